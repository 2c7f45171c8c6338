"""Win back what pairing costs: fine-tune the paired layers through the compiled pairing.

The student is the model compiled with the ``layer_parallel`` backend, so the loss is
backpropagated through the rewritten graph (AOTAutograd): what is trained is exactly what is
served. Two losses:

- ``distill`` (default): KL divergence from the unpaired model's next-token distribution. The
  teacher is the same model with the original weights of the layers that train, kept as a frozen
  copy of those tensors only and swapped in with ``torch.func.functional_call``: no second model.
- ``lm``: next-token cross-entropy on the training text.

By default only the parameters of the paired layers train (``requires_grad=False`` elsewhere);
with ``lora_rank``, low-rank adapters on those layers' linear layers train instead and the weights
stay as they were (:mod:`lp_fx.tools.training.lora`; the teacher is then the model without its
adapters, and the checkpoint holds the adapter in peft's format).
AdamW with a linear warm-up and a cosine decay to a tenth of the rate, gradient clipping, a seed
that fixes the data order and the initial state, held-out perplexity every ``eval_every`` steps,
and an all-or-nothing checkpoint every ``save_every`` steps and at the end (``lp_fx.checkpoint``).

On a device mesh (``mesh=...``, one process per rank under torchrun) each rank computes and
trains the branch it owns; gradients are completed across ranks before the optimizer step so
that every rank applies the single-device update (see :func:`lp_fx.tools.training.distributed.sync_gradients`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lp_fx.adapter import adapter_record
from lp_fx.config import PAIRING_MODES, LayerParallelError, choice
from lp_fx.checkpoint import (
    check_checkpoint_dir,
    layer_parameter_names,
    layer_stack_of,
    pairing_record,
    save_checkpoint,
    unique_tensors,
)
from lp_fx.tools.data import MixedBatches, token_streams
from lp_fx.pairing import Pair, Pairing, validate_pairs
from lp_fx.tools.evaluation.compiled import check_rewritten, make_backend
from lp_fx.tools.evaluation.scoring import perplexity
from lp_fx.tools.training import lora
from lp_fx.tools.training.losses import distill_loss, learning_rate_factor, lm_loss, logits_of
from lp_fx.tools.training.distributed import Ranks, resolve_mesh

log = logging.getLogger(__name__)

LOSSES = ("distill", "lm")
FULL_LR = 1e-4  # the default peak learning rate when the weights train
LORA_LR = 1e-3  # the default peak learning rate with LoRA (the adapters start at zero and are small)
TRAIN_SETS = ("paired", "all")


class FinetuneError(LayerParallelError):
    """Fine-tuning arguments or data that cannot be used; the message says what is valid."""


@dataclass(frozen=True)
class FinetuneConfig:
    """What to train and how. ``train_layers`` overrides the layers that train (default: the
    paired ones), e.g. to give the unpaired model the same fine-tuning as a control. ``lora_rank``:
    train LoRA adapters of that rank on those layers' linear layers (``lora_targets``: only those
    named, e.g. ``("q_proj", "v_proj")``) instead of their weights; ``lora_alpha`` defaults to
    twice the rank."""

    pairs: tuple[Pair, ...] = ()
    modes: tuple[str, ...] | None = None
    mode: str = "lp"
    loss: str = "distill"
    train: str = "paired"
    train_layers: tuple[int, ...] | None = None
    steps: int = 100
    lr: float | None = None  # None: FULL_LR, or LORA_LR with a lora rank
    batch: int = 4
    seq_len: int = 256
    seed: int = 0
    warmup: int | None = None
    clip: float = 1.0
    weight_decay: float = 0.0
    eval_every: int = 25
    save_every: int = 25
    inner: str = "aot_eager"
    lora_rank: int | None = None
    lora_alpha: float | None = None
    lora_targets: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "pairs", validate_pairs(self.pairs))
        choice(self.loss, LOSSES, "loss", FinetuneError)
        choice(self.train, TRAIN_SETS, "train", FinetuneError)
        choice(self.mode, PAIRING_MODES, "mode", FinetuneError)
        for mode in self.modes or ():
            choice(mode, PAIRING_MODES, "mode of a pair", FinetuneError)
        if self.modes is not None and len(self.modes) != len(self.pairs):
            raise FinetuneError(f"{len(self.modes)} modes for {len(self.pairs)} pairs: give one mode per pair")
        for name in ("steps", "batch", "seq_len", "eval_every", "save_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise FinetuneError(f"{name.replace('_', '-')} must be a whole number >= 1, got {value!r}")
        if self.seq_len < 2:
            raise FinetuneError(f"seq-len must be >= 2 (a token and the next one), got {self.seq_len}")
        if self.lr is None:
            object.__setattr__(self, "lr", LORA_LR if self.lora_rank is not None else FULL_LR)
        if not self.lr > 0:
            raise FinetuneError(f"lr must be > 0, got {self.lr!r}")
        if self.warmup is not None and not 0 <= self.warmup <= self.steps:
            raise FinetuneError(f"warmup must be between 0 and steps ({self.steps}), got {self.warmup}")
        if self.lora_rank is not None and (not isinstance(self.lora_rank, int) or self.lora_rank < 1):
            raise FinetuneError(f"lora rank must be a whole number >= 1, got {self.lora_rank!r}")
        if self.lora_rank is None and (self.lora_alpha is not None or self.lora_targets is not None):
            raise FinetuneError("lora alpha and lora targets are used only with a lora rank")
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            raise FinetuneError(f"lora alpha must be > 0, got {self.lora_alpha!r}")

    @property
    def pair_modes(self) -> tuple[str, ...]:
        return tuple(self.modes) if self.modes is not None else (self.mode,) * len(self.pairs)

    @property
    def pairing(self) -> Pairing:
        return Pairing("finetune", self.pairs, self.pair_modes)

    @property
    def warmup_steps(self) -> int:
        return self.warmup if self.warmup is not None else max(1, self.steps // 10)

    @property
    def alpha(self) -> float:
        """The LoRA scale's numerator: ``lora_alpha``, else twice the rank."""
        return float(self.lora_alpha if self.lora_alpha is not None else 2 * (self.lora_rank or 0))

    def layers_to_train(self) -> tuple[int, ...]:
        if self.train_layers is not None:
            return tuple(sorted(self.train_layers))
        return tuple(i for pair in self.pairs for i in pair)


