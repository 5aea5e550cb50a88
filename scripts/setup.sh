#!/usr/bin/env bash
# Set up slimmoe in a virtual environment (.venv, or $VENV) on a fresh machine.
# On a machine without an NVIDIA GPU the CPU build of PyTorch is installed first, so that the
# project's `torch` requirement is already met and pip never pulls gigabytes of CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        "$PY" -m pip install -q "torch>=2.9,<2.16"
    else
        # CPU build. Elsewhere than the project's machines, set
        # PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu to get the CPU wheel.
        "$PY" -m pip install -q "torch==2.13.0"
    fi
fi
"$PY" -m pip install -q -e ".[dev]"
echo "slimmoe is set up in $VENV (activate with: . $VENV/bin/activate)"
