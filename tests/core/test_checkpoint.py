"""Checkpoints that are checked before loading, all-or-nothing on disk, of the right model."""

from __future__ import annotations

import builtins
import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from lp_fx.find_layers import find_layers
from lp_fx.tools import cli
from lp_fx.tools.training import finetune as ft, plot
from lp_fx.checkpoint import layer_parameter_names, layer_stack_of, load_finetuned, pairing_record, unique_tensors
from lp_fx.checkpoint_files import (
    CURRENT, LEGACY_FORMAT, PAIRING, RECORD, TENSORS, CheckpointError, checkpoint_folder, save_checkpoint,
)
from lp_fx.model_identity import model_identity

from tests.helpers.models import VOCAB, hf_model
from tests.helpers.checkpoints import TinyMoE

# Its module-scoped fixture is costly: every test of this module runs in one pytest-xdist worker.
pytestmark = pytest.mark.xdist_group("test_checkpoint_reliability")

REPO = Path(__file__).resolve().parents[2]
DOWN_PROJ = "model.layers.1.mlp.down_proj.weight"


def tokens(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


def run_config(**overrides) -> ft.FinetuneConfig:
    base = dict(pairs=((1, 2),), steps=2, lr=3e-3, batch=2, seq_len=32, warmup=0, save_every=1, eval_every=2,
                inner="eager")
    return ft.FinetuneConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory) -> Path:
    """A checkpoint of the tiny 4-layer Llama, pair (1, 2), after 2 steps (kept read-only: copy it)."""
    out = tmp_path_factory.mktemp("trained") / "ckpt"
    ft.finetune(hf_model("llama"), tokens(64), run_config(), out, progress=False)
    return out


@pytest.fixture
def ckpt(trained_dir, tmp_path) -> Path:
    """A copy of the trained checkpoint to damage."""
    return Path(shutil.copytree(trained_dir, tmp_path / "ckpt", symlinks=True))


def snapshot(directory: Path) -> dict[str, object]:
    """Everything under ``directory``: links by target, files by content."""
    out: dict[str, object] = {}
    for path in sorted(directory.rglob("*")):
        key = str(path.relative_to(directory))
        out[key] = ("link", os.readlink(path)) if path.is_symlink() else path.read_bytes() if path.is_file() else "dir"
    return out


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


def refused_untouched(model: nn.Module, directory: Path, message: str) -> None:
    """Loading ``directory`` raises a CheckpointError matching ``message``; nothing changed."""
    before, files = state_of(model), snapshot(directory)
    with pytest.raises(CheckpointError, match=message):
        load_finetuned(model, directory)
    assert same_state(before, state_of(model))
    assert snapshot(directory) == files


def edit_pairing(directory: Path, edit: Callable[[dict], None]) -> None:
    path = directory / PAIRING
    pairing = json.loads(path.read_text())
    edit(pairing)
    path.write_text(json.dumps(pairing))


def overwrite_tensor_bytes(directory: Path, name: str, data: bytes) -> None:
    """Write ``data`` over the first bytes of tensor ``name`` in ``trained.safetensors``."""
    path = directory / TENSORS
    raw = path.read_bytes()
    header_size = struct.unpack("<Q", raw[:8])[0]
    start = 8 + header_size + json.loads(raw[8 : 8 + header_size])[name]["data_offsets"][0]
    path.write_bytes(raw[:start] + data + raw[start + len(data) :])


# ------------------------------------------------------------- item 3: checked before it is loaded


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda p: p.update(pairs=[[3, 4]]), r"pair \(3, 4\) is out of range: model.layers has 4 layers, valid indices 0..3"),
        (lambda p: p.update(pairs=[[1, 3]]), "not two consecutive layers"),
        (lambda p: p.update(pairs=[[0, 1], [1, 2]], modes=["lp", "lp"]), "overlap"),
        (lambda p: p.update(pairs=[["1", 2]]), "each pair must be two layer indices"),
        (lambda p: p.update(modes=["merge"]), "mode 'merge' is not a fine-tuned pairing mode; valid: 'lp', 'block'"),
        (lambda p: p.update(modes=["lp", "lp"]), "'modes' has 2 entries for 1 pairs"),
        (lambda p: p["model"].update(stack="model.norm"), "made for another model: stack 'model.norm'"),
    ],
    ids=["range", "consecutive", "overlap", "types", "mode", "modes-count", "stack"],
)
def test_checkpoint_pairing_is_checked_against_the_model_before_any_tensor_is_copied(ckpt, edit, message):
    edit_pairing(ckpt, edit)
    refused_untouched(hf_model("llama"), ckpt, message)


