#!/usr/bin/env bash
# Sequence-level knowledge distillation (Kim & Rush 2016): beam-decode the training set with the teacher
# (paper: beam 4), take the hypotheses in the original order, and binarize them as the new targets with the
# same dictionary (sources and valid/test sets unchanged).
#
#   bash scripts/distill.sh DATA_BIN TEACHER.pt OUT_BIN [--beam 4] [--batch-size 128]
#
# DATA_BIN is a fairseq-preprocess directory with a joined dictionary (scripts/prepare-data.sh). OUT_BIN gets
# the distilled train split plus copies/links of the valid and test splits and the dictionaries. Resumable: a
# finished decoding (OUT_BIN/text/train.gen) is reused when the script runs again.
set -euo pipefail
die() { echo "distill.sh: error: $*" >&2; exit 1; }
[ $# -ge 3 ] || die "usage: distill.sh DATA_BIN TEACHER.pt OUT_BIN [--beam 4] [--batch-size 128]"
data="$1"; teacher="$2"; out="$3"; shift 3
beam=4; bsz=128
while [ $# -gt 0 ]; do
  case "$1" in --beam) beam="$2"; shift 2 ;; --batch-size) bsz="$2"; shift 2 ;; *) die "unknown option $1" ;; esac
done
for tool in fairseq-generate fairseq-preprocess python; do
  command -v "$tool" >/dev/null 2>&1 || die "'$tool' not on PATH (source .venv/bin/activate)"
done
[ -d "$data" ] || die "no such directory: $data"
[ -f "$teacher" ] || die "no such checkpoint: $teacher"
src=$(ls "$data"/train.*-*.*.idx 2>/dev/null | head -1 | sed -E 's/.*train\.([^-]+)-([^.]+)\..*/\1/')
tgt=$(ls "$data"/train.*-*.*.idx 2>/dev/null | head -1 | sed -E 's/.*train\.([^-]+)-([^.]+)\..*/\2/')
[ -n "$src" ] && [ -n "$tgt" ] || die "$data has no binarized train split"
user_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/vq_nat"
mkdir -p "$out/text"

if [ -s "$out/text/train.gen" ]; then  # resumable: a finished decoding (written atomically) is kept
  echo "distill.sh: reusing $out/text/train.gen (delete it to decode again)"
else
  echo "distill.sh: beam-$beam decoding of the training set ($src -> $tgt)"
  fairseq-generate "$data" --user-dir "$user_dir" --path "$teacher" --gen-subset train --beam "$beam" \
    --batch-size "$bsz" --num-workers 0 --required-batch-size-multiple 1 > "$out/text/train.gen.tmp"
  mv "$out/text/train.gen.tmp" "$out/text/train.gen"
fi
python - "$out/text" "$data" "$src" "$tgt" <<'PY'
import sys
from fairseq.data import Dictionary, data_utils
outdir, data, src, tgt = sys.argv[1:5]
d = Dictionary.load(f"{data}/dict.{src}.txt")
ds = data_utils.load_indexed_dataset(f"{data}/train.{src}-{tgt}.{src}", d)
n = len(ds)
src_lines, hyp = [], {}
for line in open(f"{outdir}/train.gen", encoding="utf-8"):
    if line.startswith("H-"):
        i, _, text = line.rstrip("\n").split("\t")
        hyp[int(i[2:])] = text
missing = [i for i in range(n) if i not in hyp]
if missing:
    sys.exit(f"distill.sh: error: {len(missing)} of {n} training sentences have no hypothesis (e.g. id {missing[0]})")
with open(f"{outdir}/train.{src}", "w", encoding="utf-8") as fs, open(f"{outdir}/train.{tgt}", "w", encoding="utf-8") as ft:
    for i in range(n):
        fs.write(d.string(ds[i]) + "\n")  # the source exactly as binarized (BPE kept)
        ft.write(hyp[i] + "\n")
print(f"distill.sh: {n} distilled pairs")
PY
rm -rf "$out/bin.tmp"
fairseq-preprocess --source-lang "$src" --target-lang "$tgt" --srcdict "$data/dict.$src.txt" \
  --tgtdict "$data/dict.$tgt.txt" --trainpref "$out/text/train" --destdir "$out/bin.tmp" --workers 2 \
  > "$out/text/preprocess.log" 2>&1 || { cat "$out/text/preprocess.log" >&2; die "fairseq-preprocess failed"; }
mv "$out/bin.tmp"/train.* "$out/"
cp "$data"/dict.*.txt "$out/"
for f in "$data"/valid.* "$data"/test.*; do [ -e "$f" ] && cp "$f" "$out/"; done
rm -rf "$out/bin.tmp"
echo "distill.sh: done: $out"
