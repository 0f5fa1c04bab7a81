#!/usr/bin/env python
"""Average the weights of fairseq checkpoints (as fairseq's own ``scripts/average_checkpoints.py``), for latent
transformers and any other fairseq model.

    python scripts/average_checkpoints.py --inputs CK1.pt CK2.pt ... --output AVG.pt
    python scripts/average_checkpoints.py --inputs SAVE_DIR --num-update-checkpoints 5 --output AVG.pt

Every floating-point tensor of the model (weights, the codebook, the EMA counts and sums of eq.4-5) is the mean
over the checkpoints, computed in fp64 and stored in its own dtype. Integer and boolean tensors (e.g. the
quantizer's ``initialized`` flag) are not averaged: they are taken from the last checkpoint given, after checking
that every checkpoint agrees on their shape. The output keeps the last checkpoint's configuration, so
``fairseq-generate --path AVG.pt`` decodes it like any checkpoint. ``--num-update-checkpoints N`` with a directory
takes its N newest ``checkpoint_*_<updates>.pt`` (``--save-interval-updates``).
"""
import argparse
import os
import re
import sys

import torch


def newest_update_checkpoints(directory: str, n: int):
    found = []
    for name in os.listdir(directory):
        m = re.fullmatch(r"checkpoint_\d+_(\d+)\.pt", name)
        if m:
            found.append((int(m[1]), os.path.join(directory, name)))
    if len(found) < n:
        raise SystemExit(f"average_checkpoints.py: {directory} has {len(found)} checkpoint_*_<updates>.pt files, "
                         f"fewer than --num-update-checkpoints {n}")
    return [path for _, path in sorted(found)[-n:]]


def average(paths):
    from fairseq import checkpoint_utils

    total, last = None, None
    for path in paths:
        state = checkpoint_utils.load_checkpoint_to_cpu(path)
        model = state["model"]
        if total is None:
            total = {k: v.double().clone() if v.is_floating_point() else None for k, v in model.items()}
            keys = set(model)
        elif set(model) != keys:
            raise SystemExit(f"average_checkpoints.py: {path} holds other parameters than {paths[0]} "
                             f"(differs in {sorted(set(model) ^ keys)[:5]}): not the same model")
        else:
            for k, v in model.items():
                if v.shape != last["model"][k].shape:
                    raise SystemExit(f"average_checkpoints.py: {k} has shape {tuple(v.shape)} in {path}, "
                                     f"{tuple(last['model'][k].shape)} before: not the same model")
                if total[k] is not None:
                    total[k] += v.double()
        last = state
    out = dict(last)
    out["model"] = {k: v if total[k] is None else (total[k] / len(paths)).to(v.dtype)
                    for k, v in last["model"].items()}
    out["last_optimizer_state"] = None  # meaningless for an average (fairseq's script drops it too)
    from omegaconf import OmegaConf

    if OmegaConf.is_config(out.get("cfg")):  # stored as plain containers, as fairseq's save_checkpoint does
        out["cfg"] = OmegaConf.to_container(out["cfg"])
    return out


def _cfg(state, section, key):
    cfg = state.get("cfg") or {}
    part = cfg.get(section) if hasattr(cfg, "get") else None
    return part.get(key) if hasattr(part, "get") else getattr(part, key, None)


def _run_data(state):
    return str(_cfg(state, "task", "data"))


def _run_seed(state):
    return str(_cfg(state, "common", "seed"))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--inputs", nargs="+", required=True, help="checkpoint files, or one directory")
    p.add_argument("--output", required=True, help="refused if it exists, unless --overwrite")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument("--num-update-checkpoints", type=int, default=None,
                   help="with a directory: average its N newest checkpoint_*_<updates>.pt")
    args = p.parse_args(argv)
    prog = "average_checkpoints.py"
    if args.num_update_checkpoints is not None and args.num_update_checkpoints < 1:
        raise SystemExit(f"{prog}: --num-update-checkpoints must be >= 1, got {args.num_update_checkpoints}")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from io_checks import TRANSLATION, check_output, describe, require

    check_output(args.output, args.overwrite, prog, "--output")

    import vq_nat

    vq_nat.register()  # torch >= 2.6 weights-only loading of fairseq checkpoints
    paths = args.inputs
    if len(paths) == 1 and os.path.isdir(paths[0]):
        if not args.num_update_checkpoints:
            raise SystemExit("average_checkpoints.py: a directory needs --num-update-checkpoints N")
        paths = newest_update_checkpoints(paths[0], args.num_update_checkpoints)
    # every input read and checked before any averaging: one line naming a missing, corrupt or foreign file
    states = {path: require(path, prog, TRANSLATION, option="--inputs") for path in paths}
    for what, get in (("models", lambda st: describe(st)["arch"]), ("training data", _run_data),
                      ("seeds", _run_seed)):
        values = {path: get(st) for path, st in states.items()}
        if len(set(values.values())) > 1:
            raise SystemExit(f"{prog}: the checkpoints have different {what} ("
                             + ", ".join(f"{os.path.basename(p)}: {v}" for p, v in values.items())
                             + "); average checkpoints of one run")
    del states
    state = average(paths)
    from fairseq.file_io import PathManager

    tmp = args.output + ".tmp"
    with PathManager.open(tmp, "wb") as f:
        torch.save(state, f)
    os.replace(tmp, args.output)
    print(f"averaged {len(paths)} checkpoints into {args.output}: " + ", ".join(os.path.basename(x) for x in paths))


if __name__ == "__main__":
    sys.exit(main())
