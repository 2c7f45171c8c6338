"""A LoRA adapter beside a fine-tuned pairing, in peft's own format: its record, its checks, its merge.

``lp-fx finetune --lora RANK`` trains low-rank adapters (peft's LoRA) instead of the paired
layers' weights. Its checkpoint holds them as peft writes an adapter: ``adapter_config.json`` and
``adapter_model.safetensors``, tensors named ``base_model.model.<module>.lora_A.weight`` and
``...lora_B.weight``; the checkpoint directory is then also a directory that
``peft.PeftModel.from_pretrained(model, directory)`` reads.

Loading (:func:`lp_fx.checkpoint.load_finetuned`) merges the adapter into the weights it adapts,
``W += (alpha / r) * B @ A``, so everything after it (``fuse``, export) sees plain weights. This
module needs no peft: the merge is the one formula, and a test checks it against peft's
``merge_and_unload``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lp_fx.checkpoint_files import ADAPTER_CONFIG, CheckpointError
from lp_fx.files import read_json

PEFT_PREFIX = "base_model.model."  # peft's name of the wrapped model in an adapter's tensor names
FACTORS = ("lora_A", "lora_B")


class AdapterError(CheckpointError):
    """A LoRA adapter that cannot be merged: missing, damaged, or made for other modules."""


def adapter_record(config: Mapping[str, Any]) -> dict[str, Any]:
    """What ``pairing.json`` records of an adapter (rank, alpha, adapted modules), from its peft
    config; loading refuses an ``adapter_config.json`` that says otherwise."""
    return {"rank": int(config["r"]), "alpha": float(config["lora_alpha"]), "modules": sorted(config["target_modules"])}


def factor_name(module: str, factor: str) -> str:
    """The name peft gives a factor of ``module``'s adapter in ``adapter_model.safetensors``."""
    return f"{PEFT_PREFIX}{module}.{factor}.weight"


def checked_record(pairing: Mapping[str, Any], folder: Path) -> dict[str, Any]:
    """The adapter ``pairing.json`` records: a rank >= 1, an alpha and the adapted modules."""
    record = pairing["adapter"]
    valid = (
        isinstance(record, dict)
        and isinstance(record.get("rank"), int) and record["rank"] >= 1
        and isinstance(record.get("alpha"), (int, float))
        and isinstance(record.get("modules"), list) and all(isinstance(m, str) for m in record["modules"])
    )
    if not valid:
        raise AdapterError(
            f"{folder / 'pairing.json'}: field 'adapter' needs a rank (a whole number >= 1), an alpha and a list of "
            "module names: the checkpoint is damaged"
        )
    return record


def read_adapter_config(folder: Path, record: Mapping[str, Any]) -> dict[str, Any]:
    """``adapter_config.json`` in a checkpoint's folder, checked against the adapter ``pairing.json``
    records (:func:`checked_record`): a LoRA adapter of that rank and alpha on exactly those modules."""
    path = folder / ADAPTER_CONFIG
    config = read_json(path, AdapterError, missing=f"{path} is missing: the checkpoint's adapter is incomplete",
                       folder=f"{path} is a directory, not a file: the checkpoint is damaged",
                       unreadable=f"{path} cannot be read", invalid=f"{path} is not valid JSON ({{reason}}): the adapter is damaged")
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise AdapterError(f"{path}: not a peft LoRA adapter config (peft_type 'LORA')")
    if config.get("use_rslora") or config.get("use_dora"):
        raise AdapterError(f"{path}: rsLoRA and DoRA adapters are not supported; train a plain LoRA adapter")
    try:
        found = adapter_record(config)
    except (KeyError, TypeError, ValueError) as error:
        raise AdapterError(f"{path}: field {error} is missing or not valid: the adapter is damaged") from None
    if found != dict(record):
        raise AdapterError(
            f"{path} describes another adapter (rank {found['rank']}, alpha {found['alpha']}, {len(found['modules'])} "
            f"modules) than the checkpoint's pairing.json (rank {record['rank']}, alpha {record['alpha']}, "
            f"{len(record['modules'])} modules): the checkpoint was assembled from two runs"
        )
    return config


def adapted_modules(model: nn.Module, names: list[str]) -> list[str]:
    """The paths of the modules an adapter's ``names`` stand for, as peft matches them: a path is
    itself; a shortened name (peft writes ``down_proj`` for a long list that covers every layer)
    is every module whose path ends with it. A name that matches nothing is kept, to be refused."""
    paths = [path for path, _ in model.named_modules()]
    found = []
    for name in names:
        found += [path for path in paths if path == name or path.endswith(f".{name}")] or [name]
    return sorted(set(found))


def check_adapter_fits(model: nn.Module, tensors: Mapping[str, torch.Tensor], record: Mapping[str, Any], where: Path) -> None:
    """Every adapted module is a linear layer of ``model`` and the tensors are exactly its two
    factors, of rank ``record['rank']`` and the module's sizes."""
    expected = {factor_name(module, factor) for module in record["modules"] for factor in FACTORS}
    extra = sorted(set(tensors) - expected)
    missing = sorted(expected - set(tensors))
    if extra or missing:
        problem = (f"has tensor {extra[0]!r}, which no module in the adapter's list accounts for" if extra
                   else f"lacks tensor {missing[0]!r}, which the adapter's module list implies")
        raise AdapterError(f"{where} {problem}: the adapter is damaged")
    weights = model.state_dict()
    rank = record["rank"]
    for module in record["modules"]:
        weight = weights.get(f"{module}.weight")
        if weight is None or weight.dim() != 2:
            raise AdapterError(
                f"{where}: the adapter is for module {module!r}, which this {type(model).__name__} has not as a linear layer"
            )
        down, up = (tensors[factor_name(module, factor)] for factor in FACTORS)
        if tuple(down.shape) != (rank, weight.shape[1]) or tuple(up.shape) != (weight.shape[0], rank):
            raise AdapterError(
                f"{where}: {module}'s adapter factors are {tuple(down.shape)} and {tuple(up.shape)}; rank {rank} on its "
                f"{tuple(weight.shape)} weight needs {(rank, weight.shape[1])} and {(weight.shape[0], rank)}"
            )


@torch.no_grad()
def merge_adapter(model: nn.Module, tensors: Mapping[str, torch.Tensor], record: Mapping[str, Any]) -> None:
    """``W += (alpha / r) * B @ A`` for every adapted module, in place (checked first:
    :func:`check_adapter_fits`); computed in float32, stored in the weight's dtype."""
    scale = record["alpha"] / record["rank"]
    weights = model.state_dict()
    for module in record["modules"]:
        weight = weights[f"{module}.weight"]
        down, up = (tensors[factor_name(module, factor)].float() for factor in FACTORS)
        weight.copy_(weight.float() + scale * (up @ down).to(weight.device))
