"""``fuse=True``: each rewritten pair's GEMMs run as batched GEMMs over a stacked weight buffer,
with the result of the pairing's independent eager reference (which the unfused pairing also
equals: tests/core/test_rewrite.py)."""

import pytest
import torch

from lp_fx import LayerParallel, LayerParallelError
from lp_fx.weights import resident_bytes

from tests.helpers.models import VOCAB, hf_model, init_scale, tiny_hand_written
from tests.helpers.reference import eager_pairing, layer_list
from tests.helpers.runs import NEW_TOKENS, greedy
from tests.helpers.runs import logits, random_ids

ARCHS = ["llama", "qwen2", "mistral", "gemma3", "gpt2", "nanogpt", "titan"]
PAIRS = [(1, 2)]


def make(arch, layers=4):
    model = tiny_hand_written(arch) if arch in ("nanogpt", "titan") else hf_model(arch, layers=layers)
    return init_scale(model)


def compiled_logits(model, ids, **options):
    backend = LayerParallel(pairs=PAIRS, **{"inner": "eager", "strict": True, **options})
    with torch.no_grad():
        out = logits(torch.compile(model, backend=backend), ids)
    torch._dynamo.reset()
    return out, backend


# Batched GEMMs per fused pair: q/k/v, o, gate/up, down (GPT-2 and nanoGPT: c_attn, attn.c_proj, c_fc, mlp.c_proj).
GROUPS = 4


def gemms_per_layer(arch):
    return 4 if arch in ("gpt2", "nanogpt") else 7


