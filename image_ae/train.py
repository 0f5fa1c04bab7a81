"""Train an image VQ-VAE with a hard-EM (``--bottleneck vq``) or soft-EM (``--bottleneck em``) bottleneck.

    python -m image_ae.train --dataset cifar10 --data-dir data/cifar10_jpg --bottleneck em --save-dir runs/em
    vq-image-ae ...   (same options; console script)

Writes to ``--save-dir``:
  checkpoint_last.pt   model (incl. the quantizer's EMA buffers), optimizer, step, RNG states, config;
                       ``--resume`` continues from it exactly (same parameters as an uninterrupted run)
  metrics.jsonl        one JSON line per evaluation: step, mse, psnr, code_ppl, codes_used, ...
  train_log.jsonl      training loss / code usage every ``--log-interval`` steps
  recon_<step>.png     originals (top row) above their reconstructions (bottom row)
  curves.png           loss and code-usage curves
  config.json          the resolved options
An evaluation always runs at the end of training, however short.

Metrics (on ``--eval-samples`` images evenly spaced over the evaluation split (all by default), pixels in [0, 1]):
  mse = mean squared error per pixel and channel of the clamped reconstruction;
  psnr = 10 log10(1 / mse) (dB);
  code_ppl = exp(entropy) of the distribution of nearest-code assignments over all latents of the split;
  codes_used = number of distinct codes that are the nearest code of at least one latent
  (``codes_used_frac`` = codes_used / num_codes). For ``em`` the nearest code is the mode of the sampled
  posterior; ``sample_code_ppl`` is the perplexity of the codes actually sampled;
  posterior_entropy = mean entropy (nats) per latent of the E-step posterior q(j | z_e) = softmax_j(-||z_e -
  e_j||^2 / T), T = ``--soft-em-temperature`` (0 when one-hot, log K when uniform; it rises with T). Soft EM
  samples from it; for ``vq`` it is what soft EM at T would sample from.
"""
import argparse
import json
import logging
import math
import os
import random
import sys
import time
from typing import List, Optional

import numpy as np
import torch
import torch.nn.functional as F

from .data import DATASETS, DatasetNotFoundError, build_splits
from vq_nat.modules.output import code_perplexity
from vq_nat.modules.vector_quantizer import MIN_TEMPERATURE

from .models import PRESETS, ImageAutoencoder, build_config, count_parameters

logger = logging.getLogger("image_ae")

