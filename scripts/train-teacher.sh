#!/usr/bin/env bash
# Autoregressive fairseq `transformer` teacher of the same size as the student (for sequence-level distillation
# and as the speed/BLEU baseline).
#
#   bash scripts/train-teacher.sh DATA_BIN SAVE_DIR [extra fairseq-train options]
#
# Defaults match latent_transformer_tiny's transformer part: d=128, ffn 256, 4 heads, 3+3 layers, shared
# embeddings. Pass e.g. `--arch transformer --max-update 100000` for the paper's base size. Resumable (fairseq
# continues from SAVE_DIR/checkpoint_last.pt). Tools come from PATH; `--user-dir vq_nat` is passed so that
# fairseq-fixed's dropped last batch is restored (see README).
set -euo pipefail
die() { echo "train-teacher.sh: error: $*" >&2; exit 1; }
[ $# -ge 2 ] || die "usage: train-teacher.sh DATA_BIN SAVE_DIR [fairseq-train options]"
data="$1"; save="$2"; shift 2
command -v fairseq-train >/dev/null 2>&1 || die "fairseq-train not on PATH (source .venv/bin/activate)"
[ -d "$data" ] || die "no such directory: $data"
ls "$data"/dict.*.txt >/dev/null 2>&1 || die "$data has no fairseq dictionaries (run scripts/prepare-data.sh)"
user_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/vq_nat"
fairseq-train "$data" --user-dir "$user_dir" --task translation --arch transformer \
  --encoder-embed-dim 128 --decoder-embed-dim 128 --encoder-ffn-embed-dim 256 --decoder-ffn-embed-dim 256 \
  --encoder-attention-heads 4 --decoder-attention-heads 4 --encoder-layers 3 --decoder-layers 3 \
  --share-all-embeddings --dropout 0.1 --criterion label_smoothed_cross_entropy --label-smoothing 0.1 \
  --optimizer adam --adam-betas '(0.9,0.98)' --lr 1e-3 --lr-scheduler inverse_sqrt --warmup-updates 300 \
  --max-tokens 4096 --max-update 3000 --save-dir "$save" --no-epoch-checkpoints --num-workers 0 \
  --no-progress-bar --log-interval 50 "$@"