@pytest.mark.parametrize("mode", ["lp", "block"])
@pytest.mark.parametrize("arch", ARCHS)
def test_fused_pair_matches_eager_reference(arch, mode):
    model = make(arch)
    ids = random_ids(5)
    with torch.no_grad(), eager_pairing(model, PAIRS, mode) as reference:
        expected = logits(reference, ids)
    inner = "aot_eager" if arch in ("llama", "gpt2") else "eager"  # AOTAutograd behind a linear and a Conv1D model
    fused, backend = compiled_logits(model, ids, mode=mode, fuse=True, inner=inner)
    report = backend.reports[0]
    assert report.pairs_fused == [((1, 2), GROUPS)], report.summary()
    assert not report.fuse_skipped
    assert report.gemms[0] - report.gemms[1] == 2 * gemms_per_layer(arch) - GROUPS
    assert (fused - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # linear; Conv1D with bias (baddbmm over a [in, out] weight)
def test_a_fused_graph_is_one_aotautograd_can_cache(arch):
    """It bypassed AOTAutograd's cache before ("Unsupported call_method target"): every fused compile
    re-ran AOTAutograd, even with Inductor's caches warm."""
    from torch._functorch._aot_autograd.autograd_cache import check_cacheable

    graphs = []
    _, backend = compiled_logits(make(arch), random_ids(5), fuse=True,
                                 inner=lambda gm, example_inputs: graphs.append(gm) or gm.forward)
    assert backend.reports[0].pairs_fused == [((1, 2), GROUPS)]
    [gm] = graphs
    check_cacheable(gm)


def test_fused_model_holds_its_weights_once_and_still_runs_eagerly():
    model = make("llama")
    ids = random_ids(6)
    with torch.no_grad():
        plain = logits(model, ids)
    before = resident_bytes(model)
    _, backend = compiled_logits(model, ids, fuse=True)
    after = resident_bytes(model, backend.weights)
    assert after <= 1.05 * before, (before, after)
    assert backend.reports[0].fuse_bytes[1] <= 1.05 * backend.reports[0].fuse_bytes[0]
    with torch.no_grad():
        assert torch.equal(logits(model, ids), plain)  # the parameters are views of the buffers, same values
    q_a = layer_list(model)[1].self_attn.q_proj.weight
    buffers = {buffer.untyped_storage().data_ptr() for buffer in backend.weights.buffers()}
    assert q_a.untyped_storage().data_ptr() in buffers


@pytest.mark.parametrize("change", ["in_place", "new_tensor", "transposed"])
def test_changed_weights_reach_the_fused_graph(change):
    """In place or a new tensor: seen without a recompile. A transposed (non-contiguous) tensor:
    Dynamo recompiles and the fuse leaves that weight's group unfused, saying why."""
    model = make("llama")
    ids = random_ids(7)
    backend = LayerParallel(pairs=PAIRS, inner="aot_eager", fuse=True)
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        logits(compiled, ids)
        up_b = layer_list(model)[2].mlp.up_proj.weight
        new = torch.randn_like(up_b)
        if change == "in_place":
            up_b.copy_(new)
        elif change == "new_tensor":
            up_b.data = new
        else:
            up_b.data = torch.randn(up_b.shape[1], up_b.shape[0]).t()
        got = logits(compiled, ids)
        with eager_pairing(model, PAIRS, "lp") as reference:
            expected = logits(reference, ids)
    if change == "transposed":
        assert "mlp.up_proj.weight: a weight is not contiguous" in backend.reports[-1].fuse_skipped[0][1]
    else:
        assert len(backend.reports) == 1  # no recompile
    assert (got - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gemma3", "gpt2"])
def test_static_cache_generation_fused_matches_eager_reference(arch):
    model = make(arch, layers=6)
    pairs = [(1, 2), (3, 4)]
    ids = torch.randint(1, VOCAB, (1, 6), generator=torch.Generator().manual_seed(4))
    with torch.no_grad(), eager_pairing(model, pairs, "lp"):
        expected = greedy(model, ids)
    backend = LayerParallel(pairs=pairs, inner="aot_eager" if arch == "llama" else "eager", fuse=True)
    model.forward = torch.compile(model.forward, backend=backend)
    with torch.no_grad():
        got = greedy(model, ids)
    assert got.shape[1] == ids.shape[1] + NEW_TOKENS
    assert torch.equal(got, expected)
    fused = [r for r in backend.reports if r.pairs_fused]
    assert len(fused) >= 2, [r.summary() for r in backend.reports]  # prefill and decode
    assert all(r.pairs_fused == [((1, 2), 4), ((3, 4), 4)] for r in fused)
    # made once, shared by both graphs: 4 weight buffers per pair, and a bias buffer per group with biases
    assert len(backend.weights.buffers()) == {"qwen2": 2 * 5, "gpt2": 2 * 8}.get(arch, 2 * 4)


def test_fused_pairs_through_inductor():
    model = make("llama")
    ids = random_ids(8)
    with torch.no_grad(), eager_pairing(model, PAIRS, "lp") as reference:
        expected = logits(reference, ids)
    got, backend = compiled_logits(model, ids, fuse=True, inner="inductor")
    assert backend.reports[0].pairs_fused == [((1, 2), 4)]
    assert (got - expected).abs().max().item() <= 1e-4


def test_gradients_enabled_are_refused_as_for_every_inference_only_option():
    model = make("llama")
    backend = LayerParallel(pairs=PAIRS, inner="aot_eager", fuse=True)
    with pytest.raises(Exception, match="fuse=True is for inference and does not train"):
        logits(torch.compile(model, backend=backend), random_ids(9))
    assert all(p.is_contiguous() and p._base is None for p in model.parameters())  # no parameter made a view


def test_int8_weights_compile_unfused_and_match():
    torchao = pytest.importorskip("torchao.quantization")
    model = make("llama")
    try:
        torchao.quantize_(model, torchao.Int8WeightOnlyConfig())
    except Exception as error:  # noqa: BLE001 - torchao's CPU kernels are optional
        pytest.skip(f"torchao int8 weight-only quantization does not run here: {error}")
    ids = random_ids(10)
    unfused, _ = compiled_logits(model, ids, inner="aot_eager")  # tensor-subclass weights through AOTAutograd
    fused, backend = compiled_logits(model, ids, fuse=True, strict=False, inner="aot_eager")
    report = backend.reports[0]
    assert not report.pairs_fused
    assert "do not stack" in report.fuse_skipped[0][1]
    assert (fused - unfused).abs().max().item() <= 1e-4


def test_fuse_with_a_mesh_is_refused():
    with pytest.raises(LayerParallelError, match="fuse=True is for one device"):
        LayerParallel(pairs=PAIRS, fuse=True, mesh="auto")