CHECKPOINT = "checkpoint_last.pt"
# options fixed by the checkpoint on --resume (they define the model, its codebook and the data order)
MODEL_KEYS = ("arch", "bottleneck", "num_samples", "num_codes", "code_dim", "hidden_dim", "res_hidden_dim",
              "latents_per_position", "num_downsample", "num_residual", "update", "decay", "epsilon", "beta",
              "temperature", "kmeans_init", "dead_code_threshold", "latent_norm", "image_size", "channels", "seed")


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vq-image-ae", description="Image VQ-VAE with hard-EM (vq) or soft-EM (em) bottleneck (Roy et al. 2018)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=DATASETS, default="cifar10")
    g.add_argument("--data-dir", default=None,
                   help="torchvision root, or ImageFolder root (D/<class>/... or D/train/<class>/... + D/test/...)")
    g.add_argument("--download", action="store_true", help="let torchvision download the dataset into --data-dir")
    g.add_argument("--image-size", type=int, default=32, help="images are resized and centre-cropped to this")
    g.add_argument("--channels", choices=("auto", "1", "3"), default="auto",
                   help="auto: 1 if every image is grayscale, else 3")
    g.add_argument("--val-fraction", type=float, default=0.1,
                   help="held-out fraction for an ImageFolder without train/ and test/")
    g.add_argument("--no-cache", action="store_true", help="read ImageFolder files on demand instead of in memory "
                   "(a corrupt file is then reported when it is first read, not at start-up)")
    g.add_argument("--num-workers", type=int, default=0, help="DataLoader workers with --no-cache")

    g = p.add_argument_group("model")
    g.add_argument("--arch", choices=sorted(PRESETS), default="vqvae",
                   help="paper: Roy et al. App. A (8x8x10 latents, 256 codes of 512); vqvae: van den Oord et al.")
    g.add_argument("--bottleneck", choices=("vq", "em"), default="vq",
                   help="vq: nearest code (VQ-VAE / hard EM); em: soft EM with --num-samples samples")
    g.add_argument("--num-samples", type=int, default=10, help="m, samples per latent for soft EM")
    g.add_argument("--num-codes", type=int, default=None, help="codebook size K (preset: paper 256, vqvae 512)")
    g.add_argument("--code-dim", type=int, default=None, help="code dimension (preset: paper 512, vqvae 64)")
    g.add_argument("--hidden-dim", type=int, default=None, help="conv channels (preset: paper 512, vqvae 128)")
    g.add_argument("--res-hidden-dim", type=int, default=None, help="residual-layer channels (preset: paper "
                   "= hidden, vqvae 32)")
    g.add_argument("--latents-per-position", type=int, default=None, help="latents per grid cell (paper 10)")
    g.add_argument("--num-downsample", type=int, default=None,
                   help="stride-2 layers (default: as many as bring the image to the 8x8 latent grid)")
    g.add_argument("--num-residual", type=int, default=2)
    g.add_argument("--codebook-update", "--update", dest="update", choices=("ema", "grad"), default="ema",
                   help="codebook M-step (as fairseq's --codebook-update)")
    g.add_argument("--codebook-decay", "--decay", dest="decay", type=float, default=0.999,
                   help="EMA decay lambda (eq.4-5)")
    g.add_argument("--codebook-epsilon", "--epsilon", dest="epsilon", type=float, default=1e-5,
                   help="Laplace smoothing of EMA counts")
    g.add_argument("--commitment-beta", "--beta", dest="beta", type=float, default=0.25, help="commitment loss weight")
    g.add_argument("--soft-em-temperature", "--temperature", dest="temperature", type=float, default=0.1,
                   help="soft-EM temperature T of q(j|z_e) = softmax(-||z_e - e_j||^2 / T); 0.1 suits the "
                   "layer-normalised z_e (--latent-norm layer): about 3 nats of posterior entropy in training")
    g.add_argument("--kmeans-init", action=argparse.BooleanOptionalAction, default=True,
                   help="initialise the codebook by k-means on the first batch's z_e (without it the codes start "
                   "as N(0, I) draws, most far from every z_e, and VQ-VAE uses a handful of them)")
    g.add_argument("--dead-code-threshold", type=float, default=0.0, help="re-seed codes with EMA count below")
    g.add_argument("--latent-norm", choices=("layer", "none"), default="layer",
                   help="layer: layer-normalise z_e over code_dim (no gain), putting it on the scale of the codes' "
                   "N(0, I) init, as the translation model's z_e; none: the raw 1x1-conv output")

    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=float, default=None, help="training length in epochs (default 10 when "
                   "--max-steps is not given); with both, the shorter wins")
    g.add_argument("--max-steps", type=int, default=None, help="training length in updates")
    g.add_argument("--batch-size", type=int, default=32)
    g.add_argument("--lr", type=float, default=3e-4)
    g.add_argument("--warmup-steps", type=int, default=0, help="linear learning-rate warm-up")
    g.add_argument("--lr-half-life", type=int, default=0,
                   help="exponential decay after warm-up: lr halves every this many steps (0: constant)")
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--clip-norm", type=float, default=0.0, help="gradient-norm clipping (0: off)")
    g.add_argument("--seed", type=int, default=1)
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    g.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")

    g = p.add_argument_group("output")
    g.add_argument("--save-dir", default="checkpoints/image_ae",
                   help="created if missing; one that holds a run needs --resume or --overwrite")
    g.add_argument("--resume", nargs="?", const="auto", default=None,
                   help=f"continue from a checkpoint (no value: SAVE_DIR/{CHECKPOINT} if it exists)")
    g.add_argument("--overwrite", action="store_true",
                   help="start from scratch in a --save-dir that holds a run, deleting its checkpoint, logs and "
                   "images")
    g.add_argument("--eval-interval", type=int, default=0, help="evaluate every N steps (0: every epoch); "
                   "always at the end")
    g.add_argument("--save-interval", type=int, default=0, help="checkpoint every N steps (0: at each "
                   "evaluation); always at the end")
    g.add_argument("--eval-samples", type=int, default=0,
                   help="evaluate on N images evenly spaced over the split, the same for every seed (0: all)")
    g.add_argument("--eval-batch-size", type=int, default=256)
    g.add_argument("--log-interval", type=int, default=50)
    g.add_argument("--num-recon", type=int, default=8, help="images in each reconstruction grid")
    g.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    g.add_argument("--no-plots", action="store_true", help="skip curves.png")
    return p


