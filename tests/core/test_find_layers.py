"""Layer paths are the module paths a user writes from the model, however the model was compiled.

Dynamo names the model object after how it reached the compiled frame: ``L['self']``,
``L['args'][0]`` (transformers 5.24 wraps ``forward`` in a decorator), ``G['m']`` for a closure,
``L['model']`` for an argument. None of that may leak into the stack path or the ``stack`` option.
"""

import pytest
import torch

from lp_fx import LayerParallel
from lp_fx.find_layers import normalize_path

from tests.helpers.models import VOCAB, hf_model, tiny_hand_written
from tests.helpers.reference import eager_pairing

MODELS = {"llama": ("model.layers", lambda: hf_model("llama")), "nanogpt": ("transformer.h", lambda: tiny_hand_written("nanogpt"))}


def logits(out):
    return out.logits if hasattr(out, "logits") else out


def compile_and_run(model, how, backend, ids):
    """Run ``model`` on ``ids`` compiled in one of the ways users compile a model."""
    if how == "object":
        return logits(torch.compile(model, backend=backend)(ids))
    if how == "forward":
        return logits(torch.compile(model.forward, backend=backend)(ids))
    if how == "closure":
        return torch.compile(lambda x: logits(model(x)), backend=backend)(ids)

    def with_model(m, x):
        return logits(m(x))

    return torch.compile(with_model, backend=backend)(model, ids)


WAYS = ["object", "forward", "closure", "argument"]


@pytest.mark.parametrize("how", WAYS)
@pytest.mark.parametrize("arch", sorted(MODELS))
def test_stack_path_is_the_users_module_path_however_compiled(arch, how):
    path, make = MODELS[arch]
    model = make()
    ids = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with eager_pairing(model, [(1, 2)], "lp"):
            expected = logits(model(ids))
        lp = LayerParallel(pairs=[(1, 2)], stack=path, inner="eager")
        got = compile_and_run(model, how, lp, ids)
    report = lp.reports[0]
    assert report.stack == path
    assert [layer.path for layer in report.layers] == [f"{path}.{i}" for i in range(4)]
    assert [p for p, _ in report.pairs_rewritten] == [(1, 2)]
    assert (got - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("how", WAYS)
def test_unknown_stack_is_an_error_naming_the_stacks_found(how):
    model = hf_model("llama")
    ids = torch.randint(0, VOCAB, (1, 8))
    lp = LayerParallel(pairs=[(1, 2)], stack="model.blocks", inner="eager")
    with pytest.raises(Exception, match=r"no layer stack 'model.blocks'.*stacks found: model.layers\b") as info:
        compile_and_run(model, how, lp, ids)
    assert "L[" not in str(info.value) and "G[" not in str(info.value)


def test_stack_without_pairs_is_not_checked():
    """With nothing to pair the backend is a pass-through; a wrong stack has no effect to report."""
    model = hf_model("llama")
    ids = torch.randint(0, VOCAB, (1, 8))
    lp = LayerParallel(stack="model.blocks", inner="eager")
    with torch.no_grad():
        got = compile_and_run(model, "object", lp, ids)
        assert torch.equal(got, logits(model(ids)))


@pytest.mark.parametrize(
    ("raw", "roots", "user_path"),
    [
        ("L['self'].model.layers.3", ("L['self']",), "model.layers.3"),
        ("L['args'][0].model.layers.3", ("L['args'][0]",), "model.layers.3"),
        ("G['m'].transformer.h.0", ("G['m']",), "transformer.h.0"),
        ("L['fn'].__closure__[0].cell_contents.layers['2']", ("L['fn'].__closure__[0].cell_contents",), "layers.2"),
        ("L['args'][0].model.layers.3", (), "model.layers.3"),
        ("L['self'].layers['3']", (), "layers.3"),
    ],
)
def test_normalize_path_strips_how_dynamo_named_the_model(raw, roots, user_path):
    assert normalize_path(raw, roots) == user_path
