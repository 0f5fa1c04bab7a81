#!/usr/bin/env bash
# Multi30k En-De (task 1: train 29k / val 1,014 / test_2016_flickr 1,000) -> fairseq binary data.
#
#   bash scripts/prepare-multi30k.sh RAW_DIR OUT_DIR [prepare-data.sh options, e.g. --merges 8000]
#
# RAW_DIR holds train.{en,de}.gz, val.{en,de}.gz, test_2016_flickr.{en,de}.gz (the multi30k/dataset
# repository's data/task1/raw/). If RAW_DIR does not exist and the machine is online, the public originals are
# downloaded into it.
set -euo pipefail
die() { echo "prepare-multi30k.sh: error: $*" >&2; exit 1; }
[ $# -ge 2 ] || die "usage: prepare-multi30k.sh RAW_DIR OUT_DIR [options]"
raw="$1"; out="$2"; shift 2
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
url=https://raw.githubusercontent.com/multi30k/dataset/master/data/task1/raw

if [ ! -d "$raw" ]; then
  echo "prepare-multi30k.sh: $raw not found; downloading the public Multi30k files"
  mkdir -p "$raw"
  for f in train val test_2016_flickr; do
    for l in en de; do
      curl -fsSL "$url/$f.$l.gz" -o "$raw/$f.$l.gz" || { rm -rf "$raw"; die "download of $f.$l.gz failed (offline?)"; }
    done
  done
fi

# prepare-data.sh refuses an OUT_DIR that holds prepared data; check it before raw/ is rewritten
if [ -e "$out/bin" ] && [[ " $* " != *" --overwrite "* ]]; then
  die "$out already holds prepared data (bin); pass --overwrite to replace it, or choose another OUT_DIR"
fi
mkdir -p "$out/raw"
for pair in train:train valid:val test:test_2016_flickr; do
  split="${pair%%:*}"; name="${pair#*:}"
  for l in en de; do
    f="$raw/$name.$l.gz"; [ -f "$f" ] || f="$raw/$name.$l"
    [ -f "$f" ] || die "missing $raw/$name.$l.gz"
    case "$f" in *.gz) gzip -cd "$f" ;; *) cat "$f" ;; esac > "$out/raw/$split.$l"
  done
done
exec bash "$here/prepare-data.sh" "$out/raw" "$out" --src en --tgt de "$@"