# ---------------------------------------------------------------------------------------------- options
# (dest, lowest valid value, highest valid value or None, kind): checked before any work starts
RANGES = (
    ("image_size", 1, None, int), ("val_fraction", 0.0, 1.0, "open"), ("num_workers", 0, None, int),
    ("num_samples", 1, None, int), ("num_codes", 1, None, int), ("code_dim", 1, None, int),
    ("hidden_dim", 1, None, int), ("res_hidden_dim", 1, None, int), ("latents_per_position", 1, None, int),
    ("num_downsample", 0, None, int), ("num_residual", 0, None, int), ("decay", 0.0, 1.0, "right-open"),
    ("epsilon", 0.0, None, float), ("beta", 0.0, None, float), ("temperature", MIN_TEMPERATURE, None, float),
    ("dead_code_threshold", 0.0, None, float), ("epochs", 0.0, None, "left-open"), ("max_steps", 0, None, int),
    ("batch_size", 1, None, int), ("lr", 0.0, None, "left-open"), ("warmup_steps", 0, None, int),
    ("lr_half_life", 0, None, int), ("weight_decay", 0.0, None, float), ("clip_norm", 0.0, None, float),
    ("threads", 0, None, int), ("eval_interval", 0, None, int), ("save_interval", 0, None, int),
    ("eval_samples", 0, None, int), ("eval_batch_size", 1, None, int), ("log_interval", 1, None, int),
    ("num_recon", 0, None, int),
)
# options that change nothing unless another option is set: (dest, is it in effect?, why not)
INTERACTIONS = (
    ("num_samples", lambda a: a.bottleneck == "em", "--bottleneck vq takes the nearest code (one per latent)"),
    ("temperature", lambda a: a.bottleneck == "em", "--bottleneck vq takes the nearest code and does not sample "
                                                    "(only the logged posterior_entropy is computed at it)"),
    ("decay", lambda a: a.update == "ema", "--codebook-update grad trains the codebook by gradient, not by EMA"),
    ("epsilon", lambda a: a.update == "ema", "--codebook-update grad keeps no EMA counts to smooth"),
    ("dead_code_threshold", lambda a: a.update == "ema", "--codebook-update grad keeps no EMA counts"),
    ("num_workers", lambda a: a.no_cache, "the images are in memory without --no-cache"),
)


def option_name(dest: str) -> str:
    for action in get_parser()._actions:
        if action.dest == dest:
            return action.option_strings[0]
    return "--" + dest.replace("_", "-")


def explicit_options(argv: List[str]) -> set:
    """The dests of the options given on the command line (not left at their default)."""
    p = get_parser()
    for action in p._actions:
        action.default = argparse.SUPPRESS
    return set(vars(p.parse_args(argv)))


def check_args(args, given: set) -> None:
    """Every option's range, and the options that would be silently ignored: an error (SystemExit) naming the
    option and its valid range, or a warning naming the option that changes nothing and why."""
    for dest, low, high, kind in RANGES:
        value = getattr(args, dest)
        if value is None:
            continue
        if kind is int:
            ok, bound = value >= low, f">= {low}"
        else:
            ok = math.isfinite(value) and (value > low if kind in ("left-open", "open") else value >= low)
            if high is not None:
                ok = ok and (value < high if kind in ("right-open", "open") else value <= high)
            left = "(" if kind in ("left-open", "open") else "["
            right = ")" if high is None or kind in ("right-open", "open") else "]"
            bound = f"in {left}{low:g}, {'inf' if high is None else f'{high:g}'}{right}"
        if not ok:
            raise SystemExit(f"error: {option_name(dest)} must be {bound}, got {value}")
    for dest, in_effect, why in INTERACTIONS:
        if dest in given and not in_effect(args):
            logger.warning("%s %s has no effect: %s", option_name(dest), getattr(args, dest), why)


RUN_FILES = (CHECKPOINT, "metrics.jsonl", "train_log.jsonl", "config.json", "curves.png")


def run_files(save_dir: str) -> List[str]:
    """The files of a run in ``save_dir`` (checkpoint, logs, config, images)."""
    if not os.path.isdir(save_dir):
        return []
    return sorted(f for f in os.listdir(save_dir)
                  if f in RUN_FILES or (f.startswith("recon_") and f.endswith(".png")) or f == CHECKPOINT + ".tmp")


