"""LoRA adapters (peft) on the layers that fine-tuning trains, in place of their weights.

``peft.inject_adapter_in_model`` puts a low-rank adapter on each chosen linear layer of the model
in place (no wrapper model, so the ``layer_parallel`` backend finds the same layer stack and the
student is compiled as for full fine-tuning). Only the adapters' factors train; the base weights
stay as they were, so the unpaired teacher is the same model with every ``lora_B`` factor zero
(:func:`teacher_tensors`), and the checkpoint holds the adapter in peft's own format
(:mod:`lp_fx.adapter`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lp_fx.adapter import PEFT_PREFIX
from lp_fx.config import LayerParallelError


class LoraError(LayerParallelError):
    """LoRA options that cannot be used on this model; the message says what is valid."""


def linear_modules(model: nn.Module, stack: str, layers: Sequence[int]) -> dict[str, str]:
    """Path -> short name (``q_proj``) of every ``nn.Linear`` inside the given layers of ``stack``."""
    prefixes = tuple(f"{stack}.{i}." for i in layers)
    return {
        path: path.rpartition(".")[2]
        for path, module in model.named_modules()
        if path.startswith(prefixes) and isinstance(module, nn.Linear)
    }


def lora_targets(model: nn.Module, stack: str, layers: Sequence[int], names: Sequence[str] | None) -> list[str]:
    """The module paths to adapt: the linear layers of ``layers`` whose short name is in ``names``
    (all of them when ``names`` is None); a name no such layer has is refused, listing the valid ones."""
    linear = linear_modules(model, stack, layers)
    if not linear:
        raise LoraError(f"the layers to train ({', '.join(map(str, layers))}) hold no linear layer to adapt")
    valid = sorted(set(linear.values()))
    unknown = sorted(set(names or ()) - set(valid))
    if unknown:
        raise LoraError(f"--lora-targets {unknown[0]!r} is not a linear layer of the trained layers; valid: {', '.join(valid)}")
    return sorted(path for path, name in linear.items() if names is None or name in names)


def add_adapters(model: nn.Module, targets: Sequence[str], rank: int, alpha: float) -> dict[str, Any]:
    """Inject a LoRA adapter of ``rank`` on each of ``targets`` into ``model`` in place (``lora_B``
    zero, so the model computes as before); return the adapter's peft config as JSON."""
    from peft import LoraConfig, inject_adapter_in_model  # lazy: peft imports transformers; only --lora needs it

    largest = min(min(model.get_submodule(path).weight.shape) for path in targets)
    if not 1 <= rank <= largest:
        raise LoraError(f"LoRA rank {rank} is not valid here: give a whole number from 1 to {largest}, the smallest "
                        "dimension of the adapted linear layers (a rank past it adds parameters and no capacity)")
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0, bias="none",
                        task_type="CAUSAL_LM")
    inject_adapter_in_model(config, model)
    # peft shortens 20 or more targets to their last names where those match the same modules (every
    # layer adapted: ``down_proj``, ...); the record keeps each path, which loading checks tensor by tensor
    return {**json.loads(json.dumps(config.to_dict(), default=_jsonable)), "target_modules": sorted(targets)}


def _jsonable(value: Any) -> Any:
    """peft's config holds sets (target modules) and enums: as JSON, sorted lists and values."""
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    return getattr(value, "value", str(value))


def adapter_parameter_names(model: nn.Module) -> list[str]:
    """Names of the adapters' factors among ``model``'s parameters."""
    return [name for name, _ in model.named_parameters() if ".lora_A." in name or ".lora_B." in name]


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's factors named as peft saves them (``base_model.model.<module>.lora_A.weight``)."""
    from peft import get_peft_model_state_dict  # lazy: peft imports transformers; only --lora needs it

    state = get_peft_model_state_dict(model)
    return {f"{PEFT_PREFIX}{name}": tensor.detach().contiguous().cpu() for name, tensor in state.items()}


def teacher_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every ``lora_B`` factor as zeros: passed to ``functional_call``, the model computes without
    its adapters, exactly (the base weights never train)."""
    return {name: torch.zeros_like(p) for name, p in model.named_parameters() if ".lora_B." in name}
