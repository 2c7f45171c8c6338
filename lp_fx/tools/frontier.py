"""Speed against quality for every depth budget: contiguous, planned, and planned + fine-tuned pairs.

For each budget Δ (Δ/2 pairs, effective depth L − Δ/2, ideal speedup L / (L − Δ/2)) three pairings:

- ``contiguous``: the paper's form, the pairs ``(s, s+1), (s+2, s+3), …`` below ``s + Δ`` from ONE
  start ``s`` for every Δ; by default the middle-of-the-stack start ``lp-fx sweep --transforms`` uses
  (:func:`lp_fx.tools.sweep.default_starts`' last: 14 on 30 layers, so Δ = 14 is the demo's ``14:28``);
- ``planned``: :func:`lp_fx.tools.planner.make_plan` for Δ/2 pairs. Every budget is planned from ONE
  :class:`~lp_fx.tools.plan_scorers.GatedScorer` (one gated compiled graph) whose measure caches are shared
  across budgets, before anything else is compiled (a ``torch._dynamo.reset`` would make it compile
  again). A budget's pairs need not be a subset of the next one's;
- ``finetuned``: the planned pairing after :func:`lp_fx.tools.finetune.finetune` (distillation by
  default), measured, then the original weights put back.

Each point: perplexity on the held-out half of WikiText-2 raw test (the planner calibrates on the
other half) and on the LAMBADA passages, task accuracy (:func:`score_tasks`), decode speed on one
device (:mod:`lp_fx.tools.frontier_speed`; a budget's contiguous and planned pairings are timed in
one interleaved run) and, for ``lp`` pairings, in llama.cpp.

The perplexities of the baseline, contiguous and planned points come from the planner's gated graph,
run lazily, window by window, before anything else is compiled (:meth:`Frontier._score_on_gated_graph`):
on each window a pairing is computed from the first layer where it differs from the unpaired model
or from the previous pairing of its kind, so the layers below the pairs run once for every budget. Each such point is
checked: its calibration perplexity through the gated graph must equal its plain compile's (within
:data:`lp_fx.tools.planner.PLAIN_TOLERANCE`, recorded as ``ppl_check``), else the run stops. With
another ``inner`` compiler, and for fine-tuned points, each point is scored by its plain compile.

The JSON is rewritten after every plan and every point, so an interrupted run keeps what it
measured and ``resume`` goes on from there; a JSON made with other options, or with another model
(its class and weights fingerprint, :mod:`lp_fx.tools.model_identity`: the name alone does not tell
two folders called ``model`` apart), is refused, naming the difference. A JSON written before the
model's identity was recorded resumes with a warning, and records this model's from then on.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from lp_fx.config import pairs_from_range
from lp_fx.tools import data, evaluate, lm_eval_tasks, plan_scorers, planner
from lp_fx.tools.evaluate import BASELINE, Pairing
from lp_fx.tools.files import write_json

log = logging.getLogger(__name__)

VERSION = 1
VARIANTS = ("contiguous", "planned", "finetuned")
TIMED = VARIANTS[:2]  # a fine-tuned pairing runs the planned pairing's graph: its speed is the planned one's
DEFAULT_BUDGETS = (2, 4, 6, 8, 10, 12, 14)
PPL_TEXTS = ("wikitext", "lambada_text")
CALIB = "calib"
GATED_VARIANTS = ("baseline", "contiguous", "planned")  # perplexities from the gated graph (fine-tuning changes weights)
TASK_NAMES = lm_eval_tasks.LOCAL_TASKS  # what score_tasks accepts


@dataclass(frozen=True)
class FrontierOptions:
    """Everything a point's numbers depend on (the budgets aside): a resumed JSON must match it."""

    model: str
    num_layers: int
    contiguous_start: int
    window: int = 512
    ppl_windows: int = 16
    tasks: tuple[str, ...] = ()
    limit: int | None = 500
    seed: int = 1234
    batch_size: int = 8
    inner: str = "eager"
    plan_modes: tuple[str, ...] = ("lp", "block")
    calib_windows: int = 4
    screen_windows: int = 2
    refine: int = 3
    passes: int = 2
    race_margin: float | None = planner.RACE_MARGIN  # see lp_fx.tools.planner.RacedMeasure; None: no racing
    finetune_steps: int = 0
    finetune_train: str = "paired"  # what fine-tuning trains: the paired layers, or "all" parameters
    speed_inner: str = "inductor"
    speed_tokens: int = 32
    speed_rounds: int = 5
    llamacpp: bool = False

    def to_json(self) -> dict:
        return _as_json(asdict(self))


def _as_json(options: dict) -> dict:
    """Options with tuples as lists, as JSON stores them."""
    return {key: list(value) if isinstance(value, tuple) else value for key, value in options.items()}


