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
