"""LoRA fine-tuning (peft) through the compiled pairing: what trains, the adapter checkpoint in
peft's format, its merge on loading (checked against peft's own merge and the eager reference),
and its refusals."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

import lp_fx
from lp_fx import LayerParallel
from lp_fx.adapter import AdapterError
from lp_fx.checkpoint import CURRENT, PAIRING, RECORD, TENSORS, CheckpointError, load_finetuned
from lp_fx.checkpoint_files import ADAPTER_CONFIG, ADAPTER_TENSORS
from lp_fx.tools import cli
from lp_fx.tools.training import finetune as ft
from lp_fx.tools.training.lora import LoraError

from tests.helpers.models import VOCAB, hf_model
from tests.helpers.reference import eager_pairing

pytestmark = pytest.mark.xdist_group("test_lora")

PAIRS = ((1, 2),)
ADAPTED = ("model.layers.1.", "model.layers.2.")


def tokens(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


def config(**overrides) -> ft.FinetuneConfig:
    base = dict(pairs=PAIRS, steps=20, lr=1e-2, batch=2, seq_len=32, warmup=2, save_every=10, eval_every=10, lora_rank=4,
                inner="eager")
    return ft.FinetuneConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[torch.nn.Module, dict, Path]:
    """The tiny Llama with rank-4 adapters after 20 distillation steps, and its checkpoint."""
    out = tmp_path_factory.mktemp("lora")
    model = hf_model("llama")
    record = ft.finetune(model, tokens(64), config(), out, heldout=tokens(64, seed=1).view(2, 32), progress=False)
    return model, record, out


def test_loss_falls_with_adapters_alone(trained):
    _, record, _ = trained
    losses = [point["loss"] for point in record["loss"]]
    assert sum(losses[-3:]) / 3 < 0.3 * losses[0]  # 0.0014 -> 0.0001 measured


def test_only_the_adapters_train_and_the_weights_stay(trained):
    model, _, _ = trained
    before = hf_model("llama").state_dict()
    after = model.state_dict()
    weights = {name.replace(".base_layer", ""): t for name, t in after.items() if ".lora_" not in name}
    assert set(weights) == set(before) and all(torch.equal(before[n], t) for n, t in weights.items())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n and n.startswith(ADAPTED) for n in trainable)
    linear = {n for n, m in hf_model("llama").named_modules() if isinstance(m, torch.nn.Linear) and n.startswith(ADAPTED)}
    assert {n.split(".lora_")[0] for n in trainable} == linear  # every linear layer of the pair


def test_checkpoint_is_a_peft_adapter_beside_the_pairing(trained):
    _, _, out = trained
    folder = out / CURRENT
    assert sorted(p.name for p in folder.iterdir()) == sorted([PAIRING, RECORD, ADAPTER_CONFIG, ADAPTER_TENSORS])
    assert not (out / TENSORS).exists()
    pairing = json.loads((out / PAIRING).read_text())
    assert pairing["adapter"]["rank"] == 4 and pairing["adapter"]["alpha"] == 8.0
    assert all(name.startswith("base_model.model.model.layers.") for name in pairing["model"]["tensors"])
    assert json.loads((out / ADAPTER_CONFIG).read_text())["peft_type"] == "LORA"


def test_load_merges_the_adapter_as_peft_does(trained):
    from peft import PeftModel

    _, _, out = trained
    ours = hf_model("llama")
    lp_fx.load_finetuned(ours, out)
    theirs = PeftModel.from_pretrained(hf_model("llama"), out).merge_and_unload()
    mine, peft_state = ours.state_dict(), theirs.state_dict()
    assert set(mine) == set(peft_state)
    assert max((mine[n] - peft_state[n]).abs().max().item() for n in mine) < 1e-6
    assert any(not torch.equal(t, hf_model("llama").state_dict()[n]) for n, t in mine.items())


def test_served_checkpoint_equals_the_eager_reference_of_the_trained_adapters(trained):
    model, _, out = trained
    ids = tokens(12, seed=3).view(1, 12)
    fresh = hf_model("llama")
    options = load_finetuned(fresh, out)
    assert options == {"stack": "model.layers", "pairs": [(1, 2)], "modes": ["lp"]}
    torch._dynamo.reset()
    with torch.no_grad():
        served = torch.compile(fresh, backend=LayerParallel(options, inner="aot_eager"))(ids, use_cache=False).logits
        with eager_pairing(model, PAIRS, "lp"):  # the trained model, adapters unmerged, paired in eager
            reference = model(ids, use_cache=False).logits
    assert torch.allclose(served, reference, atol=1e-5, rtol=1e-5)


def test_adapter_targets_can_be_narrowed(tmp_path):
    model = hf_model("llama")
    ft.finetune(model, tokens(64), config(steps=1, warmup=0, lora_targets=("q_proj", "v_proj")), tmp_path, progress=False)
    modules = json.loads((tmp_path / PAIRING).read_text())["adapter"]["modules"]
    assert sorted(m.rpartition(".")[2] for m in modules) == ["q_proj", "q_proj", "v_proj", "v_proj"]


def test_adapters_on_every_layer_load_back_as_peft_merges_them(tmp_path):
    """peft shortens a list of 20 or more targets to their last names when those cover every layer
    (``down_proj``, ...); the checkpoint still names each adapted module by its path, so it loads."""
    from peft import PeftModel

    model = hf_model("llama")
    ft.finetune(model, tokens(64), config(steps=2, warmup=0, train="all"), tmp_path, progress=False)
    modules = json.loads((tmp_path / PAIRING).read_text())["adapter"]["modules"]
    every_linear = sorted(n for n, m in hf_model("llama").named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n)
    assert modules == every_linear and len(modules) >= 20
    ours = hf_model("llama")
    load_finetuned(ours, tmp_path)
    theirs = PeftModel.from_pretrained(hf_model("llama"), tmp_path).merge_and_unload().state_dict()
    assert max((t - theirs[n]).abs().max().item() for n, t in ours.state_dict().items()) < 1e-6
    assert not torch.equal(ours.state_dict()["model.layers.0.mlp.down_proj.weight"],
                           hf_model("llama").state_dict()["model.layers.0.mlp.down_proj.weight"])
    # as written before the fix (and as peft writes it): the last names only; loading resolves them as peft does
    short = sorted({m.rpartition(".")[2] for m in modules})
    peft_config = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    (tmp_path / ADAPTER_CONFIG).write_text(json.dumps({**peft_config, "target_modules": short}))
    pairing = json.loads((tmp_path / PAIRING).read_text())
    (tmp_path / PAIRING).write_text(json.dumps({**pairing, "adapter": {**pairing["adapter"], "modules": short}}))
    again = hf_model("llama")
    load_finetuned(again, tmp_path)
    assert all(torch.equal(t, again.state_dict()[n]) for n, t in ours.state_dict().items())


# ------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"lora_rank": 0}, "lora rank must be a whole number >= 1, got 0"),
        ({"lora_rank": None, "lora_alpha": 4.0}, "used only with a lora rank"),
        ({"lora_alpha": -1.0}, "lora alpha must be > 0"),
    ],
)
def test_bad_lora_settings_are_refused(overrides, message):
    with pytest.raises(ft.FinetuneError, match=message):
        config(**overrides)


def test_unknown_target_names_the_valid_ones(tmp_path):
    with pytest.raises(LoraError, match="'wq' is not a linear layer .* valid: down_proj, gate_proj, k_proj, o_proj"):
        ft.finetune(hf_model("llama"), tokens(64), config(lora_targets=("wq",)), tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()


def test_a_rank_past_the_layers_dimensions_is_refused_before_training(tmp_path):
    model = hf_model("llama")
    before = {n: t.clone() for n, t in model.state_dict().items()}
    with pytest.raises(LoraError, match=r"LoRA rank 100000 is not valid here: give a whole number from 1 to \d+"):
        ft.finetune(model, tokens(64), config(lora_rank=100_000), tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()
    assert set(model.state_dict()) == set(before)  # no adapter injected


def _copy_checkpoint(out: Path, to: Path) -> Path:
    for name in (PAIRING, RECORD, ADAPTER_CONFIG, ADAPTER_TENSORS):
        (to / name).write_bytes((out / name).read_bytes())
    return to


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))


def _other_rank(path: Path) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), "r": 8}))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: _flip_a_byte(d / ADAPTER_TENSORS), "does not match its sha256|not a valid safetensors"),
        (lambda d: (d / ADAPTER_TENSORS).unlink(), "adapter_model.safetensors is missing"),
        (lambda d: (d / ADAPTER_CONFIG).unlink(), "adapter_config.json is missing"),
        (lambda d: (d / ADAPTER_CONFIG).write_text("{ not json"), "not valid JSON"),
        (lambda d: _other_rank(d / ADAPTER_CONFIG), "describes another adapter .*rank 8"),
    ],
    ids=["flipped-byte", "missing-tensors", "missing-config", "corrupt-config", "config-of-another-run"],
)
def test_damaged_adapter_is_refused_and_the_model_is_untouched(trained, tmp_path, damage, message):
    _, _, out = trained
    damage(_copy_checkpoint(out, tmp_path))
    model = hf_model("llama")
    before = {n: t.clone() for n, t in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=message):
        load_finetuned(model, tmp_path)
    assert all(torch.equal(before[n], t) for n, t in model.state_dict().items())


def test_adapter_for_other_weights_is_refused(trained):
    _, _, out = trained
    other = hf_model("llama")
    with torch.no_grad():
        other.model.layers[0].mlp.up_proj.weight.mul_(2)
    before = {n: t.clone() for n, t in other.state_dict().items()}
    with pytest.raises(CheckpointError, match="fine-tuned from other weights"):
        load_finetuned(other, out)
    assert all(torch.equal(before[n], t) for n, t in other.state_dict().items())


def test_adapter_for_other_modules_is_refused(trained, tmp_path):
    _, _, out = trained
    folder = _copy_checkpoint(out, tmp_path)
    pairing = json.loads((folder / PAIRING).read_text())
    renamed = {"base_model.model.model.layers.1.mlp.down_proj": "base_model.model.model.layers.1.mlp.nothing"}
    from safetensors.torch import load_file, save_file

    tensors = {next((new + n[len(old):] for old, new in renamed.items() if n.startswith(old)), n): t
               for n, t in load_file(str(folder / ADAPTER_TENSORS)).items()}
    save_file(tensors, str(folder / ADAPTER_TENSORS))
    modules = sorted(m.replace("mlp.down_proj", "mlp.nothing") if m.startswith("model.layers.1.") else m
                     for m in pairing["adapter"]["modules"])
    pairing["adapter"]["modules"] = modules
    pairing["model"]["tensors"] = {n: {"shape": list(t.shape), "dtype": "float32", "sha256": _sha(t)} for n, t in tensors.items()}
    (folder / PAIRING).write_text(json.dumps(pairing))
    config_path = folder / ADAPTER_CONFIG
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "target_modules": modules}))
    with pytest.raises(AdapterError, match="'model.layers.1.mlp.nothing', which this LlamaForCausalLM has not"):
        load_finetuned(hf_model("llama"), folder)


def _sha(tensor: torch.Tensor) -> str:
    from lp_fx.checkpoint_files import sha256_of

    return sha256_of(tensor)


# ------------------------------------------------------------------------------------------ CLI


def _finetune_args(model_dir, data_dir, tmp_path, *extra: str) -> list[str]:
    train = tmp_path / "train.txt"
    train.write_text(" ".join(["the cat sat on a mat and the dog ran far away"] * 40))
    return ["finetune", "--model", str(model_dir), "--data-dir", str(data_dir), "--window", "16", "--no-progress",
            "--inner", "eager", "--pairs", "1:3", "--train-data", str(train), "--steps", "2", "--batch", "2", "--seq-len", "16",
            "--eval-windows", "2", "--out", str(tmp_path / "ckpt"), *extra]


def test_cli_finetune_lora_then_eval_merges_the_adapter(model_dir, data_dir, tmp_path, capsys):
    assert cli.main(_finetune_args(model_dir, data_dir, tmp_path, "--lora", "2")) == 0
    record = json.loads((tmp_path / "ckpt" / RECORD).read_text())
    assert record["args"]["lora_rank"] == 2 and record["args"]["lr"] == 1e-3  # LoRA's own default rate
    result = tmp_path / "eval.json"
    assert cli.main(["eval", "--model", str(model_dir), "--data-dir", str(data_dir), "--window", "16", "--no-progress",
                     "--tasks", "wikitext", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(result)]) == 0
    assert [p["name"] for p in json.loads(result.read_text())["pairings"]] == ["baseline", "finetuned:ckpt"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--lora", "0"], "argument --lora: 0 is not valid; give an integer >= 1"),
        (["--lora", "-3"], "argument --lora: -3 is not valid"),
        (["--lora-alpha", "4"], "--lora-alpha is used only with --lora RANK"),
        (["--lora-targets", "q_proj"], "--lora-targets is used only with --lora RANK"),
        (["--lora", "2", "--lora-targets", "wq"], "'wq' is not a linear layer of the trained layers"),
    ],
)
def test_cli_lora_bad_input_is_one_line_and_writes_nothing(model_dir, data_dir, tmp_path, capsys, extra, message):
    assert cli.main(_finetune_args(model_dir, data_dir, tmp_path, *extra)) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "ckpt").exists()
