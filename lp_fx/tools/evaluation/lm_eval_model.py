"""lp_fx as an lm-evaluation-harness model: ``lm_eval`` ``--model lp_fx``.

:class:`LayerParallelLM` is lm-eval's own Hugging Face class (``HFLM``: tokenization, batching,
log-likelihoods, generation) with one change: the model's forward is the layer_parallel
compile of :func:`lp_fx.tools.evaluation.compiled.paired_forward`, for scoring and for ``generate`` alike.
Importing this module registers the name ``lp_fx`` in lm-eval's model registry (lm-eval 0.4
finds models only that way; ``lp-fx-lm-eval`` is its command line with this module imported).

``--model_args``: ``pretrained`` (``smollm2``, the bundled model, by default; a ``.gguf`` file or
a local Hugging Face folder), one of ``pairs`` (``14:28``, ``14-15+20-21``, ``baseline``),
``plan`` (a plan JSON from ``lp-fx plan``) or ``checkpoint`` (a folder from ``lp-fx finetune``,
loaded into the model), and ``mode``, ``fuse``, ``inner``, plus these of HFLM:
:data:`HFLM_OPTIONS`.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from lp_fx.checkpoint import load_finetuned, read_pairing
from lp_fx.pairing import BASELINE, Pairing
from lp_fx.tools.evaluation.compiled import check_pairing, paired_forward
from lp_fx.tools.evaluation.lm_eval_tasks import quiet_harness
from lp_fx.tools.models import load_model

log = logging.getLogger(__name__)

NAME = "lp_fx"
# HFLM's options that apply to a model already loaded (the others choose how HFLM loads one).
HFLM_OPTIONS = ("batch_size", "max_batch_size", "max_length", "logits_cache", "truncation", "add_bos_token",
                "prefix_token_id", "softmax_dtype")
quiet_harness()


@register_model(NAME)
class LayerParallelLM(HFLM):
    """lm-eval's ``HFLM`` running ``pretrained`` with a layer pairing compiled in."""

    def __init__(
        self,
        pretrained: str | torch.nn.Module = "smollm2",
        pairs: str | Pairing | None = None,
        plan: str | None = None,
        checkpoint: str | None = None,
        mode: str = "lp",
        fuse: bool = False,
        inner: str = "eager",
        tokenizer: Any = None,
        device: str | None = None,
        **options: Any,
    ) -> None:
        unknown = sorted(set(options) - set(HFLM_OPTIONS))
        if unknown:
            raise ValueError(
                f"{NAME}: unknown model_args {unknown}; valid: pretrained, pairs, plan, checkpoint, mode, fuse, inner, "
                f"tokenizer, device, {', '.join(HFLM_OPTIONS)}"
            )
        model, tokenizer = _model_and_tokenizer(pretrained, tokenizer, device)
        self.pairing = _pairing(model, pairs, plan, checkpoint)
        self.mode, self.fuse = mode, bool(fuse)
        check_pairing(model, self.pairing, mode, fuse=self.fuse)
        super().__init__(pretrained=model, tokenizer=tokenizer, backend="causal", **options)
        self._forward = paired_forward(model, self.pairing, mode, inner, fuse=self.fuse)
        modes = ", ".join(self.pairing.modes) if self.pairing.modes else mode  # a plan's own modes win
        log.info("%s: %s (%s%s)", NAME, self.pairing.name, modes, ", fused" * self.fuse)

    def paired_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits of the paired model (no KV cache): a ``LogitsFn`` for perplexity."""
        return self._forward(input_ids=input_ids, use_cache=False).logits

    def _model_call(self, inps: torch.Tensor, attn_mask: torch.Tensor | None = None,
                    labels: torch.Tensor | None = None) -> torch.Tensor:
        """HFLM's scoring call (right-padded token ids ``(B, T)`` → logits), through the pairing."""
        if attn_mask is not None or labels is not None:
            raise ValueError(f"{NAME} runs decoder-only (causal) models; an encoder-decoder call was made")
        with torch.no_grad():
            return self.paired_logits(inps)

    def _model_generate(self, context: torch.Tensor, max_length: int, stop: list[str], **generation_kwargs: Any) -> torch.Tensor:
        """HFLM's generation with the model's forward swapped for the paired one during the call."""
        with self._paired_forward_installed():
            return super()._model_generate(context, max_length, stop, **generation_kwargs)

    @contextlib.contextmanager
    def _paired_forward_installed(self) -> Iterator[None]:
        """``self.model.forward`` is the paired forward inside the block, what it was before after it."""
        before = self.model.__dict__.get("forward")
        self.model.forward = self._forward
        try:
            yield
        finally:
            if before is None:
                del self.model.forward  # the class's forward again
            else:
                self.model.forward = before

    def get_model_info(self) -> dict:
        """What lm-eval records about the model: its size and the pairing (no Hub look-up)."""
        return {
            "model_num_parameters": sum(p.numel() for p in self.model.parameters()),
            "model_dtype": str(next(self.model.parameters()).dtype),
            "pairing": self.pairing.to_json(),
            "mode": self.mode,
            "fuse": self.fuse,
        }


def _model_and_tokenizer(pretrained: str | torch.nn.Module, tokenizer: Any, device: str | None) -> tuple[torch.nn.Module, Any]:
    """A model given with its tokenizer, or one loaded by :func:`lp_fx.tools.models.load_model`
    (local files only), placed on ``device`` when one is given and available."""
    if isinstance(pretrained, torch.nn.Module):
        if tokenizer is None:
            raise ValueError(f"{NAME}: a model object needs its tokenizer (tokenizer=...)")
        model = pretrained
    else:
        if tokenizer is not None:
            raise ValueError(f"{NAME}: pretrained={pretrained!r} is loaded with its own tokenizer; give no tokenizer")
        loaded = load_model(pretrained, progress=False)
        model, tokenizer = loaded.model, loaded.tokenizer
    if device is not None:
        model.to(_available(device))
    return model, tokenizer


def _available(device: str) -> torch.device:
    """``device``, or the CPU when its kind is not available here (lm-eval's command line asks for
    ``cuda:0`` unless told otherwise)."""
    wanted = torch.device(device)
    if wanted.type != "cpu" and not getattr(torch, wanted.type).is_available():
        log.warning("%s: device %s is not available; running on the CPU", NAME, device)
        return torch.device("cpu")
    return wanted


def _pairing(model: torch.nn.Module, pairs: str | Pairing | None, plan: str | None, checkpoint: str | None) -> Pairing:
    """The pairing asked for (at most one of ``pairs``, ``plan``, ``checkpoint``; none: the baseline).
    A checkpoint's trained tensors are loaded into ``model`` here."""
    given = {name: value for name, value in (("pairs", pairs), ("plan", plan), ("checkpoint", checkpoint)) if value}
    if len(given) > 1:
        raise ValueError(f"{NAME}: give one of pairs, plan, checkpoint (got {', '.join(given)})")
    if isinstance(pairs, Pairing):
        return pairs
    num_layers = int(model.config.num_hidden_layers)
    if pairs:
        return Pairing.parse(str(pairs).replace("+", ","), num_layers)  # "," separates lm-eval's model_args
    if plan:
        return Pairing.parse(str(plan), num_layers)
    if checkpoint:
        load_finetuned(model, checkpoint)
        return Pairing.from_checkpoint(read_pairing(checkpoint), checkpoint)
    return BASELINE
