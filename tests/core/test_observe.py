"""Each pass of ``PASSES`` under the observer (:mod:`lp_fx.observe`): with a structured trace on
(``TORCH_TRACE``, what tlparse reads) every pass of every graph is an artifact before and after;
with it off the graphs are not even printed."""

from __future__ import annotations

import json
import logging

import torch
from torch._logging._internal import trace_log

from lp_fx import LayerParallel
from lp_fx.passes import PASSES

from tests.helpers.models import VOCAB, hf_model


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.artifacts: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        metadata = record.metadata if hasattr(record, "metadata") else json.loads(record.getMessage())
        if "artifact" in metadata and metadata["artifact"]["name"].startswith("lp_fx_graph"):
            self.artifacts.append(metadata["artifact"]["name"])


def _compile_and_run() -> None:
    model = hf_model("llama")
    ids = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.compile(model, backend=LayerParallel(pairs=[(1, 2)], inner="eager"))(ids)


def test_a_structured_trace_shows_every_pass_of_every_graph_before_and_after():
    records = _Records()
    trace_log.addHandler(records)
    try:
        _compile_and_run()
    finally:
        trace_log.removeHandler(records)
    names = [run.__name__ for run in PASSES]
    expected = [f"lp_fx_graph0_{step:02d}_{name}_{side}" for step, name in enumerate(names) for side in ("before", "after")]
    assert records.artifacts == expected


def test_with_logging_off_no_graph_is_printed(monkeypatch):
    assert not trace_log.handlers
    monkeypatch.setattr(torch.fx.GraphModule, "print_readable", lambda *a, **k: (_ for _ in ()).throw(AssertionError("printed")))
    _compile_and_run()