def prepare_save_dir(args) -> List[str]:
    """Create ``--save-dir`` (and its parents), or refuse to start over in one that holds a run: a run is
    continued with ``--resume`` and replaced only with ``--overwrite``. Runs before any data is read; returns the
    previous run's files that ``--overwrite`` replaces (deleted once the new model is built)."""
    save_dir = args.save_dir
    if args.resume and args.overwrite:
        raise SystemExit("error: --resume continues a run and --overwrite replaces it; pass one of them")
    if args.resume not in (None, "auto") and not os.path.isfile(args.resume):
        raise SystemExit(f"error: --resume {args.resume}: no such checkpoint")
    if os.path.exists(save_dir) and not os.path.isdir(save_dir):
        raise SystemExit(f"error: --save-dir {save_dir} is a file, not a directory; choose another --save-dir")
    own = os.path.abspath(os.path.join(save_dir, CHECKPOINT))
    continues_own_run = args.resume == "auto" or (args.resume and os.path.abspath(args.resume) == own)
    found = run_files(save_dir)
    if found and not continues_own_run:
        if not args.overwrite:
            shown = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
            how = ("it would be overwritten by the run resumed from " + args.resume) if args.resume else \
                "starting from scratch would replace it"
            raise SystemExit(f"error: --save-dir {save_dir} already holds a run ({shown}); {how}. Pass --resume to "
                             f"continue it, --overwrite to replace it, or choose another --save-dir")
    try:
        os.makedirs(save_dir, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"error: cannot create --save-dir {save_dir}: {e}")
    return found if found and not continues_own_run else []


def check_checkpoint(path: str, state) -> None:
    """An image_ae checkpoint, or a one-line error naming what ``path`` is instead."""
    if isinstance(state, dict) and all(k in state for k in ("step", "model", "optimizer", "rng", "args")) \
            and isinstance(state["args"], dict) and "bottleneck" in state["args"]:
        return
    what = "not an image_ae checkpoint"
    if isinstance(state, dict) and ("cfg" in state or "args" in state) and "model" in state:
        what = "a fairseq checkpoint (translation model), not an image_ae one"
    raise SystemExit(f"error: --resume {path} is {what}; pass the {CHECKPOINT} that image_ae.train wrote")


# ---------------------------------------------------------------------------------------------- helpers
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise SystemExit(f"error: --device {name}: not a device; pass auto, cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise SystemExit(f"error: --device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def lr_at(step: int, args) -> float:
    lr = args.lr
    if args.warmup_steps > 0 and step < args.warmup_steps:
        return lr * (step + 1) / args.warmup_steps
    if args.lr_half_life > 0:
        lr *= 0.5 ** (max(0, step - args.warmup_steps) / args.lr_half_life)
    return lr


def rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def read_jsonl(path: str) -> List[dict]:
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path: str, rows: List[dict]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)


