#!/usr/bin/env python
"""Latent analysis (the paper's Table 5): print the discrete latent codes of sentences and draw code usage.

    python scripts/dump_latents.py DATA_BIN --path LT.pt [--subset test] [--show 10] [--png usage.png] [--cpu]

For every sentence of ``--subset`` (the first ``--show`` are printed):
  S-i / T-i   source and target (BPE removed)
  A-i         autoencoder codes of the target: the nearest code (eq.1) of every compressed position, one
              latent per 2^nc target tokens; the last latent holds the target's EOS and the padding up to the
              next multiple of 2^nc and is marked ``|eos``
  P-i         the latent predictor's greedy codes from the source, ending in ``<end>`` (our end-of-latents
              symbol; tensor2tensor instead pads the latents with codes for PAD positions)
Then a summary over the whole subset: how many of the K codes are used, the code perplexity, and the codes
most used by the EOS latent compared with all latents (an EOS/PAD code shows up as a code that the last latent
uses far more often than the others do). ``--png`` draws the code-usage histogram (all latents, and the EOS
latents) with matplotlib.
"""
import argparse
import collections
import math
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_checkpoint(args, prog):
    """(model in eval mode, task, batch iterator over ``args.subset``, on GPU?) for a latent_transformer checkpoint
    ``args.path`` trained on ``args.data``; exits with one line, before any model is built, on a missing path, a
    corrupt file, another kind of model or another dictionary."""
    if not os.path.isdir(args.data):
        sys.exit(f"{prog}: no such directory: {args.data}")
    sys.path.insert(0, ROOT)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from io_checks import LATENT, require, split_size

    split_size(require(args.path, prog, LATENT, data=args.data), args.data, args.subset, prog)
    import vq_nat

    vq_nat.register()  # the fairseq task, model and criterion; fixes for the fairseq build
    from fairseq import checkpoint_utils

    models, _, task = checkpoint_utils.load_model_ensemble_and_task([args.path], arg_overrides={"data": args.data})
    model = models[0].eval()
    if not hasattr(getattr(model, "decoder", None), "reference_codes"):
        sys.exit(f"{prog}: {args.path} is not a latent_transformer checkpoint")
    use_cuda = torch.cuda.is_available() and not args.cpu
    if use_cuda:
        model.cuda()
    task.load_dataset(args.subset)
    itr = task.get_batch_iterator(task.dataset(args.subset), max_sentences=args.batch_size,
                                  required_batch_size_multiple=1, disable_iterator_cache=True
                                  ).next_epoch_itr(shuffle=False)
    return model, task, itr, use_cuda


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", help="fairseq-preprocess directory the model was trained on")
    p.add_argument("--path", required=True, help="latent_transformer checkpoint")
    p.add_argument("--subset", default="test")
    p.add_argument("--show", type=int, default=10, help="sentences to print")
    p.add_argument("--png", help="write the code-usage histogram here (refused if it exists, unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --png")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--cpu", action="store_true")
    args = p.parse_args(argv)
    if args.show < 0 or args.batch_size < 1:
        sys.exit(f"dump_latents.py: --show must be >= 0 and --batch-size >= 1, got {args.show} and {args.batch_size}")
    if args.png:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from io_checks import check_output

        check_output(args.png, args.overwrite, "dump_latents.py", "--png")
    model, task, itr, use_cuda = load_checkpoint(args, "dump_latents.py")
    from fairseq import utils

    dec = model.decoder
    if not hasattr(dec.bottleneck, "nearest_codes"):
        sys.exit("dump_latents.py: the checkpoint is not a latent_transformer with a vq/em bottleneck")
    src_dict, tgt_dict = task.source_dictionary, task.target_dictionary
    k, factor = dec.num_codes, dec.factor
    usage, eos_usage = collections.Counter(), collections.Counter()
    rows = {}
    with torch.inference_mode():
        for sample in itr:
            sample = utils.move_to_cuda(sample) if use_cuda else sample
            net = sample["net_input"]
            enc = model.encoder(net["src_tokens"], src_lengths=net["src_lengths"])
            tgt = dec.pad_to_multiple(sample["target"])
            z_e, latent_pad = dec.encode_target(tgt, enc)
            ae = dec.bottleneck.nearest_codes(z_e)
            pred, pred_pad, _ = dec.latent_predictor.generate(
                enc, dec.bottleneck.embed_codes, max(1, latent_pad.size(1) * 2), net["src_tokens"].size(0),
                budgets=2 * (~latent_pad).sum(1))  # per sentence: the batch does not change its latents
            for b, sid in enumerate(sample["id"].tolist()):
                n_lat = int((~latent_pad[b]).sum())
                a = ae[b, :n_lat]
                a = a if a.dim() == 1 else a[:, 0]  # product quantization: block 0
                codes = a.tolist()
                usage.update(codes)
                eos_usage[codes[-1]] += 1
                q = pred[b][~pred_pad[b]]
                q = q if q.dim() == 1 else q[:, 0]
                rows[sid] = (
                    src_dict.string(utils.strip_pad(net["src_tokens"][b], src_dict.pad()), "subword_nmt"),
                    tgt_dict.string(utils.strip_pad(sample["target"][b], tgt_dict.pad()), "subword_nmt"),
                    codes, q.tolist(),
                )
    for sid in sorted(rows)[: args.show]:
        s, t, codes, q = rows[sid]
        print(f"S-{sid}\t{s}\nT-{sid}\t{t}")
        print(f"A-{sid}\t" + " ".join(map(str, codes[:-1])) + (" " if len(codes) > 1 else "") + f"{codes[-1]}|eos")
        print(f"P-{sid}\t" + " ".join(map(str, q)) + " <end>")
    total, n_sent = sum(usage.values()), len(rows)
    ppl = math.exp(-sum(c / total * math.log(c / total) for c in usage.values()))
    print(f"\n{n_sent} sentences, {total} latents (2^nc = {factor} target tokens each): {len(usage)} of {k} codes "
          f"used, code perplexity {ppl:.1f}")
    print("code\tshare of EOS latents\tshare of all latents")
    for code, c in eos_usage.most_common(5):
        print(f"{code}\t{c / n_sent:.3f}\t{usage[code] / total:.3f}")
    if args.png:
        import logging

        import matplotlib

        logging.getLogger("matplotlib").setLevel(logging.WARNING)
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(2, 1, figsize=(10, 5), sharex=True)
        ax[0].bar(list(usage), [usage[c] / total for c in usage], width=1.0, color="tab:blue")
        ax[0].set(ylabel="share", title=f"code usage, all latents ({args.subset}, {len(usage)}/{k} codes used)")
        ax[1].bar(list(eos_usage), [eos_usage[c] / n_sent for c in eos_usage], width=1.0, color="tab:red")
        ax[1].set(xlabel="code", ylabel="share", title="code of the last (EOS) latent", xlim=(-1, k))
        fig.tight_layout()
        fig.savefig(args.png, dpi=120)
        print(f"dump_latents.py: wrote {args.png}")


if __name__ == "__main__":
    main()
