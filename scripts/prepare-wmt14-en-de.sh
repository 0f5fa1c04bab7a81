#!/usr/bin/env bash
# WMT'14 English-German (the paper's data: 4.5M pairs; dev newstest2013, test newstest2014) -> fairseq binary data.
#
#   bash scripts/prepare-wmt14-en-de.sh RAW_DIR OUT_DIR [prepare-data.sh options; default --merges 32000]
#
# RAW_DIR holds the statmt.org archives training-parallel-europarl-v7.tgz, training-parallel-commoncrawl.tgz,
# training-parallel-nc-v12.tgz, dev.tgz and test-full.tgz (the same corpora as fairseq's
# examples/translation/prepare-wmt14en2de.sh). If RAW_DIR does not exist and the machine is online, they are
# downloaded into it (about 1.5 GB). Then: extract, strip the SGML of the test set, write
# {train,valid,test}.{en,de} and hand over to prepare-data.sh (sacremoses + joint BPE + fairseq-preprocess,
# every pair kept). Expect hours on a laptop-class CPU for the BPE and binarisation of 4.5M pairs.
# Status: only the local-archive path and the error paths were run in development (the development machine
# had no internet access beyond PyPI); the download URLs are those of fairseq's own script.
set -euo pipefail
die() { echo "prepare-wmt14-en-de.sh: error: $*" >&2; exit 1; }
[ $# -ge 2 ] || die "usage: prepare-wmt14-en-de.sh RAW_DIR OUT_DIR [prepare-data.sh options]"
raw="$1"; out="$2"; shift 2
if [ -e "$out/bin" ] && [[ " $* " != *" --overwrite "* ]]; then  # checked before raw/ is rewritten
  die "$out already holds prepared data (bin); pass --overwrite to replace it, or choose another OUT_DIR"
fi
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
archives="training-parallel-europarl-v7.tgz training-parallel-commoncrawl.tgz training-parallel-nc-v12.tgz dev.tgz test-full.tgz"
urls="http://statmt.org/wmt13/training-parallel-europarl-v7.tgz http://statmt.org/wmt13/training-parallel-commoncrawl.tgz
http://data.statmt.org/wmt17/translation-task/training-parallel-nc-v12.tgz http://data.statmt.org/wmt17/translation-task/dev.tgz
http://statmt.org/wmt14/test-full.tgz"

if [ ! -d "$raw" ]; then
  command -v curl >/dev/null 2>&1 || die "$raw not found and curl is not installed"
  echo "prepare-wmt14-en-de.sh: $raw not found; downloading the WMT'14 archives"
  mkdir -p "$raw"
  for u in $urls; do
    curl -fSL "$u" -o "$raw/$(basename "$u")" || { rm -rf "$raw"; die "download of $u failed (offline?)"; }
  done
fi
for a in $archives; do [ -f "$raw/$a" ] || die "missing archive: $raw/$a"; done

work="$out/wmt14"
mkdir -p "$work/extract" "$out/raw"
for a in $archives; do
  tar -xzf "$raw/$a" -C "$work/extract" || die "cannot extract $raw/$a (corrupt download?)"
done
x="$work/extract"
pick() {  # first existing file among the arguments
  for f in "$@"; do [ -f "$f" ] && { echo "$f"; return; }; done
  die "none of these files is in the archives: $*"
}
for l in en de; do
  {
    cat "$(pick "$x/training/europarl-v7.de-en.$l" "$x/europarl-v7.de-en.$l")"
    cat "$(pick "$x/commoncrawl.de-en.$l")"
    cat "$(pick "$x/training/news-commentary-v12.de-en.$l" "$x/news-commentary-v12.de-en.$l")"
  } > "$out/raw/train.$l"
  cat "$(pick "$x/dev/newstest2013.$l")" > "$out/raw/valid.$l"
  # newstest2014 (the "full" version, 3,003 sentences): keep the text of the <seg> elements
  sed -n 's/^[[:space:]]*<seg[^>]*>\(.*\)<\/seg>[[:space:]]*$/\1/p' \
    "$(pick "$x/test-full/newstest2014-deen-$( [ $l = en ] && echo src || echo ref ).$l.sgm")" > "$out/raw/test.$l"
done
for split in train valid test; do
  ne=$(wc -l < "$out/raw/$split.en"); nd=$(wc -l < "$out/raw/$split.de")
  [ "$ne" -eq "$nd" ] || die "$split: $ne English vs $nd German lines"
  echo "prepare-wmt14-en-de.sh: $split: $ne sentence pairs"
done
rm -rf "$work/extract"
has_merges=0
for a in "$@"; do [ "$a" = "--merges" ] && has_merges=1; done
[ $has_merges = 1 ] || set -- --merges 32000 "$@"
exec bash "$here/prepare-data.sh" "$out/raw" "$out" --src en --tgt de "$@"
