"""Robustness of VQ-VAE (hard EM) vs soft EM across seeds: the claim of Roy et al. 2018, Figure 5.

    python -m image_ae.robustness --seeds 1 2 3 --bottlenecks vq em --save-dir runs/robust \
        --dataset cifar10 --data-dir data/cifar10_jpg --max-steps 2000 [any other image_ae.train option]

Trains one model per (bottleneck, seed) in ``SAVE_DIR/<bottleneck>_seed<seed>/`` (each resumable: a rerun
continues or only re-evaluates finished runs), then writes
  robustness.md / robustness.json   a table: final MSE, PSNR, code perplexity, used codes, E-step posterior
                                    entropy, collapsed or not,
                                    and per-bottleneck mean / std / worst PSNR
  robustness.png                    PSNR and code usage per run
  robustness_curves.png             every run's eval PSNR and code perplexity against training steps
  robustness_recons.png             every run's final reconstructions (Figure 5: VQ-VAE left, EM right)
A run counts as collapsed when the perplexity of its nearest-code assignments on the evaluation split is
below ``--collapse-frac`` x num_codes (i.e. it effectively uses fewer than that fraction of the codebook).
"""
import argparse
import json
import logging
import math
import os
import sys
import time
from typing import List, Optional

from . import train as train_mod

logger = logging.getLogger("image_ae")


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="N seeds x {vq, em} -> table + figure (Roy et al. 2018, Fig. 5)",
                                epilog="Every other option is passed on to image_ae.train.")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--bottlenecks", nargs="+", choices=("vq", "em"), default=["vq", "em"])
    p.add_argument("--save-dir", required=True)
    p.add_argument("--collapse-frac", type=float, default=0.1,
                   help="collapsed: eval code perplexity < this fraction of num_codes")
    p.add_argument("--fresh", action="store_true", help="retrain runs that already have a checkpoint")
    return p


def _stats(values: List[float]):
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def write_table(rows: List[dict], path: str, collapse_frac: float, train_args: List[str]) -> str:
    lines = [
        "| bottleneck | seed | steps | MSE | PSNR (dB) | code ppl | codes used | posterior entropy (nats) | collapsed "
        "| train time (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['bottleneck']} | {r['seed']} | {r['step']} | {r['mse']:.5f} | {r['psnr']:.2f} | "
            f"{r['code_ppl']:.1f} | {r['codes_used']}/{r['num_codes']} | {r['posterior_entropy']:.3f} | "
            f"{'yes' if r['collapsed'] else 'no'} | "
            f"{r['train_time_s']:.0f} |"
        )
    lines += ["", "| bottleneck | runs | PSNR mean ± std | worst PSNR | mean code ppl | collapsed |",
              "|---|---:|---:|---:|---:|---:|"]
    for b in dict.fromkeys(r["bottleneck"] for r in rows):
        sel = [r for r in rows if r["bottleneck"] == b]
        m, s = _stats([r["psnr"] for r in sel])
        ppl, _ = _stats([r["code_ppl"] for r in sel])
        lines.append(f"| {b} | {len(sel)} | {m:.2f} ± {s:.2f} | {min(r['psnr'] for r in sel):.2f} | {ppl:.1f} | "
                     f"{sum(r['collapsed'] for r in sel)}/{len(sel)} |")
    lines += ["", f"collapsed = eval code perplexity < {collapse_frac} x num_codes. "
              f"Training options: `{' '.join(train_args)}`"]
    text = "\n".join(lines) + "\n"
    with open(path, "w") as f:
        f.write(text)
    return text


