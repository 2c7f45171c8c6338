"""Training text an instruction model writes itself (``lp-fx finetune --train-data self``).

Fine-tuning a chat model's paired layers on WikiText teaches it to write encyclopedia text. Here
the unpaired model answers a list of instructions through its own chat template (greedy, or
sampled at a temperature), and the conversations, rendered by the same template, are the text the
paired student is distilled on: the student learns the teacher's own distribution on the kind of
text it serves.

Generation is batched (prompts of similar length together, left-padded) and keeps the KV cache.
Its result is cached in a JSON Lines file: a header naming the model and the generation settings,
then one ``{"prompt", "answer", "tokens", "finished"}`` line per answer, appended as each batch is
done. A second run with the same model and settings reads the answers back and generates only the
prompts not there yet (an interrupted run resumes; sampled answers of a resumed run are not those
an uninterrupted run would have drawn); a cache made with other settings, another model or in
another format is refused, naming the difference.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from lp_fx.tools.data import REPO_ROOT, TrainingTextError

log = logging.getLogger(__name__)

SELF = "self"  # the --train-data value that selects this text
CACHE_FORMAT = "lp_fx.self_text/1"
DEFAULT_PROMPTS = REPO_ROOT / "examples" / "self_distill_prompts.txt"


class SelfTextError(TrainingTextError):
    """Prompts, a tokenizer or a cache that self-generated training text cannot use."""


@dataclass(frozen=True)
class GenerationSettings:
    """How the teacher answers: at most ``max_new_tokens`` per answer, greedy when ``temperature``
    is 0, else sampled from the whole vocabulary at that temperature with ``seed``. ``batch``
    prompts are generated together; it is not part of what the cache records."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    seed: int = 0
    batch: int = 16

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "batch"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise SelfTextError(f"self-text {name.replace('_', '-')} must be a whole number >= 1, got {value!r}")
        if not isinstance(self.temperature, (int, float)) or not 0 <= self.temperature < float("inf"):
            raise SelfTextError(f"self-text temperature must be a finite number >= 0 (0: greedy), got {self.temperature!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def cache_key(self) -> dict[str, Any]:
        """What the generated text depends on (the seed only when sampling)."""
        key = {"max_new_tokens": self.max_new_tokens, "temperature": float(self.temperature)}
        return key if self.greedy else {**key, "seed": self.seed}


def load_prompts(path: str | Path) -> list[str]:
    """One instruction per line of a plain text file; blank lines and lines starting with ``#``
    are skipped, repeated instructions kept once."""
    path = Path(path)
    if not path.is_file():
        raise SelfTextError(f"prompt file {path} not found; give --self-prompts FILE, one instruction per line")
    lines = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
    prompts = list(dict.fromkeys(line for line in lines if line and not line.startswith("#")))
    if not prompts:
        raise SelfTextError(f"prompt file {path} holds no instructions; write one per line")
    return prompts


def check_chat_template(tokenizer: Any, model_name: str) -> None:
    """An instruction model's tokenizer has a chat template; a base model's does not."""
    if not getattr(tokenizer, "chat_template", None):
        raise SelfTextError(
            f"{model_name}'s tokenizer has no chat template: --train-data self needs an instruction model "
            "that answers through one; give --train-data FILE (plain text) for this model"
        )


def conversation_text(tokenizer: Any, prompt: str, answer: str | None = None) -> str:
    """The model's chat template for one user turn, then ``answer`` as the assistant's turn (None:
    the generation prompt that asks for it)."""
    messages = [{"role": "user", "content": prompt}]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=answer is None)


def conversations_ids(tokenizer: Any, samples: Sequence[dict[str, Any]]) -> list[int]:
    """The conversations, rendered by the chat template and tokenized, one after another."""
    ids: list[int] = []
    for sample in samples:
        text = conversation_text(tokenizer, sample["prompt"], sample["answer"])
        ids.extend(tokenizer(text, add_special_tokens=False).input_ids)
    return ids


# ------------------------------------------------------------------------------------ the cache


def cache_header(model_name: str, settings: GenerationSettings) -> dict[str, Any]:
    return {"format": CACHE_FORMAT, "model": model_name, "settings": settings.cache_key()}


