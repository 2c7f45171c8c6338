"""The pass never computes a silently different result, never crashes on legal weights, never keeps
a deleted model alive, and says the true cause when it leaves a pair alone."""

import gc
import json
import time
import weakref
from pathlib import Path

import pytest
import torch
from torch import nn

import lp_fx.backend
from lp_fx import LayerParallel, LayerParallelError
from lp_fx.pairing import PlanError, load_plan

from tests.helpers.models import GPT, GPTConfig, hf_model, tiny_hand_written
from tests.helpers.reference import eager_pairing, layer_list, merged_copy
from tests.helpers.runs import logits, random_ids

PAIRS = [(1, 2)]


def perturbed_state(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {k: v + 0.1 * torch.randn(v.shape, generator=generator) for k, v in model.state_dict().items()}


# ------------------------------------------------------------------- merge sees the weights held now


def change_weights(model, how):
    """Change layer 2's weights the way a user would between two calls."""
    up = layer_list(model)[2].mlp.up_proj.weight
    with torch.no_grad():
        if how == "load_state_dict":
            model.load_state_dict(perturbed_state(model, 1))
        elif how == "in_place":
            up.mul_(1.5)
        else:
            up.data = torch.randn_like(up)


@pytest.mark.parametrize("how", ["load_state_dict", "in_place", "new_tensor"])
@pytest.mark.parametrize("recompile", [False, True])
def test_merge_averages_the_weights_the_model_holds_at_each_call(how, recompile):
    model = hf_model("llama")
    ids = random_ids(3)
    lp = LayerParallel(pairs=PAIRS, mode="merge", inner="aot_eager")
    compiled = torch.compile(model, backend=lp)
    with torch.no_grad():
        logits(compiled, ids)
        change_weights(model, how)
        if recompile:
            torch._dynamo.reset()
            compiled = torch.compile(model, backend=lp)
        got = logits(compiled, ids)
        expected = logits(merged_copy(model, PAIRS), ids)
    assert (got - expected).abs().max().item() <= 1e-5


# ------------------------------------------------------------------------ nothing kept of a dead model


@pytest.mark.parametrize("options", [{"fuse": True}, {"mode": "merge"}])
def test_a_backend_chosen_by_name_frees_what_it_made_from_a_deleted_model(options):
    model = hf_model("llama")
    known = {id(t) for lp in lp_fx.backend._BY_OPTIONS.values() for t in lp.weights.tensors()}
    compiled = torch.compile(
        model, backend="layer_parallel", options={"pairs": PAIRS, "inner": "aot_eager", **options}
    )
    with torch.no_grad():
        logits(compiled, random_ids(4))
    made = [t for lp in lp_fx.backend._BY_OPTIONS.values() for t in lp.weights.tensors() if id(t) not in known]
    assert made, "the backend should hold fused buffers or averages while the model lives"
    held = [weakref.ref(t) for t in made]
    del model, compiled, made
    torch._dynamo.reset()
    gc.collect()
    assert all(ref() is None for ref in held)


# ----------------------------------------------------------------------- fuse and non-contiguous weights


def test_fuse_leaves_a_non_contiguous_weight_unfused_and_stays_exact(lp_warnings):
    model = hf_model("llama")
    q = layer_list(model)[1].self_attn.q_proj.weight
    q.data = q.data.t().contiguous().t()
    ids = random_ids(5)
    with torch.no_grad(), eager_pairing(model, PAIRS, "lp") as reference:
        expected = logits(reference, ids)
    lp = LayerParallel(pairs=PAIRS, inner="aot_eager", fuse=True)
    with torch.no_grad():
        got = logits(torch.compile(model, backend=lp), ids)
    assert (got - expected).abs().max().item() <= 1e-4
    (pair, why), = lp.reports[0].fuse_skipped
    assert pair == (1, 2) and "self_attn.q_proj.weight: a weight is not contiguous" in why
    assert lp.reports[0].pairs_fused == [((1, 2), 4)]


# ------------------------------------------------------------------------------- ranges are not built


def test_a_huge_range_is_checked_without_building_it_and_refused_naming_the_stack_size():
    started = time.perf_counter()
    lp = LayerParallel(start=0, end=10**9, inner="eager")
    assert time.perf_counter() - started < 1.0
    with pytest.raises(Exception, match=r"start=0, end=1000000000 is out of range: model.layers has 4 layers, so end <= 4"):
        with torch.no_grad():
            torch.compile(hf_model("llama"), backend=lp)(random_ids(7), use_cache=False)


def test_a_range_that_fits_pairs_what_the_explicit_pairs_pair():
    model = hf_model("llama", layers=6)
    ids = random_ids(8)
    with torch.no_grad(), eager_pairing(model, [(2, 3), (4, 5)], "lp") as reference:
        expected = logits(reference, ids)
    lp = LayerParallel(start=2, end=6, inner="eager")
    with torch.no_grad():
        got = logits(torch.compile(model, backend=lp), ids)
    assert lp.reports[0].pairs_rewritten == [((2, 3), "lp"), ((4, 5), "lp")]
    assert (got - expected).abs().max().item() <= 1e-4


def test_a_range_overlapping_the_shuffle_is_refused():
    with pytest.raises(LayerParallelError, match="the range start=0, end=10 is inside the shuffled layers 8..11"):
        LayerParallel(start=0, end=10, shuffle={"start": 8, "end": 12})


# -------------------------------------------------------------------- torch.compile's mode= says so


def test_torch_compile_mode_pairs_nothing_and_says_so(lp_warnings):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2)).eval()  # mode= leaves the inner compiler Inductor: the smallest graph
    ids = random_ids(9)
    compiled = torch.compile(model, backend="layer_parallel", mode="block")
    with torch.no_grad():
        got, plain = compiled(ids), model(ids)
    assert torch.allclose(got, plain, atol=1e-5)
    assert "torch.compile(mode='block') is ignored by layer_parallel" in lp_warnings.text


