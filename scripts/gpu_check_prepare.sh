#!/usr/bin/env bash
# Prepares, on a machine where lp_fx is set up (scripts/setup.sh), the two folders that carry to a
# lent GPU machine what it lacks for `scripts/gpu_check.sh` (docs/tools/gpu_check.md):
#
#   .gpu_carry/a  the first half of the SmolLM2-135M-Instruct GGUF (≈ 46 MiB)
#   .gpu_carry/b  its second half and SHA-256; the `gguf` package (transformers reads GGUFs with it;
#                 not on the device image); the WikiText-2 raw test text; the model's config and
#                 tokenizer (for --random-weights when the first half is not there)
#
# One call to the device takes at most 64 MiB (the working tree and its carried folders), and the
# GGUF is 92 MiB and does not compress (Q4_1/Q8_0 blocks: zstd -19 keeps 98 %), so it goes in two
# calls on the same warm machine: `.gpu_carry/a` with the first, `.gpu_carry/b` with the second.
# `.gpu_carry/` is ignored by git (.gitignore). Run this in the checkout the session was started in:
# a device call sends that checkout, whichever worktree it is made from.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
CARRY=.gpu_carry
rm -rf "$CARRY"
mkdir -p "$CARRY/a" "$CARRY/b/site" "$CARRY/b/data/wikitext-2-raw" "$CARRY/b/smollm2-shape"

GGUF=$("$PY" -c "from lp_fx.tools.models import smollm2_gguf; print(smollm2_gguf())")
HALF=$(( ($(stat -c %s "$GGUF") + 1) / 2 ))
head -c "$HALF" "$GGUF" >"$CARRY/a/smollm2.gguf.part1"
tail -c +"$((HALF + 1))" "$GGUF" >"$CARRY/b/smollm2.gguf.part2"
sha256sum "$GGUF" | cut -d' ' -f1 >"$CARRY/b/smollm2.gguf.sha256"
basename "$GGUF" >"$CARRY/b/smollm2.gguf.name"

# gguf is pure Python; its dist-info goes too: transformers looks its version up before reading a GGUF
"$PY" - "$CARRY/b/site" <<'PY'
import shutil, sys
from importlib.metadata import distribution
from pathlib import Path

dist = distribution("gguf")
site = Path(dist.locate_file(""))
for top in ("gguf", Path(dist._path).name):
    shutil.copytree(site / top, Path(sys.argv[1]) / top, ignore=shutil.ignore_patterns("__pycache__"))
PY

DATA=$("$PY" -c "from lp_fx.tools import data; print(data.resolve_data_dir(None))")
cp "$DATA/wikitext-2-raw/wiki.test.raw" "$CARRY/b/data/wikitext-2-raw/"

# the converted Hugging Face folder's config and tokenizer, without its 540 MB of weights
SHAPE=$("$PY" -c "from lp_fx.tools.models import cache_root, converted_gguf, smollm2_gguf; print(converted_gguf(smollm2_gguf(), cache_root(), progress=False))")
find "$SHAPE" -maxdepth 1 -type f ! -name '*.safetensors' -exec cp {} "$CARRY/b/smollm2-shape/" \;

du -sh "$CARRY/a" "$CARRY/b"