# ----------------------------------------------------------------------------------- budgets


def check_budgets(budgets: Sequence[int], num_layers: int, contiguous_start: int) -> tuple[int, ...]:
    """The budgets, sorted; each an even Δ >= 2 whose Δ/2 disjoint pairs fit the model and whose
    contiguous range from ``contiguous_start`` ends inside it. Errors name what is valid."""
    if not budgets:
        raise ValueError("no budgets given; give even Δ values such as 2,4,6")
    repeated = sorted({delta for delta in budgets if list(budgets).count(delta) > 1})
    if repeated:
        raise ValueError(f"budget Δ={repeated[0]} is given more than once")
    most = num_layers - num_layers % 2
    for delta in budgets:
        if delta < 2 or delta % 2:
            raise ValueError(f"budget Δ={delta} is not valid: Δ counts the layers paired, 2 per pair; give an "
                             f"even Δ from 2 to {most}")
        if delta > num_layers:
            raise ValueError(f"budget Δ={delta} is more than the model's {num_layers} layers; give an even Δ "
                             f"from 2 to {most}")
        if contiguous_start + delta > num_layers:
            raise ValueError(
                f"budget Δ={delta}: the contiguous range {contiguous_start}:{contiguous_start + delta} ends past "
                f"the model's {num_layers} layers; from start {contiguous_start} Δ may be at most "
                f"{(num_layers - contiguous_start) // 2 * 2}, or give --contiguous-start <= {num_layers - delta}"
            )
    return tuple(sorted(budgets))


