#!/usr/bin/env python
"""Decoding speed, side by side: the Latent Transformer against an autoregressive fairseq transformer.

    python scripts/bench_decode.py DATA_BIN --lt-path LT.pt [LT2.pt ...] --ar-path AR.pt [AR_6+1.pt ...]
        [--gen-subset test] [--repeats 3] [--batch-sizes 1 64] [--max-sentences 200] [--ar-beams 1 4] [--lt-npd 4]
        [--threads N] [--cpu]

Decodes the same sentences with every model (LT; AR greedy; AR beam 4), interleaved (A B C, B C A, C A B, ...:
each model decodes all its batches, warm, as when decoding a test set; the first model rotates from round to
round) over ``--repeats`` rounds after one warm-up round, and prints the median (and min-max) over rounds of
ms/sentence per model and batch size. Ratios are taken round by round (the models of one round ran within
seconds of each other, on a machine whose speed drifts) and their median reported; the last line is
``speedup batch1=X.XX batch64=Y.YY``: AR greedy's time over the LT's. Like for like: both models run fairseq's
own layer code (TransformerEncoderLayer / TransformerDecoderLayer with incremental state). Wall-clock
times include the encoder, all decoding steps and the hypothesis post-processing that fairseq-generate does
(not data loading). Use the same machine and thread count for both, as here. Each line also gives the output tokens per sentence (EOS included) and, for the LT,
the decoded span (latents x 2^nc: the positions it projects onto the vocabulary unless the length budget cuts
it), against one position per output token for an autoregressive model. ``--lt-npd K`` adds the LT with noisy
parallel decoding (K latent candidates, rescored by the first AR model of ``--ar-path``, as ``fairseq-generate
--npd-candidates K --npd-teacher``) to the rounds, with AR greedy's time over its own.

Several ``--lt-path`` (e.g. an autoregressive- and a parallel-predictor LT) and several ``--ar-path`` (e.g. the 3+3
teacher and the 6-encoder / 1-decoder AR) are timed in the same rounds; each model is named by its kind and
size (``LT par K64`` for a one-pass latent predictor over 64 codes, ``LT ar-pred K512``, ``AR 6+1 greedy``), and
every ratio is against the first LT of the same round. The last
line's speedup is the first AR's greedy time over the first LT's.
"""
import argparse
import os
import statistics
import sys
import time

import torch


def load(path, data):
    from fairseq import checkpoint_utils

    overrides = {"data": data}
    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([path], arg_overrides=overrides)
    for m in models:
        m.eval()
    return models, cfg, task


