"""Where Dynamo last broke the graph, to name the cause when a layer or a pair is missing from one.

Dynamo records every graph break it makes (``torch._dynamo.utils.graph_break_reasons``, cleared by
``torch._dynamo.reset()``) with the user's stack, before it hands the graph that ends there (or
the one that resumes after it) to the backend.
"""

from __future__ import annotations

from pathlib import Path


def last_graph_break() -> str | None:
    """``"model.py:313 in forward (Call to `torch._dynamo.graph_break()`)"`` for the newest graph
    break Dynamo recorded, or None when it recorded none."""
    from torch._dynamo.utils import graph_break_reasons  # lazy: read at call time, the list Dynamo appends to

    if not graph_break_reasons:
        return None
    newest = graph_break_reasons[-1]
    cause = (newest.reason.strip().splitlines() or ["unknown cause"])[0]
    if not newest.user_stack:
        return f"an unknown place ({cause})"
    frame = newest.user_stack[-1]
    return f"{Path(frame.filename).name}:{frame.lineno} in {frame.name} ({cause})"
