#!/usr/bin/env python
"""Where the Latent Transformer's decoding time goes, on the sentences ``bench_decode.py`` times.

    python scripts/profile_decode.py DATA_BIN --path LT.pt [--gen-subset test] [--batch-size 1]
        [--max-sentences 200] [--npd-candidates k --npd-teacher AR.pt] [--threads N] [--cpu] [--ops 15]

After one warm-up pass over the batches, three more passes:
1. plain: ms/sentence, as ``bench_decode.py`` measures it;
2. stages: wall-clock share of the source encoder, the latent predictor, the parallel decoder (decompression and
   layers), the vocabulary projection + best token, the teacher's rescoring (noisy parallel decoding) and the rest
   (post-processing, glue); with k > 1 also how many of the B·k latent sequences and of the B·k token candidates
   are distinct within their sentence;
3. ``torch.profiler``: the operators with the most self CPU time, as calls and microseconds per sentence;
Also printed: how many sentences get how many latents, and how many distinct codes the one-latent sentences use.
Nothing is asserted about the numbers; they go into the README with the command that printed them.
"""
import argparse
import collections
import functools
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_decode import batches, decode_batch, load  # noqa: E402  (same batches, same timing)


def _timed(obj, name: str, label: str, totals, hook=None):
    """Wrap the bound method ``obj.name`` (instance attribute) so its wall time adds to ``totals[label]``."""
    inner = getattr(obj, name)

    @functools.wraps(inner)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        out = inner(*args, **kwargs)
        totals[label] += time.perf_counter() - start
        if hook is not None:
            hook(args, kwargs, out)
        return out

    setattr(obj, name, wrapper)
    return inner


def _distinct_rows(group: torch.Tensor, rows: torch.Tensor) -> int:
    return torch.unique(torch.cat([group.unsqueeze(1), rows], 1), dim=0).size(0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data")
    p.add_argument("--path", required=True, help="latent_transformer checkpoint")
    p.add_argument("--gen-subset", default="test")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--max-sentences", type=int, default=200)
    p.add_argument("--npd-candidates", type=int, default=1)
    p.add_argument("--npd-teacher", default=None, help="autoregressive checkpoint (with --npd-candidates > 1)")
    p.add_argument("--max-len-a", type=float, default=1.2)
    p.add_argument("--max-len-b", type=int, default=10)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--ops", type=int, default=15, help="operators listed from the profiler")
    args = p.parse_args(argv)
    for option, value, low in (("--batch-size", args.batch_size, 1), ("--max-sentences", args.max_sentences, 1),
                               ("--npd-candidates", args.npd_candidates, 1), ("--ops", args.ops, 0),
                               ("--threads", args.threads or 0, 0)):
        if value < low:
            sys.exit(f"profile_decode.py: {option} must be >= {low}, got {value}")
    if not os.path.isdir(args.data):
        sys.exit(f"profile_decode.py: no such directory: {args.data}")
    from io_checks import AUTOREGRESSIVE, LATENT, require, split_size

    state = require(args.path, "profile_decode.py", LATENT, data=args.data)
    if args.npd_teacher:
        require(args.npd_teacher, "profile_decode.py", AUTOREGRESSIVE, data=args.data, option="--npd-teacher")
    split_size(state, args.data, args.gen_subset, "profile_decode.py")

    import vq_nat

    vq_nat.register()  # the fairseq task, model and criterion; fixes for the fairseq build

    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    models, _, task = load(args.path, args.data)
    for m in models:
        m.to(device)
    task.cfg.npd_candidates = args.npd_candidates
    if args.npd_teacher:
        task.cfg.npd_teacher = args.npd_teacher
    gen = task.build_generator(models, argparse.Namespace(max_len_a=args.max_len_a, max_len_b=args.max_len_b))
    task.load_dataset(args.gen_subset)
    data, n = batches(task, args.gen_subset, args.batch_size, args.max_sentences, models)
    k = args.npd_candidates

    def run_all():
        start = time.perf_counter()
        for sample in data:
            decode_batch(task, gen, models, sample, device)
        return time.perf_counter() - start

    run_all()  # warm-up
    total = run_all()
    print(f"device={device} threads={torch.get_num_threads()} torch={torch.__version__} batch={args.batch_size} "
          f"k={k} sentences={n}")
    print(f"LT {1000 * total / n:.2f} ms/sentence")

    model, totals, counts = models[0], collections.defaultdict(float), collections.Counter()

    lone_codes, latent_counts = collections.Counter(), collections.Counter()

    def count_latents(call_args, call_kwargs, out):
        codes, latent_pad = out[0], out[1]
        lengths = (~latent_pad).sum(1)
        for length, row in zip(lengths.tolist(), codes.flatten(1).tolist()):
            latent_counts[length] += 1
            if length == 1:
                lone_codes[tuple(row[: codes[0, 0].numel()])] += 1
        kept = codes.masked_fill(latent_pad.view(*latent_pad.shape, *[1] * (codes.dim() - 2)), -1)
        counts["latent rows"] += codes.size(0)
        counts["distinct latents"] += _distinct_rows(torch.arange(codes.size(0)) // k, kept.flatten(1).cpu())

    def count_candidates(call_args, call_kwargs, out):
        targets = call_args[2]
        counts["distinct candidates"] += _distinct_rows(torch.arange(targets.size(0)) // k, targets.cpu())

    originals = [
        (model, "encode_source", _timed(model, "encode_source", "source encoder", totals)),
        (model.decoder.latent_predictor, "generate",
         _timed(model.decoder.latent_predictor, "generate", "latent predictor", totals, count_latents)),
        (model.decoder, "decode", _timed(model.decoder, "decode", "parallel decoder", totals)),
        (model.decoder, "best_tokens", _timed(model.decoder, "best_tokens", "vocabulary projection", totals)),
    ]
    if k > 1:
        originals.append((gen, "rescore", _timed(gen, "rescore", "teacher rescoring", totals, count_candidates)))
    whole = run_all()
    for obj, name, _ in originals:  # back to the class methods
        delattr(obj, name)
    totals["rest (post-processing, glue)"] = whole - sum(totals.values())
    for label, seconds in totals.items():
        print(f"stage {label:30s} {1000 * seconds / n:7.2f} ms/sentence  {100 * seconds / whole:5.1f} %")
    per_count = ", ".join(f"{n_lat}: {latent_counts[n_lat]}" for n_lat in sorted(latent_counts))
    print(f"sentences per latent count: {per_count}; the one-latent sentences use {len(lone_codes)} distinct codes")
    if k > 1:
        rows = counts["latent rows"]
        print(f"distinct latent sequences {counts['distinct latents']} of {rows}; "
              f"distinct token candidates {counts['distinct candidates']} of {rows}")

    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        run_all()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    self_total = sum(e.self_cpu_time_total for e in events)
    print(f"profiler: {self_total / n:.0f} us of operator self CPU time per sentence")
    for e in events[: args.ops]:
        print(f"op {e.key:45s} {e.count / n:7.1f} calls/sentence  {e.self_cpu_time_total / n:8.1f} us/sentence  "
              f"{e.self_cpu_time_total / max(1, e.count):6.1f} us/call  "
              f"{100 * e.self_cpu_time_total / self_total:5.1f} %")


if __name__ == "__main__":
    main()