# ---------------------------------------------------------------------------------- the trainer


@dataclass
class TrainState:
    """What a run has measured so far; ``train.json`` is its ``to_json``."""

    config: FinetuneConfig
    extra: dict[str, Any] = field(default_factory=dict)
    step: int = 0
    losses: list[dict[str, float]] = field(default_factory=list)
    heldout: list[dict[str, float]] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)
    tokens: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "args": {**asdict(self.config), **self.extra},
            "step": self.step,
            "tokens": self.tokens,
            "wall_s": round(time.perf_counter() - self.started, 2),
            "loss": self.losses,
            "heldout": self.heldout,
        }


def check_layers(model: nn.Module, config: FinetuneConfig) -> tuple[str, int]:
    """The model's layer stack; every paired or trained layer must be in it."""
    stack, count = layer_stack_of(model)
    used = (*config.layers_to_train(), *(i for pair in config.pairs for i in pair))
    out_of_range = [i for i in used if i >= count]
    if out_of_range:
        raise FinetuneError(
            f"layer {out_of_range[0]} is out of range: {stack} has {count} layers, valid indices 0..{count - 1}"
        )
    return stack, count


def choose_trainable(model: nn.Module, config: FinetuneConfig) -> list[str]:
    """Set ``requires_grad`` for the parameters that train (and only those); return their names."""
    stack, _ = check_layers(model, config)
    if config.lora_rank is not None:
        names = lora.adapter_parameter_names(model)
    elif config.train == "all":
        names = [name for name, _ in model.named_parameters()]
    else:
        names = layer_parameter_names(model, stack, config.layers_to_train())
    if not names:
        raise FinetuneError("nothing to train: no pairs were chosen and no --train-layers given")
    chosen = set(names)
    for name, param in model.named_parameters():
        param.requires_grad_(name in chosen)
    return names