def _add_tensor(directory: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(directory / TENSORS))
    tensors["model.layers.0.mlp.up_proj.weight"] = hf_model("llama").state_dict()["model.layers.0.mlp.up_proj.weight"]
    save_file(tensors, str((directory / TENSORS).resolve()))


def _drop_tensor(directory: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(directory / TENSORS))
    del tensors[DOWN_PROJ]
    save_file(tensors, str((directory / TENSORS).resolve()))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_add_tensor, "has tensor 'model.layers.0.mlp.up_proj.weight', which pairing.json does not list"),
        (_drop_tensor, f"lacks tensor '{DOWN_PROJ}', which pairing.json lists"),
    ],
    ids=["extra", "missing"],
)
def test_tensor_names_must_be_the_list_in_pairing_json(ckpt, damage, message):
    damage(ckpt)
    refused_untouched(hf_model("llama"), ckpt, message)


# ----------------------------------------------------------------- item 4: checksums, finite values


def test_flipped_bytes_giving_non_finite_values_are_refused_naming_the_tensor(ckpt):
    overwrite_tensor_bytes(ckpt, DOWN_PROJ, b"\xff" * 32)  # 8 float32 NaNs
    refused_untouched(hf_model("llama"), ckpt, f"tensor '{DOWN_PROJ}' has 8 non-finite values")


def test_changed_tensor_bytes_are_refused_by_their_checksum(ckpt):
    overwrite_tensor_bytes(ckpt, DOWN_PROJ, struct.pack("<8f", *[0.5] * 8))
    refused_untouched(hf_model("llama"), ckpt, f"tensor '{DOWN_PROJ}' does not match its sha256 in pairing.json")


def _legacy_copy(source: Path, directory: Path) -> Path:
    """``source`` as the earlier writer left it: three files in the directory, no checksums."""
    directory.mkdir()
    for name in (TENSORS, RECORD):
        shutil.copyfile(source / name, directory / name)
    pairing = json.loads((source / PAIRING).read_text())
    pairing["format"] = LEGACY_FORMAT
    pairing["model"]["tensors"] = {name: entry["shape"] for name, entry in pairing["model"]["tensors"].items()}
    (directory / PAIRING).write_text(json.dumps(pairing))
    return directory


def test_checkpoint_without_checksums_loads_with_a_warning_and_non_finite_values_are_still_refused(
    trained_dir, tmp_path, lp_warnings
):
    legacy = _legacy_copy(trained_dir, tmp_path / "legacy")
    model = hf_model("llama")
    assert load_finetuned(model, legacy)["pairs"] == [(1, 2)]
    assert "has no checksums" in lp_warnings.text
    overwrite_tensor_bytes(legacy, DOWN_PROJ, b"\xff" * 32)
    refused_untouched(hf_model("llama"), legacy, "8 non-finite values")


# ---------------------------------------------------------------------- item 5: all or nothing


def _fail_at(monkeypatch, owner: object, name: str, call: int) -> None:
    """Make the ``call``-th call of ``owner.name`` raise, as an interrupted save would."""
    real, calls = getattr(owner, name), []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise KeyboardInterrupt(f"interrupted at {name} #{call}")
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, failing)


def _loaded(directory: Path) -> tuple[dict, dict[str, torch.Tensor], int]:
    model = hf_model("llama")
    options = load_finetuned(model, directory)
    return options, model.state_dict(), json.loads((checkpoint_folder(directory) / RECORD).read_text())["step"]


