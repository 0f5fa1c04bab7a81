"""Drive fairseq's own command-line entry points in-process, as fairseq's tests/test_binaries.py does."""
import contextlib
import io
import os
import random
import sys
from typing import List, Optional

USER_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "vq_nat")


def write_parallel(dirname: str, split: str, pairs) -> None:
    with open(os.path.join(dirname, f"{split}.src"), "w") as fs, open(os.path.join(dirname, f"{split}.tgt"), "w") as ft:
        for src, tgt in pairs:
            fs.write(src + "\n")
            ft.write(tgt + "\n")


def make_copy_task(dirname: str, n_train=800, n_valid=40, n_test=24, vocab=12, max_len=9, seed=0, reverse=False):
    """A small deterministic translation task: y = x (or reversed x) over a tiny vocabulary."""
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(vocab)]

    def pairs(n):
        out = []
        for _ in range(n):
            s = [rng.choice(words) for _ in range(rng.randint(2, max_len))]
            out.append((" ".join(s), " ".join(reversed(s) if reverse else s)))
        return out

    os.makedirs(dirname, exist_ok=True)
    for split, n in (("train", n_train), ("valid", n_valid), ("test", n_test)):
        write_parallel(dirname, split, pairs(n))


def preprocess(raw_dir: str, dest_dir: str, extra: Optional[List[str]] = None) -> None:
    from fairseq_cli import preprocess as preprocess_cli

    parser = preprocess_cli.options.get_preprocessing_parser()
    args = parser.parse_args(
        ["--source-lang", "src", "--target-lang", "tgt", "--joined-dictionary", "--workers", "1",
         "--trainpref", os.path.join(raw_dir, "train"), "--validpref", os.path.join(raw_dir, "valid"),
         "--testpref", os.path.join(raw_dir, "test"), "--destdir", dest_dir] + (extra or [])
    )
    preprocess_cli.main(args)


TINY = [
    "--arch", "latent_transformer_tiny", "--encoder-embed-dim", "32", "--decoder-embed-dim", "32",
    "--encoder-ffn-embed-dim", "64", "--decoder-ffn-embed-dim", "64", "--encoder-layers", "1",
    "--decoder-layers", "1", "--latent-layers", "1", "--encoder-attention-heads", "2",
    "--decoder-attention-heads", "2", "--num-codes", "16", "--num-compress-steps", "3",
]


def train(data_bin: str, save_dir: str, extra: Optional[List[str]] = None, arch_flags=TINY) -> None:
    from fairseq import distributed_utils, options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq_cli import train as train_cli

    parser = options.get_training_parser()
    args = options.parse_args_and_arch(
        parser,
        [data_bin, "--user-dir", USER_DIR, "--task", "latent_translation", "--criterion", "latent_vq",
         "--optimizer", "adam", "--lr", "0.001", "--max-tokens", "500", "--max-update", "3", "--cpu",
         "--save-dir", save_dir, "--no-progress-bar", "--log-interval", "1", "--num-workers", "0",
         "--seed", "1"] + list(arch_flags) + (extra or []),
    )
    distributed_utils.call_main(convert_namespace_to_omegaconf(args), train_cli.main)


def generate(data_bin: str, checkpoint: str, extra: Optional[List[str]] = None) -> str:
    from fairseq import options
    from fairseq_cli import generate as generate_cli

    parser = options.get_generation_parser()
    args = options.parse_args_and_arch(
        parser,
        [data_bin, "--user-dir", USER_DIR, "--task", "latent_translation", "--path", checkpoint, "--cpu",
         "--batch-size", "8", "--num-workers", "0"] + (extra or []),
    )
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        generate_cli.main(args)
    return out.getvalue()


def interactive(data_bin: str, checkpoint: str, lines: List[str], extra: Optional[List[str]] = None) -> str:
    from fairseq import options
    from fairseq_cli import interactive as interactive_cli

    parser = options.get_interactive_generation_parser()
    args = options.parse_args_and_arch(
        parser,
        [data_bin, "--user-dir", USER_DIR, "--task", "latent_translation", "--path", checkpoint, "--cpu",
         "--source-lang", "src", "--target-lang", "tgt"] + (extra or []),
    )
    out = io.StringIO()
    old_stdin = sys.stdin
    sys.stdin = io.StringIO("".join(line + "\n" for line in lines))
    try:
        with contextlib.redirect_stdout(out):
            interactive_cli.main(args)
    finally:
        sys.stdin = old_stdin
    return out.getvalue()


