"""Two or more models of one class compiled in one process (a teacher and a student, an A/B
comparison, a server holding two checkpoints): Dynamo reuses one graph for all of them, and the
state the backend keeps per weight (fused buffers, averages) must be each model's own, never read
or written for another model."""

import copy

import pytest
import torch

from lp_fx import LayerParallel

from tests.helpers.models import hf_model, init_scale
from tests.helpers.reference import eager_pairing, merged_copy
from tests.helpers.runs import logits, random_ids

PAIRS = [(1, 2)]


def three_models_of_one_class() -> list[torch.nn.Module]:
    models = []
    for seed in range(3):
        model = init_scale(hf_model("llama"))
        with torch.no_grad():
            generator = torch.Generator().manual_seed(100 + seed)
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=generator) * 0.05)
        models.append(model.requires_grad_(False))
    return models


def eager_reference(model: torch.nn.Module, modes: dict, ids: torch.Tensor) -> torch.Tensor:
    """``model`` run eagerly with each pair of ``modes`` in its mode (one summed mode at most)."""
    merged = [pair for pair, mode in modes.items() if mode == "merge"]
    summed = {mode: [pair] for pair, mode in modes.items() if mode != "merge"}
    with torch.no_grad():
        reference = merged_copy(model, merged) if merged else model
        if not summed:
            return logits(reference, ids)
        [(mode, pairs)] = summed.items()
        with eager_pairing(reference, pairs, mode) as paired:
            return logits(paired, ids)


def backends(options: dict, how: str, count: int):
    """``count`` backends for ``options``: the registered name each time, or one shared object."""
    if how == "by name":
        return ["layer_parallel"] * count, [{**options}] * count
    shared = LayerParallel(options)
    return [shared] * count, [None] * count


FUSE_AND_MERGE = {"fuse": True, "pairs": [(0, 1), (2, 3)], "modes": ["merge", "lp"]}


@pytest.mark.parametrize("options, how", [
    ({"fuse": True, "mode": "lp"}, "by name"),
    ({"fuse": True, "mode": "block"}, "one LayerParallel"),
    (FUSE_AND_MERGE, "by name"),
    (FUSE_AND_MERGE, "one LayerParallel"),
], ids=["fuse-lp-by-name", "fuse-block-one-object", "fuse-and-merge-by-name", "fuse-and-merge-one-object"])
def test_models_of_one_class_never_read_or_write_each_others_weights(options, how):
    options = {"pairs": PAIRS, "inner": "aot_eager", "strict": True, **options}
    modes = dict(zip(options["pairs"], options.get("modes") or [options.get("mode")] * len(options["pairs"])))
    models = three_models_of_one_class()
    ids = random_ids(7)
    own = [copy.deepcopy(dict(m.named_parameters())) for m in models]
    expected = [eager_reference(m, modes, ids) for m in models]
    targets, opts = backends(options, how, len(models))
    compiled = [
        torch.compile(m, backend=b, options=o) if o is not None else torch.compile(m, backend=b)
        for m, b, o in zip(models, targets, opts)
    ]
    with torch.no_grad():
        for k in [0, 1, 2, 0, 2, 1, 0]:
            got = logits(compiled[k], ids)
            assert (got - expected[k]).abs().max().item() <= 1e-4, f"model {k}"
    for k, model in enumerate(models):
        for name, param in model.named_parameters():
            assert torch.equal(param, own[k][name]), f"model {k}: {name} changed"