# ------------------------------------------------------------------------------------ graph breaks


class BreakInMLP(nn.Module):
    """Wraps an MLP with a graph break before it runs."""

    def __init__(self, mlp: nn.Module):
        super().__init__()
        self.inner = mlp

    def forward(self, x):
        torch._dynamo.graph_break()
        return self.inner(x)


def test_a_graph_break_inside_a_layer_names_itself_as_the_reason_nothing_is_paired(lp_warnings):
    model = hf_model("llama", layers=4)
    layer_list(model)[1].mlp = BreakInMLP(layer_list(model)[1].mlp)
    ids = random_ids(10)
    lp = LayerParallel(pairs=[(0, 1), (2, 3)], inner="eager")
    with torch.no_grad():
        got = logits(torch.compile(model, backend=lp), ids)
        plain = logits(model, ids)
    assert torch.allclose(got, plain, atol=1e-6)  # nothing paired: each layer is compiled on its own
    assert len(lp.reports) > 2
    line = BreakInMLP.forward.__code__.co_firstlineno + 1
    assert f"split by a graph break at {Path(__file__).name}:{line} in forward" in lp_warnings.text
    assert "no module list" not in lp_warnings.text


class UnrolledGPT(GPT):
    """nanoGPT calling its six blocks one by one, with a graph break after the third."""

    def forward(self, idx):
        h = self.transformer.h
        x = self.transformer.wte(idx) + self.transformer.wpe(torch.arange(idx.shape[1]))
        x = h[2](h[1](h[0](x)))
        torch._dynamo.graph_break()
        x = h[5](h[4](h[3](x)))
        return self.lm_head(self.transformer.ln_f(x))


def test_pairs_wholly_inside_one_graph_are_rewritten_and_only_the_split_one_is_left(lp_warnings):
    torch.manual_seed(0)
    model = UnrolledGPT(GPTConfig(n_layer=6)).eval()
    ids = random_ids(11)
    with torch.no_grad(), eager_pairing(model, [(0, 1), (4, 5)], "lp") as reference:
        expected = reference(ids)
    lp = LayerParallel(pairs=[(0, 1), (2, 3), (4, 5)], inner="eager")
    with torch.no_grad():
        got = torch.compile(model, backend=lp)(ids)
    assert (got - expected).abs().max().item() <= 1e-4
    assert [r.pairs_rewritten for r in lp.reports] == [[((0, 1), "lp")], [((4, 5), "lp")]]
    line = UnrolledGPT.forward.__code__.co_firstlineno + 4
    assert f"split by a graph break at {Path(__file__).name}:{line} in forward" in lp_warnings.text


class SkippingGPT(GPT):
    """nanoGPT that never runs its layer 3."""

    def forward(self, idx):
        x = self.transformer.wte(idx) + self.transformer.wpe(torch.arange(idx.shape[1]))
        for i, block in enumerate(self.transformer.h):
            if i != 3:
                x = block(x)
        return self.lm_head(self.transformer.ln_f(x))


def test_a_layer_the_model_skips_is_not_called_a_graph_break(lp_warnings):
    torch.manual_seed(0)
    model = SkippingGPT(GPTConfig(n_layer=6)).eval()
    lp = LayerParallel(pairs=[(2, 3)], inner="eager")
    with torch.no_grad():
        torch.compile(model, backend=lp)(random_ids(12))
    (pair, why), = lp.reports[0].pairs_skipped
    assert pair == (2, 3) and "layer 3 not run in this graph (skipped by the model, not a graph break)" in why
    assert "graph break at" not in lp_warnings.text


# -------------------------------------------------------------------------------------- plan paths


def test_a_plan_path_that_is_a_directory_is_named(tmp_path):
    with pytest.raises(PlanError, match=f"plan file {tmp_path} is a directory"):
        load_plan(tmp_path)


def test_an_unreadable_plan_is_named(tmp_path, monkeypatch):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"pairs": [[1, 2]], "num_layers": 4}))

    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(type(plan), "read_bytes", refuse)
    with pytest.raises(PlanError, match=f"cannot read plan file {plan}: Permission denied"):
        load_plan(plan)
