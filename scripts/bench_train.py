#!/usr/bin/env python
"""Training speed, side by side: the Latent Transformer against fairseq's transformer of the same size.

    python scripts/bench_train.py DATA_BIN [--steps 20] [--repeats 3] [--max-tokens 4096] [--size tiny|base]
        [--lt-args "--bottleneck em ..."] [--ar-args "..."] [--size-args "..."] [--threads N] [--cpu]

Both models are built through fairseq's own option parsing from the same size flags (default: the ``--size``
preset of ``vq_nat/models/presets.py``, ``tiny`` = the ``latent_transformer_tiny`` sizes, with shared embeddings
and dropout 0.1; ``--size-args`` replaces them), and trained on the same batches with Adam through
fairseq's task.train_step, alternating blocks of ``--steps`` updates (A B A B ...) for ``--repeats`` rounds after a
warm-up block. Prints target words/s (median, min-max) for each and, last, ``ratio words/s LT/AR = X.XX``.
Runs on the GPU when one is visible (``--cpu``: on the CPU regardless), in fp32.
"""
import argparse
import shlex
import statistics
import sys
import time

import torch



def size_args(name):
    """The fairseq flags of size preset ``name`` (vq_nat/models/presets.py), shared embeddings, dropout 0.1."""
    from vq_nat.models import presets

    return " ".join(presets.size_flags(name) + ["--share-all-embeddings", "--dropout", "0.1"])


def build(data, flags, device="cpu"):
    from fairseq import options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq.optim.adam import FairseqAdam

    parser = options.get_training_parser()
    cpu = ["--cpu"] if device == "cpu" else []
    args = options.parse_args_and_arch(parser, [data, *cpu, "--optimizer", "adam", "--lr", "5e-4"] + flags)
    cfg = convert_namespace_to_omegaconf(args)
    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model).to(device)
    criterion = task.build_criterion(cfg.criterion).to(device)
    optimizer = FairseqAdam(cfg.optimizer, [p for p in model.parameters() if p.requires_grad])
    return task, model, criterion, optimizer


def run_block(task, model, criterion, optimizer, samples, start_update, device="cpu"):
    words = 0
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for i, sample in enumerate(samples):
        optimizer.zero_grad()
        loss, sample_size, log = task.train_step(sample, model, criterion, optimizer, start_update + i)
        optimizer.step()
        words += sample["ntokens"]
    if device == "cuda":
        torch.cuda.synchronize()
    return words / (time.perf_counter() - t)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", help="fairseq-preprocess directory (its train split is read)")
    p.add_argument("--steps", type=int, default=20, help="updates per timed block")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (after one warm-up round)")
    p.add_argument("--max-tokens", type=int, default=4096, help="batch size in tokens")
    p.add_argument("--lt-args", default="--arch latent_transformer_tiny --bottleneck em --num-samples 10",
                   help="fairseq options of the Latent Transformer, one string")
    p.add_argument("--ar-args", default="--arch transformer", help="fairseq options of the AR model, one string")
    p.add_argument("--size", default="tiny", help="size preset of both models (tiny or base)")
    p.add_argument("--size-args", default=None, help="size flags of both models instead of --size, one string")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is visible")
    args = p.parse_args(argv)

    import vq_nat

    vq_nat.register()  # the fairseq task, model and criterion; fixes for the fairseq build

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    try:
        size = args.size_args if args.size_args is not None else size_args(args.size)
    except ValueError as e:
        p.error(str(e))
    common = shlex.split(size) + ["--max-tokens", str(args.max_tokens)]
    user_dir = vq_nat.__path__[0]
    lt = build(args.data, ["--user-dir", user_dir, "--task", "latent_translation", "--criterion", "latent_vq"]
               + shlex.split(args.lt_args) + common, device)
    ar = build(args.data, ["--user-dir", user_dir, "--task", "translation", "--criterion",
                           "label_smoothed_cross_entropy", "--label-smoothing", "0.1"] + shlex.split(args.ar_args)
               + common, device)
    task = lt[0]
    task.load_dataset("train")
    itr = task.get_batch_iterator(task.dataset("train"), max_tokens=args.max_tokens, seed=1,
                                  required_batch_size_multiple=1, disable_iterator_cache=True
                                  ).next_epoch_itr(shuffle=True)
    samples = [s for _, s in zip(range(args.steps), itr)]
    if device == "cuda":
        from fairseq import utils

        samples = [utils.move_to_cuda(s) for s in samples]
    for name, (t, m, c, o) in (("LT", lt), ("AR", ar)):
        print(f"{name}: {sum(p.numel() for p in m.parameters()):,} parameters")
    where = torch.cuda.get_device_name() if device == "cuda" else f"cpu threads={torch.get_num_threads()}"
    print(f"device={where} torch={torch.__version__} batches={len(samples)} "
          f"({sum(s['ntokens'] for s in samples)} target words) x {args.repeats} rounds (+1 warm-up)")
    rates = {"LT": [], "AR": []}
    for r in range(args.repeats + 1):
        for name, parts in (("LT", lt), ("AR", ar)):
            wps = run_block(*parts, samples, start_update=r * args.steps, device=device)
            if r > 0:
                rates[name].append(wps)
    for name, ws in rates.items():
        print(f"{name}: {statistics.median(ws):8.0f} words/s (min {min(ws):.0f}, max {max(ws):.0f})")
    ratios = [a / b for a, b in zip(rates["LT"], rates["AR"])]
    print(f"ratio words/s LT/AR = {statistics.median(ratios):.2f} (rounds {min(ratios):.2f}..{max(ratios):.2f})")


if __name__ == "__main__":
    sys.exit(main())