def plot(rows: List[dict], save_dir: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bns = list(dict.fromkeys(r["bottleneck"] for r in rows))
    colors = {"vq": "tab:red", "em": "tab:blue"}
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for i, b in enumerate(bns):
        sel = [r for r in rows if r["bottleneck"] == b]
        xs = [i + 0.08 * (j - (len(sel) - 1) / 2) for j in range(len(sel))]
        for ax, key in zip(axes, ("psnr", "code_ppl")):
            ax.scatter(xs, [r[key] for r in sel], color=colors.get(b), s=40, zorder=3)
            for x, r in zip(xs, sel):
                if r["collapsed"]:
                    ax.scatter([x], [r[key]], marker="x", color="k", s=80, zorder=4)
    for ax, title in zip(axes, ("final eval PSNR (dB)", "eval code perplexity (x = collapsed)")):
        ax.set_xticks(range(len(bns)))
        ax.set_xticklabels({"vq": "VQ-VAE (hard EM)", "em": "soft EM"}.get(b, b) for b in bns)
        ax.set_xlim(-0.5, len(bns) - 0.5)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[1].axhline(rows[0]["num_codes"], color="gray", ls=":", lw=0.8)
    fig.suptitle(f"{len(rows) // max(1, len(bns))} seeds per bottleneck, {rows[0]['step']} steps")
    fig.tight_layout()
    fig.savefig(os.path.join(save_dir, "robustness.png"), dpi=90)
    plt.close(fig)

    # every run's evaluation curves: PSNR and code perplexity against training steps
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for r in rows:
        evals = train_mod.read_jsonl(os.path.join(r["run_dir"], "metrics.jsonl"))
        steps = [e["step"] for e in evals]
        for ax, key in zip(axes, ("psnr", "code_ppl")):
            ax.plot(steps, [e[key] for e in evals], color=colors.get(r["bottleneck"]), alpha=0.7, lw=1.2,
                    label=f"{r['bottleneck']} seed {r['seed']}")
    for ax, title in zip(axes, ("eval PSNR (dB)", "eval code perplexity")):
        ax.set_xlabel("training step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[1].set_yscale("log")
    handles = {}
    for line in axes[0].get_lines():
        handles.setdefault(line.get_label().split()[0], line)
    axes[0].legend(list(handles.values()), [{"vq": "VQ-VAE (hard EM)", "em": "soft EM"}.get(k, k) for k in handles])
    fig.tight_layout()
    fig.savefig(os.path.join(save_dir, "robustness_curves.png"), dpi=90)
    plt.close(fig)

    # Figure-5 style montage: one row per seed, one column per bottleneck
    seeds = list(dict.fromkeys(r["seed"] for r in rows))
    fig, axes = plt.subplots(len(seeds), len(bns), figsize=(5 * len(bns), 1.6 * len(seeds) + 0.6), squeeze=False)
    for r in rows:
        ax = axes[seeds.index(r["seed"])][bns.index(r["bottleneck"])]
        img_path = os.path.join(r["run_dir"], f"recon_{r['step']}.png")
        if os.path.exists(img_path):
            ax.imshow(plt.imread(img_path), cmap="gray")
        ax.set_title(f"{r['bottleneck']} seed {r['seed']}: {r['psnr']:.1f} dB, ppl {r['code_ppl']:.0f}", fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(os.path.join(save_dir, "robustness_recons.png"), dpi=110)
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> List[dict]:
    args, train_args = get_parser().parse_known_args(argv)
    for bad in ("--seed", "--bottleneck", "--resume", "--overwrite"):
        if any(a == bad or a.startswith(bad + "=") for a in train_args):
            raise SystemExit(f"{bad} is set per run by image_ae.robustness; do not pass it")
    if not 0.0 < args.collapse_frac <= 1.0:
        raise SystemExit(f"--collapse-frac must be in (0, 1], got {args.collapse_frac}")
    if len(set(args.seeds)) != len(args.seeds) or len(set(args.bottlenecks)) != len(args.bottlenecks):
        raise SystemExit(f"--seeds {args.seeds} and --bottlenecks {args.bottlenecks} must not repeat a value (each "
                         f"pair is one run directory)")
    os.makedirs(args.save_dir, exist_ok=True)
    rows = []
    for seed in args.seeds:  # seed by seed, so an interrupted study has as many runs of each bottleneck
        for b in args.bottlenecks:
            run_dir = os.path.join(args.save_dir, f"{b}_seed{seed}")
            run_args = train_args + ["--bottleneck", b, "--seed", str(seed), "--save-dir", run_dir]
            run_args.append("--overwrite" if args.fresh else "--resume")
            logger.info("=== %s seed %d -> %s", b, seed, run_dir)
            t = time.time()
            m = train_mod.main(run_args)
            log = train_mod.read_jsonl(os.path.join(run_dir, "train_log.jsonl"))
            rows.append({
                "bottleneck": b, "seed": seed, "step": m["step"], "mse": m["mse"], "psnr": m["psnr"],
                "code_ppl": m["code_ppl"], "codes_used": m["codes_used"], "num_codes": m["num_codes"],
                "posterior_entropy": m.get("posterior_entropy", float("nan")),  # older runs' metrics lack it
                "collapsed": m["code_ppl"] < args.collapse_frac * m["num_codes"],
                "train_time_s": log[-1]["elapsed_s"] if log else time.time() - t,
                "wall_this_call_s": time.time() - t, "run_dir": run_dir,
            })
    rows.sort(key=lambda r: (args.bottlenecks.index(r["bottleneck"]), r["seed"]))
    with open(os.path.join(args.save_dir, "robustness.json"), "w") as f:
        json.dump(rows, f, indent=2)
    text = write_table(rows, os.path.join(args.save_dir, "robustness.md"), args.collapse_frac, train_args)
    plot(rows, args.save_dir)
    print(text)
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
