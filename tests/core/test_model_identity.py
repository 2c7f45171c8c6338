"""A model's identity (class and weights fingerprint): the same for the same weights however loaded,
different for other weights of the same config."""

from __future__ import annotations

import copy

import torch

from lp_fx.tools import models
from lp_fx.model_identity import model_identity

from tests.helpers.model_files import direct
from tests.helpers.models import hf_model


def test_the_same_weights_have_one_identity_however_they_are_held(tmp_path):
    from transformers import AutoModelForCausalLM

    model = hf_model("llama")
    model.save_pretrained(tmp_path)
    identity = model_identity(model)
    assert identity["class"] == "LlamaForCausalLM" and len(identity["weights"]) == 16
    assert model_identity(hf_model("llama")) == identity
    assert model_identity(AutoModelForCausalLM.from_pretrained(tmp_path)) == identity
    assert model_identity(torch.compile(model, backend="eager")) == identity
    bf16 = hf_model("llama").to(torch.bfloat16)
    assert model_identity(bf16) == model_identity(copy.deepcopy(bf16).float())  # the same values in another dtype


def test_other_weights_of_the_same_config_have_another_identity():
    model = hf_model("llama")
    base = model_identity(model)
    torch.manual_seed(1)
    reseeded = type(model)(model.config)
    assert model_identity(reseeded)["weights"] != base["weights"]
    nudged = hf_model("llama")
    with torch.no_grad():
        nudged.model.layers[3].post_attention_layernorm.weight[7] += 1e-6
    assert model_identity(nudged)["weights"] != base["weights"]
    assert model_identity(hf_model("mistral"))["class"] == "MistralForCausalLM"


def test_a_gguf_has_the_identity_of_its_converted_copy_and_of_the_file_read_itself(gguf_path, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("LP_FX_CACHE", str(tmp_path / "cache"))
    converted = model_identity(models.load_model(str(gguf_path), progress=False).model)
    again = model_identity(models.load_model(str(gguf_path), progress=False).model)
    _, itself = direct(gguf_path)
    assert converted == again == model_identity(itself)
