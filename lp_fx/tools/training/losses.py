"""What fine-tuning minimises and how fast: the distillation and next-token losses, the logits they
read, and the learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student) of the next-token distributions."""
    vocab = student_logits.shape[-1]
    student = F.log_softmax(student_logits.float().reshape(-1, vocab), dim=-1)
    teacher = F.log_softmax(teacher_logits.float().reshape(-1, vocab), dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean")


def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy."""
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def learning_rate_factor(step: int, steps: int, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then a cosine from 1 down to 0.1 at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress)))


def logits_of(model: Callable, ids: torch.Tensor) -> torch.Tensor:
    """Logits of a Hugging Face causal LM (or any model returning logits) for ``ids``."""
    out = model(input_ids=ids, use_cache=False)
    return out.logits if hasattr(out, "logits") else out
