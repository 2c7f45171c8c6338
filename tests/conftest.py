"""The fixtures every test folder shares; the helpers they use are in ``tests/helpers/``."""

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch

from lp_fx.tools.export.fold import Source
from lp_fx.tools.export.write import export
from tests.helpers.bpe import bpe_model, save_bpe_tokenizer
from tests.helpers.models import hf_model
from tests.helpers.words import WORDS

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two workers share the cores: one thread each (and in the processes they start) instead of two
    # threads each spinning for the same cores; the tiny models gain nothing from intra-op threads.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch: no cached graphs or recompile limits carried over."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def lp_warnings(caplog):
    caplog.set_level(logging.WARNING, logger="lp_fx")
    return caplog


# ----- a tiny local HF model directory and tiny data files, for the CLI tests -----


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny_model")
    vocab = {"[UNK]": 0, **{word: i + 1 for i, word in enumerate(WORDS + [".", "</s>"])}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    # an end-of-text token, as every causal LM tokenizer has: lm-eval's HFLM reads it
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="</s>").save_pretrained(path)
    hf_model("llama", layers=4).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data")
    (path / "wikitext-2-raw").mkdir()
    text = " ".join(WORDS[(i * 7) % len(WORDS)] for i in range(16 * 12)) + " ."
    (path / "wikitext-2-raw" / "wiki.test.raw").write_text(text)
    (path / "winogrande").mkdir()
    row = {"context_options": ["the cat sat so the cat", "the cat sat so the dog"], "continuation": "ran far.", "gold": 1}
    (path / "winogrande" / "winogrande.jsonl").write_text((json.dumps(row) + "\n") * 5)
    return path


# ----- a tiny byte-level BPE tokenizer and a model that fits it, for the export tests -----


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory) -> Path:
    """A Hugging Face folder holding only a tiny byte-level BPE tokenizer (fewer tokens than BPE_VOCAB)."""
    return save_bpe_tokenizer(tmp_path_factory.mktemp("bpe"))


@pytest.fixture(scope="module")
def bpe_model_dir(tmp_path_factory, bpe_dir) -> Path:
    """A local Hugging Face model folder: the tiny BPE model and its tokenizer."""
    path = tmp_path_factory.mktemp("bpe_model")
    for item in bpe_dir.iterdir():
        shutil.copy(item, path)
    bpe_model().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory) -> Path:
    """A tiny Llama with a byte-level BPE tokenizer, written as a GGUF by our exporter."""
    root = tmp_path_factory.mktemp("gguf")
    path = root / "tiny.gguf"
    export(bpe_model(), [], [], path, Source("tiny", save_bpe_tokenizer(root / "bpe")))
    return path