def add_lora(model: nn.Module, config: FinetuneConfig, mesh: Any = None) -> dict[str, Any] | None:
    """Inject the LoRA adapters ``config`` asks for (on every layer with ``train='all'``); their peft
    config (None without a LoRA rank)."""
    if config.lora_rank is None:
        return None
    if mesh is not None:
        raise FinetuneError("LoRA fine-tuning runs in one process: drop --mesh, or fine-tune the weights on the mesh")
    stack, count = check_layers(model, config)
    layers = range(count) if config.train == "all" else config.layers_to_train()
    targets = lora.lora_targets(model, stack, layers, config.lora_targets)
    adapter = lora.add_adapters(model, targets, config.lora_rank, config.alpha)
    log.info("LoRA rank %d, alpha %g on %d linear layers", config.lora_rank, config.alpha, len(targets))
    return adapter


def make_student(model: nn.Module, config: FinetuneConfig, mesh: Any = None) -> tuple[Callable, Any]:
    """``model`` compiled with the layer_parallel backend for the pairing; and the backend."""
    options: dict[str, Any] = {"stack": layer_stack_of(model)[0]}
    if mesh is not None:
        options["mesh"] = mesh
    backend = make_backend(config.pairing, config.mode, config.inner, **options)
    return torch.compile(model, backend=backend), backend


def finetune(
    model: nn.Module,
    train_ids: Sequence[int] | torch.Tensor | Sequence[Sequence[int]],
    config: FinetuneConfig,
    out_dir: str | Path,
    heldout: torch.Tensor | None = None,
    mesh: Any = None,
    progress: bool = True,
    extra_args: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Fine-tune ``model`` in place through its compiled pairing; write checkpoints to ``out_dir``.

    ``train_ids``: the tokenized training text, or a list of several texts that every batch
    draws from in equal shares (:class:`~lp_fx.tools.data.MixedBatches`). ``heldout``: ``(N, T)`` windows of text never
    trained on, whose perplexity is measured before training, every ``eval_every`` steps and at
    the end. Returns the run record (also ``out_dir/train.json``). ``out_dir`` holding another
    model's checkpoint or other files is refused before any work unless ``overwrite``
    (:func:`lp_fx.checkpoint.check_checkpoint_dir`).
    """
    out_dir = check_checkpoint_dir(out_dir, model, overwrite)
    torch.manual_seed(config.seed)
    check_layers(model, config)
    pairing = pairing_record(model, config.pairs, config.pair_modes)  # before training: the base weights
    adapter = add_lora(model, config, mesh)
    if adapter is not None:
        pairing = {**pairing, "adapter": adapter_record(adapter)}
    batches = MixedBatches(token_streams(train_ids), config.seq_len, config.batch, config.seed)
    names = choose_trainable(model, config)
    params = [p for name, p in model.named_parameters() if p.requires_grad]
    teacher = _teacher(model, adapter) if config.loss == "distill" else None
    student, backend = make_student(model, config, mesh)
    ranks = _ranks(mesh, model, backend)
    optimizer, schedule = _optimizer(params, config)
    state = TrainState(config, extra=dict(extra_args or {}))
    _log_start(names, params, config)
    model.train(False)  # dropout off: the student must match the teacher when nothing is paired
    _measure_heldout(student, heldout, state, progress)
    bar = tqdm(range(config.steps), desc="fine-tune", disable=not progress, dynamic_ncols=True)
    for step in bar:
        started = time.perf_counter()
        ids = batches.next()
        loss = _train_step(model, student, teacher, ids, config, optimizer, schedule, params, ranks)
        if step == 0:
            check_rewritten(backend.reports, config.pairing, config.mode)
        state.step, state.tokens = step + 1, state.tokens + ids.numel()
        rate = ids.numel() / (time.perf_counter() - started)
        state.losses.append({"step": step + 1, "loss": loss, "lr": schedule.get_last_lr()[0],
                             "tokens_per_s": round(rate, 1), "rss_mib": resident_mib()})
        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{rate:.0f}")
        last = step + 1 == config.steps
        if heldout is not None and ((step + 1) % config.eval_every == 0 or last):
            _measure_heldout(student, heldout, state, progress)
        if (step + 1) % config.save_every == 0 or last:
            _save(model, names, pairing, state, out_dir, ranks, adapter)
    bar.close()
    for param in params:
        param.grad = None
    return state.to_json()


def _ranks(mesh: Any, model: nn.Module, backend: Any) -> Ranks | None:
    """The ranks that train together on ``mesh``; None on one device (or a mesh of one)."""
    ranks = Ranks(resolve_mesh(mesh, model), backend) if mesh is not None else None
    return ranks if ranks is not None and ranks.world > 1 else None


def _teacher(model: nn.Module, adapter: dict[str, Any] | None) -> dict[str, torch.Tensor]:
    """What ``functional_call`` swaps in to compute the unpaired teacher: the original values of the
    weights that train, or, with LoRA, zero ``lora_B`` factors (the model without its adapters)."""
    if adapter is not None:
        return lora.teacher_tensors(model)
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def _optimizer(params: Sequence[torch.Tensor], config: FinetuneConfig) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW over ``params`` and its learning-rate schedule (linear warm-up, then cosine)."""
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: learning_rate_factor(step, config.steps, config.warmup_steps)
    )
    return optimizer, schedule


