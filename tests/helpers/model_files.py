"""A model read from its GGUF by transformers itself, and the check that a loaded model is that one."""

from __future__ import annotations

from pathlib import Path

import torch

from lp_fx.tools import models


def direct(path: Path) -> tuple:
    """``(tokenizer, model)`` read from the GGUF itself by transformers, the reference."""
    tokenizer, model = models._from_pretrained(path.parent, torch.float32, False, gguf_file=path.name)
    return tokenizer, model.eval()


def assert_same_model(loaded: models.LoadedModel, reference: tuple) -> None:
    tokenizer, model = reference
    mine, theirs = loaded.model.state_dict(), model.state_dict()
    assert mine.keys() == theirs.keys()
    for name, tensor in mine.items():
        assert tensor.dtype == theirs[name].dtype and torch.equal(tensor, theirs[name]), name
    source_records = ("_name_or_path", "architectures", "quantization_config")  # where it was read from
    assert ({k: v for k, v in loaded.model.config.to_dict().items() if k not in source_records}
            == {k: v for k, v in model.config.to_dict().items() if k not in source_records})
    text = "the cat sat on the mat"
    assert loaded.tokenizer(text).input_ids == tokenizer(text).input_ids
    assert loaded.tokenizer.eos_token == tokenizer.eos_token
    assert loaded.model.generation_config == model.generation_config
    assert not loaded.model.training
