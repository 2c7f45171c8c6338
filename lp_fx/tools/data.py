"""Text in and out of the tools: the evaluation sets under the shared data directory (see its
SOURCES.md), and the training text fine-tuning reads, in chunks and seeded batches.

Every multiple-choice task becomes a list of :class:`MCItem`: one ``(context, continuation)``
request per choice and the gold index. The prompt formats follow lm-evaluation-harness
(``Question: …\\nAnswer:`` for ARC and PIQA, the partial scoring of WinoGrande, and so on), so
numbers are comparable in spirit with published zero-shot results. The data is read in place and
never copied.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from lp_fx.config import LayerParallelError

log = logging.getLogger(__name__)

WIKITEXT_RAW = "wikitext-2-raw/wiki.test.raw"


class DataError(FileNotFoundError):
    """A data directory or file is missing; the message names the path and what was expected."""


@dataclass(frozen=True)
class MCItem:
    """One multiple-choice question: a ``(context, continuation)`` request per choice."""

    requests: tuple[tuple[str, str], ...]
    gold: int


@dataclass(frozen=True)
class LambadaItem:
    """A passage whose last word (``target``, with its leading space) must be predicted."""

    context: str
    target: str


DATA_VARIABLE = "LP_FX_DATA"  # a data directory for installed copies; read before the defaults
REPO_ROOT = Path(__file__).resolve().parent.parent.parent  # the folder holding the lp_fx package


def default_data_dir() -> Path | None:
    """``$LP_FX_DATA`` when set (it must be a directory), else ``../shared/data`` next to the
    repository, else next to the working directory; None when none of them exists."""
    from_environment = os.environ.get(DATA_VARIABLE)
    if from_environment:
        path = Path(from_environment)
        if not path.is_dir():
            raise DataError(
                f"{DATA_VARIABLE}={path} is not a directory; set it to a directory holding {WIKITEXT_RAW}, "
                "arc_easy/, hellaswag/, … (see its SOURCES.md), or unset it"
            )
        return path
    for base in (REPO_ROOT, Path.cwd()):
        candidate = (base / ".." / "shared" / "data").resolve()
        if candidate.is_dir():
            return candidate
    return None


def resolve_data_dir(data_dir: str | Path | None) -> Path:
    """The data directory to read: the one given, else the default; errors name what was tried."""
    if data_dir is None:
        found = default_data_dir()
        if found is None:
            raise DataError(
                f"no data directory given and none found: {DATA_VARIABLE} is not set, and there is no "
                f"../shared/data next to the repository ({REPO_ROOT}) or the working directory; pass "
                f"--data-dir DIR or set {DATA_VARIABLE}=DIR, a directory holding {WIKITEXT_RAW}, "
                "arc_easy/, hellaswag/, … as described in its SOURCES.md"
            )
        return found
    path = Path(data_dir)
    if not path.is_dir():
        raise DataError(
            f"data directory {path} does not exist; expected a directory holding {WIKITEXT_RAW}, "
            "arc_easy/, hellaswag/, … as described in its SOURCES.md"
        )
    return path


def _require(data_dir: Path, relative: str, expected: str) -> Path:
    path = data_dir / relative
    if not path.is_file():
        raise DataError(f"missing data file {path}; expected {expected}")
    return path


def _jsonl(path: Path) -> Iterator[dict]:
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                yield json.loads(line)


def load_wikitext(data_dir: Path) -> str:
    """The WikiText-2 raw test text with CRLF turned into LF."""
    path = _require(data_dir, WIKITEXT_RAW, "the raw WikiText-2 test text")
    return path.read_text(encoding="utf-8").replace("\r\n", "\n")


def _qa_prompt(question: str) -> str:
    return f"Question: {question}\nAnswer:"


def _answer_keys(path: Path) -> dict[str, str]:
    return {row["id"]: row["answerKey"] for row in _jsonl(path)}


def load_arc_easy(data_dir: Path) -> list[MCItem]:
    """ARC-Easy test; answer keys from the AI2 key file, the per-choice ``para`` is ignored."""
    questions = _require(data_dir, "arc_easy/test.jsonl", "ARC-Easy test in the AI2 layout")
    keys = _answer_keys(
        _require(data_dir, "arc_easy/question-answers.jsonl", "AI2 ARC-Easy answer keys")
    )
    items = []
    for row in _jsonl(questions):
        choices = row["question"]["choices"]
        labels = [choice["label"] for choice in choices]
        prompt = _qa_prompt(row["question"]["stem"])
        items.append(
            MCItem(
                tuple((prompt, " " + choice["text"]) for choice in choices),
                labels.index(keys[row["id"]]),
            )
        )
    return items


def load_arc_challenge(data_dir: Path) -> list[MCItem]:
    """ARC-Challenge test with the answer letter inline."""
    path = _require(
        data_dir, "arc_challenge/arc_challenge_test.jsonl", "ARC-Challenge test with options"
    )
    items = []
    for row in _jsonl(path):
        labels = [option["label"] for option in row["options"]]
        prompt = _qa_prompt(row["question"])
        items.append(
            MCItem(
                tuple((prompt, " " + option["text"]) for option in row["options"]),
                labels.index(row["answer"]),
            )
        )
    return items


def load_piqa(data_dir: Path) -> list[MCItem]:
    """PIQA validation: goal, two solutions, labels from the separate label file."""
    rows = list(_jsonl(_require(data_dir, "piqa/valid.jsonl", "PIQA validation questions")))
    labels_path = _require(data_dir, "piqa/valid-labels.lst", "one 0/1 label per PIQA line")
    labels = [int(line) for line in labels_path.read_text().split()]
    if len(labels) != len(rows):
        raise DataError(f"{labels_path} has {len(labels)} labels for {len(rows)} questions")
    return [
        MCItem(tuple((_qa_prompt(row["goal"]), " " + row[key]) for key in ("sol1", "sol2")), label)
        for row, label in zip(rows, labels)
    ]


def load_hellaswag(data_dir: Path) -> list[MCItem]:
    """HellaSwag validation in the 6-lines-per-item text layout."""
    path = _require(
        data_dir, "hellaswag/hellaswag_val_full.txt", "6 lines per item: context, gold, 4 endings"
    )
    lines = path.read_text(encoding="utf-8").splitlines()
    if len(lines) % 6:
        raise DataError(f"{path} has {len(lines)} lines, expected a multiple of 6")
    return [
        MCItem(
            tuple((lines[start], " " + ending) for ending in lines[start + 2 : start + 6]),
            int(lines[start + 1]),
        )
        for start in range(0, len(lines), 6)
    ]


def load_winogrande(data_dir: Path) -> list[MCItem]:
    """WinoGrande dev with partial scoring: the contexts differ, the continuation is shared."""
    path = _require(
        data_dir, "winogrande/winogrande.jsonl", "context_options/continuation/gold rows"
    )
    return [
        MCItem(
            tuple((context, " " + row["continuation"]) for context in row["context_options"]),
            row["gold"],
        )
        for row in _jsonl(path)
    ]


def load_boolq(data_dir: Path) -> list[MCItem]:
    """BoolQ validation: ``Passage: …\\nQuestion: …?`` then ``\\nAnswer:`` and no/yes."""
    path = _require(data_dir, "boolq/boolq.jsonl", "query/choices/gold rows")
    return [
        MCItem(
            tuple((row["query"] + "\nAnswer:", " " + choice) for choice in row["choices"]),
            row["gold"],
        )
        for row in _jsonl(path)
    ]


def load_lambada(data_dir: Path) -> list[LambadaItem]:
    """LAMBADA (OpenAI detokenized): the passage and its final word."""
    path = _require(data_dir, "lambada/lambada_openai.jsonl", "context/continuation rows")
    return [LambadaItem(row["context"], " " + row["continuation"]) for row in _jsonl(path)]


def load_lambada_text(data_dir: Path) -> str:
    """The LAMBADA passages (book fiction, another domain than WikiText) as one text, for perplexity."""
    return "\n\n".join(item.context + item.target for item in load_lambada(data_dir)) + "\n"


MC_TASKS: dict[str, Callable[[Path], list[MCItem]]] = {
    "arc_easy": load_arc_easy,
    "arc_challenge": load_arc_challenge,
    "piqa": load_piqa,
    "hellaswag": load_hellaswag,
    "winogrande": load_winogrande,
    "boolq": load_boolq,
}
ALL_TASKS: tuple[str, ...] = (*MC_TASKS, "lambada")


def subset(items: list, limit: int | None, seed: int) -> list:
    """A fixed-seed random subset of ``limit`` items in their original order (all if no limit)."""
    if limit is None or limit >= len(items):
        return items
    chosen = sorted(random.Random(seed).sample(range(len(items)), limit))
    return [items[index] for index in chosen]


class TrainingTextError(LayerParallelError):
    """A training text that cannot be used: missing, empty, or too short for one batch."""


# ------------------------------------------------------------------------- text to fine-tune on


_WIKITEXT_RULES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern), repl)
    for pattern, repl in (
        (r" @(.)@ ", r"\1"),  # 1 @,@ 000 -> 1,000; well @-@ known -> well-known
        (r" <unk>", ""),  # words the tokenized release replaced; the raw words are not there
        (r"<unk> ?", ""),
        (r" ([.,;:!?%)\]}])", r"\1"),
        (r"([(\[{$]) ", r"\1"),
        (r" (n't|'s|'re|'ve|'m|'ll|'d)\b", r"\1"),
        (r"^ *(=+) (.*?) (=+) *$", r"\1 \2 \3"),
    )
)


def detokenize_wikitext(text: str) -> str:
    """Undo the tokenization of the WikiText ``.tokens``/``train.txt`` release, line by line.

    ``1 @,@ 000`` -> ``1,000``, ``well @-@ known`` -> ``well-known``, no space before punctuation or
    after an opening bracket, contractions joined, ``<unk>`` dropped (the raw word is not known),
    and the ``" "`` separator lines removed, so the training text reads like the raw test text.
    """
    lines = []
    for line in text.splitlines():
        if not line.strip():
            continue
        for pattern, repl in _WIKITEXT_RULES:
            line = pattern.sub(repl, line)
        lines.append(line.strip())
    return "\n".join(lines) + "\n"


def looks_tokenized(text: str) -> bool:
    """Whether ``text`` is the tokenized WikiText release (``@-@``, ``<unk>``, `` , ``)."""
    sample = text[:200_000]
    return " @-@ " in sample or " @,@ " in sample or sample.count("<unk>") > 3


def load_training_text(path: str | Path) -> str:
    """A plain text file to train on; the tokenized WikiText release is detokenized first."""
    path = Path(path)
    if not path.is_file():
        problem = "is a directory" if path.is_dir() else "not found"
        raise TrainingTextError(f"training text {path} {problem}; give --train-data FILE (any plain text file)")
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise TrainingTextError(f"training text {path} is empty")
    if looks_tokenized(text):
        log.info("%s is tokenized WikiText: detokenizing before training", path)
        text = detokenize_wikitext(text)
    return text


def training_chunks(token_ids: Sequence[int] | torch.Tensor, seq_len: int, needed: int) -> torch.Tensor:
    """Non-overlapping ``(N, seq_len)`` chunks of the token stream; at least ``needed`` are asked
    for, and fewer than one batch is an error."""
    ids = torch.as_tensor(token_ids, dtype=torch.long)
    count = ids.numel() // seq_len
    if count < needed:
        raise TrainingTextError(
            f"the training text has {ids.numel()} tokens: {count} chunks of {seq_len}, fewer than one batch "
            f"({needed}); give a longer text or a smaller --batch / --seq-len"
        )
    return ids[: count * seq_len].view(count, seq_len)


class Batches:
    """Batches of chunks in a seeded random order, reshuffled each pass over the data."""

    def __init__(self, chunks: torch.Tensor, batch: int, seed: int) -> None:
        self.chunks, self.batch = chunks, batch
        self.generator = torch.Generator().manual_seed(seed)
        self.order = torch.empty(0, dtype=torch.long)
        self.position = 0

    def next(self) -> torch.Tensor:
        if self.position + self.batch > self.order.numel():
            self.order = torch.randperm(self.chunks.shape[0], generator=self.generator)
            self.position = 0
        index = self.order[self.position : self.position + self.batch]
        self.position += self.batch
        return self.chunks[index]


def check_batch_shares(texts: int, batch: int) -> None:
    """Every text mixed in takes at least one sequence of each batch."""
    if batch < 1:
        raise TrainingTextError(f"batch must be a whole number >= 1, got {batch!r}")
    if texts > batch:
        raise TrainingTextError(f"{texts} training texts cannot share a batch of {batch} sequences; give --batch {texts} or more")


class MixedBatches:
    """Batches drawn from several token streams in equal shares: each batch holds ``batch // k``
    chunks of each of the ``k`` streams (the first ``batch % k`` streams one more), each stream in
    its own seeded order, so a short text is repeated rather than drowned by a long one."""

    def __init__(self, streams: Sequence[Sequence[int] | torch.Tensor], seq_len: int, batch: int, seed: int) -> None:
        check_batch_shares(len(streams), batch)
        shares = [batch // len(streams) + (i < batch % len(streams)) for i in range(len(streams))]
        self.parts = [Batches(training_chunks(ids, seq_len, share), share, seed + i)
                      for i, (ids, share) in enumerate(zip(streams, shares))]

    def next(self) -> torch.Tensor:
        return torch.cat([part.next() for part in self.parts])


def token_streams(train_ids: Sequence[int] | torch.Tensor | Sequence[Sequence[int] | torch.Tensor]) -> list:
    """One token stream, or a list of several, as a list of streams."""
    if isinstance(train_ids, torch.Tensor) or not train_ids or isinstance(train_ids[0], int):
        return [train_ids]
    return list(train_ids)