@pytest.mark.parametrize(
    "failure",
    [("fsync", k) for k in range(1, 6)] + [("replace", 1), ("save_file", 1), ("symlink", 1)],
    ids=lambda f: f"{f[0]}-{f[1]}",
)
def test_interrupted_save_leaves_one_whole_checkpoint(ckpt, monkeypatch, failure):
    """A save of another pairing (other tensors, other step) over ``ckpt`` fails part-way: the
    directory loads whole, the old checkpoint or (only once switched) the new one, never a mix."""
    import safetensors.torch

    model = hf_model("llama")
    old_options, old_state, old_step = _loaded(ckpt)
    new = {name: t + 1 for name, t in unique_tensors(model, layer_parameter_names(model, "model.layers", [2, 3])).items()}
    pairing = json.loads((ckpt / PAIRING).read_text())
    pairing.update(pairs=[[2, 3]], modes=["lp"])
    name, call = failure
    _fail_at(monkeypatch, safetensors.torch if name == "save_file" else os, name, call)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(ckpt, new, pairing, {"step": 99})
    monkeypatch.undo()
    options, state, step = _loaded(ckpt)
    if options == old_options:
        assert step == old_step and same_state(state, old_state)
    else:
        assert options["pairs"] == [(2, 3)] and step == 99
        assert all(torch.equal(state[name], tensor) for name, tensor in new.items())
    if name in ("save_file", "symlink") or (name == "fsync" and call <= 4):  # before the switch
        assert options == old_options
    save_checkpoint(ckpt, new, pairing, {"step": 100})  # the next save leaves one folder
    folders = [p.name for p in ckpt.iterdir() if p.is_dir() and not p.is_symlink()]
    assert folders == [os.readlink(ckpt / CURRENT)]
    assert sorted(p.name for p in ckpt.iterdir()) == sorted([CURRENT, PAIRING, RECORD, TENSORS, folders[0]])


