"""The local evaluation sets as lm-evaluation-harness tasks, and running them.

Each task is a YAML file in ``lm_tasks/`` (``lp_arc_easy``, ``lp_piqa``, …; tag ``lp_fx`` for all
of them). Its ``dataset_kwargs`` name the local files relative to the data directory, and its
``custom_dataset`` is :func:`local_dataset`, which reads them at run time from the directory in
the task metadata ``data_dir`` (else ``$LP_FX_DATA``, else ``../shared/data``) and turns the
local format (see the directory's SOURCES.md) into the fields of the Hugging Face dataset that
lm-eval's own task reads, in memory. So the prompt, choice, target and metric lines of each YAML
are lm-eval's own, and nothing is downloaded.

lm-eval is imported only inside the functions that run it (``import lp_fx`` and the ``lp-fx``
commands without tasks never load it).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from lp_fx.tools import data

log = logging.getLogger(__name__)

TASKS_DIR = Path(__file__).resolve().parent / "lm_tasks"
LOCAL_TASKS: tuple[str, ...] = ("arc_easy", "arc_challenge", "piqa", "hellaswag", "winogrande", "boolq", "lambada")
PREFIX = "lp_"  # lm-eval task name = PREFIX + local name, clear of lm-eval's own (hub) tasks
METRIC_NAMES = {"perplexity": "ppl"}  # lm-eval's metric name -> the name in lp-fx results
# Draws of lm-eval's bootstrap, for the standard errors without a closed form (here LAMBADA's
# perplexity; accuracies have one). On all 5153 LAMBADA items 1000 draws took 3.4 s on a shared
# 2-core CPU, so lm-eval's default of 100000 would take about 6 minutes; 1000 estimate the standard
# error to about 2 % (relative error ~ 1/sqrt(2 * draws)).
BOOTSTRAP_ITERS = 1000


def harness_name(task: str) -> str:
    """The lm-eval task name of a local task (``arc_easy`` -> ``lp_arc_easy``)."""
    return PREFIX + task


# ------------------------------------------------------------------------------ local files → rows


def _arc_ai2(files: dict[str, Path]) -> list[dict]:
    """ARC in the AI2 layout (``question.stem``, ``question.choices``, ``answerKey``)."""
    return [
        {
            "id": row["id"],
            "question": row["question"]["stem"],
            "choices": {
                "text": [choice["text"] for choice in row["question"]["choices"]],
                "label": [choice["label"] for choice in row["question"]["choices"]],
            },
            "answerKey": row["answerKey"],
        }
        for row in data._jsonl(files["questions"])
    ]


def _arc_options(files: dict[str, Path]) -> list[dict]:
    """ARC with ``options`` and the answer letter inline."""
    return [
        {
            "id": row["id"],
            "question": row["question"],
            "choices": {
                "text": [option["text"] for option in row["options"]],
                "label": [option["label"] for option in row["options"]],
            },
            "answerKey": row["answer"],
        }
        for row in data._jsonl(files["questions"])
    ]


def _piqa(files: dict[str, Path]) -> list[dict]:
    """PIQA: goal and solutions, the labels from their own file, line by line."""
    rows = list(data._jsonl(files["questions"]))
    labels = [int(line) for line in files["labels"].read_text().split()]
    if len(labels) != len(rows):
        raise data.DataError(f"{files['labels']} has {len(labels)} labels for {len(rows)} questions")
    return [{"goal": row["goal"], "sol1": row["sol1"], "sol2": row["sol2"], "label": label}
            for row, label in zip(rows, labels)]


def _hellaswag(files: dict[str, Path]) -> list[dict]:
    """HellaSwag in the 6-lines-per-item text layout: the already joined and cleaned context is
    the ``query``, the four endings the ``choices`` (the fields lm-eval's ``process_docs`` makes)."""
    path = files["items"]
    lines = path.read_text(encoding="utf-8").splitlines()
    if len(lines) % 6:
        raise data.DataError(f"{path} has {len(lines)} lines, expected a multiple of 6")
    return [{"query": lines[start], "choices": lines[start + 2 : start + 6], "label": lines[start + 1]}
            for start in range(0, len(lines), 6)]


def _boolq(files: dict[str, Path]) -> list[dict]:
    """BoolQ in MosaicML's ``Passage: …\\nQuestion: …?`` form, split back into its passage and its
    question (without the ``?`` that lm-eval's prompt adds)."""
    rows = []
    for row in data._jsonl(files["questions"]):
        passage, question = row["query"].removeprefix("Passage: ").rsplit("\nQuestion: ", 1)
        rows.append({"passage": passage, "question": question.removesuffix("?"), "label": row["gold"]})
    return rows


def _lambada(files: dict[str, Path]) -> list[dict]:
    """LAMBADA: the passage and its last word joined into lm-eval's ``text`` (the last word has no space)."""
    return [{"text": f"{row['context']} {row['continuation']}"} for row in data._jsonl(files["passages"])]


def _as_is(files: dict[str, Path]) -> list[dict]:
    """A JSON-lines file whose fields the YAML reads directly."""
    return list(data._jsonl(files["rows"]))


READERS: dict[str, Callable[[dict[str, Path]], list[dict]]] = {
    "arc_ai2": _arc_ai2, "arc_options": _arc_options, "piqa": _piqa, "hellaswag": _hellaswag, "boolq": _boolq,
    "lambada": _lambada, "jsonl": _as_is,
}


def read_rows(reader: str, data_files: dict[str, str], data_dir: str | Path | None = None) -> list[dict]:
    """The rows of a local task: ``data_files`` (role -> path relative to the data directory) read
    by the reader named ``reader``; a missing file raises :class:`~lp_fx.tools.data.DataError`."""
    if reader not in READERS:
        raise ValueError(f"unknown local reader {reader!r}; expected one of {', '.join(READERS)}")
    directory = data.resolve_data_dir(data_dir)
    files = {role: data._require(directory, relative, f"the {role} of a {reader} task") for role, relative in data_files.items()}
    return READERS[reader](files)


def local_dataset(reader: str, split: str, data_files: dict[str, str], data_dir: str | None = None, **metadata: Any) -> Any:
    """lm-eval's ``custom_dataset``: the local task as a ``datasets.DatasetDict`` with one ``split``.

    lm-eval passes the task's metadata (``data_dir`` among it, when given) and its
    ``dataset_kwargs`` (``reader``, ``split``, ``data_files``) as keywords."""
    import datasets  # lazy: only lm-eval's task loading needs datasets

    return datasets.DatasetDict({split: datasets.Dataset.from_list(read_rows(reader, data_files, data_dir))})


# ------------------------------------------------------------------------------------- running


# What lm-eval warns about on every run of the local tasks or of LayerParallelLM, by logger: the
# tasks read their files through custom_dataset on purpose, and HFLM is handed a loaded model on
# purpose. Anything else lm-eval says still shows.
HARNESS_NOISE: dict[str, Callable[[str], bool]] = {
    "lm_eval.api.task": lambda message: message.startswith(PREFIX) and ": Custom kwargs can be passed" in message,
    "lm_eval.models.huggingface": lambda message: message.startswith(
        ("`pretrained` model kwarg is not of type `str`", "Passed an already-initialized model through `pretrained`")
    ),
}


class _DropNoise(logging.Filter):
    def __init__(self, is_noise: Callable[[str], bool]) -> None:
        super().__init__()
        self.is_noise = is_noise

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.is_noise(str(record.msg))


def quiet_harness() -> None:
    """Drop :data:`HARNESS_NOISE` from lm-eval's loggers (once per process)."""
    for name, is_noise in HARNESS_NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(existing, _DropNoise) for existing in logger.filters):
            logger.addFilter(_DropNoise(is_noise))


