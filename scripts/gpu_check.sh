#!/usr/bin/env bash
# The GPU check, one command on a machine with one CUDA GPU: Multi30k En->De, the tiny Latent Transformer (soft EM,
# latent_transformer_tiny) and its autoregressive transformer of the same size trained with --fp16 for a few
# hundred updates, test2016 decoded and scored (sacreBLEU, detokenized), and scripts/bench_decode.py at batch 1 and
# 64 on the GPU (LT vs AR greedy, like for like, fp32 decoding); ends with one markdown table (also written to
# WORK/gpu_check.md) naming the card.
#
#   bash scripts/gpu_check.sh [--work DIR] [--max-update N] [--overwrite]
#
#   --work DIR        working directory (default runs/gpu_check); the prepared data is kept there and reused
#   --max-update N    training updates of each model (default 800; the LT's latent loss starts at update 400)
#   --overwrite       run again although DIR/gpu_check.md (a finished check) exists: its models are retrained
#
# Environment: MULTI30K_DIR (raw Multi30k; default ../shared/data/multi30k, downloaded when missing and online),
# VENV (default .venv in the checkout, used when fairseq-train is not on PATH). With several GPUs visible only
# the first is used. Without a CUDA GPU it refuses, runs nothing and exits non-zero.
# Every step is a script of this repository: prepare-multi30k.sh, experiments.py table1 (fairseq-train /
# fairseq-generate commands, printed as they run), bench_decode.py.
set -euo pipefail
die() { echo "gpu_check.sh: error: $*" >&2; exit 1; }
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
work="$root/runs/gpu_check"; max_update=800; overwrite=0
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    --work) [ $# -ge 2 ] || die "--work needs a directory"; work="$2"; shift 2 ;;
    --max-update) [ $# -ge 2 ] || die "--max-update needs a number"; max_update="$2"; shift 2 ;;
    --overwrite) overwrite=1; shift ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done
[[ "$max_update" =~ ^[1-9][0-9]*$ ]] || die "--max-update must be a positive number of updates, not '$max_update'"
venv="${VENV:-$root/.venv}"
command -v fairseq-train >/dev/null 2>&1 || export PATH="$venv/bin:$PATH"
command -v fairseq-train >/dev/null 2>&1 || die "fairseq-train not on PATH (bash scripts/install.sh, then source .venv/bin/activate)"

# refuse before anything is written: the check measures a GPU and means nothing without one
python - <<'PY' || die "no CUDA GPU visible (torch.cuda.is_available() is False): this check needs one GPU; nothing was run"
import sys
import torch
sys.exit(0 if torch.cuda.is_available() else 1)
PY
export CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0}"
export CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES%%,*}"  # one GPU: fairseq would otherwise train on all of them

table="$work/gpu_check.md"
exp="$work/exp"
if [ -f "$table" ]; then
  [ "$overwrite" = 1 ] || die "$table exists (a finished check); pass --overwrite to run it again, or another --work"
  rm -rf "$exp" "$table" "$work/bench.txt"
fi
mkdir -p "$work"
started=$(date +%s)
data="$work/data"
if [ ! -f "$data/bin/dict.en.txt" ]; then
  bash "$root/scripts/prepare-multi30k.sh" "${MULTI30K_DIR:-$root/../shared/data/multi30k}" "$data" \
    --merges 6000 --workers "$(nproc 2>/dev/null || echo 2)"
fi

lt=lt-em-raw-K512-m10-nc1-s1
echo "gpu_check.sh: fp16 training of the AR transformer and the LT ($max_update updates each), decoding test2016"
python "$root/scripts/experiments.py" table1 --data "$data/bin" --raw "$data/raw" --work "$exp" \
  --max-update "$max_update" --max-tokens 4096 --log-interval 50 --only ar "$lt" -- --fp16
echo "gpu_check.sh: decoding speed (bench_decode.py, batch 1 and 64)"
python "$root/scripts/bench_decode.py" "$data/bin" --lt-path "$exp/$lt/checkpoint_last.pt" \
  --ar-path "$exp/ar/checkpoint_last.pt" --batch-sizes 1 64 --ar-beams 1 --repeats 3 --max-sentences 256 \
  | tee "$work/bench.txt"

python - "$exp" "$work/bench.txt" "$table" "$root/scripts" "$started" "$lt" <<'PY'
import json
import os
import re
import sys
import time

import torch

exp, bench_path, table_path, scripts, started, lt = sys.argv[1:7]
sys.path.insert(0, scripts)
from experiments import read_results, train_seconds

bench = {}
for line in open(bench_path):
    m = re.match(r"batch\s+(\d+)\s+(.+?)\s+([\d.]+) ms/sentence", line)
    if m:
        bench[(m[2], int(m[1]))] = float(m[3])
speedup = next((line.split(None, 1)[1].strip() for line in open(bench_path) if line.startswith("speedup ")), "?")


def fp16_seen(run):  # fairseq logs a loss scale only when it trains in fp16
    log = os.path.join(exp, run, "train.log")
    return os.path.exists(log) and '"loss_scale"' in open(log).read()


rows = ["| model | updates | train s (updates/s) | fp16 | test2016 sacreBLEU | fairseq-generate ms/sent. b1 / b64 "
        "| bench_decode ms/sent. b1 / b64 |", "|---|---|---|---|---|---|---|"]
bench_name = {"AR transformer, greedy": "AR greedy", "LT em (m=10), nc=1, K=512": "LT"}
for r in read_results(exp):
    secs = train_seconds(os.path.join(exp, r["run"])) or 0.0
    rate = f"{secs:.0f} ({r['updates'] / secs:.1f})" if secs else "?"
    b = bench_name.get(r["label"])
    timed = f"{bench[(b, 1)]:.2f} / {bench[(b, 64)]:.2f}" if b and (b, 1) in bench and (b, 64) in bench else "-"
    rows.append(f"| {r['label']} | {r['updates']} | {rate} | {'yes' if fp16_seen(r['run']) else 'NO'} | "
                f"{r['bleu']:.2f} | {r['ms_b1']:.2f} / {r['ms_b64']:.2f} | {timed} |")
card = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
head = (f"GPU check on {card} (torch {torch.__version__}, CUDA {torch.version.cuda}), "
        f"{time.strftime('%Y-%m-%d', time.gmtime())}: Multi30k En-De, tiny size, --fp16 training, fp32 decoding; "
        f"LT speedup over AR greedy (bench_decode.py, median of 3 rounds): {speedup}; whole check "
        f"{time.time() - float(started):.0f} s")
text = head + "\n\n" + "\n".join(rows) + "\n"
with open(table_path + ".tmp", "w") as f:
    f.write(text)
os.replace(table_path + ".tmp", table_path)
print("\n" + text)
if not all(fp16_seen(run) for run in ("ar", lt)):
    sys.exit("gpu_check.sh: a model did not train in fp16 (no loss scale in its train.log)")
PY
