#!/usr/bin/env bash
# Raw parallel text -> sacremoses normalisation + tokenisation -> subword-nmt joint BPE -> fairseq-preprocess.
#
#   bash scripts/prepare-data.sh RAW_DIR OUT_DIR [--src en] [--tgt de] [--merges 8000] [--workers 2] [--overwrite]
#
# RAW_DIR holds {train,valid,test}.{SRC,TGT} (plain or .gz), one sentence per line, line-aligned.
# OUT_DIR gets tok/ (tokenised), bpe/ (BPE codes + segmented text) and bin/ (fairseq binary data with a
# joined dictionary). Every sentence pair is kept (empty lines too): fairseq's training-time size filters decide.
# An OUT_DIR that already holds prepared data is replaced only with --overwrite (checked before any work).
# Tools come from PATH (the active environment): sacremoses, subword-nmt, fairseq-preprocess.
set -euo pipefail

die() { echo "prepare-data.sh: error: $*" >&2; exit 1; }
usage="usage: prepare-data.sh RAW_DIR OUT_DIR [--src en] [--tgt de] [--merges 8000] [--workers 2] [--overwrite]"
[ $# -ge 2 ] || die "$usage"
raw="$1"; out="$2"; shift 2
src=en; tgt=de; merges=8000; workers=2; overwrite=0
while [ $# -gt 0 ]; do
  case "$1" in
    --src|--tgt|--merges|--workers) [ $# -ge 2 ] || die "$1 needs a value" ;;&
    --src) src="$2"; shift 2 ;;
    --tgt) tgt="$2"; shift 2 ;;
    --merges) merges="$2"; shift 2 ;;
    --workers) workers="$2"; shift 2 ;;
    --overwrite) overwrite=1; shift ;;
    *) die "unknown option $1 ($usage)" ;;
  esac
done
[[ "$workers" =~ ^[1-9][0-9]*$ ]] || die "--workers must be an integer >= 1, got '$workers'"
[[ "$merges" =~ ^[1-9][0-9]*$ ]] || die "--merges must be an integer >= 1 (BPE merge operations), got '$merges'"
[ "$src" != "$tgt" ] || die "--src and --tgt are both '$src'"
[ ! -e "$out" ] || [ -d "$out" ] || die "OUT_DIR $out is a file, not a directory"
existing=$(for d in tok bpe bin preprocess.log; do [ -e "$out/$d" ] && printf '%s ' "$d"; done; true)
if [ -n "$existing" ] && [ "$overwrite" != 1 ]; then
  die "$out already holds prepared data (${existing% }); pass --overwrite to replace it, or choose another OUT_DIR"
fi

for tool in sacremoses subword-nmt fairseq-preprocess; do
  command -v "$tool" >/dev/null 2>&1 || die "'$tool' not found on PATH (activate the environment: source .venv/bin/activate)"
done
[ -d "$raw" ] || die "no such directory: $raw"

cat_any() { case "$1" in *.gz) gzip -cd "$1" ;; *) cat "$1" ;; esac; }
find_file() {  # split lang -> path of the plain or gzipped file
  for f in "$raw/$1.$2" "$raw/$1.$2.gz"; do [ -f "$f" ] && { echo "$f"; return; }; done
  die "missing file: $raw/$1.$2 (or $raw/$1.$2.gz)"
}

check_text() {  # path -> dies naming the file and line when it is not UTF-8
  cat_any "$1" | python3 -c '
import sys
for i, line in enumerate(sys.stdin.buffer, 1):
    try:
        line.decode("utf-8")
    except UnicodeDecodeError as e:
        sys.exit(f"line {i} is not UTF-8 (byte {e.start + 1}: {line[e.start:e.start + 1]!r}); convert the file, e.g. iconv -f latin1 -t utf-8")
' 2>&1 >/dev/null | { msg=$(cat); [ -z "$msg" ] || die "$1: $msg"; }
}

# every input checked before anything is written: present, line-aligned, not empty, UTF-8
for split in train valid test; do
  fs="$(find_file "$split" "$src")"; ft="$(find_file "$split" "$tgt")"
  ns=$(cat_any "$fs" | wc -l); nt=$(cat_any "$ft" | wc -l)
  [ "$ns" -eq "$nt" ] || die "$split: $fs has $ns lines but $ft has $nt (not line-aligned)"
  [ "$ns" -gt 0 ] || die "$split: $fs and $ft are empty (every split needs at least one sentence pair)"
  check_text "$fs"; check_text "$ft"
done

# built in a scratch directory next to OUT_DIR and moved into place at the end: a failure leaves no partial output
final="$out"
mkdir -p "$(dirname "$final")"
out="$(mktemp -d "${final%/}.partial.XXXXXX")"
trap 'rm -rf "$out"' EXIT
mkdir -p "$out/tok" "$out/bpe"
for split in train valid test; do
  fs="$(find_file "$split" "$src")"
  ns=$(cat_any "$fs" | wc -l)
  for lang in "$src" "$tgt"; do
    f="$(find_file "$split" "$lang")"
    echo "prepare-data.sh: tokenising $f ($ns lines)"
    cat_any "$f" | sacremoses -q -l "$lang" -j "$workers" normalize | \
      sacremoses -q -l "$lang" -j "$workers" tokenize -a > "$out/tok/$split.$lang"
    n=$(wc -l < "$out/tok/$split.$lang")
    [ "$n" -eq "$ns" ] || die "tokenisation changed the line count of $f ($ns -> $n)"
  done
done

echo "prepare-data.sh: learning joint BPE ($merges merges)"
subword-nmt learn-joint-bpe-and-vocab --input "$out/tok/train.$src" "$out/tok/train.$tgt" -s "$merges" \
  -o "$out/bpe/codes" --write-vocabulary "$out/bpe/vocab.$src" "$out/bpe/vocab.$tgt"
for split in train valid test; do
  for lang in "$src" "$tgt"; do
    subword-nmt apply-bpe -c "$out/bpe/codes" --vocabulary "$out/bpe/vocab.$lang" --vocabulary-threshold 1 \
      < "$out/tok/$split.$lang" > "$out/bpe/$split.$lang"
  done
done

echo "prepare-data.sh: binarising"
fairseq-preprocess --source-lang "$src" --target-lang "$tgt" --joined-dictionary \
  --trainpref "$out/bpe/train" --validpref "$out/bpe/valid" --testpref "$out/bpe/test" \
  --destdir "$out/bin" --workers "$workers" > "$out/preprocess.log" 2>&1 || { cat "$out/preprocess.log" >&2; die "fairseq-preprocess failed"; }
entries=$(wc -l < "$out/bin/dict.$src.txt")
mkdir -p "$final"
rm -rf "$final/tok" "$final/bpe" "$final/bin" "$final/preprocess.log"
mv "$out/tok" "$out/bpe" "$out/bin" "$out/preprocess.log" "$final/"
echo "prepare-data.sh: done: $final/bin ($entries dictionary entries)"
