#!/usr/bin/env python
"""BLEU against training updates and against CPU hours for several fairseq-train runs, on the same axes.

    python scripts/plot_curves.py --run "AR transformer=runs/ar" --run "LT em=runs/lt" --out curves.png [--cores 2]

Each run directory holds the ``train.log`` that fairseq-train wrote with ``--log-format json --log-file`` and
``--eval-bleu`` (its validation lines carry ``valid_bleu``). For a task that scores no BLEU while it validates
(fairseq's ``translation_lev`` NAT/CMLM), ``scripts/experiments.py curve`` decodes the run's kept checkpoints into
``valid_bleu.log`` beside ``train.log``; its points are read too. Training time is the sum of fairseq's per-interval
``train_wall`` up to each validation (validation and checkpointing not counted), times ``--cores`` for CPU hours.
Prints the points as a table too.
"""
import argparse
import json
import os
import sys


def curve(log_path):
    """[(update, train seconds so far, valid BLEU)] from a fairseq json log and, when present, the
    ``valid_bleu.log`` beside it (the latest value per update)."""
    wall, points = {}, {}
    extra = os.path.join(os.path.dirname(log_path), "valid_bleu.log")
    for path in [log_path] + ([extra] if os.path.isfile(extra) else []):
        for line in open(path, encoding="utf-8"):
            if not line.startswith('{"'):
                continue
            d = json.loads(line)
            if "train_wall" in d and "num_updates" in d:
                wall[int(d["num_updates"])] = float(d["train_wall"])
            if "valid_bleu" in d and "valid_num_updates" in d:
                points[int(d["valid_num_updates"])] = float(d["valid_bleu"])
    out = []
    for u in sorted(points):
        secs = sum(w for x, w in wall.items() if x <= u)
        out.append((u, secs, points[u]))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", action="append", required=True, metavar="LABEL=DIR", help="a run (repeatable)")
    p.add_argument("--out", required=True, help="PNG to write (refused if it exists, unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--cores", type=float, default=2.0, help="CPU cores each run used (for CPU hours)")
    p.add_argument("--title", default="valid BLEU during training")
    args = p.parse_args(argv)
    curves = {}
    for spec in args.run:
        label, sep, path = spec.partition("=")
        if not sep:
            sys.exit(f"plot_curves.py: --run wants LABEL=DIR, got {spec!r}")
        log = os.path.join(path, "train.log")
        if not os.path.isfile(log):
            sys.exit(f"plot_curves.py: no train.log in {path}")
        points = curve(log)
        if not points:
            sys.exit(f"plot_curves.py: {log} has no valid_bleu (train with --eval-bleu, or run "
                     "`experiments.py curve` for a translation_lev model)")
        curves[label] = points
    if not args.cores > 0:
        sys.exit(f"plot_curves.py: --cores must be > 0, got {args.cores}")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from io_checks import check_output

    check_output(args.out, args.overwrite, "plot_curves.py", "--out")

    import logging

    import matplotlib

    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for label, points in curves.items():
        u, secs, bleu = zip(*points)
        axes[0].plot(u, bleu, marker=".", label=label)
        axes[1].plot([s * args.cores / 3600 for s in secs], bleu, marker=".", label=label)
    axes[0].set(xlabel="training updates", ylabel="BLEU", title=args.title)
    axes[1].set(xlabel=f"CPU hours of training ({args.cores:g} core{'' if args.cores == 1 else 's'} per run)",
                title=args.title)
    axes[0].grid(alpha=0.3)
    axes[1].grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print("| run | update | train seconds | BLEU |\n|---|---|---|---|")
    for label, points in curves.items():
        for u, s, b in points:
            print(f"| {label} | {u} | {s:.0f} | {b:.2f} |")
    print(f"plot_curves.py: wrote {args.out}")


if __name__ == "__main__":
    main()