def _default_sigint() -> None:
    """In the saver, before Python starts: SIGINT's default disposition. A process started with
    SIGINT ignored (pytest-xdist's workers are) passes that on, and Python then installs no
    KeyboardInterrupt handler, so the saver would never stop on SIGINT."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_a_signal_during_saves_every_step_leaves_a_consistent_checkpoint(tmp_path, sig):
    out = tmp_path / "ckpt"
    script = f"from tests.helpers.checkpoints import save_forever; save_forever({str(out)!r})"
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=_default_sigint)
    try:
        for _ in range(5):  # a few complete saves, then the signal lands in the middle of others
            assert proc.stdout.readline(), f"the saving process ended early: {proc.stderr.read()}"
        time.sleep(0.05)
        proc.send_signal(sig)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    model = TinyMoE(2)
    load_finetuned(model, out)
    values = {float(t.flatten()[0]) for name, t in model.state_dict().items() if name.startswith("layers.")}
    step = json.loads((out / RECORD).read_text())["step"]
    assert values == {float(step)} and step >= 5


def test_finetune_refuses_out_holding_another_models_checkpoint(ckpt):
    files = snapshot(ckpt)
    with pytest.raises(CheckpointError, match=r"holds a checkpoint of another model: num_layers 4 .*this model has 6"):
        ft.finetune(hf_model("llama", layers=6), tokens(64), run_config(), ckpt, progress=False)
    assert snapshot(ckpt) == files


def test_finetune_refuses_a_non_empty_directory_without_a_checkpoint(tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match=r"is not empty \(1 entries, e.g. 'notes.txt'\) and holds no checkpoint"):
        ft.finetune(hf_model("llama"), tokens(64), run_config(), out, progress=False)
    assert snapshot(out) == {"notes.txt": b"mine"}


def test_finetune_overwrite_replaces_another_models_checkpoint_and_keeps_other_files(ckpt):
    (ckpt / "notes.txt").write_text("mine")
    model = hf_model("llama", layers=6)
    ft.finetune(model, tokens(64), run_config(steps=1), ckpt, progress=False, overwrite=True)
    assert load_finetuned(hf_model("llama", layers=6), ckpt)["pairs"] == [(1, 2)]
    assert (ckpt / "notes.txt").read_text() == "mine"
    assert len([p for p in ckpt.iterdir() if p.name.startswith("ckpt-")]) == 1


def test_finetune_out_that_is_a_file_is_refused(tmp_path):
    out = tmp_path / "ckpt"
    out.write_text("a file")
    with pytest.raises(CheckpointError, match="checkpoint directory .*ckpt is a file; give a directory"):
        ft.finetune(hf_model("llama"), tokens(64), run_config(), out, progress=False)
    assert out.read_text() == "a file"


def _cli_finetune(model_dir: Path, data_dir: Path, out: Path, *extra: str) -> int:
    train = out.parent / "train.txt"
    train.write_text(" ".join(["the cat sat on a mat and the dog ran far away"] * 40))
    return cli.main(["finetune", "--model", str(model_dir), "--data-dir", str(data_dir), "--window", "16",
                     "--no-progress", "--inner", "eager", "--pairs", "1:3", "--train-data", str(train), "--steps", "1", "--batch", "2",
                     "--seq-len", "16", "--eval-windows", "1", "--out", str(out), *extra])


@pytest.fixture
def six_layer_checkpoint(tmp_path) -> Path:
    model = hf_model("llama", layers=6)
    names = layer_parameter_names(model, "model.layers", [4, 5])
    out = tmp_path / "other"
    save_checkpoint(out, unique_tensors(model, names), pairing_record(model, [(4, 5)], ["lp"]), {"step": 1})
    return out


def test_cli_finetune_refuses_out_holding_another_models_checkpoint_unless_overwrite(
    model_dir, data_dir, six_layer_checkpoint, capsys
):
    files = snapshot(six_layer_checkpoint)
    assert _cli_finetune(model_dir, data_dir, six_layer_checkpoint) == 2
    err = capsys.readouterr().err
    assert "holds a checkpoint of another model: num_layers 6" in err and "--overwrite" in err
    assert "Traceback" not in err and snapshot(six_layer_checkpoint) == files
    assert _cli_finetune(model_dir, data_dir, six_layer_checkpoint, "--overwrite") == 0
    assert load_finetuned(hf_model("llama"), six_layer_checkpoint)["pairs"] == [(1, 2)]


def test_cli_finetune_refuses_a_non_empty_out_before_loading_the_model(tmp_path, data_dir, capsys):
    out = tmp_path / "results"
    out.mkdir()
    (out / "eval.json").write_text("{}")
    assert _cli_finetune(tmp_path / "no-such-model", data_dir, out) == 2  # refused before the model is read
    assert "is not empty (1 entries, e.g. 'eval.json') and holds no checkpoint" in capsys.readouterr().err
    assert snapshot(out) == {"eval.json": b"{}"}


# ----------------------------------------------------------------- item 6: the pass's layer finder


def test_layer_stack_of_a_moe_model_is_its_layer_list_as_the_pass_finds_it():
    model = TinyMoE(2)
    assert layer_stack_of(model) == ("layers", 2)
    graphs = []
    torch.compile(model, backend=lambda gm, inputs: graphs.append(gm) or gm.forward)(tokens(8).view(1, 8))
    found = find_layers(graphs[0])
    assert (found.path, len(found)) == ("layers", 2)


def test_checkpoint_of_a_two_layer_moe_is_refused_by_a_four_layer_one(tmp_path):
    small = TinyMoE(2)
    names = layer_parameter_names(small, "layers", [0, 1])
    save_checkpoint(tmp_path, unique_tensors(small, names), pairing_record(small, [(0, 1)], ["lp"]), {"step": 1})
    refused_untouched(TinyMoE(4), tmp_path, r"made for another model: num_layers 2 .*this model has 4 \(TinyMoE")


# ---------------------------------------------------------------- item 11: what is wrong, where


def test_checkpoint_path_that_is_a_file_says_it_is_a_file(tmp_path):
    path = tmp_path / "ckpt"
    path.write_text("not a directory")
    with pytest.raises(CheckpointError, match=f"checkpoint path {path} is a file, not a checkpoint directory"):
        load_finetuned(hf_model("llama"), path)


def test_pairing_json_that_is_a_directory_is_named(ckpt):
    path = (ckpt / PAIRING).resolve()
    path.unlink()
    path.mkdir()
    refused_untouched(hf_model("llama"), ckpt, f"{path} is a directory, not a file")


def deny_reading(monkeypatch, path: Path) -> None:
    """``path`` cannot be read. Tests run as root, which chmod does not stop: opening it raises
    PermissionError as it would for another user."""
    path = path.resolve()
    path.chmod(0)
    real_open = builtins.open

    def guarded(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and Path(file).resolve() == path:
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded)
    monkeypatch.setattr(io, "open", guarded)


@pytest.mark.parametrize("name", [PAIRING, TENSORS])
def test_unreadable_file_is_named_as_unreadable_not_missing_or_corrupt(ckpt, monkeypatch, name):
    files = snapshot(ckpt)
    deny_reading(monkeypatch, ckpt / name)
    model = hf_model("llama")
    before = state_of(model)
    with pytest.raises(CheckpointError, match=f"{(ckpt / name).resolve()} cannot be read: Permission denied$"):
        load_finetuned(model, ckpt)
    assert same_state(before, state_of(model))
    monkeypatch.undo()
    (ckpt / name).resolve().chmod(0o644)
    assert snapshot(ckpt) == files


# ------------------------------------------------- issue 32 item 4: the model a checkpoint was trained from


@pytest.mark.parametrize("arch", ["qwen2", "mistral"])
def test_a_checkpoint_is_refused_by_another_architecture_of_the_same_sizes(ckpt, arch):
    model = hf_model(arch)
    refused_untouched(model, ckpt, f"made for another model: class 'LlamaForCausalLM', this model is a "
                                   f"'{type(model).__name__}'$")


def test_a_checkpoint_is_refused_by_other_weights_of_its_class_naming_both_and_loads_into_its_own(ckpt, tmp_path):
    from transformers import AutoModelForCausalLM

    other = hf_model("llama")
    torch.manual_seed(1)
    other = type(other)(other.config).eval()  # the same config, other weights
    refused_untouched(other, ckpt, "fine-tuned from other weights")
    with pytest.raises(CheckpointError) as refused:
        load_finetuned(other, ckpt)
    recorded = json.loads((ckpt / PAIRING).read_text())["model"]["weights"]
    assert recorded in str(refused.value) and model_identity(other)["weights"] in str(refused.value)
    assert "load it into the model it was fine-tuned from" in str(refused.value)
    hf_model("llama").save_pretrained(tmp_path / "base")  # its own weights, read again from disk
    assert load_finetuned(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), ckpt)["pairs"] == [(1, 2)]


def test_a_checkpoint_written_before_its_base_weights_were_recorded_loads_with_a_warning(ckpt, lp_warnings):
    edit_pairing(ckpt, lambda pairing: pairing["model"].pop("weights", None))
    other = hf_model("llama")
    torch.manual_seed(1)
    assert load_finetuned(type(other)(other.config), ckpt)["pairs"] == [(1, 2)]
    assert "records no fingerprint of the weights it was fine-tuned from" in lp_warnings.text


def test_cli_eval_refuses_a_checkpoint_of_another_class_of_the_same_sizes_in_one_line(model_dir, data_dir, tmp_path, capsys):
    model = hf_model("mistral")  # the tensors of a Llama: they would load
    names = layer_parameter_names(model, "model.layers", [1, 2])
    out = tmp_path / "mistral"
    save_checkpoint(out, unique_tensors(model, names), pairing_record(model, [(1, 2)], ["lp"]), {"step": 1})
    code = cli.main(["eval", "--model", str(model_dir), "--data-dir", str(data_dir), "--window", "16", "--no-progress",
                     "--tasks", "wikitext", "--checkpoint", str(out), "--out", str(tmp_path / "eval.json")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "class 'MistralForCausalLM', this model is a 'LlamaForCausalLM'" in err
    assert not (tmp_path / "eval.json").exists()


# ----------------------------------------------------- issue 32 item 7: a checkpoint copied without its links


def copied_without_links(source: Path, target: Path) -> Path:
    """``source`` as ``rsync -r`` without ``-l`` copies it: folders and files, no symbolic links."""
    return Path(shutil.copytree(source, target, ignore=lambda folder, names: [
        name for name in names if (Path(folder) / name).is_symlink()]))


def test_a_checkpoint_copied_without_its_links_loads_its_one_complete_version(trained_dir, tmp_path, lp_warnings):
    copy = copied_without_links(trained_dir, tmp_path / "copy")
    [version] = [entry.name for entry in copy.iterdir()]
    (copy / "ckpt-step000001-halfwritten").mkdir()  # a save interrupted before its files were all there
    (copy / "ckpt-step000001-halfwritten" / PAIRING).write_text("{}")
    expected, loaded = hf_model("llama"), hf_model("llama")
    load_finetuned(expected, trained_dir)
    assert load_finetuned(loaded, copy)["pairs"] == [(1, 2)]
    assert same_state(state_of(loaded), state_of(expected))
    assert f"has no current link (copied without symlinks?): loading its one complete checkpoint {version}" in lp_warnings.text


def test_a_copy_without_links_holding_several_complete_versions_names_them_and_loads_the_one_given(trained_dir, tmp_path):
    copy = copied_without_links(trained_dir, tmp_path / "copy")
    [version] = [entry.name for entry in copy.iterdir()]
    shutil.copytree(copy / version, copy / "ckpt-step000001-earlier")
    refused_untouched(hf_model("llama"), copy, f"has no current link .* and 2 complete checkpoints: ckpt-step000001-earlier, "
                                               f"{version}; give one of them as the checkpoint directory")
    assert load_finetuned(hf_model("llama"), copy / version)["pairs"] == [(1, 2)]


# --------------------------------------------------- issue 32 item 10: one fine-tuning run per directory


def test_a_second_finetune_into_a_folder_a_running_one_holds_is_refused_before_loading_the_model(
    model_dir, data_dir, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "ckpt"
    train = tmp_path / "train.txt"
    train.write_text(" ".join(["the cat sat on a mat and the dog ran far away"] * 40))
    args = ["finetune", "--model", str(model_dir), "--data-dir", str(data_dir), "--window", "16", "--no-progress",
            "--pairs", "1:3", "--train-data", str(train), "--steps", "1", "--batch", "2", "--seq-len", "16",
            "--eval-windows", "1", "--out", str(out)]
    working = ("import sys, time; from lp_fx.tools import cli; from lp_fx.tools.cli import common as options; "
               "options.load = lambda *a: (print('working', flush=True), time.sleep(120)); "  # a long run, cheaply
               "sys.exit(cli.main(sys.argv[1:]))")
    first = subprocess.Popen([sys.executable, "-c", working, *args], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().strip() == "working", "the first run ended before its work"
        files = snapshot(out)
        monkeypatch.setattr("lp_fx.tools.models.load_model", lambda *a, **k: pytest.fail("the model was loaded"))
        capsys.readouterr()
        assert cli.main(args) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        assert f"{out} is held by another fine-tuning run (process {first.pid})" in err
        assert snapshot(out) == files
    finally:
        first.kill()
        first.wait(timeout=60)


def test_a_folder_held_by_a_killed_run_is_free_and_a_held_folder_is_left_as_it_was(tmp_path):
    from lp_fx.checkpoint_files import LOCK, hold_checkpoint_dir

    out = tmp_path / "ckpt"
    holding = ("import sys, time; from lp_fx.checkpoint import hold_checkpoint_dir\n"
               "with hold_checkpoint_dir(sys.argv[1]):\n    print('held', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", holding, str(out)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(CheckpointError, match=f"held by another fine-tuning run \\(process {holder.pid}\\)"):
            with hold_checkpoint_dir(out):
                pass
    finally:
        holder.kill()
        holder.wait(timeout=60)
    assert [entry.name for entry in out.iterdir()] == [LOCK]  # left by the killed run: it holds nothing
    with hold_checkpoint_dir(out):
        save_checkpoint(out, {}, pairing_record(hf_model("llama"), [], []), {"step": 1})
    assert LOCK not in {entry.name for entry in out.iterdir()} and (out / PAIRING).is_file()
    with hold_checkpoint_dir(tmp_path / "new" / "refused"):
        pass  # a run refused after it took the folder: the folders it made are gone
    assert sorted(entry.name for entry in tmp_path.iterdir()) == ["ckpt"]


def test_an_interrupted_plot_leaves_the_earlier_loss_png_whole(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    path = tmp_path / "loss.png"
    path.write_bytes(b"the earlier plot")
    record = {"args": {"loss": "distill", "pairing": "1:3"}, "wall_s": 1.0, "heldout": [],
              "loss": [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.4}]}

    def interrupted(self, target, **kwargs):
        Path(target).write_bytes(b"\x89PNG half")
        raise KeyboardInterrupt("interrupted while plotting")

    monkeypatch.setattr(Figure, "savefig", interrupted)
    with pytest.raises(KeyboardInterrupt):
        plot.plot_record(record, path)
    assert [entry.name for entry in tmp_path.iterdir()] == ["loss.png"] and path.read_bytes() == b"the earlier plot"
