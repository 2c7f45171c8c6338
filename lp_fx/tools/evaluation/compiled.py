"""A pairing served as the tools measure it: ``model`` compiled by a strict ``layer_parallel``
backend for one :class:`~lp_fx.pairing.Pairing`, as a ``LogitsFn`` (token ids ``(B, T)`` → logits
``(B, T, V)``) or as ``model.forward``, every compile checked against what was asked; and the
checks of a pairing against a model before anything is measured."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from lp_fx.backend import LayerParallel
from lp_fx.fx_utils import copy_graph_module
from lp_fx.pairing import BASELINE, Pairing, out_of_range

LogitsFn = Callable[[torch.Tensor], torch.Tensor]


def compile_pairing(
    model: torch.nn.Module, pairing: Pairing, mode: str = "lp", inner: str = "eager", **options: Any
) -> LogitsFn:
    """``model`` through ``torch.compile`` with the layer_parallel backend for ``pairing``, as a
    ``LogitsFn`` (no KV cache); see :func:`paired_forward`."""
    forward = paired_forward(model, pairing, mode, inner, **options)
    return lambda input_ids: forward(input_ids=input_ids, use_cache=False).logits


def paired_forward(
    model: torch.nn.Module, pairing: Pairing, mode: str = "lp", inner: str = "eager", **options: Any
) -> Callable[..., Any]:
    """``model.forward`` compiled with a strict layer_parallel backend for ``pairing``: the same
    arguments and outputs, so it serves scoring and ``generate`` alike.

    ``mode`` applies to pairs without a mode of their own. Dynamo's caches are reset first so
    that each pairing gets fresh graphs. The backend runs with ``strict=True`` and every call that
    compiled new graphs checks their reports: a silently unpaired (or unshuffled) model would be
    measured as the baseline. More backend ``options`` (``fuse=True``) may be given.
    """
    torch._dynamo.reset()
    backend = make_backend(pairing, mode, inner, **options)
    compiled = torch.compile(model.forward, backend=backend)

    def forward(*args: Any, **kwargs: Any) -> Any:
        seen = len(backend.reports)
        out = compiled(*args, **kwargs)
        if len(backend.reports) > seen:
            check_rewritten(backend.reports[seen:], pairing, mode)
        return out

    return forward


class PairingSwitch:
    """``model``'s forward traced by Dynamo once and compiled for one pairing after another (no KV
    cache, like :func:`compile_pairing`): :meth:`set_pairing` runs a strict layer_parallel
    backend on the graphs Dynamo captured, so a new pairing costs the rewrite and the ``inner``
    compile, not Dynamo's trace of the model (about 0.1 s against 10 s on SmolLM2-135M).

    Dynamo's caches are not reset here (a gated graph compiled before keeps working); a call
    that makes Dynamo capture a new graph compiles it for the current pairing."""

    def __init__(self, model: torch.nn.Module, inner: str = "eager") -> None:
        self.inner = inner
        self._graphs: list[tuple[torch.fx.GraphModule, list]] = []
        self._compiled: list[Callable] = []
        self._backend: Any = None
        self._pairing, self._mode = BASELINE, "lp"
        self._forward = torch.compile(model.forward, backend=self._capture)

    def set_pairing(self, pairing: Pairing, mode: str = "lp") -> None:
        """Serve ``pairing`` from now on (``mode`` for pairs without a mode of their own)."""
        self._backend = make_backend(pairing, mode, self.inner)
        self._pairing, self._mode = pairing, mode
        self._compiled = [self._compile(gm, example_inputs) for gm, example_inputs in self._graphs]

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """A ``LogitsFn`` of the current pairing."""
        if self._backend is None:
            raise ValueError("PairingSwitch: call set_pairing before scoring")
        return self._forward(input_ids=input_ids, use_cache=False).logits

    def _capture(self, gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
        index = len(self._graphs)
        self._graphs.append((gm, list(example_inputs)))
        self._compiled.append(self._compile(gm, example_inputs))
        return lambda *args: self._compiled[index](*args)

    def _compile(self, gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
        seen = len(self._backend.reports)
        compiled = self._backend(copy_graph_module(gm), example_inputs)  # the backend rewrites the graph it is given
        check_rewritten(self._backend.reports[seen:], self._pairing, self._mode)
        return compiled


def make_backend(pairing: Pairing, mode: str, inner: str, **options: Any) -> object:
    """A strict backend for one pairing (more backend ``options`` may be added, e.g. ``mesh``);
    ``mode`` for pairs without a mode of their own."""
    return LayerParallel(pairing.to_options(mode=mode, inner=inner, strict=True, **options))


def check_pairing(model: torch.nn.Module, pairing: Pairing, mode: str = "lp", **options: Any) -> None:
    """Refuse, before anything is measured, a pairing that :func:`compile_pairing` would refuse for
    this model: the backend's own checks of its options (:mod:`lp_fx.config`: consecutive, disjoint,
    modes, ``options``), then every layer index against the model's layer count."""
    config = make_backend(pairing, mode, "eager", **options).config
    num_layers = model.config.num_hidden_layers
    for pair in config.pairs:
        if pair[1] >= num_layers:
            raise out_of_range(f"{pairing.name}: pair {pair}", num_layers)


def check_rewritten(reports: Sequence, pairing: Pairing, mode: str) -> None:
    """Refuse to measure (or train) a graph in which the pairing was not applied as asked."""
    done = {tuple(pair): how for report in reports for pair, how in report.pairs_rewritten}
    wanted = zip(pairing.pairs, pairing.modes_or(mode))
    wrong: list = [(pair, how) for pair, how in wanted if done.get(tuple(pair)) != how]
    shuffle = pairing.shuffle
    if shuffle is not None and all(report.shuffled != shuffle.order for report in reports):
        wrong.append(("shuffle", shuffle.order))
    if wrong:
        summary = "; ".join(report.summary() for report in reports)
        raise RuntimeError(f"pairing {pairing.name!r}: not rewritten as asked: {wrong} ({summary})")


def eager_logits(model: torch.nn.Module) -> LogitsFn:
    """The plain model as a ``LogitsFn`` (no compile)."""
    return lambda input_ids: model(input_ids=input_ids, use_cache=False).logits
