"""``lp-fx-lm-eval``: lm-evaluation-harness's own command line, with ``--model lp_fx`` and the local tasks.

lm-eval 0.4 finds a model only in its own list or in a module that is imported before it runs
(it reads no entry points), so a plain ``lm_eval --model lp_fx`` cannot find lp_fx. This is
``lm_eval`` itself with :mod:`lp_fx.tools.evaluation.lm_eval_model` imported and, unless ``--include_path``
is given, the local task folder included (``--tasks lp_arc_easy`` or ``lp_fx`` for all of them;
their data directory: ``--metadata '{"data_dir": "DIR"}'``, else ``$LP_FX_DATA`` or ``../shared/data``)::

    lp-fx-lm-eval --model lp_fx --model_args pretrained=smollm2,pairs=14:28,fuse=True \\
        --tasks lp_fx --device cpu --batch_size 8

Every other lm-eval task (``--tasks hellaswag``) runs as lm-eval runs it, with its downloads.
Bad arguments (``--model_args bogus=1``) are refused on one line with exit status 2, as ``lp-fx`` does.
"""

from __future__ import annotations

import sys
from typing import Sequence

from lp_fx.tools.console import ERRORS, refuse
from lp_fx.tools.evaluation.lm_eval_tasks import TASKS_DIR


def harness_argv(argv: Sequence[str]) -> list[str]:
    """lm-eval's arguments: ``argv`` with the local task folder included when no folder is given
    (none at all: lm-eval's help)."""
    if not argv or any(arg == "--include_path" or arg.startswith("--include_path=") for arg in argv):
        return list(argv)
    return [*argv, "--include_path", str(TASKS_DIR)]


def main(argv: Sequence[str] | None = None) -> int:
    """Run lm-eval's command line (it reads ``sys.argv``) with lp_fx registered; its exit status
    (2: a refused argument, reported on one line)."""
    import lp_fx.tools.evaluation.lm_eval_model  # noqa: F401  (lazy: registers --model lp_fx; imports lm-eval)
    from lm_eval.__main__ import cli_evaluate  # lazy: lm-eval's import takes seconds; only task scoring needs it

    sys.argv = [sys.argv[0], *harness_argv(sys.argv[1:] if argv is None else argv)]
    try:
        cli_evaluate()
    except ERRORS as error:
        return refuse("lp-fx-lm-eval", error)
    return 0


if __name__ == "__main__":
    sys.exit(main())
