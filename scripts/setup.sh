#!/usr/bin/env bash
# Create .venv and install pied with its test extra. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d .venv ] || python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# On a machine without a GPU take the CPU build of torch (a plain `torch` requirement can pull a
# multi-GB CUDA build); pyproject.toml itself only asks for torch>=2.4.
if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    python -m pip install -q "torch>=2.4"
  else
    python -m pip install -q "torch==2.13.0" || python -m pip install -q "torch>=2.4"
  fi
fi
python -m pip install -q -e '.[test]'
