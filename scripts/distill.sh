#!/usr/bin/env bash
# Sequence-level knowledge distillation (Kim & Rush 2016): beam-decode the training set with the teacher
# (paper: beam 4), take the hypotheses in the original order, and binarize them as the new targets with the
# same dictionary (sources and valid/test sets unchanged).
#
#   bash scripts/distill.sh DATA_BIN TEACHER.pt OUT_BIN [--beam 4] [--batch-size 128] [--overwrite]
#
# DATA_BIN is a fairseq-preprocess directory with a joined dictionary (scripts/prepare-data.sh); TEACHER.pt an
# autoregressive model trained on it (checked before anything runs). OUT_BIN (created with its parents) gets the
# distilled train split plus copies of the valid and test splits and the dictionaries.
# Resumable: the decoding (OUT_BIN/text/train.gen) is keyed on what produced it (OUT_BIN/text/train.gen.key: the
# teacher file's path, size and modification time, the training data and dictionaries, --beam) and reused
# only when all of these are the same; otherwise the training set is decoded again. A finished OUT_BIN
# (OUT_BIN/distill.key) made from other inputs is not replaced without --overwrite.
set -euo pipefail
die() { echo "distill.sh: error: $*" >&2; exit 1; }
usage="usage: distill.sh DATA_BIN TEACHER.pt OUT_BIN [--beam 4] [--batch-size 128] [--overwrite]"
[ $# -ge 3 ] || die "$usage"
data="$1"; teacher="$2"; out="$3"; shift 3
beam=4; bsz=128; overwrite=0
while [ $# -gt 0 ]; do
  case "$1" in
    --beam) [ $# -ge 2 ] || die "--beam needs a value"; beam="$2"; shift 2 ;;
    --batch-size) [ $# -ge 2 ] || die "--batch-size needs a value"; bsz="$2"; shift 2 ;;
    --overwrite) overwrite=1; shift ;;
    *) die "unknown option $1 ($usage)" ;;
  esac
done
[[ "$beam" =~ ^[1-9][0-9]*$ ]] || die "--beam must be an integer >= 1, got '$beam'"
[[ "$bsz" =~ ^[1-9][0-9]*$ ]] || die "--batch-size must be an integer >= 1, got '$bsz'"
for tool in fairseq-generate python; do
  command -v "$tool" >/dev/null 2>&1 || die "'$tool' not on PATH (source .venv/bin/activate)"
done
[ -d "$data" ] || die "no such directory: $data"
[ -f "$teacher" ] || die "no such checkpoint: $teacher"
[ ! -e "$out" ] || [ -d "$out" ] || die "OUT_BIN $out is a file, not a directory"
# OUT_BIN must not be DATA_BIN (or hold it, or lie inside it): the distilled targets would replace the originals
data_abs="$(readlink -f "$data")"; out_abs="$(readlink -m "$out")"
case "$out_abs/" in "$data_abs/"*) die "OUT_BIN $out is DATA_BIN or inside it: choose another directory" ;; esac
case "$data_abs/" in "$out_abs/"*) die "OUT_BIN $out holds DATA_BIN $data: choose another directory" ;; esac
src=$(ls "$data"/train.*-*.*.idx 2>/dev/null | head -1 | sed -E 's/.*train\.([^-]+)-([^.]+)\..*/\1/')
tgt=$(ls "$data"/train.*-*.*.idx 2>/dev/null | head -1 | sed -E 's/.*train\.([^-]+)-([^.]+)\..*/\2/')
[ -n "$src" ] && [ -n "$tgt" ] || die "$data has no binarized train split"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
user_dir="$here/../vq_nat"
# the teacher must be an autoregressive model of this data's dictionaries (one line naming it otherwise)
python "$here/io_checks.py" autoregressive "$teacher" --data "$data" --prog distill.sh --option TEACHER.pt \
  || exit 1

