"""Speed against quality for every depth budget: contiguous, planned, and planned + fine-tuned pairs.

For each budget Δ (Δ/2 pairs, effective depth L − Δ/2, ideal speedup L / (L − Δ/2)) three pairings:

- ``contiguous``: the paper's form, the pairs ``(s, s+1), (s+2, s+3), …`` below ``s + Δ`` from ONE
  start ``s`` for every Δ; by default the middle-of-the-stack start ``lp-fx sweep --transforms`` uses
  (:func:`lp_fx.tools.evaluation.sweep.default_starts`' last: 14 on 30 layers, so Δ = 14 is the demo's ``14:28``);
- ``planned``: :func:`lp_fx.tools.planning.search.make_plan` for Δ/2 pairs. Every budget is planned from ONE
  :class:`~lp_fx.tools.planning.scorers.GatedScorer` (one gated compiled graph) whose measure caches are shared
  across budgets, before anything else is compiled (a ``torch._dynamo.reset`` would make it compile
  again). A budget's pairs need not be a subset of the next one's;
- ``finetuned``: the planned pairing after :func:`lp_fx.tools.training.finetune.finetune` (distillation by
  default), measured, then the original weights put back.

Each point: perplexity on the held-out half of WikiText-2 raw test (the planner calibrates on the
other half) and on the LAMBADA passages, task accuracy (:func:`score_tasks`), decode speed on one
device (:mod:`lp_fx.tools.frontier.speed`; a budget's contiguous and planned pairings are timed in
one interleaved run) and, for ``lp`` pairings, in llama.cpp.

The perplexities of the baseline, contiguous and planned points come from the planner's gated graph,
run lazily, window by window, before anything else is compiled (:mod:`lp_fx.tools.frontier.gated`):
on each window a pairing is computed from the first layer where it differs from the unpaired model
or from the previous pairing of its kind, so the layers below the pairs run once for every budget. Each such point is
checked: its calibration perplexity through the gated graph must equal its plain compile's (within
:data:`lp_fx.tools.planning.search.PLAIN_TOLERANCE`, recorded as ``ppl_check``), else the run stops. With
another ``inner`` compiler, and for fine-tuned points, each point is scored by its plain compile.

The JSON is rewritten after every plan and every point, so an interrupted run keeps what it
measured and ``resume`` goes on from there; a JSON made with other options, or with another model
(its class and weights fingerprint, :mod:`lp_fx.model_identity`: the name alone does not tell
two folders called ``model`` apart), is refused, naming the difference. A JSON written before the
model's identity was recorded resumes with a warning, and records this model's from then on.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from lp_fx.pairing import BASELINE, Pairing, save_plan
from lp_fx.tools import data
from lp_fx.tools.evaluation import lm_eval_tasks
from lp_fx.tools.evaluation import scoring as evaluate
from lp_fx.tools.evaluation.compiled import compile_pairing
from lp_fx.tools.evaluation.scoring import Perplexity, perplexity, wikitext_windows
from lp_fx.tools.frontier.gated import gated_points
from lp_fx.tools.frontier.options import FrontierOptions
from lp_fx.tools.frontier.points import GATED_VARIANTS, TIMED, check_variants, ideal_speedup, point_keys
from lp_fx.tools.frontier.results import find_point, measured
from lp_fx.files import write_json
from lp_fx.tools.planning import scorers as plan_scorers
from lp_fx.tools.planning import search as planner
from lp_fx.tools.training import finetune

log = logging.getLogger(__name__)

PPL_TEXTS = ("wikitext", "lambada_text")
TASK_NAMES = lm_eval_tasks.LOCAL_TASKS  # what score_tasks accepts


def plan_budgets(
    scorer: plan_scorers.GatedScorer, model_name: str, calib: torch.Tensor, screen: torch.Tensor,
    budgets: Sequence[int], options: FrontierOptions, save: Callable[[int, dict], None], progress: bool = True,
) -> dict:
    """Plan every budget with ONE gated scorer (on ``calib``) and measure caches shared across
    budgets; ``save`` each plan as it is made. Returns the planner's totals (graphs compiled,
    pairings scored)."""
    began = time.monotonic()
    measure, screen_measure = plan_scorers.calibration_measures(scorer, calib, screen, options.search.margin)
    calibration = {"split": "calib", "windows": int(calib.shape[0]), "screen_windows": int(screen.shape[0]),
                   "window": options.window}
    for delta in budgets:
        try:
            plan = planner.make_plan(
                measure, options.num_layers, model_name, num_pairs=delta // 2, modes=options.search.modes,
                refine=options.search.refine, passes=options.search.passes, calibration=calibration, screen=screen_measure,
                progress=progress,
            )
        except ValueError as error:
            raise ValueError(f"planning budget Δ={delta}: {error}") from None
        log.info("planned Δ=%d: pairs %s modes %s, calibration ppl %.3f", delta, plan["pairs"], plan["modes"],
                 plan["calibration"]["plan_ppl"])
        save(delta, plan)
    return {"graphs_compiled": scorer.compiles, "pairings_scored": planner.pairings_scored(measure, screen_measure),
            "budgets": list(budgets), "seconds": round(time.monotonic() - began, 1)}


# ----------------------------------------------------------------------------------- tasks


def score_tasks(
    model: torch.nn.Module, tokenizer: object, pairing: Pairing, data_dir: Path, options: FrontierOptions,
    progress: bool = True,
) -> dict[str, dict]:
    """Task accuracy of ``model`` served with ``pairing``, scored by lm-evaluation-harness
    (:func:`lp_fx.tools.evaluation.scoring.measure`): ``{task: {"acc", "acc_stderr", "n", …}}``."""
    spec = evaluate.EvalSpec(data_dir=data_dir, tasks=options.tasks, limit=options.limit, seed=options.seed,
                             batch_size=options.batch_size)
    return evaluate.measure(model, tokenizer, pairing, evaluate.prepare(tokenizer, spec), inner=options.inner,
                            progress=progress)


@dataclass
class Frontier:
    """One run: the loaded model, its data, where results go; :meth:`run` measures what is missing."""

    model: torch.nn.Module
    tokenizer: object
    model_name: str
    data_dir: Path
    options: FrontierOptions
    out: Path
    result: dict
    progress: bool = True
    speed: Any = None  # a frontier_speed.SpeedBench, or None: no speed measured
    windows: dict[str, torch.Tensor] = field(init=False, repr=False)
    _train_ids: list[int] | None = field(default=None, init=False, repr=False)
    _pending: set[tuple[str, int]] = field(default_factory=set, init=False, repr=False)  # points this run measures later
    _timed_ahead: dict[tuple[str, int], dict] = field(default_factory=dict, init=False, repr=False)
    _scorer: plan_scorers.GatedScorer | None = field(default=None, init=False, repr=False)
    # (variant, Δ) -> (perplexities through the gated graph, its check against the plain compile)
    _gated: dict[tuple[str, int], tuple[dict[str, Perplexity], dict]] = field(
        default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        window, count = self.options.window, self.options.ppl_windows
        self.windows = {text: wikitext_windows(self.tokenizer, self.data_dir, window, "heldout", count, text)
                        for text in PPL_TEXTS}
        self.calib, self.screen = (
            wikitext_windows(self.tokenizer, self.data_dir, window, "calib", n)
            for n in (self.options.search.calib_windows, self.options.search.screen_windows)
        )

    @property
    def plan_folder(self) -> Path:
        return self.out.with_name(f"{self.out.stem}_plans")

    def save(self) -> None:
        write_json(self.out, self.result)

    def run(self, budgets: Sequence[int], variants: Sequence[str] | None = None) -> dict:
        """Plan the budgets not planned yet, then measure every point of ``variants`` (default: all,
        see :func:`check_variants`) not measured yet."""
        began, load = time.monotonic(), os.getloadavg()
        variants = check_variants(variants, self.options.finetune_steps)
        todo = [key for key in point_keys(budgets, variants) if key not in measured(self.result)]
        unplanned = sorted({d for variant, d in todo if variant != "contiguous" and d and str(d) not in self.result["plans"]})
        if unplanned:
            self.result["planner"].append(plan_budgets(
                self.scorer(), self.model_name, self.calib, self.screen, unplanned, self.options, self._save_plan,
                self.progress,
            ))
        self._score_on_gated_graph(todo)
        self._pending = set(todo)
        for variant, delta in tqdm(todo, desc="frontier points", disable=not self.progress):
            self._pending.discard((variant, delta))
            self.result["points"].append(self.measure(variant, delta))
            self.save()
        self.result["runs"].append({"points": len(todo), "wall_s": round(time.monotonic() - began, 1),
                                    "loadavg_start": load, "loadavg_end": os.getloadavg()})
        self.save()
        return self.result

    def scorer(self) -> plan_scorers.GatedScorer:
        """The run's gated scorer (one gated graph, run lazily with the ``eager`` inner compiler),
        made at its first use."""
        if self._scorer is None:
            self._scorer = plan_scorers.GatedScorer(self.model, self.calib, self.options.search.modes, self.options.inner)
        return self._scorer

    def _score_on_gated_graph(self, todo: Sequence[tuple[str, int]]) -> None:
        """The perplexities of every point of ``todo`` that the gated graph computes
        (:data:`~lp_fx.tools.frontier.points.GATED_VARIANTS`, pairs in the gated modes), kept for
        :meth:`measure` (:func:`lp_fx.tools.frontier.gated.gated_points`). ``eager`` inner only: run
        whole, the gated graph computes more than a plain compile."""
        if self.options.inner != "eager":
            return
        pairings = {key: self.pairing(*key)[0] for key in todo if key[0] in GATED_VARIANTS}
        gateable = {key: pairing for key, pairing in pairings.items()
                    if set(pairing.modes_or("lp")) <= set(self.options.search.modes)}
        if gateable:
            self._gated = gated_points(self.scorer(), self.model, gateable, self.windows, self.calib,
                                       self.options.inner, self.progress)
            self._scorer = None  # the next compile resets Dynamo's caches, and the graph with them

    def _save_plan(self, delta: int, plan: dict) -> None:
        self.result["plans"][str(delta)] = plan
        save_plan(plan, self.plan_folder / f"delta_{delta}.json")
        self.save()

    def pairing(self, variant: str, delta: int) -> tuple[Pairing, dict]:
        """The pairing of a point, and the backend options that serve it."""
        if variant == "baseline":
            return BASELINE, {}
        if variant == "contiguous":
            start = self.options.contiguous_start
            return Pairing.contiguous(start, start + delta, "lp"), {"start": start, "end": start + delta, "mode": "lp"}
        plan_path = self.plan_folder / f"delta_{delta}.json"
        if not plan_path.is_file():  # a resumed run whose plan files were removed: the JSON holds the plans
            save_plan(self.result["plans"][str(delta)], plan_path)
        return Pairing.from_plan(self.result["plans"][str(delta)], f"{variant} Δ={delta}"), {"plan": str(plan_path)}

    def measure(self, variant: str, delta: int) -> dict:
        """Every measurement of one point (see the module doc)."""
        began, load = time.monotonic(), os.getloadavg()
        pairing, backend_options = self.pairing(variant, delta)
        num_layers = self.options.num_layers
        point: dict[str, Any] = {
            "variant": variant, "delta": delta, "effective_depth": num_layers - delta // 2,
            "ideal_speedup": ideal_speedup(num_layers, delta), "pairing": pairing.to_json(),
            "backend_options": backend_options,
        }
        with self._weights_for(variant, pairing, delta, point):
            if (variant, delta) in self._gated:
                gated, point["ppl_check"] = self._gated.pop((variant, delta))
                point["ppl"] = {text: gated[text].to_json() for text in self.windows}
                plain_calib = point["ppl_check"]["plain_ppl"]
            else:
                logits_fn = compile_pairing(self.model, pairing, inner=self.options.inner)
                point["ppl"] = {text: perplexity(logits_fn, w, text, progress=False).to_json()
                                for text, w in self.windows.items()}
                plain_calib = perplexity(logits_fn, self.calib, progress=False).ppl if variant == "planned" else None
            if variant == "planned":
                self._check_plan(delta, plain_calib)
            if self.options.tasks:
                point["tasks"] = score_tasks(self.model, self.tokenizer, pairing, self.data_dir, self.options,
                                             self.progress)
            if self.speed is not None and variant in TIMED:
                point.update(self._speed_of(variant, delta, pairing, backend_options))
        if variant == "finetuned":  # the planned pairing's graph, so its speed: measured once
            planned = find_point(self.result, "planned", delta) or {}
            point.update({key: {**planned[key], "measured_for": "planned"} for key in ("speed", "llamacpp") if key in planned})
        scored_before = point.get("ppl_check", {}).get("seconds", 0.0)  # its perplexities, on the gated graph
        point.update(seconds=round(time.monotonic() - began + scored_before, 1), loadavg_start=load,
                     loadavg_end=os.getloadavg())
        log.info("frontier %s Δ=%d: %s", variant, delta, {k: point[k] for k in ("ppl", "seconds")})
        return point

    def _speed_of(self, variant: str, delta: int, pairing: Pairing, backend_options: dict) -> dict:
        """The speed records of a point. The budget's other timed variant, when this run measures it
        later, is timed in the same run (one unpaired copy for both: its compile and rounds once per
        budget) and its records kept for its point; an interrupted run times it again alone."""
        if (variant, delta) in self._timed_ahead:
            return self._timed_ahead.pop((variant, delta))
        later = [other for other in TIMED if other != variant and (other, delta) in self._pending]
        group = [(variant, pairing, backend_options),
                 *((other, *self.pairing(other, delta)) for other in later)]
        records = self.speed.measure(self.model, [(p, options) for _, p, options in group])
        for (other, _, _), record in zip(group[1:], records[1:]):
            self._timed_ahead[(other, delta)] = record
        return records[0]

    def _check_plan(self, delta: int, plain_ppl: float) -> None:
        """The gated graph's calibration perplexity of the plan must be the plain compile's."""
        plan = self.result["plans"][str(delta)]
        plan["calibration"]["plan_ppl_plain"] = plain_ppl
        self._save_plan(delta, plan)
        problem = planner.plain_disagreement(plan)
        if problem:
            raise ValueError(f"plan for Δ={delta}: {problem}; the planner's numbers cannot be trusted")

    def _weights_for(self, variant: str, pairing: Pairing, delta: int, point: dict) -> contextlib.AbstractContextManager:
        if variant != "finetuned":
            return contextlib.nullcontext()
        if self._train_ids is None:
            text = data.load_training_text(self.data_dir / "wikitext-2" / "train.txt")
            self._train_ids = self.tokenizer.encode(text, add_special_tokens=False)
        folder = self.out.with_name(f"{self.out.stem}_checkpoints") / f"delta_{delta}"
        return finetuned_weights(self.model, self._train_ids, pairing, self.options.finetune_steps, folder, point,
                                 self.progress, self.options.finetune_train, self.options.inner)


@contextlib.contextmanager
def finetuned_weights(
    model: torch.nn.Module, train_ids: Sequence[int], pairing: Pairing, steps: int, folder: Path, point: dict,
    progress: bool = True, train: str = "paired", inner: str = finetune.FinetuneConfig.inner,
) -> Iterator[None]:
    """``model`` with ``pairing`` fine-tuned for ``steps`` (:func:`lp_fx.tools.training.finetune.finetune`,
    its defaults: distillation from the unpaired model; ``train``: only the paired layers, or all
    parameters; ``inner``: the compiler behind the backend; checkpoint in ``folder``); the training
    record goes to ``point["finetune"]``. The original weights and ``requires_grad`` are put back afterwards."""
    original = {name: p.detach().clone() for name, p in model.named_parameters()}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    config = finetune.FinetuneConfig(pairs=pairing.pairs, modes=pairing.modes, train=train, steps=steps,
                                     eval_every=steps, save_every=steps, inner=inner)
    try:
        record = finetune.finetune(model, train_ids, config, folder, progress=progress)
        point["finetune"] = {"checkpoint": str(folder), "args": record["args"], "wall_s": record["wall_s"],
                             "final_loss": record["loss"][-1]["loss"]}
        for param in model.parameters():
            param.requires_grad_(False)
        yield
    finally:
        with torch.no_grad():
            for name, param in model.named_parameters():
                param.copy_(original[name])
                param.requires_grad_(flags[name])
