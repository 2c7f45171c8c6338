"""What examples/ ships for the demo's recommended row: the planner's pairing and its LoRA adapter,
a checkpoint for that pairing, small, whole (every file its pairing.json lists, with its sha256)."""

from __future__ import annotations

import json
from pathlib import Path

from lp_fx.checkpoint_files import ADAPTER_CONFIG, checkpoint_folder, read_pairing_in, read_tensors

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
PLAN = EXAMPLES / "smollm2_plan.json"
ADAPTER = EXAMPLES / "smollm2_lora"
MAX_BYTES = 10 * 10**6


def test_the_recommended_adapter_is_for_the_committed_plan():
    plan = json.loads(PLAN.read_text())
    pairing = read_pairing_in(checkpoint_folder(ADAPTER))
    assert (pairing["pairs"], pairing["modes"]) == (plan["pairs"], plan["modes"])
    assert pairing["model"]["num_layers"] == plan["num_layers"] == 30


def test_the_recommended_adapter_is_a_whole_peft_adapter_under_ten_megabytes():
    folder = checkpoint_folder(ADAPTER)
    pairing = read_pairing_in(folder)
    tensors = read_tensors(folder, pairing)  # every listed tensor, its sha256 and finite values checked
    assert tensors and all(".lora_" in name for name in tensors)
    assert json.loads((ADAPTER / ADAPTER_CONFIG).read_text())["r"] == pairing["adapter"]["rank"]
    assert sum(f.stat().st_size for f in ADAPTER.rglob("*") if f.is_file() and not f.is_symlink()) <= MAX_BYTES