def hypotheses(output: str) -> dict:
    """{id: hypothesis string} from fairseq-generate / -interactive output."""
    hyps = {}
    for line in output.splitlines():
        if line.startswith("H-"):
            parts = line.split("\t")
            hyps[int(parts[0][2:])] = parts[2] if len(parts) > 2 else ""
    return hyps


# ---------------------------------------------------------------------------------------------------------
# Helpers for tests/test_reliability.py (added; the helpers above are unchanged)


def free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_distributed_rank(rank: int, data_bin: str, save_root: str, port: int, world_size: int, runs,
                           capture_dir: str) -> None:
    """One rank of a CPU/gloo fairseq-train (for ``torch.multiprocessing.spawn``), launched as INSTALL-NOTES says.

    ``runs``: list of (name, extra flags); they train one after the other in the same process group (fairseq's
    ``distributed_init`` reuses an initialised group). ``checkpoint_utils.save_checkpoint`` (called on every
    rank) is wrapped to also save this rank's unwrapped model state to ``capture_dir/{name}.rank{rank}.pt``; the
    last save of a run is its final state.
    """
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    import torch
    from fairseq import checkpoint_utils

    torch.set_num_threads(1)
    original = checkpoint_utils.save_checkpoint
    current = {}

    def save_and_capture(cfg, trainer, epoch_itr, val_loss):
        state = {k: v.detach().clone() for k, v in trainer.get_model().state_dict().items()}
        torch.save({"num_updates": trainer.get_num_updates(), "model": state},
                   os.path.join(capture_dir, f"{current['name']}.rank{rank}.pt"))
        return original(cfg, trainer, epoch_itr, val_loss)

    checkpoint_utils.save_checkpoint = save_and_capture
    dist_flags = ["--distributed-backend", "gloo", "--distributed-world-size", str(world_size),
                  "--distributed-init-method", f"tcp://127.0.0.1:{port}", "--distributed-no-spawn",
                  "--distributed-rank", str(rank), "--ddp-backend", "legacy_ddp", "--device-id", "0"]
    try:
        for name, extra in runs:
            current["name"] = name
            train(data_bin, os.path.join(save_root, name), dist_flags + list(extra))
    finally:
        checkpoint_utils.save_checkpoint = original
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def build_task_and_model(dict_dir: str, extra: Optional[List[str]] = None, vocab: int = 12, seed: int = 0):
    """(task, model, criterion) of latent_translation over a w0..w{vocab-1} dictionary, built in-process."""
    import torch
    from fairseq import options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    os.makedirs(dict_dir, exist_ok=True)
    for lang in ("src", "tgt"):
        with open(os.path.join(dict_dir, f"dict.{lang}.txt"), "w") as f:
            for i in range(vocab):
                f.write(f"w{i} {100 - i}\n")
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(
        parser,
        [dict_dir, "--user-dir", USER_DIR, "--task", "latent_translation", "--criterion", "latent_vq",
         "--source-lang", "src", "--target-lang", "tgt", "--optimizer", "adam", "--lr", "1e-3", "--cpu"]
        + TINY + (extra or []),
    )
    cfg = convert_namespace_to_omegaconf(args)
    task = tasks.setup_task(cfg.task)
    torch.manual_seed(seed)
    model = task.build_model(cfg.model)
    criterion = task.build_criterion(cfg.criterion)
    return task, model, criterion


def make_sample(dictionary, lengths, seed: int = 0, words=None):
    """A right-padded target / left-padded source batch (target = reversed source) with the given lengths
    (EOS not counted); ``words``: optional list of token-id lists to use instead of random words."""
    import torch

    g = torch.Generator().manual_seed(seed)
    pad, eos = dictionary.pad(), dictionary.eos()
    if words is not None:
        lengths = [len(w) for w in words]
    b, t = len(lengths), max(lengths) + 1
    src = torch.full((b, t), pad)
    tgt = torch.full((b, t), pad)
    for i, n in enumerate(lengths):
        w = (torch.tensor(words[i], dtype=torch.long) if words is not None
             else torch.randint(dictionary.nspecial, len(dictionary), (n,), generator=g))
        src[i, t - n - 1 : t - 1] = w
        src[i, t - 1] = eos
        tgt[i, :n] = w.flip(0)
        tgt[i, n] = eos
    return {
        "id": torch.arange(b),
        "nsentences": b,
        "ntokens": int(tgt.ne(pad).sum()),
        "net_input": {"src_tokens": src, "src_lengths": torch.tensor([n + 1 for n in lengths])},
        "target": tgt,
    }


class BackwardOnly:
    """The part of a FairseqOptimizer that ``FairseqTask.train_step`` uses (``backward``)."""

    def backward(self, loss):
        loss.backward()