def ideal_speedup(num_layers: int, delta: int) -> float:
    """L / (L − Δ/2): time proportional to depth."""
    return num_layers / (num_layers - delta // 2)


def contiguous_pairing(start: int, delta: int) -> Pairing:
    pairs = pairs_from_range(start, start + delta)
    return Pairing(f"{start}:{start + delta}", pairs, ("lp",) * len(pairs))


def check_variants(variants: Sequence[str] | None, finetune_steps: int) -> tuple[str, ...]:
    """The variants to measure, in :data:`VARIANTS` order; by default every one (``finetuned`` only
    with fine-tuning steps). Errors name what is valid."""
    if variants is None:
        return VARIANTS if finetune_steps else VARIANTS[:2]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or not variants:
        raise ValueError(f"variants {', '.join(map(repr, unknown)) or '(none given)'}: give some of {', '.join(VARIANTS)}")
    if "finetuned" in variants and not finetune_steps:
        raise ValueError("the finetuned variant needs fine-tuning steps: give --finetune-steps N (N >= 1)")
    return tuple(variant for variant in VARIANTS if variant in variants)


def point_keys(budgets: Sequence[int], variants: Sequence[str]) -> list[tuple[str, int]]:
    """``(variant, Δ)`` of every point, in the order measured: the baseline (every retention and
    ratio is relative to it), then each budget's ``variants``."""
    return [("baseline", 0), *((variant, delta) for delta in budgets for variant in variants)]


# ----------------------------------------------------------------------------------- results


def new_result(options: FrontierOptions, model: dict[str, str]) -> dict:
    """An empty result for the model of identity ``model`` (:func:`lp_fx.tools.model_identity.model_identity`):
    ``plans`` by Δ, ``planner`` one record per planning (one gated graph each), ``points`` as measured,
    ``runs`` one record per invocation (wall time, load average)."""
    return {"version": VERSION, "options": options.to_json(), "model_identity": dict(model), "plans": {},
            "planner": [], "points": [], "runs": []}


def option_differences(stored: dict, current: dict) -> list[str]:
    """``name: stored -> current`` for every option that differs."""
    return [
        f"{key}: {stored.get(key)!r} -> {current.get(key)!r}"
        for key in sorted(set(stored) | set(current))
        if stored.get(key) != current.get(key)
    ]


def option_defaults() -> dict:
    """Each option's default, as JSON: what a record made before the option existed was measured with."""
    return _as_json({f.name: f.default for f in fields(FrontierOptions) if f.default is not MISSING})


def resume_result(path: Path, options: FrontierOptions, model: dict[str, str]) -> dict:
    """The results in ``path``, made with ``options`` (else an error naming each difference) on the
    model of identity ``model`` (else an error naming both)."""
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(f"--resume: cannot read {path} ({error})") from None
    if not isinstance(result, dict) or result.get("version") != VERSION or "options" not in result:
        raise ValueError(f"--resume: {path} is not a frontier JSON of version {VERSION}")
    differences = option_differences({**option_defaults(), **result["options"]}, options.to_json())
    if differences:
        raise ValueError(f"--resume: {path} was made with other options ({'; '.join(differences)}); run with the "
                         "options it was made with, or give another --out")
    _check_same_model(path, result, model)
    return result


def _check_same_model(path: Path, result: dict, model: dict[str, str]) -> None:
    """The model of ``result`` is ``model``; a result that does not record one takes it, with a warning."""
    recorded = result.get("model_identity")
    if recorded is None:
        log.warning("--resume: %s does not record the identity of its model (written before it was recorded): "
                    "resuming without checking that this is the model it was measured on, and recording it", path)
        result["model_identity"] = dict(model)
    elif recorded != model:
        raise ValueError(
            f"--resume: {path} was measured on another model ({recorded.get('class')} with weights "
            f"{recorded.get('weights')}), this one is a {model['class']} with weights {model['weights']}; resume with "
            "the model it was measured on, or give another --out"
        )


def measured(result: dict) -> set[tuple[str, int]]:
    return {(point["variant"], point["delta"]) for point in result["points"]}


def find_point(result: dict, variant: str, delta: int) -> dict | None:
    return next((p for p in result["points"] if (p["variant"], p["delta"]) == (variant, delta)), None)


# ----------------------------------------------------------------------------------- planning


def plan_budgets(
    scorer: plan_scorers.GatedScorer, model_name: str, calib: torch.Tensor, screen: torch.Tensor,
    budgets: Sequence[int], options: FrontierOptions, save: Callable[[int, dict], None], progress: bool = True,
) -> dict:
    """Plan every budget with ONE gated scorer (on ``calib``) and measure caches shared across
    budgets; ``save`` each plan as it is made. Returns the planner's totals (graphs compiled,
    pairings scored)."""
    began = time.monotonic()
    measure, screen_measure = plan_scorers.calibration_measures(scorer, calib, screen, options.race_margin)
    calibration = {"split": "calib", "windows": int(calib.shape[0]), "screen_windows": int(screen.shape[0]),
                   "window": options.window}
    for delta in budgets:
        try:
            plan = planner.make_plan(
                measure, options.num_layers, model_name, num_pairs=delta // 2, modes=options.plan_modes,
                refine=options.refine, passes=options.passes, calibration=calibration, screen=screen_measure,
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
    (:func:`lp_fx.tools.evaluate.measure`): ``{task: {"acc", "acc_stderr", "n", …}}``."""
    spec = evaluate.EvalSpec(data_dir=data_dir, tasks=options.tasks, limit=options.limit, seed=options.seed,
                             batch_size=options.batch_size)
    return evaluate.measure(model, tokenizer, pairing, evaluate.prepare(tokenizer, spec), inner=options.inner,
                            progress=progress)


# ----------------------------------------------------------------------------------- measuring


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
    _gated: dict[tuple[str, int], tuple[dict[str, evaluate.Perplexity], dict]] = field(
        default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        window, count = self.options.window, self.options.ppl_windows
        self.windows = {text: evaluate.wikitext_windows(self.tokenizer, self.data_dir, window, "heldout", count, text)
                        for text in PPL_TEXTS}
        self.calib, self.screen = (
            evaluate.wikitext_windows(self.tokenizer, self.data_dir, window, "calib", n)
            for n in (self.options.calib_windows, self.options.screen_windows)
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
            self._scorer = plan_scorers.GatedScorer(self.model, self.calib, self.options.plan_modes, self.options.inner)
        return self._scorer

    def _score_on_gated_graph(self, todo: Sequence[tuple[str, int]]) -> None:
        """The held-out and calibration perplexities of every point of ``todo`` that the gated graph
        computes (:data:`GATED_VARIANTS`, pairs in the gated modes), kept for :meth:`measure`,
        each checked against its plain compile (:func:`check_gated`; the plain compiles share one
        Dynamo trace, :class:`lp_fx.tools.evaluate.PairingSwitch`).

        Run lazily (``eager`` inner only), window by window, the graph computes a pairing from the
        first layer where it differs from the unpaired model or from the previous pairing of its
        variant on that window, whose values are kept until the next window: the layers before a
        budget's first new pair run once for all budgets, and what is kept is one window's values.
        This comes before every other compile, which resets Dynamo's caches (and with them the graph)."""
        if self.options.inner != "eager":  # run whole, the gated graph computes more than a plain compile
            return
        pairings = {key: self.pairing(*key)[0] for key in todo if key[0] in GATED_VARIANTS}
        keys = [key for key, pairing in pairings.items()
                if set(pairing.modes or ("lp",) * pairing.num_pairs) <= set(self.options.plan_modes)]
        if not keys:
            return
        windows = {**self.windows, CALIB: self.calib}
        nll, seconds = self._gated_nll(keys, pairings, windows)
        plain = evaluate.PairingSwitch(self.model, self.options.inner)
        for key in keys:
            began = time.monotonic()
            gated = {name: evaluate.Perplexity.of(nll[key][name], rows) for name, rows in windows.items()}
            plain.set_pairing(pairings[key])
            plain_ppl = evaluate.perplexity(plain.logits, self.calib, progress=False).ppl
            check = check_gated(pairings[key].name, gated[CALIB].ppl, plain_ppl)
            self._gated[key] = (gated, {**check, "seconds": round(seconds[key] + time.monotonic() - began, 1)})

    def _gated_nll(
        self, keys: Sequence[tuple[str, int]], pairings: dict[tuple[str, int], Pairing], windows: dict[str, torch.Tensor]
    ) -> tuple[dict[tuple[str, int], dict[str, float]], dict[tuple[str, int], float]]:
        """``(NLL summed over each set of windows, seconds)`` of each point, on the gated graph,
        window by window (see :meth:`_score_on_gated_graph`)."""
        scorer = self.scorer()
        nll = {key: dict.fromkeys(windows, 0.0) for key in keys}
        seconds = dict.fromkeys(keys, 0.0)
        every_window = [(name, row) for name, rows in windows.items() for row in rows]
        for name, row in tqdm(every_window, desc="perplexity windows (gated graph)", disable=not self.progress):
            previous: dict[str, Pairing] = {}
            for key in keys:
                began = time.monotonic()
                nll[key][name] += scorer.window_nll(pairings[key], row)
                previous[key[0]] = pairings[key]
                scorer.keep_only(list(previous.values()))
                seconds[key] += time.monotonic() - began
            scorer.forget()  # one window's values at a time: the memory of a window, not of every window
        self._scorer = None  # the next compile resets Dynamo's caches, and the graph with them
        return nll, seconds

    def _save_plan(self, delta: int, plan: dict) -> None:
        self.result["plans"][str(delta)] = plan
        planner.save_plan(plan, self.plan_folder / f"delta_{delta}.json")
        self.save()

    def pairing(self, variant: str, delta: int) -> tuple[Pairing, dict]:
        """The pairing of a point, and the backend options that serve it."""
        if variant == "baseline":
            return BASELINE, {}
        if variant == "contiguous":
            start = self.options.contiguous_start
            return contiguous_pairing(start, delta), {"start": start, "end": start + delta, "mode": "lp"}
        plan_path = self.plan_folder / f"delta_{delta}.json"
        if not plan_path.is_file():  # a resumed run whose plan files were removed: the JSON holds the plans
            planner.save_plan(self.result["plans"][str(delta)], plan_path)
        return planner.plan_pairing(self.result["plans"][str(delta)], f"{variant} Δ={delta}"), {"plan": str(plan_path)}

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
                logits_fn = evaluate.compile_pairing(self.model, pairing, inner=self.options.inner)
                point["ppl"] = {text: evaluate.perplexity(logits_fn, w, text, progress=False).to_json()
                                for text, w in self.windows.items()}
                plain_calib = evaluate.perplexity(logits_fn, self.calib, progress=False).ppl if variant == "planned" else None
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
                                 self.progress, self.options.finetune_train)


def check_gated(name: str, gated: float, plain: float) -> dict:
    """The record of a point's check: the gated graph's calibration perplexity against its plain
    compile's; an error when they differ by more than :data:`lp_fx.tools.planner.PLAIN_TOLERANCE`."""
    if abs(gated - plain) > planner.PLAIN_TOLERANCE * plain:
        raise ValueError(
            f"{name}: the gated graph's calibration perplexity, {gated:.4f}, differs from the plain compile's, "
            f"{plain:.4f}, by more than {planner.PLAIN_TOLERANCE:.1%}; its held-out perplexities cannot be trusted"
        )
    return {"windows": CALIB, "gated_ppl": gated, "plain_ppl": plain}


@contextlib.contextmanager
def finetuned_weights(
    model: torch.nn.Module, train_ids: Sequence[int], pairing: Pairing, steps: int, folder: Path, point: dict,
    progress: bool = True, train: str = "paired",
) -> Iterator[None]:
    """``model`` with ``pairing`` fine-tuned for ``steps`` (:func:`lp_fx.tools.finetune.finetune`,
    its defaults: distillation from the unpaired model; ``train``: only the paired layers, or all
    parameters; checkpoint in ``folder``); the training record goes to ``point["finetune"]``. The
    original weights and ``requires_grad`` are put back afterwards."""
    from lp_fx.tools import finetune

    original = {name: p.detach().clone() for name, p in model.named_parameters()}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    config = finetune.FinetuneConfig(pairs=pairing.pairs, modes=pairing.modes, train=train, steps=steps,
                                     eval_every=steps, save_every=steps)
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
