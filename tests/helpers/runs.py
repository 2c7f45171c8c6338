"""Running a tiny model the way the tests compare it: logits, greedy static-cache generation, ids."""

import torch

from lp_fx import LayerParallel
from tests.helpers.models import VOCAB, hf_model, tiny_hand_written


NEW_TOKENS = 32


def greedy(model, ids):
    return model.generate(
        ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, cache_implementation="static"
    )


def make(arch, layers=4):
    return tiny_hand_written(arch) if arch == "nanogpt" else hf_model(arch, layers=layers)


def logits(model, ids):
    out = model(ids, use_cache=False) if hasattr(model, "config") else model(ids)
    return out.logits if hasattr(out, "logits") else out


def random_ids(seed, length=12, batch=2):
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def shuffled_order(options, num_layers):
    """The whole model's layer order for a shuffle option, and the shuffled range's order."""
    order = LayerParallel(shuffle=options).config.shuffle.order
    start, end = options["start"], options["end"]
    assert sorted(order) == list(range(start, end)) and list(order) != sorted(order), order
    return [*range(start), *order, *range(end, num_layers)], order