def offline_environment() -> None:
    """No download from the Hub for the rest of the process (the local tasks need none), set
    before lm-eval imports ``datasets`` and ``huggingface_hub``, which read it once; and no fork of
    a process holding a model for lm-eval's bootstrap of standard errors."""
    for variable in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "DISABLE_MULTIPROC"):
        os.environ.setdefault(variable, "1")


@dataclass
class TaskSuite:
    """Local tasks loaded through lm-eval once, with the items each is scored on."""

    manager: Any  # the lm-eval TaskManager of the local tasks (building lm-eval's full index takes ~30 s)
    tasks: dict[str, Any]  # local name -> lm-eval Task
    samples: dict[str, list[int] | None]  # local name -> document indices (None: all)
    bootstrap_iters: int = BOOTSTRAP_ITERS
    sizes: dict[str, int] = field(default_factory=dict)


def check_tasks(names: Sequence[str]) -> None:
    """Refuse names that are not local tasks, naming those that are."""
    unknown = [name for name in names if name not in LOCAL_TASKS]
    if unknown:
        raise ValueError(f"unknown tasks {unknown}; the local lm-eval tasks are {', '.join(LOCAL_TASKS)}")


def load_suite(
    names: Sequence[str], data_dir: Path, limit: int | None = None, seed: int = 1234, bootstrap_iters: int = BOOTSTRAP_ITERS
) -> TaskSuite:
    """The local tasks ``names`` read from ``data_dir`` through lm-eval's task manager, each with a
    fixed-seed subset of ``limit`` documents (:func:`lp_fx.tools.data.subset`, the items the
    earlier hand-written scorer used), so a missing or broken file is refused before any model runs."""
    check_tasks(names)
    offline_environment()
    quiet_harness()
    from lm_eval.tasks import TaskManager  # lazy: lm-eval's import takes seconds; only task scoring needs it

    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata={"data_dir": str(data_dir)})
    loaded = manager.load([harness_name(name) for name in names])["tasks"]
    tasks = {name: loaded[harness_name(name)] for name in names}
    counts = {name: len(task.eval_docs) for name, task in tasks.items()}
    samples = {name: None if limit is None else data.subset(list(range(count)), limit, seed)
               for name, count in counts.items()}
    sizes = {name: counts[name] if chosen is None else len(chosen) for name, chosen in samples.items()}
    return TaskSuite(manager, tasks, samples, bootstrap_iters, sizes)


