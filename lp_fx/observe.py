"""Every pass of :data:`lp_fx.passes.PASSES` runs under one observer that shows the graph before
and after it, when torch's logging asks for it, and costs nothing when it does not:

- ``TORCH_TRACE=/tmp/trace`` (structured tracing, what ``tlparse /tmp/trace`` reads): one
  ``trace_structured`` artifact per pass and side, named ``lp_fx_graph<G>_<NN>_<pass>_<before|after>``,
  so tlparse lists every pass of every graph under its Dynamo compile;
- ``TORCH_LOGS=graph_code``: the same graphs as readable code, through the ``graph_code`` artifact
  logger (the one Dynamo prints its own graphs with).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from torch import fx
from torch._logging import getArtifactLogger, trace_structured
from torch._logging._internal import trace_log

from .state import GraphState

code_log = getArtifactLogger(__name__, "graph_code")


def watching() -> bool:
    """Whether a structured trace or the ``graph_code`` log is on (read once per pass)."""
    return bool(trace_log.handlers) or code_log.isEnabledFor(logging.DEBUG)


def artifact_name(graph: int, step: int, name: str, side: str) -> str:
    return f"lp_fx_graph{graph}_{step:02d}_{name}_{side}"


def show_graph(name: str, gm: fx.GraphModule) -> None:
    """``gm``'s code as the artifact ``name``: in a structured trace and in the ``graph_code`` log."""
    code = gm.print_readable(print_output=False)
    trace_structured("artifact", metadata_fn=lambda: {"name": name, "encoding": "string"}, payload_fn=lambda: code)
    code_log.debug("%s:\n%s", name, code)


def observed(step: int, run: Callable[[GraphState], None], state: GraphState) -> None:
    """Run one pass (the ``step``-th), its graph shown before and after when someone is watching."""
    if not watching():
        run(state)
        return
    name = getattr(run, "__name__", type(run).__name__)
    show_graph(artifact_name(state.report.index, step, name, "before"), state.gm)
    run(state)
    show_graph(artifact_name(state.report.index, step, name, "after"), state.gm)
