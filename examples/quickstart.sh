#!/usr/bin/env bash
# The main job: Multi30k En->De with a small Latent Transformer trained by soft EM.
#   prepare (sacremoses + joint BPE + fairseq-preprocess) -> fairseq-train latent_transformer_tiny
#   -> fairseq-generate test2016 -> sacreBLEU (detokenized, cased), ms/sentence at batch 1 and 64, and a few
#   test translations (detokenized) next to their references.
#
#   bash examples/quickstart.sh                 # defaults: 3,000 updates (README.md gives its BLEU and time)
#   MAX_UPDATE=1000 BOTTLENECK=vq bash examples/quickstart.sh    # a shorter run / another bottleneck
#
# Environment: MULTI30K_DIR (raw data; default ../shared/data/multi30k, downloaded when missing and online),
# WORK_DIR (default runs/quickstart), MAX_UPDATE, BOTTLENECK (em|vq|gumbel|semhash), NUM_SAMPLES, MERGES,
# VENV (default .venv in the checkout, created by scripts/install.sh when missing), SHOW (test translations
# printed at the end, default 5).
# Devices: fairseq trains and decodes on a GPU when one is visible, on the CPU otherwise; CPU=1 forces the CPU.
# TRAIN_ARGS / GENERATE_ARGS: extra fairseq-train / fairseq-generate options, appended (so they win), e.g.
#   TRAIN_ARGS="--fp16" GENERATE_ARGS="--fp16" bash examples/quickstart.sh
# Resumable: rerun the same command and training continues from the last checkpoint.
# latent_transformer_tiny's own defaults are set for budgets from ~1,000 updates (latent loss from update 400,
# codebook EMA decay 0.99 with dead-code re-seeding); see examples/multi30k/README.md for what they give and why.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="${VENV:-$root/.venv}"
[ -x "$venv/bin/fairseq-train" ] || bash scripts/install.sh "$venv"
export PATH="$venv/bin:$PATH"

raw="${MULTI30K_DIR:-$root/../shared/data/multi30k}"
work="${WORK_DIR:-$root/runs/quickstart}"
max_update="${MAX_UPDATE:-3000}"
bottleneck="${BOTTLENECK:-em}"
num_samples="${NUM_SAMPLES:-10}"
merges="${MERGES:-6000}"
show="${SHOW:-5}"
[[ "$show" =~ ^[0-9]+$ ]] || { echo "quickstart: SHOW must be a number of sentences, not '$show'" >&2; exit 1; }
data="$work/data"
device=()
case "${CPU:-0}" in 0|"") ;; 1) device=(--cpu) ;; *) echo "quickstart: CPU must be 0 or 1, not '$CPU'" >&2; exit 1 ;; esac
read -r -a train_extra <<< "${TRAIN_ARGS:-}"
read -r -a generate_extra <<< "${GENERATE_ARGS:-}"

if [ ! -f "$data/bin/dict.en.txt" ]; then
  # a bin/ without its dictionary is an interrupted preparation: redo it
  bash scripts/prepare-multi30k.sh "$raw" "$data" --merges "$merges" $([ -e "$data/bin" ] && echo --overwrite)
fi

echo "quickstart: training latent_transformer_tiny ($bottleneck) for $max_update updates"
set +e  # keep fairseq-train's own exit status (checked below) through the log filter
fairseq-train "$data/bin" --user-dir vq_nat --task latent_translation --arch latent_transformer_tiny \
  --criterion latent_vq --bottleneck "$bottleneck" --num-samples "$num_samples" --share-all-embeddings \
  --optimizer adam --adam-betas '(0.9,0.98)' --lr 1e-3 --lr-scheduler inverse_sqrt --warmup-updates 300 \
  --max-tokens 4096 --max-update "$max_update" --dropout 0.1 \
  --save-dir "$work/checkpoints" --no-epoch-checkpoints --validate-interval-updates 400 --save-interval-updates 400 \
  --keep-interval-updates 1 --log-interval 50 --no-progress-bar --num-workers 0 \
  ${device[@]+"${device[@]}"} ${train_extra[@]+"${train_extra[@]}"} \
  2>&1 | tee "$work/train.log" | { grep --line-buffered -E "train_inner|valid on|done training|Error|error" || true; }
rc=${PIPESTATUS[0]}
set -e
[ "$rc" -eq 0 ] || { echo "quickstart: fairseq-train failed (exit $rc); end of $work/train.log:" >&2; tail -20 "$work/train.log" >&2; exit 1; }
ckpt="$work/checkpoints/checkpoint_last.pt"
[ -f "$ckpt" ] || { echo "quickstart: training produced no checkpoint" >&2; exit 1; }

echo "quickstart: decoding test2016"
for bs in 64 1; do
  fairseq-generate "$data/bin" --user-dir vq_nat --task latent_translation --path "$ckpt" --gen-subset test \
    --batch-size "$bs" --remove-bpe --num-workers 0 --max-len-a 1.2 --max-len-b 10 \
    ${device[@]+"${device[@]}"} ${generate_extra[@]+"${generate_extra[@]}"} > "$work/gen.b$bs.txt" 2>&1 \
    && grep -q "Translated .* sentences" "$work/gen.b$bs.txt" \
    || { echo "quickstart: fairseq-generate at batch $bs failed; end of $work/gen.b$bs.txt:" >&2
         tail -20 "$work/gen.b$bs.txt" >&2; exit 1; }
done
python - "$work" "$data" "$root/scripts" "$show" <<'PY'
import sys
work, data, show = sys.argv[1], sys.argv[2], int(sys.argv[4])
sys.path.insert(0, sys.argv[3])
from experiments import read_generate, score  # the scoring of scripts/experiments.py (sacremoses + sacreBLEU)
from sacremoses import MosesDetokenizer

bleu, signature = score(f"{work}/gen.b64.txt", f"{data}/raw/test.de", "de")
print(f"quickstart: test2016 sacreBLEU (detokenized, cased) = {bleu:.2f}  [{signature}]")
for bs in (64, 1):
    hyps, ms = read_generate(f"{work}/gen.b{bs}.txt")
    print(f"quickstart: batch {bs}: {ms:.1f} ms/sentence ({len(hyps)} sentences)")
hyps, _ = read_generate(f"{work}/gen.b64.txt")
sources = open(f"{data}/raw/test.en", encoding="utf-8").read().splitlines()
refs = open(f"{data}/raw/test.de", encoding="utf-8").read().splitlines()
detok = MosesDetokenizer(lang="de")
n = min(show, len(hyps))
if n > 0:  # evenly spread over the test set, in its order
    print(f"quickstart: {n} of the {len(hyps)} test translations (detokenized), with their references:")
    for i in sorted({(k * len(hyps)) // n for k in range(n)}):
        print(f"\n  source     {sources[i]}\n  LT         {detok.detokenize(hyps[i].split())}\n  reference  {refs[i]}")
PY
