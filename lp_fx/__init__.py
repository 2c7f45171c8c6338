"""lp_fx: Layer Parallelism as a torch.compile backend.

    torch.compile(model, backend="layer_parallel", options={"start": 14, "end": 28})

or, to read what was done to each graph::

    lp = lp_fx.LayerParallel(start=14, end=28)
    torch.compile(model, backend=lp)
    lp.reports
"""

from .backend import LayerParallel, layer_parallel
from .config import LayerParallelError, LPConfig
from .report import GraphReport, LayerInfo

__all__ = ["LayerParallel", "layer_parallel", "LayerParallelError", "LPConfig", "GraphReport", "LayerInfo"]
