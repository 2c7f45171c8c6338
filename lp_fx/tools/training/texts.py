"""The text a fine-tuning run trains on, made token ids once the model is loaded: a plain text
file, or the unpaired model's own answers to prompts (:mod:`lp_fx.tools.training.self_text`), or
several mixed in equal shares per batch."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lp_fx.tools.training import self_text


@dataclass(frozen=True)
class TrainingIds:
    """The token stream to train on, what the run record says of it, and a line for the user."""

    ids: list[int] | list[list[int]]  # one stream, or several mixed in equal shares per batch
    record: dict[str, Any]
    description: str


@dataclass
class FileText:
    """A plain text file to train on, read before the model is loaded."""

    path: Path
    text: str

    def token_ids(self, loaded: Any, mesh: str | None, progress: bool) -> TrainingIds:
        ids = loaded.tokenizer.encode(self.text, add_special_tokens=False)
        return TrainingIds(ids, {"train_data": str(self.path)}, f"training text {self.path} ({len(ids)} tokens)")


@dataclass
class SelfText:
    """The unpaired model's answers to ``prompts``, generated (or read from ``cache``) once the
    model is loaded and before it is trained."""

    prompts_path: Path
    prompts: list[str]
    settings: self_text.GenerationSettings
    cache: Path

    def token_ids(self, loaded: Any, mesh: str | None, progress: bool) -> TrainingIds:
        """Under a mesh rank 0 generates and writes the cache; the other ranks then read it."""
        rank0 = mesh is None or torch.distributed.get_rank() == 0
        if rank0:
            samples = self._samples(loaded, progress)
        if mesh is not None:
            torch.distributed.barrier()
        if not rank0:
            samples = self._samples(loaded, False)
        ids = self_text.conversations_ids(loaded.tokenizer, samples)
        made = self_text.summary(samples, len(ids))
        record = {"train_data": self_text.SELF, "self_prompts": str(self.prompts_path), "cache": str(self.cache),
                  "self_generation": self.settings.cache_key(), "self_text": made}
        return TrainingIds(ids, record, self._describe(made))

    def _samples(self, loaded: Any, progress: bool) -> list[dict[str, Any]]:
        return self_text.training_samples(loaded.model, loaded.tokenizer, loaded.name, self.prompts, self.settings,
                                          self.cache, progress)

    def _describe(self, made: dict[str, Any]) -> str:
        mode = "greedy" if self.settings.greedy else f"sampled at temperature {self.settings.temperature}"
        return (f"training text: the unpaired model's {mode} answers to {len(self.prompts)} prompts of "
                f"{self.prompts_path}, {made['finished']:.0%} ended before {self.settings.max_new_tokens} "
                f"tokens ({made['tokens']} tokens with the chat template; cache {self.cache})")


def mixed(texts: list[TrainingIds]) -> TrainingIds:
    """Several training texts as one: their streams, drawn from in equal shares per batch."""
    if len(texts) == 1:
        return texts[0]
    record = {key: value for text in texts for key, value in text.record.items()}
    record["train_data"] = [text.record["train_data"] for text in texts]
    description = " + ".join(text.description for text in texts)
    return TrainingIds([text.ids for text in texts], record, f"{description}; each batch takes from each in equal shares")
