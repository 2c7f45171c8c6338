"""What each gloo rank runs for tests/test_distributed*.py (spawned, so importable by name).

Every check compares the placed graph on this rank with the single-device backend on the same
model and pairing, and returns plain numbers; the test process asserts on them.
"""

from __future__ import annotations

import functools
import os
import socket
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from transformers import LlamaConfig, LlamaForCausalLM

from lp_fx.backend import LayerParallel
from lp_fx.config import LayerParallelError
from lp_fx.tools.evaluation.reference import eager_pairing
from lp_fx.weights import resident_bytes


GPT_CASES = (("lp", True), ("block", False))
# The tiny Llama's layers and the pair the two-rank cases place: one tensor-parallel layer on each side.
LLAMA_LAYERS, LLAMA_PAIR = 4, (1, 2)
PROMPT = torch.tensor([[3, 14, 15, 9, 26, 5, 35]])


def tiny_llama(layers: int = LLAMA_LAYERS, kv_heads: int = 2, seed: int = 0, heads: int = 4) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, vocab_size=61, max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


class Block(nn.Module):
    """A hand-written pre-norm block: LayerNorm with bias, biased linears, manual attention, GELU MLP."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.up, self.down = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        h = self.ln1(x)
        q, k, v = (p(h).view(b, t, self.heads, c // self.heads).transpose(1, 2) for p in (self.q, self.k, self.v))
        att = (q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5
        att = att.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf")).softmax(dim=-1)
        y = (att @ v).transpose(1, 2).reshape(b, t, c)
        x = x + self.o(y)
        return x + self.down(nn.functional.gelu(self.up(self.ln2(x))))


class TinyGPT(nn.Module):
    def __init__(self, layers: int = 4, dim: int = 32, heads: int = 4, vocab: int = 61, seed: int = 0) -> None:
        torch.manual_seed(seed)
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def compiled_logits(model: nn.Module, backend: LayerParallel) -> torch.Tensor:
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        out = compiled(PROMPT) if isinstance(model, TinyGPT) else compiled(PROMPT, use_cache=False)
    return out if isinstance(out, torch.Tensor) else out.logits


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def logits_case(mesh, make_model: Callable[[], nn.Module], pairs, mode: str, tp: bool, inner: str = "eager") -> dict:
    """Max |placed - single device| and the placed report's collectives and parameter bytes."""
    case = placed_case(mesh, make_model, pairs, mode, tp, inner)
    case["diff"] = _diff(case.pop("logits"), single_device_logits(make_model, tuple(pairs), mode))
    return case


@functools.cache
def single_device_logits(make_model: Callable[[], nn.Module], pairs: tuple, mode: str) -> torch.Tensor:
    """The single-device reference, computed once per process for cases that share it: the Llama's
    pairing run eagerly (:func:`eager_pairing`, no compile); the hand-written model's, whose layer
    the eager reference has no sub-blocks for, through the single-device backend."""
    model = make_model()
    if isinstance(model, TinyGPT):
        return compiled_logits(model, LayerParallel(pairs=list(pairs), mode=mode, inner="eager"))
    with torch.no_grad(), eager_pairing(model, pairs, mode):
        return model(PROMPT, use_cache=False).logits


@functools.cache
def single_device_tokens(make_model: Callable[[], nn.Module] = tiny_llama) -> list[int]:
    """Greedy tokens of ``LLAMA_PAIR`` run eagerly (static cache), computed once per process."""
    model = make_model()
    with eager_pairing(model, [LLAMA_PAIR], "lp"):
        return greedy(model)


def placed_case(mesh, make_model: Callable[[], nn.Module], pairs, mode: str, tp: bool, inner: str = "eager") -> dict:
    """This rank's logits and its report's collectives and parameter bytes."""
    model = make_model()
    placed = LayerParallel(pairs=pairs, mode=mode, inner=inner, mesh=mesh, tp=tp)
    logits = compiled_logits(model, placed)
    report = placed.reports[-1]
    full = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"logits": logits, "collectives": report.collectives, "param_bytes": report.param_bytes,
            "full_bytes": full, "rank": report.rank}


