"""Checks the scripts run on their inputs and outputs before any work starts.

Checkpoints: what a checkpoint is, read before any model is built or any data is loaded, so that a missing,
corrupt or wrong file (an image_ae checkpoint, an autoregressive model where a Latent Transformer is needed or the
reverse, a model of another dictionary) is named in one line instead of failing later inside fairseq:

    from io_checks import LATENT, require
    state = require(path, "dump_latents.py", LATENT, data=DATA_BIN)

Outputs: ``check_output`` refuses to replace an existing file without ``--overwrite`` and creates the missing
parent directories.
"""
import os
import sys
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
from vq_nat.checkpoint_compat import get as _get, trained_dictionary  # noqa: E402

# kinds a script can ask for
LATENT = "latent_transformer"  # a Latent Transformer (task latent_translation)
AUTOREGRESSIVE = "autoregressive"  # an autoregressive fairseq translation model (task translation)
TRANSLATION = "translation"  # any fairseq translation model
# tasks whose dictionaries are exactly the data directory's dict.<lang>.txt (no symbols added by the task)
_PLAIN_DICTIONARY_TASKS = ("translation", "latent_translation")


def read(path: str, prog: str):
    """The unpickled checkpoint, or exit naming a missing or unreadable file."""
    if not os.path.isfile(path):
        sys.exit(f"{prog}: no such checkpoint: {path}")
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated, corrupt, or not a torch file at all
        first = (str(e).splitlines() or [""])[0]
        sys.exit(f"{prog}: cannot read checkpoint {path} ({type(e).__name__}: {first}); it is corrupt, truncated or "
                 f"not a checkpoint: pass another file")


def describe(state) -> dict:
    """{"kind": "image_ae" | "latent_transformer" | "fairseq" | "unknown", "arch": str, "task": str}."""
    if not isinstance(state, dict):
        return {"kind": "unknown", "arch": "", "task": ""}
    args = state.get("args")
    if isinstance(args, dict) and "image_size" in args and "rng" in state:
        return {"kind": "image_ae", "arch": str(args.get("arch", "")), "task": "image autoencoder"}
    if "model" not in state or ("cfg" not in state and args is None):
        return {"kind": "unknown", "arch": "", "task": ""}
    cfg = state.get("cfg")
    model_cfg = _get(cfg, "model") if cfg is not None else None
    task_cfg = _get(cfg, "task") if cfg is not None else None
    arch = str(_get(model_cfg, "arch") or _get(model_cfg, "_name") or _get(args, "arch") or "")
    task = str(_get(task_cfg, "_name") or _get(args, "task") or "")
    kind = LATENT if arch.startswith("latent_transformer") or task == "latent_translation" else "fairseq"
    return {"kind": kind, "arch": arch, "task": task}


def languages(state, data: str):
    """(source, target) language of the checkpoint, or as the data directory's file names say."""
    cfg = state.get("cfg")
    task_cfg = _get(cfg, "task") if cfg is not None else state.get("args")
    src, tgt = _get(task_cfg, "source_lang"), _get(task_cfg, "target_lang")
    if src and tgt:
        return src, tgt
    # as fairseq's data_utils.infer_language_pair (without importing fairseq): from SPLIT.SRC-TGT.LANG.* files
    for name in sorted(os.listdir(data)):
        parts = name.split(".")
        if len(parts) >= 3 and len(parts[1].split("-")) == 2:
            return tuple(parts[1].split("-"))
    return None, None


def split_size(state, data: str, subset: str, prog: str) -> int:
    """Sentences in ``data``'s binarized ``subset`` for the checkpoint's language pair; exits naming a missing split."""
    src, tgt = languages(state, data)
    prefix = os.path.join(data, f"{subset}.{src}-{tgt}.{src}")
    if not os.path.isfile(prefix + ".idx"):
        sys.exit(f"{prog}: {data} has no {subset} split ({prefix}.idx); pass a split it has, e.g. valid or test")
    from fairseq.data import data_utils

    return len(data_utils.load_indexed_dataset(prefix, None))