def _log_start(names: Sequence[str], params: Sequence[torch.Tensor], config: FinetuneConfig) -> None:
    log.info(
        "fine-tuning %d tensors (%.1f M parameters) of %d pairs, loss %s, %d steps of %d x %d tokens",
        len(names), sum(p.numel() for p in params) / 1e6, len(config.pairs), config.loss,
        config.steps, config.batch, config.seq_len,
    )
    if config.loss == "distill" and not config.pairs:
        log.warning("loss 'distill' with no pairs: the student is the teacher and the loss is 0; "
                    "use loss 'lm' for the unpaired control")


def _train_step(
    model: nn.Module,
    student: Callable,
    teacher: dict[str, torch.Tensor] | None,
    ids: torch.Tensor,
    config: FinetuneConfig,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    params: Sequence[torch.Tensor],
    ranks: Ranks | None,
) -> float:
    """One optimizer step; returns the loss."""
    optimizer.zero_grad(set_to_none=True)
    logits = logits_of(student, ids)
    if teacher is not None:
        with torch.no_grad():
            target = logits_of(lambda **kw: torch.func.functional_call(model, teacher, args=(), kwargs=kw, strict=False), ids)
        loss = distill_loss(logits, target)
    else:
        loss = lm_loss(logits, ids)
    loss.backward()
    if ranks is not None:
        ranks.complete_gradients(params)
    torch.nn.utils.clip_grad_norm_(params, config.clip)
    if ranks is not None:
        ranks.drop_gradients_not_read(params)
    optimizer.step()
    schedule.step()
    return loss.item()


def resident_mib() -> float | None:
    """This process's resident memory now, in MiB (Linux), to show it does not grow per step."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return round(pages * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)


def _measure_heldout(student: Callable, heldout: torch.Tensor | None, state: TrainState, progress: bool) -> None:
    if heldout is None:
        return
    ppl = perplexity(lambda ids: logits_of(student, ids), heldout, desc="held-out", progress=progress).ppl
    state.heldout.append({"step": state.step, "ppl": ppl})
    log.info("step %d: held-out perplexity %.3f", state.step, ppl)


def _save(
    model: nn.Module,
    names: Sequence[str],
    pairing: dict,
    state: TrainState,
    out_dir: Path,
    ranks: Ranks | None,
    adapter: dict[str, Any] | None,
) -> None:
    if ranks is not None:
        ranks.gather_to_all(model, names)
        if ranks.rank != 0:
            return
    tensors = lora.adapter_tensors(model) if adapter is not None else unique_tensors(model, names)
    save_checkpoint(out_dir, tensors, pairing, state.to_json(), adapter)
    log.info("step %d: checkpoint written to %s", state.step, out_dir)
