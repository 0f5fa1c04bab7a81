#!/usr/bin/env bash
# Create or update a virtual environment with every dependency of vq-nat and the project itself (editable).
#
#   bash scripts/install.sh [VENV_DIR]      # default: .venv in the checkout; may be an absolute path
#
# Why a script and not `pip install -e .`: fairseq 0.12.2 does not import on Python 3.11, so we use the
# patched fork `fairseq-fixed`, which must be built with `--no-deps --no-build-isolation` against the torch
# installed here (its C++ extensions link against that exact torch, and its declared dependencies pin
# omegaconf 2.0.x / torchaudio, which do not work on 3.11).
#
# Idempotent: a stamp file records a hash of the install inputs; when nothing changed and the imports work,
# the script returns in a few seconds.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${1:-$here/.venv}"
python="${PYTHON:-python3}"

# versions that work together on Python 3.11
TORCH_PKGS=(torch==2.14.1 torchvision==0.29.1)
BUILD_PKGS=(numpy cython setuptools wheel)
FAIRSEQ_PKG=fairseq-fixed==0.12.3.1

if ! "$python" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 9) else 1)'; then
  echo "install.sh: need Python >= 3.9 (found $("$python" --version 2>&1))" >&2
  exit 1
fi

if [ ! -x "$venv/bin/python" ]; then
  echo "install.sh: creating virtual environment $venv"
  "$python" -m venv "$venv"
fi
py="$venv/bin/python"
pip=("$py" -m pip --disable-pip-version-check)

stamp="$venv/.vq_nat_install_stamp"
want="$(cat "$here/scripts/install.sh" "$here/setup.py" | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] \
   && "$py" -c 'import fairseq, torch, torchvision, vq_nat' >/dev/null 2>&1; then
  echo "install.sh: $venv is up to date"
  exit 0
fi

echo "install.sh: [1/4] torch, torchvision and build tools"
"${pip[@]}" install -q "${TORCH_PKGS[@]}" "${BUILD_PKGS[@]}"

echo "install.sh: [2/4] runtime dependencies of fairseq and vq-nat (from setup.py)"
# setup.py is the single list of dependencies; fairseq itself is installed in step 3.
mapfile -t deps < <("$py" "$here/setup.py" --print-deps)
"${pip[@]}" install -q "${deps[@]}"

echo "install.sh: [3/4] $FAIRSEQ_PKG (compiled against this torch; several minutes the first time)"
if ! "$py" -c 'import fairseq, fairseq.libnat' >/dev/null 2>&1; then
  "${pip[@]}" install -q --no-deps --no-build-isolation "$FAIRSEQ_PKG"
fi

echo "install.sh: [4/4] vq-nat (editable)"
"${pip[@]}" install -q --no-deps --no-build-isolation -e "$here"

"$py" -c 'import fairseq, torch, torchvision, vq_nat; print("install.sh: ok: torch", torch.__version__, "fairseq", fairseq.__version__)'
echo "$want" > "$stamp"
echo "install.sh: activate with: source $venv/bin/activate"
