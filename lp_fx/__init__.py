"""lp_fx: Layer Parallelism as a torch.compile backend.

    torch.compile(model, backend="layer_parallel", options={"start": 14, "end": 28})

or, to read what was done to each graph::

    lp = lp_fx.LayerParallel(start=14, end=28)
    torch.compile(model, backend=lp)
    lp.reports

A fine-tuned pairing (``lp-fx finetune``) is served with::

    torch.compile(model, backend="layer_parallel", options=lp_fx.load_finetuned(model, "ckpt/"))
"""

from .backend import GatedLayerParallel, LayerParallel, layer_parallel
from .checkpoint import load_finetuned
from .config import LayerParallelError, LPConfig
from .report import GraphReport, LayerInfo

__all__ = [
    "LayerParallel", "GatedLayerParallel", "layer_parallel", "LayerParallelError", "LPConfig", "GraphReport",
    "LayerInfo", "load_finetuned",
]