def run_suite(lm: Any, suite: TaskSuite) -> dict[str, dict]:
    """lm-eval's scores of ``lm`` on every task of ``suite``: ``{task: {"acc": …, "acc_stderr": …, "n": …}}``
    (LAMBADA's ``perplexity`` as ``ppl``), with each item's ``acc`` as ``items``: ``{"doc_id": […],
    "acc": […]}`` in document order, for errors paired over the items two models share."""
    import lm_eval  # lazy: lm-eval's import takes seconds; only task scoring needs it

    by_harness = {harness_name(name): name for name in suite.tasks}
    samples = {harness_name(name): chosen for name, chosen in suite.samples.items() if chosen is not None}
    out = lm_eval.simple_evaluate(
        model=lm, tasks=list(suite.tasks.values()), task_manager=suite.manager, samples=samples or None,
        log_samples=True, bootstrap_iters=suite.bootstrap_iters,
    )
    return {by_harness[task]: {**_metrics(values, out["n-samples"][task]["effective"]), **_items(out["samples"][task])}
            for task, values in out["results"].items()}


def _items(logged: Sequence[dict]) -> dict:
    """Each logged item's ``acc`` by document, as ``{"items": {"doc_id": […], "acc": […]}}`` (nothing
    when the task has no per-item ``acc``)."""
    scored = sorted((sample["doc_id"], float(sample["acc"])) for sample in logged if "acc" in sample)
    if not scored:
        return {}
    return {"items": {"doc_id": [doc for doc, _ in scored], "acc": [acc for _, acc in scored]}}


def _metrics(values: dict[str, Any], count: int) -> dict:
    """lm-eval's ``"acc,none"`` / ``"acc_stderr,none"`` keys as ``acc`` / ``acc_stderr`` (an
    unavailable standard error as None), and the number of items as ``n``."""
    out: dict = {}
    for key, value in values.items():
        metric, _, filter_name = key.partition(",")
        if not filter_name:
            continue  # the alias, not a metric
        stderr = metric.endswith("_stderr")
        base = METRIC_NAMES.get(metric.removesuffix("_stderr"), metric.removesuffix("_stderr"))
        out[base + "_stderr" * stderr] = None if value == "N/A" else float(value)
    out["n"] = count
    return out