def check_dictionaries(state, path: str, data: str, prog: str) -> None:
    """Exit when the model's embedding tables do not have the size of ``data``'s dictionaries."""
    info = describe(state)
    if info["task"] not in _PLAIN_DICTIONARY_TASKS or not os.path.isdir(data):
        return
    src, tgt = languages(state, data)
    if not (src and tgt):
        return
    weights = state["model"]
    for side, lang, keys in (("source", src, ("encoder.embed_tokens.weight",)),
                             ("target", tgt, ("decoder.embed_tokens.weight", "decoder.output_projection.weight"))):
        dict_path = os.path.join(data, f"dict.{lang}.txt")
        if not os.path.isfile(dict_path):
            sys.exit(f"{prog}: {data} has no dict.{lang}.txt, the {side} dictionary of {path} ({src}-{tgt}); pass the "
                     f"data directory the model was trained on")
        with open(dict_path, encoding="utf-8") as f:
            entries = 4 + sum(1 for line in f if line.strip())  # fairseq's <s> <pad> </s> <unk> come first
        for key in keys:
            if key in weights and weights[key].shape[0] != entries:
                sys.exit(f"{prog}: {path} was trained with a {side} dictionary of {weights[key].shape[0]} entries, "
                         f"but {dict_path} has {entries}: another dictionary; pass the data directory the model was "
                         f"trained on")
        trained = trained_dictionary(state, lang)
        if trained is not None and _symbols(trained) != _symbols(dict_path):
            sys.exit(f"{prog}: {path} was trained on {os.path.dirname(trained)}, whose dict.{lang}.txt has other "
                     f"symbols than {dict_path} (the same size, another vocabulary); pass the data directory the "
                     f"model was trained on")


def _symbols(dict_path: str):
    with open(dict_path, encoding="utf-8") as f:
        return [line.split(" ", 1)[0] for line in f if line.strip()]


def require(path: str, prog: str, want: str, data: Optional[str] = None, option: str = "--path"):
    """The checkpoint at ``path`` if it is a model of kind ``want`` (LATENT, AUTOREGRESSIVE or TRANSLATION) whose
    dictionaries match ``data``; otherwise exit with one line that names the file, what it is and what to pass."""
    state = read(path, prog)
    info = describe(state)
    what = {"image_ae": "an image_ae checkpoint (image VQ-VAE)",
            "unknown": "not a fairseq checkpoint",
            LATENT: f"a Latent Transformer checkpoint ({info['arch']})",
            "fairseq": f"a {info['arch'] or 'fairseq'} checkpoint (task {info['task'] or 'unknown'})"}[info["kind"]]
    need = {LATENT: "a latent_transformer checkpoint (task latent_translation)",
            AUTOREGRESSIVE: "an autoregressive transformer checkpoint (task translation, e.g. "
                            "scripts/train-teacher.sh)",
            TRANSLATION: "a fairseq translation checkpoint"}[want]
    ok = (info["kind"] == LATENT if want == LATENT
          else info["kind"] == "fairseq" and info["task"] == "translation" if want == AUTOREGRESSIVE
          else info["kind"] in (LATENT, "fairseq"))
    if not ok:
        sys.exit(f"{prog}: {option} {path} is {what}; pass {need}")
    if data is not None:
        check_dictionaries(state, path, data, prog)
    return state


def read_lines(path: str, prog: str, option: str = "--ref"):
    """The lines of a UTF-8 text file (newlines stripped); bad bytes name the file and line in one message."""
    with open(path, "rb") as f:
        raw = f.read().split(b"\n")
    if raw and raw[-1] == b"":
        raw.pop()
    lines = []
    for i, line in enumerate(raw, 1):
        try:
            lines.append(line.decode("utf-8").rstrip("\r"))
        except UnicodeDecodeError as e:
            sys.exit(f"{prog}: {option} {path}, line {i}, is not UTF-8 ({e.reason} at byte {e.start}); "
                     f"convert the file, e.g. with iconv")
    return lines


def check_output(path: str, overwrite: bool, prog: str, option: str) -> None:
    """Before any work: exit when ``path`` exists (unless ``overwrite``) or is a directory; create its parents."""
    if os.path.isdir(path):
        sys.exit(f"{prog}: {option} {path} is a directory; name a file")
    if os.path.exists(path) and not overwrite:
        sys.exit(f"{prog}: {option} {path} exists; pass --overwrite to replace it, or choose another file")
    parent = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        sys.exit(f"{prog}: cannot create the directory of {option} {path}: {e}")



def main(argv=None) -> None:
    """``python scripts/io_checks.py KIND CHECKPOINT [--data DATA_BIN] [--prog NAME] [--option NAME]``: the checkpoint
    check for shell scripts (exit 0 when it is a model of KIND, else one line on stderr and exit 1)."""
    import argparse

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("kind", choices=(LATENT, AUTOREGRESSIVE, TRANSLATION))
    p.add_argument("checkpoint")
    p.add_argument("--data")
    p.add_argument("--prog", default="io_checks.py")
    p.add_argument("--option", default="--path")
    a = p.parse_args(argv)
    require(a.checkpoint, a.prog, a.kind, data=a.data, option=a.option)


if __name__ == "__main__":
    main()