def int8_llama() -> LlamaForCausalLM:
    """The tiny Llama with torchao int8 weight-only linears (tensor-subclass weights)."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    model = tiny_llama()
    quantize_(model, Int8WeightOnlyConfig())
    return model


def greedy_tokens(backend: LayerParallel, make_model: Callable[[], nn.Module] = tiny_llama) -> tuple[list[int], nn.Module]:
    """Greedy tokens of a tiny Llama whose forward is compiled with ``backend`` (static cache)."""
    torch._dynamo.reset()
    model = make_model()
    model.forward = torch.compile(model.forward, backend=backend)
    return greedy(model), model


def greedy(model: nn.Module) -> list[int]:
    """8 greedy tokens after ``PROMPT``, with a static cache."""
    with torch.no_grad():
        return model.generate(PROMPT, max_new_tokens=8, do_sample=False, cache_implementation="static")[0].tolist()


def generate_case(mesh) -> dict:
    """Greedy tokens with a static cache, TP + LP on 2 ranks vs single-device LP."""
    placed = LayerParallel(pairs=[LLAMA_PAIR], inner="aot_eager", mesh=mesh)
    return {"single": single_device_tokens(),
            "placed": greedy_tokens(placed)[0], "collectives": [r.collectives for r in placed.reports]}


def free_weights_case(mesh, make_model: Callable[[], nn.Module] = tiny_llama) -> dict:
    """TP + LP generation with ``free_weights=True``: tokens, and the parameter memory the rank keeps
    (weights are released before the inner compiler runs, so ``aot_eager`` shows it)."""
    placed = LayerParallel(pairs=[LLAMA_PAIR], inner="aot_eager", mesh=mesh, free_weights=True)
    tokens, model = greedy_tokens(placed, make_model)
    full = resident_bytes(make_model())

    def with_gradients() -> None:
        torch._dynamo.reset()
        torch.compile(tiny_llama(), backend=LayerParallel(mesh=mesh, free_weights=True))(PROMPT)

    return {"single": single_device_tokens(make_model), "placed": tokens,
            "resident": resident_bytes(model, placed.weights), "full_bytes": full,
            "param_bytes": [r.param_bytes for r in placed.reports], "released": [r.released_bytes for r in placed.reports],
            "grad_error": error_case(with_gradients)}


def free_weights_two_models_case(mesh) -> dict:
    """Two tiny Llamas (other weights) through one ``free_weights=True`` backend, called A, B, A:
    Dynamo reuses A's graph for B, and each must still compute with its own weights' slices."""
    seeds = (0, 1)
    expected = [single_device_logits(functools.partial(tiny_llama, seed=s), (LLAMA_PAIR,), "lp") for s in seeds]
    models = [tiny_llama(seed=s) for s in seeds]
    placed = LayerParallel(pairs=[LLAMA_PAIR], inner="aot_eager", mesh=mesh, free_weights=True)
    torch._dynamo.reset()
    compiled = [torch.compile(m, backend=placed) for m in models]
    with torch.no_grad():
        diffs = [_diff(compiled[k](PROMPT, use_cache=False).logits, expected[k]) for k in (0, 1, 0)]
    return {"diffs": diffs, "resident": [resident_bytes(m) for m in models], "full_bytes": resident_bytes(tiny_llama())}


def gradient_case(mesh, tp: bool) -> float:
    """Largest gradient error: owned parameters summed over ranks, replicated ones per rank."""
    def grads(backend: LayerParallel) -> dict[str, torch.Tensor]:
        torch._dynamo.reset()
        model = TinyGPT()
        torch.compile(model, backend=backend)(PROMPT).square().mean().backward()
        return {n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}

    pairs = [(1, 2)]
    reference = grads(LayerParallel(pairs=pairs, inner="eager"))
    mine = grads(LayerParallel(pairs=pairs, inner="aot_eager", mesh=mesh, tp=tp))
    worst = 0.0
    for name, g in mine.items():
        split = name.startswith(("blocks.1.", "blocks.2.")) or (tp and "blocks." in name and ".ln" not in name)
        if split:
            g = g.clone()
            dist.all_reduce(g)
        worst = max(worst, _diff(g, reference[name]))
    return worst


def error_case(fn: Callable[[], object]) -> str:
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the message is what is checked
        cause = e
        while cause.__cause__ is not None and not isinstance(cause, LayerParallelError):
            cause = cause.__cause__
        return f"{type(cause).__name__}: {cause}"
    return "no error"


def spawn_ranks(cases: Callable[[DeviceMesh], dict], world: int, out_dir: Path) -> list[dict]:
    """Each rank's ``cases(mesh)`` results, from ``world`` spawned gloo processes (any failure raised
    here). The ``distributed`` tests that spawn them run in a pytest call of their own, one process,
    so the ranks have the cores to themselves."""
    mp.spawn(run_cases, args=(world, _free_port(), str(out_dir), cases), nprocs=world)
    results = [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(world)]
    for r, res in enumerate(results):
        assert "error" not in res, f"rank {r}:\n{res['error']}"
    return results


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cases(rank: int, world: int, port: int, out_dir: str, cases: Callable[[DeviceMesh], dict]) -> None:
    """One spawned rank: ``cases`` on a 1-D mesh over all ranks, saved (or its traceback) for the test process."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = cases(init_device_mesh("cpu", (world,)))
    except Exception:  # noqa: BLE001 - reported to the test process
        results = {"error": traceback.format_exc()}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def two_rank_cases(mesh: DeviceMesh) -> dict:
    """Everything tests/test_distributed.py checks."""
    results: dict = {}
    llama, gpt = tiny_llama, TinyGPT
    for tp in (False, True):
        for mode in ("lp", "block"):
            results[f"llama_{mode}_tp{tp}"] = logits_case(mesh, llama, [LLAMA_PAIR], mode, tp)
    for mode, tp in GPT_CASES:
        results[f"gpt_{mode}_tp{tp}"] = logits_case(mesh, gpt, [(1, 2)], mode, tp)
    results["llama_tp_only"] = logits_case(mesh, llama, [], "lp", True)
    results["gpt_tp_only"] = logits_case(mesh, gpt, [], "lp", True)
    results["generate"] = generate_case(mesh)
    results["free_weights"] = free_weights_case(mesh)
    results["free_weights_int8"] = free_weights_case(mesh, int8_llama)
    results["free_weights_two_models"] = free_weights_two_models_case(mesh)
    results["llama_lp_tpTrue_inductor"] = logits_case(mesh, llama, [LLAMA_PAIR], "lp", True, inner="inductor")
    results["grad_tp"] = gradient_case(mesh, tp=True)
    results["grad_lp"] = gradient_case(mesh, tp=False)
    one = init_device_mesh("cpu", (mesh.size(), 1), mesh_dim_names=("outer", "inner"))["inner"]
    results["mesh_of_one"] = logits_case(one, llama, [LLAMA_PAIR], "lp", True)
    results["kv_heads_error"] = error_case(lambda: logits_case(mesh, lambda: tiny_llama(kv_heads=1), [], "lp", True))
    return results


