#!/usr/bin/env python
"""Score a checkpoint exactly as the results tables are made: fairseq-generate, then sacreBLEU of the
detokenized (sacremoses), BPE-removed hypotheses against the raw references.

    python scripts/score.py DATA_BIN --path CKPT.pt --subset test --ref RAW/test.de [--out gen.txt] \
        [-- fairseq-generate options, e.g. --latent-length-beam 3 or --beam 4]

The task follows the checkpoint (``latent_translation`` for a latent_transformer, else the task it was trained with);
``--max-len-a 1.2 --max-len-b 10 --batch-size 64`` are the tables' defaults, and options after ``--`` are
passed to fairseq-generate as they are (later ones win). Prints the sacreBLEU signature and score, one line
each, and with ``--out`` keeps fairseq-generate's output (refused if the file exists, unless ``--overwrite``).
"""
import argparse
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
USER_DIR = os.path.join(ROOT, "vq_nat")


def hypotheses(text: str) -> dict:
    hyps = {}
    for line in text.splitlines():
        if line.startswith("H-"):
            parts = line.split("\t")
            hyps[int(parts[0][2:])] = parts[2] if len(parts) > 2 else ""
    return hyps


def task_of(path: str, data: str, subset: str, num_refs: int) -> str:
    """The fairseq task that decodes the checkpoint at ``path``, after checking that it is a translation model
    trained with ``data``'s dictionaries and that ``data``'s ``subset`` has ``num_refs`` sentences (exits with one
    line otherwise)."""
    from io_checks import LATENT, TRANSLATION, describe, require, split_size

    state = require(path, "score.py", TRANSLATION, data=data)
    n = split_size(state, data, subset, "score.py")
    if n != num_refs:
        sys.exit(f"score.py: the {subset} split of {data} has {n} sentences but --ref has {num_refs} lines; pass the "
                 f"references of this split")
    info = describe(state)
    return "latent_translation" if info["kind"] == LATENT else (info["task"] or "translation")


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1 :]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", help="fairseq-preprocess directory")
    p.add_argument("--path", required=True, help="checkpoint")
    p.add_argument("--subset", default="test")
    p.add_argument("--ref", required=True, help="raw references, one per line, in the order of the subset")
    p.add_argument("--lang", help="target language for the detokenizer (default: the --ref file's suffix)")
    p.add_argument("--out", help="keep fairseq-generate's output here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = p.parse_args(argv)
    for what, path in (("data directory", args.data), ("checkpoint", args.path), ("reference file", args.ref)):
        if not os.path.exists(path):
            sys.exit(f"score.py: no such {what}: {path}")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    if args.out:
        from io_checks import check_output

        check_output(args.out, args.overwrite, "score.py", "--out")
    from io_checks import read_lines

    refs = read_lines(args.ref, "score.py")
    task = task_of(args.path, args.data, args.subset, len(refs))
    lang = args.lang or os.path.splitext(args.ref)[1].lstrip(".")

    from sacrebleu.metrics import BLEU
    from sacremoses import MosesDetokenizer

    cmd = ["fairseq-generate", args.data, "--user-dir", USER_DIR, "--task", task, "--path", args.path,
           "--gen-subset", args.subset, "--remove-bpe", "--max-len-a", "1.2", "--max-len-b", "10",
           "--batch-size", "64", "--num-workers", "0", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"score.py: fairseq-generate failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    if args.out:
        with tempfile.NamedTemporaryFile("w", dir=os.path.dirname(os.path.abspath(args.out)), delete=False) as f:
            f.write(proc.stdout)
        os.replace(f.name, args.out)
    hyps = hypotheses(proc.stdout)
    if sorted(hyps) != list(range(len(refs))):
        sys.exit(f"score.py: {len(hyps)} hypotheses for {len(refs)} references ({args.ref} is not the "
                 f"{args.subset} split of {args.data}?)")
    md = MosesDetokenizer(lang=lang)
    bleu = BLEU()
    score = bleu.corpus_score([md.detokenize(hyps[i].split()) for i in range(len(refs))], [refs])
    print(f"signature {bleu.get_signature()}")
    print(score)  # BLEU = 31.19 62.0/37.9/... (BP = ... ratio = ... hyp_len = ... ref_len = ...)


if __name__ == "__main__":
    main()
