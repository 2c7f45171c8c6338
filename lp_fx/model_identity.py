"""Which model this is: its class and a fingerprint of its weights, to tell apart two models of one config.

A fine-tuning checkpoint records the identity of the model it was trained from, and a frontier run
the identity of the model it measures, so that loading a checkpoint into other weights or resuming
a run with another model is refused instead of silently mixing the two.

The fingerprint hashes, for each tensor of the state dict in name order, its name, its shape and an
evenly spaced sample of at most :data:`SAMPLE` of its values (every value of a smaller tensor), as
float64. It depends on the values only, not on where they were read from: the same weights give the
same fingerprint however they are loaded (a Hugging Face folder, a GGUF, the GGUF's converted copy),
and in any dtype that holds them exactly; two models of one config with other weights (another
seed, an instruct model and its base) differ. It costs a few thousand values per tensor, not a pass
over the weights: a fingerprint, not a checksum (a change to a few values between the samples is not
seen).
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

SAMPLE = 4096  # values hashed per tensor
DIGITS = 16  # hexadecimal digits kept of the sha256


def model_identity(model: nn.Module) -> dict[str, str]:
    """``{"class": ..., "weights": ...}``: the model's class name and :func:`weights_fingerprint`
    (of the module a ``torch.compile`` wrapper holds, when given one)."""
    model = getattr(model, "_orig_mod", model)
    return {"class": type(model).__name__, "weights": weights_fingerprint(model)}


def weights_fingerprint(model: nn.Module) -> str:
    """Hexadecimal digest of the names, shapes and sampled values of ``model``'s state dict."""
    digest = hashlib.sha256()
    state = model.state_dict()
    for name in sorted(state):
        tensor = state[name].detach()
        digest.update(f"{name}:{list(tensor.shape)};".encode())
        digest.update(_sampled_values(tensor).numpy().tobytes())
    return digest.hexdigest()[:DIGITS]


def _sampled_values(tensor: torch.Tensor) -> torch.Tensor:
    """At most :data:`SAMPLE` values of ``tensor`` at evenly spaced flat indices, as float64 on the CPU."""
    flat = tensor.reshape(-1)
    count = min(flat.numel(), SAMPLE)
    index = torch.arange(count, dtype=torch.int64) * (flat.numel() - 1) // max(count - 1, 1)
    return flat[index.to(flat.device)].to(device="cpu", dtype=torch.float64)
