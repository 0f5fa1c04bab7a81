#!/usr/bin/env bash
# Autoregressive fairseq `transformer` teacher (for sequence-level distillation and as the speed/BLEU baseline)
# of a named size: the arch transformer_teacher_SIZE of vq_nat/models/presets.py, the one definition of the sizes
# that the Latent Transformer archs share (registered by `--user-dir vq_nat`).
#
#   bash scripts/train-teacher.sh DATA_BIN SAVE_DIR [--size tiny|base] [--dry-run] [fairseq-train options]
#
#   --size tiny   d=128, ffn 256, 4 heads, 3+3 layers (latent_transformer_tiny's transformer part; the default);
#                 lr 1e-3, 300 warm-up updates, 3,000 updates
#   --size base   d=512, ffn 2048, 8 heads, 6+6 layers (the paper's base transformer, as `latent_transformer`);
#                 lr 7e-4, 4,000 warm-up updates, 100,000 updates
#   --dry-run     print the fairseq-train command and run nothing
#
# Shared embeddings (joined dictionary), label smoothing 0.1, Adam (0.9, 0.98), inverse-sqrt schedule,
# --max-tokens 4096. Every fairseq-train option given after DATA_BIN SAVE_DIR comes last and so wins, e.g.
# `--encoder-layers 6 --decoder-layers 1` (a deep-encoder / shallow-decoder AR), another `--arch` (with all of its
# own sizes), `--fp16`, `--update-freq 8`, `--max-update 200000`, `--cpu`. fairseq trains on the GPU(s) it sees
# and on the CPU otherwise. Resumable (fairseq continues from SAVE_DIR/checkpoint_last.pt). Tools come from PATH;
# `--user-dir vq_nat` also restores the last batch that fairseq-fixed drops (see README).
set -euo pipefail
die() { echo "train-teacher.sh: error: $*" >&2; exit 1; }
usage="usage: train-teacher.sh DATA_BIN SAVE_DIR [--size tiny|base] [--dry-run] [fairseq-train options]"
case "${1:-}" in -h|--help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;; esac
[ $# -ge 2 ] || die "$usage"
data="$1"; save="$2"; shift 2
size=tiny; dry_run=0; extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --size) [ $# -ge 2 ] || die "--size needs a value (tiny or base)"; size="$2"; shift 2 ;;
    --size=*) size="${1#--size=}"; shift ;;
    --dry-run) dry_run=1; shift ;;
    *) extra+=("$1"); shift ;;
  esac
done
case "$size" in
  tiny) schedule=(--lr 1e-3 --warmup-updates 300 --max-update 3000) ;;
  base) schedule=(--lr 7e-4 --warmup-updates 4000 --max-update 100000) ;;
  *) die "unknown --size '$size' (choose tiny or base)" ;;
esac
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cmd=(fairseq-train "$data" --user-dir "$root/vq_nat" --task translation --arch "transformer_teacher_$size"
  --share-all-embeddings --dropout 0.1 --criterion label_smoothed_cross_entropy --label-smoothing 0.1
  --optimizer adam --adam-betas '(0.9,0.98)' "${schedule[@]}" --lr-scheduler inverse_sqrt
  --max-tokens 4096 --save-dir "$save" --no-epoch-checkpoints --num-workers 0
  --no-progress-bar --log-interval 50 ${extra[@]+"${extra[@]}"})
if [ "$dry_run" = 1 ]; then
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi
command -v fairseq-train >/dev/null 2>&1 || die "fairseq-train not on PATH (source .venv/bin/activate)"
[ -d "$data" ] || die "no such directory: $data"
ls "$data"/dict.*.txt >/dev/null 2>&1 || die "$data has no fairseq dictionaries (run scripts/prepare-data.sh)"
exec "${cmd[@]}"
