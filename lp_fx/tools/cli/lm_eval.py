"""``lp-fx-lm-eval``: lm-evaluation-harness's own command line, with ``--model lp_fx`` and the local tasks.

lm-eval 0.4 finds a model only in its own list or in a module that is imported before it runs
(it reads no entry points), so a plain ``lm_eval --model lp_fx`` cannot find lp_fx. This is
``lm_eval`` itself with :mod:`lp_fx.tools.evaluation.lm_eval_model` imported and, unless ``--include_path``
is given, the local task folder included (``--tasks lp_arc_easy`` or ``lp_fx`` for all of them;
their data directory: ``--metadata '{"data_dir": "DIR"}'``, else ``$LP_FX_DATA`` or ``../shared/data``)::

    lp-fx-lm-eval --model lp_fx --model_args pretrained=smollm2,pairs=14:28,fuse=True \\
        --tasks lp_fx --device cpu --batch_size 8

Every other lm-eval task (``--tasks hellaswag``) runs as lm-eval runs it, with its downloads. When
every task asked for is a local one, lm-eval's index of its own tasks (about 20 s to build, each run)
is not built.
Bad arguments (``--model_args bogus=1``) are refused on one line with exit status 2, as ``lp-fx`` does.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Sequence

from lp_fx.tools.console import ERRORS, refuse
from lp_fx.tools.evaluation.lm_eval_tasks import PREFIX, TASKS_DIR


def harness_argv(argv: Sequence[str]) -> list[str]:
    """lm-eval's arguments: ``argv`` with the local task folder included when no folder is given
    (none at all: lm-eval's help)."""
    if not argv or any(arg == "--include_path" or arg.startswith("--include_path=") for arg in argv):
        return list(argv)
    return [*argv, "--include_path", str(TASKS_DIR)]


def requested_tasks(argv: Sequence[str]) -> list[str]:
    """The task names of ``--tasks A,B`` (or ``--tasks=A,B``) in ``argv``."""
    names = [b for a, b in zip(argv, argv[1:]) if a == "--tasks"]
    names += [arg.split("=", 1)[1] for arg in argv if arg.startswith("--tasks=")]
    return [name for value in names for name in value.split(",") if name]


def only_local_tasks(argv: Sequence[str]) -> bool:
    """Whether every task asked for is one of the local folder's (their names start with ``lp_``,
    which no lm-eval task does) and the local folder is the one included."""
    tasks = requested_tasks(argv)
    return bool(tasks) and all(name.startswith(PREFIX) for name in tasks) and harness_argv(argv)[-1] == str(TASKS_DIR)


@contextlib.contextmanager
def task_index(local_only: bool) -> Iterator[None]:
    """With ``local_only``, lm-eval's task managers index only the included folder while inside:
    its command line gives no way to leave out the index of its own tasks, rebuilt on every run."""
    import lm_eval.tasks  # lazy: lm-eval's import takes seconds

    default = lm_eval.tasks.TaskManager

    class LocalTaskManager(default):
        def __init__(self, *args, include_defaults: bool = False, **kwargs) -> None:
            super().__init__(*args, include_defaults=include_defaults, **kwargs)

    lm_eval.tasks.TaskManager = LocalTaskManager if local_only else default
    try:
        yield
    finally:
        lm_eval.tasks.TaskManager = default


def main(argv: Sequence[str] | None = None) -> int:
    """Run lm-eval's command line (it reads ``sys.argv``) with lp_fx registered; its exit status
    (2: a refused argument, reported on one line)."""
    import lp_fx.tools.evaluation.lm_eval_model  # noqa: F401  (lazy: registers --model lp_fx; imports lm-eval)
    from lm_eval.__main__ import cli_evaluate  # lazy: lm-eval's import takes seconds; only task scoring needs it

    argv = sys.argv[1:] if argv is None else list(argv)
    sys.argv = [sys.argv[0], *harness_argv(argv)]
    try:
        with task_index(local_only=only_local_tasks(argv)):
            cli_evaluate()
    except ERRORS as error:
        return refuse("lp-fx-lm-eval", error)
    return 0


if __name__ == "__main__":
    sys.exit(main())
