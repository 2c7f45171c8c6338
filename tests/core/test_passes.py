"""The pass list and what it shares: options read from LPConfig, the layers found again after a
pass changes them, the one inference-only rule, the one call wrapper; and the README and the design
page say the same."""

import ast
import re
from dataclasses import fields
from pathlib import Path

import pytest
import torch

import lp_fx.config
from lp_fx import LayerParallel, LayerParallelError
from lp_fx.config import DEFAULTS, OPTION_NAMES, LPConfig, config_from_options
from lp_fx.passes import PASSES, rewrite
from lp_fx.report import GraphReport
from lp_fx.state import GraphState, fixed, wrap_call
from lp_fx.weights import WeightStore

from tests.helpers.reference import eager_order, eager_pairing
from tests.helpers.runs import logits, make, random_ids, shuffled_order

REPO = Path(__file__).resolve().parents[2]


def section(document: str, title: str) -> str:
    text = (REPO / document).read_text()
    start = text.index(title)
    return text[start : text.index("\n##", start + len(title))]  # "# " alone starts comments in code blocks


# ------------------------------------------------------------------------------- options


def test_option_defaults_come_from_the_dataclass():
    assert config_from_options() == LPConfig() == config_from_options(DEFAULTS)
    for name, default in DEFAULTS.items():  # each given explicitly at its default changes nothing
        assert config_from_options({name: default}) == LPConfig()
    assert set(DEFAULTS) == set(OPTION_NAMES) - {"start", "end", "plan", "modes"}


def test_the_options_are_the_fields():
    made_from = {"span": ("start", "end"), "plan_num_layers": ("plan",)}
    assert list(OPTION_NAMES) == [name for f in fields(LPConfig) for name in made_from.get(f.name, (f.name,))]
    with pytest.raises(LayerParallelError, match="valid options: " + ", ".join(OPTION_NAMES) + "$"):
        LayerParallel(pairz=[(0, 1)])


def test_every_field_is_documented_where_it_is_declared():
    tree = ast.parse(Path(lp_fx.config.__file__).read_text())
    body = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "LPConfig").body
    documented = {
        statement.target.id
        for statement, after in zip(body, body[1:])
        if isinstance(statement, ast.AnnAssign) and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
    }
    assert documented == {f.name for f in fields(LPConfig)}


def test_readme_options_table_lists_the_options():
    rows = [line for line in section("README.md", "## Using the backend").splitlines() if line.startswith("| `")]
    listed = [name for row in rows for name in re.findall(r"`(\w+)`", row.split("|")[1])]
    assert listed == list(OPTION_NAMES)


# ------------------------------------------------------------------------------- passes


def test_the_design_page_lists_the_passes_in_their_order():
    described = section("docs/design.md", "## What it does to the graph")
    listed = re.findall(r"^\d+\. \*\*[^*]+\*\* \(`(\w+)`", described, flags=re.MULTILINE)
    assert listed == [p.__name__ for p in PASSES]


def graph_of(model, ids):
    """The one graph Dynamo makes of ``model`` (no backend of ours) and its example inputs."""
    caught = []

    def keep(gm, example_inputs):
        caught.append((gm, example_inputs))
        return gm.forward

    with torch.no_grad():
        logits(torch.compile(model, backend=keep), ids)
    assert len(caught) == 1
    return caught[0]


def test_layers_are_found_again_after_the_rewrite():
    gm, example_inputs = graph_of(make("llama", layers=6), random_ids(0))
    config = config_from_options(pairs=[(0, 1), (2, 3)], inner="eager")
    said = []
    state = GraphState(gm, example_inputs, config, GraphReport(index=0), WeightStore(), said.append)
    for run in PASSES[: PASSES.index(rewrite) + 1]:
        run(state)
    assert not said and [p for p, _ in state.report.pairs_rewritten] == [(0, 1), (2, 3)]
    live, layers = set(gm.graph.nodes), state.stack.layers
    for layer in layers.values():
        assert layer.nodes <= live and layer.input in live
        for block in layer.blocks:
            assert block.stream in block.add.args and block.add in live
    pair_out = [r.combines[-1].users for r in state.rewrites]
    # the second pair reads the first one's sum, and layer 4 the second one's: not the outputs found before
    assert layers[2].input is layers[3].input is layers[1].output is next(iter(pair_out[0]))
    assert layers[4].input is layers[3].output is next(iter(pair_out[1]))


def test_a_shuffle_right_after_an_lp_pair_reads_the_pair_as_rewritten():
    model = make("llama", layers=6)
    shuffle = {"start": 2, "end": 6, "seed": 0}
    order, shuffled = shuffled_order(shuffle, 6)
    ids = random_ids(4)
    with torch.no_grad():
        with eager_pairing(model, [(0, 1)], "lp"), eager_order(model, order):
            expected = logits(model, ids)
        lp = LayerParallel(pairs=[(0, 1)], shuffle=shuffle, inner="aot_eager", strict=True)
        got = logits(torch.compile(model, backend=lp), ids)
    assert lp.reports[0].shuffled == shuffled and lp.reports[0].pairs_rewritten == [((0, 1), "lp")]
    assert (got - expected).abs().max().item() <= 1e-4


# ------------------------------------------------------------------------------- inference only


@pytest.mark.parametrize(
    "options, option", [({"mode": "merge"}, "mode='merge'"), ({"fuse": True}, "fuse=True")], ids=["merge", "fuse"]
)
def test_one_inference_only_rule_refuses_gradients_before_changing_anything(options, option):
    model = make("llama")
    before = {name: (p.data_ptr(), p.clone()) for name, p in model.named_parameters()}
    backend = LayerParallel(pairs=[(1, 2)], inner="eager", **options)
    with pytest.raises(Exception, match=re.escape(option) + " is for inference and does not train"):
        logits(torch.compile(model, backend=backend), random_ids(1))
    assert not backend.weights.tensors()
    assert all(p.data_ptr() == before[n][0] and torch.equal(p, before[n][1]) for n, p in model.named_parameters())
    with torch.no_grad():  # the same backend compiles the same pairing once gradients are off
        logits(torch.compile(model, backend=backend), random_ids(1))
    assert backend.reports[-1].pairs_rewritten == [((1, 2), options.get("mode", "lp"))]


def test_the_inference_only_rule_holds_only_where_the_option_acts():
    model = make("llama")
    backend = LayerParallel(pairs=[(1, 2)], mode="prune", fuse=True, inner="eager")  # nothing to fuse
    out = logits(torch.compile(model, backend=backend), random_ids(2))
    assert out.requires_grad and backend.reports[0].gemms is None


# ------------------------------------------------------------------------------- call wrapper


def bare_state() -> GraphState:
    return GraphState(None, [], LPConfig(), GraphReport(index=0), WeightStore(), lambda msg: None)


def test_the_call_wrapper_checks_then_replaces_then_appends():
    seen = []
    state = bare_state()
    state.checks.append(lambda args: seen.append(("check", list(args))))
    state.replaced[1] = lambda args: args[0] + args[1]
    state.appended.append(lambda args: args[2] * 100)  # what to append is made from the call's own inputs
    call = wrap_call(lambda *args: seen.append(("call", list(args))), state)
    state.appended.append(fixed(1000))  # what the passes set when the wrapper was made counts, not later changes
    call(1, 2, 3)
    assert seen == [("check", [1, 2, 3]), ("call", [1, 3, 3, 300])]
    plain = lambda *args: args  # noqa: E731
    assert wrap_call(plain, bare_state()) is plain
