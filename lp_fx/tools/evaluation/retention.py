"""Retention: what a pairing keeps of the baseline's metrics, per metric and as the mean accuracy
ratio with its standard error (paired over the items both scored when they kept them)."""

from __future__ import annotations

import math
from typing import Any, Sequence

HIGHER_IS_BETTER = {"acc", "acc_norm"}


def metric_values(results: dict) -> dict[tuple[str, str], float]:
    """``{(task, metric): value}`` for every reported metric (sizes left out)."""
    return {
        (task, metric): float(value)
        for task, metrics in results.items()
        for metric, value in metrics.items()
        if metric in HIGHER_IS_BETTER or metric == "ppl"
    }


def retention(results: dict, baseline: dict) -> dict:
    """Per-metric ratio ``LP / baseline`` and the mean over the accuracy metrics.

    For perplexity the ratio is reported as is (above 1 is worse); the mean ``acc`` retention
    averages the tasks' ``acc`` ratios, as DESIGN.md §5 asks, with its standard error
    (:func:`acc_retention_stderr`) when the tasks give one.
    """
    ours, base = metric_values(results), metric_values(baseline)
    ratios = {
        f"{task}/{metric}": value / base[(task, metric)]
        for (task, metric), value in ours.items()
        if base.get((task, metric))
    }
    accs = [value for key, value in ratios.items() if key.endswith("/acc")]
    norms = [value for key, value in ratios.items() if key.endswith("/acc_norm")]
    summary: dict[str, Any] = {"per_metric": ratios}
    if accs:
        summary["mean_acc"] = sum(accs) / len(accs)
        stderr = acc_retention_stderr(results, baseline)
        if stderr is not None:
            summary["mean_acc_stderr"], summary["mean_acc_stderr_paired"] = stderr
    if norms:
        summary["mean_acc_norm"] = sum(norms) / len(norms)
    return summary


def acc_retention_stderr(results: dict, baseline: dict) -> tuple[float, bool] | None:
    """The standard error of the mean ``acc`` retention (mean over the tasks of ``acc`` /
    baseline ``acc``), and whether it is paired; None when a task gives no error.

    Each task's ratio r = p / b is linearised (delta method): its error is that of
    ``p − r·b`` over the baseline's ``b``. Paired: from the per-item accuracies when both sides
    kept them for the same items (``items``, see :func:`lp_fx.tools.evaluation.lm_eval_tasks.run_suite`):
    the two are scored on the same items and mostly agree, which a per-item difference sees.
    Otherwise from the two standard errors as if independent, which overstates it.
    """
    tasks = [task for task, metrics in results.items()
             if "acc" in metrics and baseline.get(task, {}).get("acc")]
    if not tasks:
        return None
    paired = all(_same_items(results[task], baseline[task]) for task in tasks)
    variances = []
    for task in tasks:
        ours, base = results[task], baseline[task]
        ratio = ours["acc"] / base["acc"]
        if paired:
            variance = _mean_variance([p - ratio * b for p, b in zip(ours["items"]["acc"], base["items"]["acc"])])
        elif ours.get("acc_stderr") is not None and base.get("acc_stderr") is not None:
            variance = ours["acc_stderr"] ** 2 + (ratio * base["acc_stderr"]) ** 2
        else:
            return None
        variances.append(variance / base["acc"] ** 2)
    return math.sqrt(sum(variances)) / len(tasks), paired


def _same_items(ours: dict, base: dict) -> bool:
    """Whether both kept per-item accuracies, one per item, for the same items (a record whose lists
    disagree is not paired: its error is taken as independent rather than from a truncated pairing)."""
    if "items" not in ours or "items" not in base:
        return False
    docs = ours["items"]["doc_id"]
    return docs == base["items"]["doc_id"] and len(ours["items"]["acc"]) == len(base["items"]["acc"]) == len(docs)


def _mean_variance(values: Sequence[float]) -> float:
    """The variance of the mean of ``values`` (sample variance / n)."""
    n = len(values)
    mean = sum(values) / n
    return sum((v - mean) ** 2 for v in values) / (n - 1) / n if n > 1 else 0.0