key_of() {  # what the decoding depends on: the teacher file, the training data and dictionaries, the beam
  local f
  printf 'teacher %s %s\n' "$(readlink -f "$teacher")" "$(stat -L -c '%s %Y' "$teacher")"
  for f in "$data"/train."$src-$tgt".* "$data/dict.$src.txt" "$data/dict.$tgt.txt"; do
    printf 'data %s %s\n' "$(readlink -f "$f")" "$(stat -L -c '%s %Y' "$f")"
  done
  printf 'beam %s\n' "$beam"
}
key="$(key_of)"
same_key() { [ -f "$1" ] && [ "$(cat "$1")" = "$key" ]; }

# a finished distillation of other inputs is replaced only with --overwrite (one without distill.key is
# unfinished when its decoding has this key: stopped between binarizing and writing distill.key)
if [ -f "$out/distill.key" ] || ls "$out"/train.*.bin >/dev/null 2>&1; then
  if ! same_key "$out/distill.key" && { [ -f "$out/distill.key" ] || ! same_key "$out/text/train.gen.key"; }; then
    if [ "$overwrite" = 1 ]; then
      echo "distill.sh: --overwrite: replacing the distillation in $out"
      rm -f "$out/distill.key"
    elif [ -f "$out/distill.key" ]; then
      die "$out holds a distillation of other inputs:
$(diff <(cat "$out/distill.key") <(printf '%s\n' "$key") | sed -n 's/^< /  was: /p; s/^> /  now: /p')
pass --overwrite to replace it, or choose another OUT_BIN"
    else
      die "$out holds distilled data of unknown origin (no distill.key); pass --overwrite to replace it, or choose another OUT_BIN"
    fi
  fi
fi
mkdir -p "$out/text" || die "cannot create $out/text"

if same_key "$out/text/train.gen.key" && [ -s "$out/text/train.gen" ]; then
  echo "distill.sh: reusing $out/text/train.gen (decoded by the same teacher from the same data and options)"
else
  [ ! -e "$out/text/train.gen" ] || echo "distill.sh: $out/text/train.gen was decoded from other inputs (or its key is missing): decoding again"
  rm -f "$out/text/train.gen.key" "$out/text/train.gen"
  echo "distill.sh: beam-$beam decoding of the training set ($src -> $tgt)"
  fairseq-generate "$data" --user-dir "$user_dir" --path "$teacher" --gen-subset train --beam "$beam" \
    --batch-size "$bsz" --num-workers 0 --required-batch-size-multiple 1 > "$out/text/train.gen.tmp"
  mv "$out/text/train.gen.tmp" "$out/text/train.gen"
  printf '%s\n' "$key" > "$out/text/train.gen.key"
fi
# the hypotheses in the original order, then binarized with the data's dictionaries (in one Python process)
rm -rf "$out/bin.tmp"
python - "$out" "$data" "$src" "$tgt" <<'PY' || die "binarizing the distilled data failed"
import contextlib
import glob
import os
import shutil
import sys

from fairseq.data import Dictionary, data_utils

out, data, src, tgt = sys.argv[1:5]
outdir = os.path.join(out, "text")
d = Dictionary.load(f"{data}/dict.{src}.txt")
ds = data_utils.load_indexed_dataset(f"{data}/train.{src}-{tgt}.{src}", d)
n = len(ds)
hyp = {}
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
sys.stdout.flush()
log = os.path.join(outdir, "preprocess.log")
try:
    with open(log, "w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        from fairseq_cli import preprocess  # its logging goes to the redirected stdout

        args = preprocess.options.get_preprocessing_parser().parse_args(
            ["--source-lang", src, "--target-lang", tgt, "--srcdict", f"{data}/dict.{src}.txt",
             "--tgtdict", f"{data}/dict.{tgt}.txt", "--trainpref", f"{outdir}/train",
             "--destdir", os.path.join(out, "bin.tmp"), "--workers", "2"])
        preprocess.main(args)
except BaseException:
    sys.stderr.write(open(log).read())
    raise
for f in glob.glob(os.path.join(out, "bin.tmp", "train.*")):
    shutil.move(f, os.path.join(out, os.path.basename(f)))
PY
cp "$data"/dict.*.txt "$out/"
for f in "$data"/valid.* "$data"/test.*; do [ -e "$f" ] && cp "$f" "$out/"; done
rm -rf "$out/bin.tmp"
printf '%s\n' "$key" > "$out/distill.key"
echo "distill.sh: done: $out"
