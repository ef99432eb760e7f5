#!/usr/bin/env bash
# Create ./.venv and install p2ptrain with its test tools.
#
#   ./scripts/setup.sh            # then: .venv/bin/p2ptrain demo
#
# torch comes first, chosen for this machine: with an NVIDIA GPU (nvidia-smi lists one) the regular
# build with CUDA; without, the CPU build (+cpu wheel, ~200 MB instead of several GB of CUDA libraries).
# Override with P2PTRAIN_TORCH='torch==X.Y.Z' (and P2PTRAIN_TORCH_INDEX=URL). Safe to rerun.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION=2.13.0
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip --disable-pip-version-check)

if .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "setup: torch $(.venv/bin/python -c 'import torch; print(torch.__version__)') already installed"
elif [ -n "${P2PTRAIN_TORCH:-}" ]; then
  "${pip[@]}" install -q "$P2PTRAIN_TORCH" ${P2PTRAIN_TORCH_INDEX:+--extra-index-url "$P2PTRAIN_TORCH_INDEX"}
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q GPU; then
  echo "setup: NVIDIA GPU found: installing torch $TORCH_VERSION with CUDA"
  "${pip[@]}" install -q "torch==$TORCH_VERSION"
else
  echo "setup: no NVIDIA GPU: installing the CPU build of torch $TORCH_VERSION"
  "${pip[@]}" install -q "torch==$TORCH_VERSION+cpu" --retries 1 --timeout 20 \
    --extra-index-url "${P2PTRAIN_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"
fi

echo "setup: installing p2ptrain and its dependencies"
"${pip[@]}" install -q -e '.[test]'
echo "setup: done ($(.venv/bin/p2ptrain version))"