def append_jsonl(path: str, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> torch.Tensor:
    """Index batches (steps_per_epoch, batch_size) of one epoch: a permutation that depends on seed and epoch
    only, so that any step's batch is known from the step number (exact resume)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=gen)
    bs = min(batch_size, n)
    steps = n // bs
    return perm[: steps * bs].view(steps, bs)


def iterate_batches(ds, batches: torch.Tensor, num_workers: int = 0):
    """Yield float image batches for the given rows of index batches (in memory, or through a DataLoader)."""
    if ds.images is not None:
        for idx in batches:
            yield ds.images[idx].float().div_(255.0)
        return
    loader = torch.utils.data.DataLoader(ds, batch_sampler=[b.tolist() for b in batches], num_workers=num_workers)
    yield from loader


# ---------------------------------------------------------------------------------------------- evaluation
def eval_indices(size: int, n: int) -> torch.Tensor:
    """``n`` of ``size`` evaluation images, evenly spaced over the split (floor(i * size / n)): the same for every
    seed, and spread over the classes of a class-sorted ImageFolder instead of its first class only."""
    return torch.arange(n) * size // n


@torch.no_grad()
def evaluate(model: ImageAutoencoder, test, args, device: torch.device, step: int) -> dict:
    """Reconstruction error and code usage on the evaluation split; writes recon_<step>.png."""
    from torchvision.utils import save_image

    was_training = model.training
    model.eval()
    n = len(test) if args.eval_samples <= 0 else min(args.eval_samples, len(test))
    k = model.config.num_codes
    sq_err, pixels, entropy_sum, images = 0.0, 0, 0.0, 0
    nearest = torch.zeros(k, dtype=torch.float64)
    sampled = torch.zeros(k, dtype=torch.float64)
    shown = eval_indices(n, min(args.num_recon, n))  # positions in the evaluation sample, spread over the classes
    originals, recons, offset = [], [], 0
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # soft-EM sampling here must not move the training RNG
        torch.manual_seed(args.seed)
        for x in iterate_batches(test, eval_indices(len(test), n).split(args.eval_batch_size), args.num_workers):
            x = x.to(device)
            recon, out, z_e = model(x)
            recon = recon.clamp(0.0, 1.0)
            sq_err += float(((recon - x) ** 2).double().sum())
            pixels += x.numel()
            nearest += torch.bincount(model.nearest_codes(z_e).cpu(), minlength=k).double()
            # the sampled codes' histogram (the sum of the targets, without building the N x K targets)
            sampled += torch.bincount(out.codes.reshape(-1).cpu(), minlength=k).double() / model.quantizer.num_samples
            entropy_sum += float(out.posterior_entropy) * len(x)  # every image has the same number of latents
            images += len(x)
            here = shown[(shown >= offset) & (shown < offset + len(x))] - offset
            originals.append(x[here].cpu())
            recons.append(recon[here].cpu())
            offset += len(x)
    model.train(was_training)

    def ppl(counts: torch.Tensor) -> float:
        return float(code_perplexity(counts))

    mse = sq_err / max(pixels, 1)
    used = int((nearest > 0).sum())
    metrics = {
        "step": step,
        "mse": mse,
        "psnr": 10.0 * math.log10(1.0 / mse) if mse > 0 else float("inf"),
        "code_ppl": ppl(nearest),
        "codes_used": used,
        "codes_used_frac": used / k,
        "sample_code_ppl": ppl(sampled),
        "posterior_entropy": entropy_sum / max(images, 1),
        "num_codes": k,
        "eval_images": n,
        "bottleneck": model.config.bottleneck,
    }
    if len(shown):
        grid = torch.cat([torch.cat(originals), torch.cat(recons)])
        save_image(grid, os.path.join(args.save_dir, f"recon_{step}.png"), nrow=len(grid) // 2, padding=2,
                   pad_value=1.0)
    return metrics


def plot_curves(save_dir: str, train_log: List[dict], metrics: List[dict], num_codes: int) -> Optional[str]:
    if not train_log and not metrics:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    ax = axes[0]
    if train_log:
        ax.plot([r["step"] for r in train_log], [r["recon_mse"] for r in train_log], label="train recon MSE")
        ax.plot([r["step"] for r in train_log], [r["loss"] for r in train_log], label="train loss", alpha=0.6)
    if metrics:
        ax.plot([m["step"] for m in metrics], [m["mse"] for m in metrics], "o-", label="eval MSE")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title("loss")
    ax.legend()
    ax = axes[1]
    if metrics:
        ax.plot([m["step"] for m in metrics], [m["psnr"] for m in metrics], "o-")
    ax.set_xlabel("step")
    ax.set_ylabel("dB")
    ax.set_title("eval PSNR")
    ax = axes[2]
    if train_log:
        ax.plot([r["step"] for r in train_log], [r["code_ppl"] for r in train_log], label="train batch code ppl")
    if metrics:
        ax.plot([m["step"] for m in metrics], [m["code_ppl"] for m in metrics], "o-", label="eval code ppl")
        ax.plot([m["step"] for m in metrics], [m["codes_used"] for m in metrics], "s--", label="eval codes used")
    ax.axhline(num_codes, color="gray", lw=0.8, ls=":")
    ax.set_xlabel("step")
    ax.set_title(f"code usage (K = {num_codes})")
    ax.legend()
    fig.tight_layout()
    path = os.path.join(save_dir, "curves.png")
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------- checkpoints
def save_checkpoint(path: str, model, optimizer, step: int, args, device) -> None:
    state = {
        "version": 1,
        "step": step,
        "model": model.state_dict(),  # includes the quantizer's codebook and EMA buffers
        "optimizer": optimizer.state_dict(),
        "rng": rng_state(device),
        "args": vars(args),
    }
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str) -> dict:
    # our own file (holds numpy/python RNG states): trusted, full unpickling
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated, corrupt or not a torch file at all
        raise SystemExit(f"error: cannot read checkpoint {path} ({type(e).__name__}: {str(e).splitlines()[0]}); "
                         f"it is corrupt or not a checkpoint: pass another --resume, or --overwrite to start over")
    check_checkpoint(path, state)
    return state


# ---------------------------------------------------------------------------------------------- main
def main(argv: Optional[List[str]] = None) -> dict:
    """Train (or resume) and return the final evaluation's metrics."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = get_parser().parse_args(argv)
    threads = torch.get_num_threads()
    try:
        return _main(args, explicit_options(argv))
    finally:
        torch.set_num_threads(threads)  # --threads only for this call (main() is also used as a library)


def _main(args, given: set) -> dict:
    if not logger.handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s | %(message)s", datefmt="%H:%M:%S")
    check_args(args, given)
    device = resolve_device(args.device)
    replaced = prepare_save_dir(args)
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    ckpt = None
    if args.resume:
        path = os.path.join(args.save_dir, CHECKPOINT) if args.resume == "auto" else args.resume
        if os.path.isfile(path):
            ckpt = load_checkpoint(path)
            ckpt["args"].setdefault("latent_norm", "none")  # checkpoints from before --latent-norm
            for key in MODEL_KEYS:
                old, new = ckpt["args"].get(key), getattr(args, key)
                if key in ckpt["args"] and new is not None and old != new and key != "channels" \
                        and key in given:
                    logger.warning("--resume: %s %r from the checkpoint overrides %r given on the command line "
                                   "(a run keeps its model)", option_name(key), old, new)
                if key in ckpt["args"]:
                    setattr(args, key, old)
            logger.info("resuming from %s at step %d", path, ckpt["step"])
        elif args.resume != "auto":
            raise SystemExit(f"--resume {path}: no such checkpoint")
        else:
            logger.info("--resume: no %s in %s, starting from scratch", CHECKPOINT, args.save_dir)

    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    random.seed(args.seed)

    channels = None if str(args.channels) == "auto" else int(args.channels)
    splits = build_splits(args.dataset, args.data_dir, args.image_size, channels, args.download,
                          args.val_fraction, cache=not args.no_cache, progress=not args.no_progress)
    args.channels = splits.channels
    logger.info("data: %s", splits.description)
    train, test = splits.train, splits.test
    if len(train) == 0 or len(test) == 0:
        raise DatasetNotFoundError("empty training or evaluation split")

    overrides = {k: getattr(args, k) for k in MODEL_KEYS if k not in ("arch", "image_size", "channels", "seed")}
    config = build_config(args.arch, splits.channels, args.image_size, overrides)
    try:
        model = ImageAutoencoder(config).to(device)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    for k in ("hidden_dim", "res_hidden_dim", "num_codes", "code_dim", "latents_per_position", "num_downsample"):
        setattr(args, k, getattr(config, k))
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    logger.info("model: %s preset, %s bottleneck, %d parameters, latent field %dx%dx%d = %d latents, "
                "%d codes of dim %d", config.arch, config.bottleneck, count_parameters(model), config.grid,
                config.grid, config.latents_per_position, config.num_latents, config.num_codes, config.code_dim)

    if replaced:
        logger.warning("--overwrite: deleting the previous run in %s (%s)", args.save_dir, ", ".join(replaced))
        for f in replaced:
            os.remove(os.path.join(args.save_dir, f))
    step = 0
    metrics_path = os.path.join(args.save_dir, "metrics.jsonl")
    log_path = os.path.join(args.save_dir, "train_log.jsonl")
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise SystemExit(f"error: the --resume checkpoint does not fit the model it describes "
                             f"({type(e).__name__}: {str(e).splitlines()[0]}); it was written by another version "
                             f"of image_ae or edited: start a new run with --overwrite or another --save-dir")
        step = int(ckpt["step"])
        set_rng_state(ckpt["rng"], device)
        # drop log lines written after this checkpoint (an interrupted run's tail is redone)
        write_jsonl(metrics_path, [r for r in read_jsonl(metrics_path) if r["step"] <= step])
        write_jsonl(log_path, [r for r in read_jsonl(log_path) if r["step"] <= step])
    else:  # --resume found no checkpoint here: an unfinished run's logs are redone
        for p in (metrics_path, log_path):
            if os.path.exists(p):
                os.remove(p)
    with open(os.path.join(args.save_dir, "config.json"), "w") as f:
        json.dump(vars(args), f, indent=2)

    steps_per_epoch = max(1, len(train) // min(args.batch_size, len(train)))
    epochs = args.epochs if args.epochs is not None else (10 if args.max_steps is None else None)
    total = math.inf
    if epochs is not None:
        total = int(round(epochs * steps_per_epoch))
    if args.max_steps is not None:
        total = min(total, args.max_steps)
    total = int(total)
    eval_interval = args.eval_interval if args.eval_interval > 0 else steps_per_epoch
    save_interval = args.save_interval if args.save_interval > 0 else eval_interval
    logger.info("training %d -> %d steps (%d steps/epoch, batch %d) on %s", step, total, steps_per_epoch,
                args.batch_size, device)

    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=min(step, total), desc=f"{config.bottleneck}", unit="step",
               disable=args.no_progress, mininterval=1.0, dynamic_ncols=True)
    model.train()
    batch_iter, batches_epoch = None, -1
    last_metrics = None
    ckpt_path = os.path.join(args.save_dir, CHECKPOINT)
    t0 = time.time()
    run_loss = None
    while step < total:
        epoch, offset = divmod(step, steps_per_epoch)
        if epoch != batches_epoch:  # new epoch, or resuming in the middle of one
            batches = epoch_batches(len(train), args.batch_size, args.seed, epoch)
            batch_iter, batches_epoch = iterate_batches(train, batches[offset:], args.num_workers), epoch
        x = next(batch_iter).to(device, non_blocking=True)
        lr = lr_at(step, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        recon, out, _ = model(x)
        recon_mse = F.mse_loss(recon, x)
        loss = recon_mse + out.loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if args.clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_norm)
        optimizer.step()
        step += 1
        bar.update(1)

        lv = float(loss.detach())
        if not math.isfinite(lv):
            raise FloatingPointError(f"non-finite loss {lv} at step {step} (the last checkpoint in {args.save_dir} "
                                     f"is intact): lower --lr or set --clip-norm, and continue with --resume")
        run_loss = lv if run_loss is None else 0.98 * run_loss + 0.02 * lv
        if step % args.log_interval == 0 or step == total:
            row = {"step": step, "epoch": step / steps_per_epoch, "loss": lv,
                   "recon_mse": float(recon_mse.detach()), "vq_loss": float(out.loss.detach()),
                   "code_ppl": float(out.perplexity), "posterior_entropy": float(out.posterior_entropy),
                   "codes_used_frac": float(out.codes_used), "lr": lr, "elapsed_s": time.time() - t0}
            append_jsonl(log_path, row)
            bar.set_postfix(loss=f"{run_loss:.4f}", ppl=f"{row['code_ppl']:.1f}", refresh=False)
        if step % save_interval == 0 or step == total:
            save_checkpoint(ckpt_path, model, optimizer, step, args, device)
        if step % eval_interval == 0 or step == total:
            last_metrics = _evaluate_and_log(model, test, args, device, step, metrics_path, log_path, t0, bar)
    bar.close()

    if last_metrics is None:  # nothing trained (already at the end): evaluate anyway
        if ckpt is None:
            save_checkpoint(ckpt_path, model, optimizer, step, args, device)
        last_metrics = _evaluate_and_log(model, test, args, device, step, metrics_path, log_path, t0, None)
    return last_metrics


def _evaluate_and_log(model, test, args, device, step, metrics_path, log_path, t0, bar) -> dict:
    m = evaluate(model, test, args, device, step)
    m["elapsed_s"] = time.time() - t0
    rows = [r for r in read_jsonl(metrics_path) if r["step"] != step] + [m]
    write_jsonl(metrics_path, rows)
    msg = (f"eval step {step}: mse {m['mse']:.5f}  psnr {m['psnr']:.2f} dB  code_ppl {m['code_ppl']:.1f}  "
           f"codes_used {m['codes_used']}/{m['num_codes']}  posterior_entropy {m['posterior_entropy']:.3f}")
    if bar is not None and not bar.disable:
        bar.write(msg)
    else:
        logger.info(msg)
    if not args.no_plots:
        plot_curves(args.save_dir, read_jsonl(log_path), rows, model.config.num_codes)
    return m


def cli_main(argv: Optional[List[str]] = None) -> None:
    try:
        main(argv)
    except DatasetNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except FloatingPointError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    cli_main()