def finetune_cases(mesh: DeviceMesh) -> dict:
    """The trained tensors after 3 fine-tuning steps on this rank's part of a TP + LP mesh."""
    from lp_fx.tools.training.finetune import finetune

    results = {}
    for train in ("paired", "all"):
        model = tiny_llama()
        finetune(model, finetune_tokens(), finetune_config(train), Path(os.environ["LP_FX_CKPT"]) / train,
                 mesh=mesh, progress=False)
        results[train] = {n: p.detach().clone() for n, p in model.named_parameters()}
        results[f"grads_{train}"] = finetune_gradients(train, mesh)
    return results


def finetune_gradients(train: str, mesh: DeviceMesh | None = None) -> dict[str, torch.Tensor]:
    """The gradients the optimizer sees in the first fine-tuning step (after the cross-rank sum)."""
    from lp_fx.tools.training import finetune as ft, losses
    from lp_fx.tools.training.distributed import Ranks

    torch._dynamo.reset()
    model, config = tiny_llama(), finetune_config(train)
    ft.choose_trainable(model, config)
    student, backend = ft.make_student(model, config, mesh)
    ids = finetune_tokens().view(4, 16)[:2]
    losses.lm_loss(losses.logits_of(student, ids), ids).backward()
    params = [p for p in model.parameters() if p.requires_grad]
    if mesh is not None:
        Ranks(mesh, backend).complete_gradients(params)
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def finetune_tokens() -> torch.Tensor:
    return torch.randint(0, 61, (4 * 16,), generator=torch.Generator().manual_seed(0))


def finetune_config(train: str):
    from lp_fx.tools.training.finetune import FinetuneConfig

    return FinetuneConfig(pairs=(LLAMA_PAIR,), train=train, steps=3, lr=1e-4, batch=2, seq_len=16, warmup=1)
