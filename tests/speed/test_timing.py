"""The decode clock that every speed command reads."""

import pytest

from lp_fx.tools.speed import timing


def test_decode_speed_is_one_over_the_median_step_so_a_stall_does_not_move_it(monkeypatch):
    arrivals = iter([0.0, 0.1, 0.2, 1.2, 1.3])  # the third step stalled for a second
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(arrivals))
    clock = timing._TokenClock()
    for value in ["prompt", *range(5)]:  # the prompt's ids first: not a decode step
        clock.put(value)
    assert clock.decode_tokens_per_s() == pytest.approx(10.0)  # the mean step would give 4 / 1.3 s


def test_each_round_starts_one_variant_further_along(monkeypatch):
    order = []

    def generate(model, ids, tokens):
        order.append(model)
        return ids, 1.0

    monkeypatch.setattr(timing, "generate", generate)
    todo = [Variant(name) for name in "abc"]
    timing.time_interleaved({v.name: v.name for v in todo}, todo, None, 4, rounds=4)
    assert "".join(order) == "abc" + "bca" + "cab" + "abc"
    assert all(len(v.tokens_per_s) == 4 for v in todo)


class Variant:
    def __init__(self, name):
        self.name, self.tokens_per_s = name, []


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_decode_steps_compile_once_even_where_the_cache_counts_tokens_in_a_python_int(arch):
    """Gemma 3's sliding-window cache layers keep their length in a Python int: with automatic dynamic
    shapes off, each decode step compiled a graph of its own (and the timing timed compiles)."""
    import torch

    from lp_fx import LayerParallel

    from tests.helpers.models import hf_model

    model = hf_model(arch, layers=4)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, cache_implementation="static")
    backend = LayerParallel(pairs=[], inner="eager")
    settings = ("automatic_dynamic_shapes", "cache_size_limit", "accumulated_cache_size_limit")
    with torch._dynamo.config.patch({name: getattr(torch._dynamo.config, name) for name in settings}):
        timing.room_for_variants()
        model.forward = timing.decode_steps_through(torch.compile(model.forward, backend=backend), model.forward)
        got, _ = timing.generate(model, ids, 8)
    assert torch.equal(got, expected)
    assert len(backend.reports) <= 2, [r.summary() for r in backend.reports]  # one, and one with the int dynamic
