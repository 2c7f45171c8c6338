"""The package's one error type: every refusal of options, pairings, plans and checkpoints is one."""


class LayerParallelError(ValueError):
    """Bad options, or (with ``strict=True``) a pairing that cannot be applied to a graph."""
