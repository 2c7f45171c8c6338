"""A hand-written MoE model (its experts list longer than its layer list), and a process that writes
its checkpoints forever (the interrupted-write tests kill it)."""

from __future__ import annotations

import torch
from torch import nn

from lp_fx.checkpoint import layer_parameter_names, pairing_record, unique_tensors
from lp_fx.checkpoint_files import save_checkpoint
from tests.helpers.models import VOCAB


def save_forever(directory: str) -> None:
    """Checkpoints of :class:`TinyMoE` with every tensor equal to the step, one after the other."""
    model = TinyMoE(2)
    names = layer_parameter_names(model, "layers", [0, 1])
    pairing = pairing_record(model, [(0, 1)], ["lp"])
    for step in range(1, 100_000):
        tensors = {name: torch.full_like(t, float(step)) for name, t in unique_tensors(model, names).items()}
        save_checkpoint(directory, tensors, pairing, {"step": step})
        print(step, flush=True)


class Expert(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class MoELayer(nn.Module):
    def __init__(self, experts: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(16)
        self.experts = nn.ModuleList(Expert() for _ in range(experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        return x + sum(expert(h) for expert in self.experts) / len(self.experts)


class TinyMoE(nn.Module):
    """Hand-written MoE: each layer's experts list (6) is longer than the layer list."""

    def __init__(self, layers: int, experts: int = 6) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, 16)
        self.layers = nn.ModuleList(MoELayer(experts) for _ in range(layers))
        self.head = nn.Linear(16, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)