def read_cache(path: Path, header: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The answers in the cache at ``path`` by prompt ({} when there is no file). A cache whose
    header differs from ``header`` or with a line that is not an answer is refused; an unfinished
    last line (a run stopped while writing it) is dropped from the file."""
    if not path.exists():
        return {}
    if not path.is_file():
        raise SelfTextError(f"self-text cache {path} is not a file; give --cache FILE")
    text = path.read_text(encoding="utf-8")
    complete, _, partial = text.rpartition("\n")
    if partial:
        log.warning("%s: dropping an unfinished last line (a run stopped while writing it)", path)
        path.write_text(complete + "\n" if complete else "", encoding="utf-8")
    lines = complete.splitlines() if complete else []
    if not lines:
        return {}
    found = _parse_line(path, 1, lines[0])
    if found != header:
        raise SelfTextError(f"self-text cache {path} was made {_describe(found)}; this run asks {_describe(header)}: "
                            "delete the file or give another --cache FILE")
    samples = {}
    for number, line in enumerate(lines[1:], start=2):
        sample = _parse_line(path, number, line)
        if not _is_sample(sample):
            raise SelfTextError(f"self-text cache {path}, line {number} is not an answer: expected "
                                '{"prompt": text, "answer": text, "tokens": count, "finished": true/false}')
        samples[sample["prompt"]] = sample
    return samples


def _is_sample(row: dict[str, Any]) -> bool:
    return (isinstance(row.get("prompt"), str) and isinstance(row.get("answer"), str)
            and isinstance(row.get("tokens"), int) and isinstance(row.get("finished"), bool))


def _parse_line(path: Path, number: int, line: str) -> dict[str, Any]:
    try:
        value = json.loads(line)
    except json.JSONDecodeError as error:
        raise SelfTextError(f"self-text cache {path}, line {number} is not valid JSON ({error.msg}); "
                            "delete the file or give another --cache FILE") from None
    if not isinstance(value, dict):
        raise SelfTextError(f"self-text cache {path}, line {number} is not a JSON object")
    return value


def _describe(header: dict[str, Any]) -> str:
    if header.get("format") != CACHE_FORMAT:
        return f"in format {header.get('format')!r} (expected {CACHE_FORMAT!r})"
    return f"by model {header.get('model')!r} with {header.get('settings')}"


def _append(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    with path.open("a", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        handle.flush()


# ------------------------------------------------------------------------------- generation


def _special_ids(model: nn.Module, tokenizer: Any) -> tuple[int, Any]:
    """``(pad id, eos id(s))``: pad with the tokenizer's pad token, else its end of sequence."""
    eos = model.generation_config.eos_token_id
    eos = tokenizer.eos_token_id if eos is None else eos
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise SelfTextError("the tokenizer has neither a pad nor an end-of-sequence token: batched generation needs one")
    return pad, eos


@torch.no_grad()
def generate_batches(
    model: nn.Module, tokenizer: Any, prompts: Sequence[str], settings: GenerationSettings, progress: bool = True
) -> Iterator[list[dict[str, Any]]]:
    """The model's answers to ``prompts`` through its chat template, a batch at a time.

    Prompts of similar length go together (left padding); generation keeps the KV cache. Each
    answer records its prompt, its token count and whether it ended with the end-of-sequence
    token (``finished``) or at the length limit.
    """
    from transformers import GenerationConfig  # lazy: transformers' import takes seconds; `import lp_fx.tools` stays light

    pad, eos = _special_ids(model, tokenizer)
    config = GenerationConfig(
        max_new_tokens=settings.max_new_tokens, do_sample=not settings.greedy, use_cache=True,
        pad_token_id=pad, eos_token_id=eos,
        **({} if settings.greedy else {"temperature": float(settings.temperature), "top_k": 0, "top_p": 1.0}),
    )
    encoded = [tokenizer(conversation_text(tokenizer, prompt), add_special_tokens=False).input_ids for prompt in prompts]
    order = sorted(range(len(prompts)), key=lambda index: len(encoded[index]))
    generator_state = torch.random.get_rng_state()  # sampling draws from a seeded stream, left as it was
    torch.manual_seed(settings.seed)
    bar = tqdm(total=len(prompts), desc="generating", unit="answer", disable=not progress, dynamic_ncols=True)
    try:
        for start in range(0, len(order), settings.batch):
            chosen = order[start : start + settings.batch]
            began = time.perf_counter()
            rows = _generate_batch(model, tokenizer, [encoded[i] for i in chosen], config, pad, eos)
            bar.update(len(chosen))
            bar.set_postfix(tok_s=f"{sum(r['tokens'] for r in rows) / (time.perf_counter() - began):.0f}")
            yield [{"prompt": prompts[i], **row} for i, row in zip(chosen, rows)]
    finally:
        bar.close()
        torch.random.set_rng_state(generator_state)


def left_padded(sequences: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, attention mask)`` of the sequences, padded on the left to the longest."""
    width = max(len(ids) for ids in sequences)
    ids = torch.tensor([[pad] * (width - len(row)) + list(row) for row in sequences])
    mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in sequences])
    return ids, mask


def _generate_batch(model: nn.Module, tokenizer: Any, prompts: Sequence[Sequence[int]], config: Any, pad: int, eos: Any) -> list[dict[str, Any]]:
    ids, mask = left_padded(prompts, pad)
    new = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)[:, ids.shape[1] :]
    stops = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
    rows = []
    for tokens in new.tolist():
        ended = next((i for i, token in enumerate(tokens) if token in stops), None)
        kept = tokens if ended is None else tokens[:ended]
        rows.append({"answer": tokenizer.decode(kept, skip_special_tokens=True).strip(), "tokens": len(kept),
                     "finished": ended is not None})
    return rows


def training_samples(
    model: nn.Module,
    tokenizer: Any,
    model_name: str,
    prompts: Sequence[str],
    settings: GenerationSettings,
    cache: str | Path,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """The model's answer to each prompt, in the order given: read from ``cache`` where it holds
    them, generated (and appended to ``cache``) where not."""
    check_chat_template(tokenizer, model_name)
    cache = Path(cache)
    header = cache_header(model_name, settings)
    samples = read_cache(cache, header)
    missing = [prompt for prompt in prompts if prompt not in samples]
    log.info("self-text: %d of %d answers in %s, %d to generate", len(prompts) - len(missing), len(prompts), cache, len(missing))
    if missing:
        if not cache.is_file() or cache.stat().st_size == 0:
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps(header) + "\n", encoding="utf-8")
        for rows in generate_batches(model, tokenizer, missing, settings, progress):
            _append(cache, rows)
            samples.update((row["prompt"], row) for row in rows)
    return [samples[prompt] for prompt in prompts]


def summary(samples: Sequence[dict[str, Any]], token_count: int) -> dict[str, Any]:
    """What the training text is made of, for the run record."""
    answer_tokens = [sample["tokens"] for sample in samples]
    return {
        "conversations": len(samples),
        "tokens": token_count,
        "answer_tokens_mean": round(sum(answer_tokens) / len(samples), 1),
        "finished": round(sum(bool(sample["finished"]) for sample in samples) / len(samples), 3),
    }
