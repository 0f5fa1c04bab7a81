#!/usr/bin/env python
"""Where a Latent Transformer loses BLEU: the autoencoder or the latent predictor.

    python scripts/diagnose.py DATA_BIN --path LT.pt [--subset valid] [--ref RAW_REF] [--cpu] [--json OUT]

On every sentence of ``--subset`` it measures:
  bleu           sacreBLEU of ordinary decoding (greedy latents from the latent predictor);
                 len_ratio  its output / reference length (sacreBLEU's)
  bleu_oracle    sacreBLEU of teacher-forced decoding: the autoencoder's own codes of the reference
                 (``--oracle-latents``), i.e. what a perfect latent predictor would give (paper Figure 3's y-axis)
  lp_acc         latent-predictor accuracy on the reference codes, teacher-forced (every block right; a parallel
                 predictor: its one pass at the reference's number of latents)
  lp_end_acc     share of sentences where the predictor, fed the reference codes, puts END right after them
                 (a parallel predictor: where its length classifier picks the reference's number of latents)
  len_err        mean (predicted - reference) number of latents of greedy decoding; len_abs_err its mean |.|;
                 len_short  the share of sentences given fewer latents than the reference needs
  codes_ae       distinct codes the autoencoder uses for the references; codes_pred  the predictor uses
  ze_spread      how distinct the encoder outputs z_e of the reference latents are: mean ||z_e - mean z_e||^2 over
                 mean ||z_e||^2 (0: every latent is the same vector, the autoencoder carries nothing; 1: no
                 common component at all)
  post_ent       mean entropy (nats) of the E-step posterior over codes at the reference latents (0: one-hot,
                 soft EM is then hard EM); sample_codes  mean distinct codes among soft EM's m samples
BLEU is computed on detokenized (sacremoses), BPE-removed output against ``--ref`` (the raw references, one per
line in the order of the split) or, without it, the split's own targets detokenized the same way.
Prints one table and, with ``--json``, appends the numbers as one JSON line.
"""
import argparse
import json
import math
import os
import sys