def batches(task, subset, batch_size, max_sentences, models):
    """Batches of about ``max_sentences`` sentences in all, evenly spaced over fairseq's length-sorted batch
    order, so that short and long sentences are represented as in the whole split (the first batches would hold
    only the shortest sentences)."""
    from fairseq import utils

    ds = task.dataset(subset)
    itr = task.get_batch_iterator(
        ds, max_sentences=batch_size, required_batch_size_multiple=1,
        max_positions=utils.resolve_max_positions(task.max_positions(), *[m.max_positions() for m in models]),
        ignore_invalid_inputs=True, disable_iterator_cache=True,  # fairseq caches one iterator per dataset
    ).next_epoch_itr(shuffle=False)
    every = list(itr)
    want = max(1, min(len(every), round(max_sentences / batch_size)))
    out = [every[(i * len(every)) // want] for i in range(want)]
    return out, sum(sample["nsentences"] for sample in out)


def decode_batch(task, generator, models, sample, device, stats=None) -> float:
    """Seconds to decode one batch; with ``stats`` (a dict, the untimed warm-up round) also counts the output
    tokens (EOS included) and, for the LT, the decoded span (latents x 2^nc) of every hypothesis."""
    from fairseq import utils

    start = time.perf_counter()
    with torch.inference_mode():
        sample = utils.move_to_cuda(sample) if device == "cuda" else sample
        hypos = task.inference_step(generator, models, sample)
        for h in hypos:  # what fairseq-generate reads of every hypothesis
            h[0]["tokens"].int().cpu()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if stats is not None:
        for h in hypos:
            stats["tokens"] = stats.get("tokens", 0) + len(h[0]["tokens"])
            if "latents" in h[0]:
                stats["span"] = stats.get("span", 0) + len(h[0]["latents"]) * models[0].decoder.factor
    return seconds


def time_round(runners, data, device, first: int = 0, stats=None):
    """One round: each model decodes all its batches in turn (warm, as when decoding a test set), starting with
    model number ``first`` (rotated from round to round). Seconds per model."""
    names = list(runners)
    seconds = {}
    for name in names[first % len(names):] + names[: first % len(names)]:
        task, gen, models = runners[name]
        seconds[name] = sum(decode_batch(task, gen, models, sample, device, None if stats is None else stats[name])
                            for sample in data[name][0])
    return seconds


def unique(names, name: str) -> str:
    """``name``, or ``name #2``, ``#3``, ... where a model of the same kind and size is already named so."""
    out, i = name, 2
    while out in names:
        out, i = f"{name} #{i}", i + 1
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", help="fairseq-preprocess directory")
    p.add_argument("--lt-path", required=True, nargs="+", help="latent_transformer checkpoint(s)")
    p.add_argument("--ar-path", required=True, nargs="+",
                   help="autoregressive checkpoint(s); the first rescores --lt-npd and gives the speedup line")
    p.add_argument("--gen-subset", default="test", help="split to decode")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (after one warm-up round)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64], help="batch sizes (sentences) to time")
    p.add_argument("--max-sentences", type=int, default=200,
                   help="about this many sentences per model and round, in batches evenly spaced over the split")
    p.add_argument("--ar-beams", type=int, nargs="+", default=[1, 4], help="beam sizes of the AR models")
    p.add_argument("--lt-npd", type=int, nargs="*", default=[], metavar="K",
                   help="also time the LT with noisy parallel decoding of K candidates, the AR model rescoring")
    p.add_argument("--max-len-a", type=float, default=1.2, help="length budget: a x source length + b")
    p.add_argument("--max-len-b", type=int, default=10, help="length budget: a x source length + b")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--cpu", action="store_true", help="decode on the CPU even when a GPU is visible")
    args = p.parse_args(argv)
    for name, values, low in (("--repeats", [args.repeats], 1), ("--batch-sizes", args.batch_sizes, 1),
                              ("--max-sentences", [args.max_sentences], 1), ("--ar-beams", args.ar_beams, 1),
                              ("--lt-npd", args.lt_npd, 2), ("--max-len-b", [args.max_len_b], 0),
                              ("--threads", [args.threads or 1], 1)):
        if any(v < low for v in values):
            p.error(f"{name} must be >= {low}, got {' '.join(map(str, values))}")
    if not (0 <= args.max_len_a < float("inf")):
        p.error(f"--max-len-a must be a finite number >= 0, got {args.max_len_a}")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from io_checks import AUTOREGRESSIVE, LATENT, require

    for path in args.lt_path:  # the kind of every checkpoint, named in one line before any model is built
        require(path, "bench_decode.py", LATENT, args.data, option="--lt-path")
    for path in args.ar_path:
        require(path, "bench_decode.py", AUTOREGRESSIVE, args.data, option="--ar-path")

    import vq_nat

    vq_nat.register()  # the fairseq task, model and criterion; fixes for the fairseq build
    from fairseq.sequence_generator import SequenceGenerator

    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    lts = [load(path, args.data) for path in args.lt_path]
    ars = [load(path, args.data) for path in args.ar_path]
    for models, _, task in lts + ars:
        models[0].to(device)
        task.load_dataset(args.gen_subset)
    gen_args = argparse.Namespace(max_len_a=args.max_len_a, max_len_b=args.max_len_b)
    from vq_nat.latent_generator import LatentGenerator

    runners = {}
    for models, cfg, task in lts:
        m = cfg.model
        kind = "par" if getattr(m, "latent_predictor", "autoregressive") == "parallel" else "ar-pred"
        name = unique(runners, "LT" if len(lts) == 1 else f"LT {kind} K{m.num_codes}")
        runners[name] = (task, task.build_generator(models, gen_args), models)
    lt_name = next(iter(runners))
    lt_models, _, lt_task = lts[0]
    for k in args.lt_npd:
        gen = LatentGenerator(lt_task.target_dictionary, args.max_len_a, args.max_len_b, npd_candidates=k,
                              npd_teacher=ars[0][0][0])
        runners[f"LT NPD{k}"] = (lt_task, gen, lt_models)
    greedy = []
    for i, (models, cfg, task) in enumerate(ars):
        what = "AR" if len(ars) == 1 else f"AR {cfg.model.encoder_layers}+{cfg.model.decoder_layers}"
        for beam in args.ar_beams:
            gen = SequenceGenerator(models, task.target_dictionary, beam_size=beam,
                                    max_len_a=args.max_len_a, max_len_b=args.max_len_b)
            name = unique(runners, f"{what} beam{beam}" if beam > 1 else f"{what} greedy")
            runners[name] = (task, gen, models)
            if beam == 1:
                greedy.append(name)

    where = f"cuda ({torch.cuda.get_device_name()})" if device == "cuda" else "cpu"
    print(f"device={where} threads={torch.get_num_threads()} torch={torch.__version__} "
          f"subset={args.gen_subset} repeats={args.repeats} (+1 warm-up)")
    ratios = {}  # (name, batch size) -> per-round time / LT's time in the same round
    for bs in args.batch_sizes:
        data = {name: batches(task, args.gen_subset, bs, args.max_sentences, models)
                for name, (task, _, models) in runners.items()}
        times = {name: [] for name in runners}
        stats = {name: {} for name in runners}
        for r in range(args.repeats + 1):
            seconds = time_round(runners, data, device, first=r, stats=stats if r == 0 else None)
            if r > 0:
                for name, secs in seconds.items():
                    times[name].append(1000.0 * secs / data[name][1])
        for name, ts in times.items():
            n = data[name][1]
            span = f", {stats[name]['span'] / n:.1f} span positions" if "span" in stats[name] else ""
            print(f"batch {bs:3d}  {name:16s} {statistics.median(ts):8.2f} ms/sentence  (min {min(ts):.2f}, "
                  f"max {max(ts):.2f}, {n} sentences x {len(ts)} rounds; {stats[name]['tokens'] / n:.1f} output "
                  f"tokens{span} per sentence)")
            ratios[(name, bs)] = [t / lt for t, lt in zip(ts, times[lt_name])]
    # the ratio of each round pairs the models under the same machine state: its median is the figure reported
    for bs in args.batch_sizes:
        for name in runners:
            if name != lt_name:
                rs = ratios[(name, bs)]
                print(f"ratio batch{bs}: {name} / {lt_name} = {statistics.median(rs):.2f} (median of {len(rs)} rounds; "
                      f"min {min(rs):.2f}, max {max(rs):.2f})")
        for name in runners:
            if name.startswith("LT NPD") and greedy:
                rs = [a / b for a, b in zip(ratios[(greedy[0], bs)], ratios[(name, bs)])]
                print(f"ratio batch{bs}: {greedy[0]} / {name} = {statistics.median(rs):.2f} (median of {len(rs)} "
                      f"rounds; min {min(rs):.2f}, max {max(rs):.2f})")
    speed = " ".join(f"batch{bs}={statistics.median(ratios[(greedy[0], bs)]):.2f}"
                     for bs in args.batch_sizes if greedy)
    print(f"speedup {speed}")


if __name__ == "__main__":
    sys.exit(main())