import torch


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", help="fairseq-preprocess directory the model was trained on")
    p.add_argument("--path", required=True, help="latent_transformer checkpoint")
    p.add_argument("--subset", default="valid")
    p.add_argument("--ref", help="raw (untokenized) references of the subset, one per line")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-len-a", type=float, default=1.2)
    p.add_argument("--max-len-b", type=int, default=10)
    p.add_argument("--json", help="append the result as one JSON line to this file")
    p.add_argument("--label", default="", help="stored with the JSON line")
    p.add_argument("--cpu", action="store_true")
    args = p.parse_args(argv)
    # checked before any work, in one line each (as dump_latents.py's --batch-size, bench_decode.py's --max-len-a)
    for name, value, low in (("--batch-size", args.batch_size, 1), ("--max-len-a", args.max_len_a, 0),
                             ("--max-len-b", args.max_len_b, 0)):
        if not (math.isfinite(value) and value >= low):
            bound = f">= {low}" if isinstance(value, int) else "a finite number" + (
                f" >= {low:g}" if low > -math.inf else "")
            sys.exit(f"diagnose.py: {name} must be {bound}, got {value}")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from dump_latents import load_checkpoint

    from io_checks import read_lines

    # the inputs that could fail are read before the decoding: the references and the --json directory
    references = read_lines(args.ref, "diagnose.py") if args.ref else None
    if args.json and os.path.dirname(args.json):
        os.makedirs(os.path.dirname(args.json), exist_ok=True)
    model, task, itr, use_cuda = load_checkpoint(args, "diagnose.py")
    if references is not None and len(references) != len(task.dataset(args.subset)):
        sys.exit(f"diagnose.py: --ref has {len(references)} lines, {args.subset} {len(task.dataset(args.subset))} "
                 f"sentences")
    from fairseq import utils
    from sacrebleu.metrics import BLEU
    from sacremoses import MosesDetokenizer

    from vq_nat.latent_generator import LatentGenerator
    from vq_nat.models.bottleneck import bottleneck_stats, is_soft

    dec = model.decoder
    tgt_dict = task.target_dictionary
    greedy = LatentGenerator(tgt_dict, args.max_len_a, args.max_len_b)
    oracle = LatentGenerator(tgt_dict, args.max_len_a, args.max_len_b, oracle_latents=True)
    soft = is_soft(dec.bottleneck)

    hyps, hyps_oracle, refs = {}, {}, {}
    n_lat = n_sent = lp_right = end_right = short = 0
    len_err = len_abs = 0.0
    post_ent = sample_codes = 0.0
    z_sum, z_sq, z_n = 0.0, 0.0, 0
    has_posterior = False
    codes_ae, codes_pred = set(), set()

    def text(tokens):
        return tgt_dict.string(utils.strip_pad(tokens, tgt_dict.pad()), "subword_nmt", extra_symbols_to_ignore={tgt_dict.eos()})

    with torch.inference_mode():
        for sample in itr:
            sample = utils.move_to_cuda(sample) if use_cuda else sample
            net = sample["net_input"]
            ids = sample["id"].tolist()
            for store, gen in ((hyps, greedy), (hyps_oracle, oracle)):
                for sid, h in zip(ids, gen.generate([model], sample)):
                    store[sid] = (text(h[0]["tokens"]), h[0]["latents"])
            enc = model.encode_source(net["src_tokens"], net["src_lengths"])
            codes, pad = dec.reference_codes(sample["target"], enc)
            real = ~pad
            lengths = real.sum(1)
            latents = dec.bottleneck.embed_codes(codes).masked_fill(pad.unsqueeze(-1), 0.0)
            predictor = dec.latent_predictor
            if predictor.parallel:  # one pass at the reference's length; "END" = the length classifier is right
                pred = predictor(latents, pad, enc)[0].argmax(-1)  # (B, L, blocks)
                end_right += int((predictor.top_lengths(enc, predictor.max_latents)[0][:, 0] == lengths).sum())
            else:  # teacher-forced: position j predicts code j from the codes before it, L_i predicts END
                pred = predictor(latents, pad, enc).argmax(-1)  # (B, L + 1, blocks)
                end_right += int((pred[torch.arange(len(ids)), lengths, 0] == predictor.end).sum())
                pred = pred[:, :-1]
            blocks = pred.size(2)
            want = codes.view(*pad.shape, blocks)
            lp_right += int(((pred == want).all(-1) & real).sum())
            n_lat += int(lengths.sum())
            # the E-step posterior at the reference latents (evaluation mode: no codebook update)
            z_e = dec.encode_target(dec.pad_to_multiple(sample["target"]), enc)[0]
            z_real = z_e[real].double()
            z_sum, z_sq, z_n = z_sum + z_real.sum(0), z_sq + float((z_real ** 2).sum()), z_n + z_real.size(0)
            stats = bottleneck_stats(dec.bottleneck, dec.bottleneck(z_e, padding_mask=pad), pad)  # as in training
            has_posterior = "post_ent" in stats
            post_ent += float(stats.get("post_ent", 0.0))
            sample_codes += float(stats.get("sample_codes", 0.0))
            for b, sid in enumerate(ids):
                n = int(lengths[b])
                codes_ae.update(map(_key, want[b, :n].tolist()))
                refs[sid] = text(sample["target"][b])
                codes_pred.update(map(_key, hyps[sid][1].view(-1, blocks).tolist()))
                err = len(hyps[sid][1]) - n
                len_err += err
                len_abs += abs(err)
                short += err < 0
                n_sent += 1

    order = sorted(hyps)
    lang = task.cfg.target_lang
    md = MosesDetokenizer(lang=lang)
    if references is None:
        references = [md.detokenize(refs[i].split()) for i in order]
    bleu = BLEU()

    def score(store):
        return bleu.corpus_score([md.detokenize(store[i][0].split()) for i in order], [references])

    greedy_score = score(hyps)

    report = {
        "label": args.label, "path": args.path, "subset": args.subset, "sentences": n_sent,
        "bleu": round(greedy_score.score, 2), "bleu_oracle": round(score(hyps_oracle).score, 2),
        "len_ratio": round(greedy_score.sys_len / max(greedy_score.ref_len, 1), 4),
        "lp_acc": round(lp_right / max(n_lat, 1), 4), "lp_end_acc": round(end_right / max(n_sent, 1), 4),
        "len_err": round(len_err / max(n_sent, 1), 3), "len_abs_err": round(len_abs / max(n_sent, 1), 3),
        "len_short": round(short / max(n_sent, 1), 4), "latents_per_sentence": round(n_lat / max(n_sent, 1), 2),
        "ze_spread": round(1.0 - float((z_sum / max(z_n, 1)).pow(2).sum()) / max(z_sq / max(z_n, 1), 1e-12), 4)
        if z_n else None,
        "codes_ae": len(codes_ae), "codes_pred": len(codes_pred), "num_codes": dec.num_codes,
        "post_ent": round(post_ent / max(n_lat, 1), 4) if has_posterior else None,
        "sample_codes": round(sample_codes / max(n_lat, 1), 3) if soft else None,
    }
    print("| " + " | ".join(report) + " |")
    print("|" + "---|" * len(report))
    print("| " + " | ".join(str(v) for v in report.values()) + " |")
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(report) + "\n")
    return report


def _key(code):
    return tuple(code) if isinstance(code, list) else code


if __name__ == "__main__":
    main()
