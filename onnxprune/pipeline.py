"""The pipeline: load → analyze → calibrate → score → plan → cut → reconstruct → fine-tune → quantize → verify
→ report.

``prune`` is the one function every front door calls (CLI embedded mode, gRPC service, Python API):
a pure function of (model file, spec) → (pruned model file, report), with progress and cancellation
passed in. It never touches server state. Stages are small functions over one :class:`PruneState`;
``_run_stages`` runs them in order, reports progress at each boundary and names the stage when an
unexpected error escapes.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxprune.io.export import export_checked, export_graph
from onnxprune.io.genai import write_genai_config
from onnxprune.io.load import LoadedModel, load_model
from onnxprune.io.save import save_model
from onnxprune.io.shapes import check_model, ops_without_schema, static_shapes
from onnxprune.planning.budget import (
    BudgetResult,
    DropProbe,
    DropSearch,
    RemovalOrder,
    bisect_max_drop,
    fit_budget,
    fit_latency,
    global_order,
    plan_from_counts,
    uniform_order,
)
from onnxprune.planning.cost import CostModel
from onnxprune.planning.plan import Plan, global_ranking, keep_every_tensor, uniform
from onnxprune.measure.fidelity import Fidelity, FidelityAccumulator
from onnxprune.measure.metrics import POINTS, TaskMetric
from onnxprune.measure.stats import ModelStats, model_bytes, model_stats
from onnxprune.report import build_report, metric_report
from onnxprune.errors import BadInputError, InvariantError, OnnxpruneError, PlanError
from onnxprune.analysis.core import Analysis, AnalysisOptions, group_to_dict
from onnxprune.analysis.driver import analyze_graph
from onnxprune.importance import score_groups
from onnxprune.importance.base import Evidence, Need, ScoringContext
from onnxprune.importance import default_criteria
from onnxprune.importance.taylor import collect_gradients
from onnxprune.progress import Progress, ProgressFn, Reporter
from onnxprune.spec import PruneSpec
from onnxprune.transform.surgery import CacheCut, cache_inputs_in_full, cut_channels, full_cache_inputs
from onnxprune.transform.depth import depth_io, original_io, without_removed_outputs

if TYPE_CHECKING:
    from onnxprune.data import DataSource
    from onnxprune.planning.sensitivity import Evaluator, SensitivityResult
    from onnxprune.quantize.stage import Judge, QuantizeResult
    from onnxprune.repair.reconstruct import ReconstructResult
    from onnxprune.runtime.device import DeviceChoice
    from onnxprune.runtime.session import Session
    from onnxprune.training.data import TrainData
    from onnxprune.training.losses import FeatureMatch
    from onnxprune.transform.depth import DepthResult

log = logging.getLogger(__name__)


@dataclass
class PruneResult:
    """What a prune job produced: the pruned model's path and the JSON-able report."""

    output_path: str
    report: dict[str, Any]


@dataclass
class PruneState:
    """Everything the stages pass along. Each stage reads what earlier ones set and adds its part."""

    model_path: str
    output_path: str
    spec: PruneSpec
    reporter: Reporter
    loaded: LoadedModel | None = None
    shapes: dict[str, list[int | str]] = field(default_factory=dict)
    graph: gs.Graph | None = None
    analysis: Analysis | None = None
    scores: dict[int, np.ndarray] = field(default_factory=dict)
    plan: Plan | None = None
    pruned: onnx.ModelProto | None = None
    fidelity: Fidelity | None = None
    device: str = "cpu"
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)
    teacher_path: str | None = None
    """The model fine-tuning distils from when the data has no labels (default: this run's input)."""
    device_choice: DeviceChoice | None = None
    """The resolved device, probed once and shared by every stage."""
    depth: DepthResult | None = None
    """``--depth``: the blocks removed and the model the width stages work on."""
    calib: CalibrationData | None = None
    """The calibration stream, opened once by the first stage that needs it."""
    evidence: Evidence = field(default_factory=Evidence)
    """Statistics the criterion asked for (calibration, gradients)."""
    original_stats: ModelStats | None = None
    budget: BudgetResult | None = None
    sparsity: dict[str, Any] | None = None
    reconstruct: ReconstructResult | None = None
    finetune: FinetuneSummary | None = None
    fidelity_data: str | None = None
    """Where the fidelity inputs came from, said plainly in the report (random inputs or calibration data)."""
    latency_speedup: float | None = None
    group_kept: dict[int, int] | None = None
    """Iterative runs: channels each group keeps in the final model (the plan of the last step is not it)."""
    score_always: bool = False
    """Score every group even when no cut is asked for (the sensitivity scan ranks channels itself)."""
    fidelity_random: bool = False
    """Fidelity was measured on random inputs: it says nothing about the task, and the report says so."""
    task: TaskMetric | None = None
    """``--eval-data``/``--metric``: the task metric on the evaluation data, with the original's value."""
    task_data: str | None = None
    """How the report names the evaluation data."""
    stage_metrics: list[StageMetric] = field(default_factory=list)
    """The task metric after each stage that changed the model (cut, reconstruct, fine-tune)."""
    measure_stages: bool = True
    """Measure after each model-changing stage (``--max-drop`` probes measure only their end result)."""
    scored: ScoredModel | None = None
    """The task metric of the model ``pruned`` holds, when measured (identity-checked before reuse)."""
    planner: Evaluator | None = None
    cache: dict[str, CacheCut] = field(default_factory=dict)
    """KV-cache inputs/outputs the cut shrank: verification feeds and compares them narrowed to the kept heads."""
    """What ranks channels by measurement (planning data and metric), built once when first needed."""
    max_drop: DropSearch | None = None
    """``--max-drop``: the budgets probed and the one chosen."""
    quantize: QuantizeResult | None = None
    """``--quantize``: the conversion, the layers left float and why, size and metric before/after."""

    @property
    def model(self) -> onnx.ModelProto:
        """The loaded input model: what the result is verified and reported against."""
        assert self.loaded is not None
        return self.loaded.model

    @property
    def working(self) -> onnx.ModelProto:
        """The model the width stages analyse, calibrate and cut: the input after ``--depth``, if any."""
        return self.depth.model if self.depth is not None else self.model


@dataclass(frozen=True)
class CalibrationData:
    """An opened calibration source and how the report names it."""

    source: DataSource
    description: str


@dataclass(frozen=True)
class StageMetric:
    """The task metric after one stage (higher is better)."""

    stage: str
    value: float


@dataclass(frozen=True)
class ScoredModel:
    """A model and its task metric, so the report does not measure the same model twice."""

    model: onnx.ModelProto
    value: float


@dataclass(frozen=True)
class FinetuneSummary:
    """What fine-tuning did, for the report."""

    steps: int
    loss: str
    lr: float
    batch_size: int
    metrics: dict[str, float]
    terms: dict[str, dict[str, Any]]
    """Per output: the loss term, the tensor it reads (the logits before a Softmax) and its class axis."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


Stage = Callable[[PruneState], None]


def analysis_shapes(model: onnx.ModelProto, shapes: dict[str, list[int]]) -> dict[str, list[int | str]]:
    """Tensor shapes for the analysis: onnx shape inference, completed by one onnxruntime run where it
    leaves dims unknown (Paddle exports, Reshape targets computed at run time), when the inputs allow a run."""
    from onnxprune.runtime.shapes import complete_shapes

    known = static_shapes(model, shapes)
    completed, why = complete_shapes(model, shapes, known)
    if why:
        log.debug("shapes left to inference: %s", why)
    return completed  # type: ignore[return-value]


def stage_load(state: PruneState) -> None:
    state.loaded = load_model(state.model_path)
    state.notes.extend(state.loaded.notes)


EVAL_BATCH = 64
"""Samples per onnxruntime run when measuring the task metric (models that fix their batch get theirs)."""


def metric_data(spec: PruneSpec) -> str | None:
    """Where the task metric is measured: ``--eval-data``, else ``--calib DATA`` when ``--metric`` is given
    (never random inputs: a metric on noise would decide nothing)."""
    if spec.eval_data:
        return spec.eval_data
    if spec.metric is not None and spec.real_calib:
        return spec.calib
    return None


def stage_measure(state: PruneState) -> None:
    """``--eval-data``/``--metric``: measure the original once, so each stage and the result compare with it
    (and a bad metric or data fails before any pruning work)."""
    spec = state.spec
    data = metric_data(spec)
    if data is None:
        return
    from onnxprune.data import fitted_batches, model_inputs, open_data

    source = open_data(data, model_inputs(state.model), shapes=spec.shapes, seed=spec.seed)
    labels = source.has_labels
    state.task = TaskMetric.create(_reference(state), lambda: fitted_batches(source, EVAL_BATCH, with_labels=labels),
                                   spec.metric_choice, has_labels=labels, device=_device(state))
    state.task_data = f"{data} ({state.task.samples} samples{', with labels' if labels else ''})"
    state.notes.extend(state.task.notes)


def _measured(name: str, stage: Stage) -> Stage:
    """``stage``, then the task metric of the model when the stage changed it (and a metric was asked for)."""

    def run(state: PruneState) -> None:
        before = state.pruned
        stage(state)
        if state.task is not None and state.measure_stages and state.pruned is not None and state.pruned is not before:
            value = _score(state)
            state.stage_metrics.append(StageMetric(name, value))

    run.__name__ = stage.__name__
    run.__doc__ = stage.__doc__
    return run


def _score(state: PruneState) -> float:
    """The task metric of ``state.pruned``, measured once per model."""
    assert state.task is not None and state.pruned is not None
    if state.scored is None or state.scored.model is not state.pruned:
        measured = full_cache_inputs(state.pruned, state.cache) if state.cache else state.pruned
        if state.depth is not None:
            measured = original_io(measured, state.model, state.depth.cache_io)
        state.scored = ScoredModel(state.pruned, state.task(measured).value)
    return state.scored.value


def stage_depth(state: PruneState) -> None:
    """``--depth K``: remove the K least important residual blocks; width pruning then works on the rest."""
    if state.spec.depth <= 0:
        return
    from onnxprune.transform import depth

    spec = state.spec
    result = depth.prune_depth(
        state.model, spec.depth, analysis_shapes(state.model, spec.shapes), calib=spec.calib,
        samples=min(spec.calib_samples, 16), input_shapes=spec.shapes, method=spec.depth_method, device=spec.device,
        seed=spec.seed,
    )
    state.depth = result
    state.notes.append("removed residual blocks " + ", ".join(f"{b.add} ({b.kind}, {b.importance:.3g})"
                                                              for b in result.removed))
    state.notes.extend(result.notes)


def stage_analyze(state: PruneState) -> None:
    state.shapes = analysis_shapes(state.working, state.spec.shapes)
    state.graph = gs.import_onnx(state.working)
    state.analysis = analyze_graph(state.graph, state.shapes, exclude=state.spec.exclude,
                                   options=AnalysisOptions(heads=state.spec.heads,
                                                           lm_stream=state.spec.prune_lm_hidden))
    if state.spec.granularity == "channel" and state.spec.depth == 0 and state.spec.ratio > 0:
        if not any(g.prunable for g in state.analysis.groups):
            reasons = sorted({r for g in state.analysis.groups for r in g.reasons})
            detail = f": {reasons[0]}" + (f" (and {len(reasons) - 1} more reasons)" if len(reasons) > 1 else "") if reasons else ""
            raise PlanError(f"the model has no prunable channel groups{detail}")


def _device(state: PruneState) -> DeviceChoice:
    """The job's resolved device (``DeviceChoice``), probed once and shared by every stage."""
    from onnxprune.runtime.device import select_device

    if state.device_choice is None:
        state.device_choice = select_device(state.spec.device)
    state.device = state.device_choice.name
    return state.device_choice


def _calibration_data(state: PruneState) -> CalibrationData:
    """The ``--calib`` stream (or random inputs), opened once per run by whichever stage needs it first."""
    from onnxprune.repair import calibration

    if state.calib is None:
        spec = state.spec
        source, what = calibration.open_calibration(state.model, spec.calib, spec.calib_samples, spec.shapes, spec.seed)
        state.calib = CalibrationData(source, what)
    return state.calib


def _reconstruct_report(result: ReconstructResult | None) -> dict[str, dict[str, float]] | None:
    if result is None:
        return None
    return {n: {"error_before": b, "error_after": a} for n, (b, a) in result.layers.items()}


def stage_calibrate(state: PruneState) -> None:
    """Open calibration data when the criterion or ``--reconstruct`` needs it; gather the criterion's statistics."""
    from onnxprune.repair import calibration

    assert state.graph is not None and state.analysis is not None
    spec = state.spec
    scoring = _scores_needed(state)
    needs = default_criteria().needs.get(spec.criterion, set()) if scoring else set()
    if not needs and not spec.reconstruct:
        return
    calib = _calibration_data(state)
    source, what = calib.source, calib.description
    if Need.GRADIENTS in needs:
        state.evidence.gradients = collect_gradients(state.working, source, device=_device(state),
                                                     reporter=state.reporter)
        state.notes.append(f"gradients for {spec.criterion} from {what}"
                           + ("" if source.has_labels else " with the model's own top-1 as labels"))
        needs = needs - {Need.GRADIENTS}
    if needs:
        stats = calibration.calibrate(
            state.working, state.graph, state.analysis, source, needs=needs, device=_device(state), seed=spec.seed,
            description=what, progress=lambda f, m: state.reporter("calibrate", f, m),
        )
        state.evidence.calibration = stats
        state.notes.extend(stats.notes)
        state.notes.append(f"calibrated on {what} with onnxruntime on {stats.device}")


def stage_score(state: PruneState) -> None:
    assert state.graph is not None and state.analysis is not None
    if not _scores_needed(state):
        return
    ctx = ScoringContext(state.graph, state.analysis, seed=state.spec.seed, evidence=state.evidence)
    state.scores = score_groups(ctx, state.spec.criterion, default_criteria())
    state.notes.extend(ctx.notes)


def _scores_needed(state: PruneState) -> bool:
    spec = state.spec
    wanted = state.score_always or spec.ratio > 0 or spec.uses_budget or spec.max_drop is not None
    return wanted and spec.granularity == "channel"


def stage_plan(state: PruneState) -> None:
    assert state.analysis is not None
    spec = state.spec
    if spec.granularity != "channel":
        state.plan = Plan()  # fine-grained: weights are zeroed in stage_cut, no channel goes
        return
    if spec.uses_budget:
        plan = _budget_plan(state)
    elif spec.global_ranking:
        measured = _measured_global_plan(state)
        plan = measured if measured is not None else global_ranking(state.analysis, state.scores, spec.ratio,
                                                                    spec.round_to)
    else:
        plan = uniform(state.analysis, state.scores, spec.ratio, spec.round_to)
    state.plan = keep_every_tensor(state.analysis, plan, state.scores)


def _planner(state: PruneState) -> Evaluator | None:
    """The evaluator budget planning, ``--global`` and ``--max-drop`` rank channels with: ``--metric`` when given,
    else accuracy when the data has labels, else top-1 agreement with the model before the cut; on at most
    ``--calib-samples`` samples of :attr:`PruneSpec.planning_data`."""
    from onnxprune.planning import sensitivity

    data = state.spec.planning_data
    if data is None:
        return None
    if state.planner is None:
        spec = state.spec
        state.planner = sensitivity.evaluator_for(state.working, data, spec.calib_samples, spec.shapes, _device(state),
                                                  spec.seed, metric=spec.metric_choice)
        state.notes.extend(state.planner.task.notes)
    return state.planner


def allocation_for(spec: PruneSpec) -> str:
    """The allocation rule ``--allocation auto`` stands for: ``measured`` when there is real data to measure on,
    else ``global`` (the scores).

    ``uniform`` is not the default although it reads best on PP-OCRv4 rec after reconstruction and 300 distillation
    steps (96.7 % of characters at 0.69 MACs against 96.1 % by the global ranking, 512 training lines): right after
    reconstruction measured reads better (75.3 % against 69.2 % at 0.70), and on the genai-builder Llama at 0.7
    params uniform cut the two layers' KV heads differently, which ``genai_config.json`` cannot describe.
    """
    if spec.allocation != "auto":
        return spec.allocation
    return "measured" if spec.planning_data is not None else "global"


def _removal_order(state: PruneState, cost: CostModel, metric: str, target: float) -> RemovalOrder:
    """Channels in the order they go, by :func:`allocation_for`: every group the same share, measured greedy
    allocation down to ``target`` on the planning data (:func:`_planner`), or the global ranking of the importance
    scores."""
    from onnxprune.planning import sensitivity

    assert state.analysis is not None
    spec = state.spec
    rule = allocation_for(spec)
    if rule == "uniform":
        return uniform_order(state.analysis, state.scores)
    if rule == "global":
        if spec.allocation == "auto" and spec.calib == "random":
            state.notes.append("allocation by importance scores: random calibration inputs cannot rank channels")
        return global_order(state.analysis, state.scores)
    evaluate = _planner(state)
    assert evaluate is not None  # measured: allocation_for and PruneSpec.validate saw real data to measure on
    order = sensitivity.budget_order(state.working, state.analysis, state.scores, cost, metric, target, evaluate,
                                     round_to=spec.round_to)
    state.notes.append(f"allocation measured by {evaluate.metric_name} on {spec.planning_data} "
                       f"({evaluate.samples} samples)")
    return order


def _cost_dimension(cost: CostModel) -> str:
    """MACs when the original's are known, else params (Paddle exports without ``--shape``)."""
    return "macs" if cost.base.macs else "params"


def _budget_plan(state: PruneState) -> Plan:
    """``--target-macs/params/latency``: the removal order (measured with data, else global ranking) cut at the
    shortest prefix that meets the budget."""
    from onnxprune.planning import sensitivity

    assert state.graph is not None and state.analysis is not None
    spec = state.spec
    cost = CostModel(state.graph, state.analysis, _original_stats(state))
    targets = {k: v for k, v in (("macs", spec.target_macs), ("params", spec.target_params)) if v is not None}
    metric, target = next(iter(targets.items())) if targets else ("macs", spec.target_latency or 1.0)
    order = _removal_order(state, cost, metric, target)
    if spec.target_latency is not None:
        measure = sensitivity.latency_measure(state.working, state.analysis, spec.device, spec.shapes or None)
        result = fit_latency(state.analysis, state.scores, cost, order, spec.target_latency, measure,
                                      spec.round_to)
    else:
        result = fit_budget(state.analysis, state.scores, cost, order, targets, spec.round_to)
    _record_budget(state, result)
    return result.plan


def _record_budget(state: PruneState, result: BudgetResult) -> None:
    state.budget = result
    state.notes.append("budget " + ", ".join(f"{k} {v:.4f} (target {result.targets.get(k)})"
                                             for k, v in result.achieved.items() if k in result.targets)
                       + f" by {result.strategy} allocation")


def _measured_global_plan(state: PruneState) -> Plan | None:
    """``--global`` with data: remove as much as the score ranking would (its MACs, or params), but choose where
    by measuring the metric (:func:`_removal_order`); None without data to measure on."""
    assert state.graph is not None and state.analysis is not None
    if state.spec.planning_data is None:
        return None
    spec = state.spec
    by_scores = global_ranking(state.analysis, state.scores, spec.ratio, spec.round_to)
    if not by_scores.total_removed:
        return by_scores
    cost = CostModel(state.graph, state.analysis, _original_stats(state))
    dimension = _cost_dimension(cost)
    target = cost.fraction(by_scores, dimension)
    order = _removal_order(state, cost, dimension, target)
    result = fit_budget(state.analysis, state.scores, cost, order, {dimension: target}, spec.round_to)
    state.notes.append(f"--global: channels chosen by measurement at the {dimension} the score ranking keeps "
                       f"({target:.4f})")
    _record_budget(state, result)
    return result.plan


MAX_DROP_PROBE_STEPS = 50
"""Fine-tuning steps a ``--max-drop`` probe takes at most (the final model gets ``--finetune-steps``)."""
MAX_DROP_PROBES = 7
"""Probes a ``--max-drop`` search runs at most (bisection from 1.0 down to the floor: about 0.9 / 2**7 apart)."""
MAX_DROP_TOLERANCE = 0.02
"""The search stops when the passing and failing budgets are this close (fractions of the original)."""
DROP_SLACK = 1e-9
"""Points of float rounding a drop may exceed ``--max-drop`` by (a drop of exactly X passes)."""


def stage_max_drop(state: PruneState) -> None:
    """``--max-drop X``: the most compressed MACs budget whose task metric, after repair, stays within X points.

    Bisection over the budget (:func:`onnxprune.planning.budget.bisect_max_drop`) on one removal order, so probes
    are nested; each probe cuts and repairs cheaply (``--reconstruct`` as asked, at most
    :data:`MAX_DROP_PROBE_STEPS` fine-tuning steps) and is measured on ``--eval-data``. The chosen budget then
    gets the full repair; if that model falls outside the drop, the passing probe's model is the result, so the
    result is never outside the drop on the evaluation data.

    Raises:
        PlanError: no probed budget stayed within the drop.
    """
    assert state.graph is not None and state.analysis is not None and state.task is not None
    spec, task, limit = state.spec, state.task, state.spec.max_drop
    assert limit is not None
    cost = CostModel(state.graph, state.analysis, _original_stats(state))
    dimension = _cost_dimension(cost)
    order = _removal_order(state, cost, dimension, 0.0)
    floor = cost.fraction(plan_from_counts(state.analysis, state.scores, order.counts(len(order)), spec.round_to),
                          dimension)
    probe_spec = dataclasses.replace(spec, finetune_steps=min(spec.finetune_steps, MAX_DROP_PROBE_STEPS))
    search = DropSearch(limit, task.label, dimension, task.baseline.value, floor, _repair_words(probe_spec),
                        _repair_words(spec))
    best: PruneState | None = None

    def probe(target: float) -> DropProbe:
        nonlocal best
        budget = fit_budget(state.analysis, state.scores, cost, order, {dimension: target}, spec.round_to)
        label = f"probe {len(search.probes) + 1} ({dimension} {budget.achieved[dimension]:.3f})"
        child = _repaired(state, probe_spec, budget, label, measure_stages=False)
        value = _score(child)
        drop = task.drop_points(value)
        result = DropProbe(target, budget.achieved[dimension], value, drop, drop <= limit + DROP_SLACK)
        search.probes.append(result)
        if result.passed and (best is None or search.chosen is None or result.achieved < search.chosen.achieved):
            best, search.chosen = child, result
        return result

    bisect_max_drop(probe, floor, tolerance=MAX_DROP_TOLERANCE, max_probes=MAX_DROP_PROBES)
    state.max_drop = search
    if best is None or search.chosen is None:
        tried = ", ".join(f"{p.achieved:.3f} dropped {p.drop:.2f}" for p in search.probes) or "none"
        raise PlanError(f"--max-drop {limit}: no budget kept {search.metric} within {limit} points "
                        f"({dimension} probed: {tried}); allow a larger drop or add repair (--reconstruct, "
                        "--finetune-steps)")
    _adopt(state, _final_within_drop(state, best, search))


def _final_within_drop(state: PruneState, best: PruneState, search: DropSearch) -> PruneState:
    """The chosen budget with the full repair, or the passing probe when the full repair is the same or falls
    outside the drop."""
    spec, task, limit = state.spec, state.task, state.spec.max_drop
    assert search.chosen is not None and best.budget is not None and task is not None and limit is not None
    if best.spec.finetune_steps == spec.finetune_steps:
        search.final_value = search.chosen.value
        return best
    final = _repaired(state, spec, best.budget, "final model", measure_stages=True)
    value = _score(final)
    search.full_repair_value = value
    if task.drop_points(value) <= limit + DROP_SLACK:
        search.final_value = value
        return final
    search.final_value, search.stepped_back = search.chosen.value, True
    best.notes.append(f"the fully repaired model fell {task.drop_points(value):.2f} points below the original, "
                      f"outside --max-drop {limit}: returning the passing probe's model")
    return best


def _repaired(state: PruneState, spec: PruneSpec, budget: BudgetResult, label: str, *,
              measure_stages: bool) -> PruneState:
    """A copy of ``state`` cut to ``budget`` and repaired as ``spec`` says (cut, reconstruct, fine-tune)."""
    assert state.analysis is not None
    reporter = Reporter(_labelled_progress(state.reporter.callback, "max-drop", label), state.reporter.cancel)
    child = dataclasses.replace(
        state, spec=spec, reporter=reporter, graph=gs.import_onnx(state.working), budget=budget,
        plan=keep_every_tensor(state.analysis, budget.plan, state.scores), pruned=None, scored=None, notes=[],
        timings={}, stage_metrics=[], reconstruct=None, finetune=None, measure_stages=measure_stages,
    )
    _run_stages(child, REPAIR_STAGES, finish=False)
    return child


def _adopt(state: PruneState, child: PruneState) -> None:
    """Take the chosen model and what made it from a :func:`_repaired` copy."""
    state.pruned, state.plan, state.scored = child.pruned, child.plan, child.scored
    state.reconstruct, state.finetune = child.reconstruct, child.finetune
    state.stage_metrics = child.stage_metrics
    state.notes.extend(child.notes)
    if child.budget is not None:
        _record_budget(state, child.budget)


def _repair_words(spec: PruneSpec) -> str:
    """The repair a probe or the final model gets, as the report names it."""
    parts = (["reconstruct"] if spec.reconstruct else []) + (
        ["BatchNorm refresh"] if spec.real_calib else []) + (
        [f"{spec.finetune_steps} fine-tuning steps"] if spec.finetune_steps else [])
    return ", ".join(parts) or "none"


def _labelled_progress(callback: ProgressFn | None, stage: str, label: str) -> ProgressFn | None:
    """Progress of a sub-run shown under ``stage`` with ``label`` in front of its messages."""
    if callback is None:
        return None
    return lambda ev: callback(Progress(stage, ev.fraction, f"{label}: {ev.message}"))


def stage_cut(state: PruneState) -> None:
    assert state.graph is not None and state.analysis is not None and state.plan is not None
    if state.spec.granularity != "channel":
        _sparsify(state)
        return
    summary = cut_channels(state.graph, state.analysis, state.plan.removed_classes(state.analysis))
    log.info("cut %d channels: %d tensors sliced, %d edits", state.plan.total_removed, summary.tensors_sliced, summary.edits)
    state.cache = summary.cache
    state.notes.extend(summary.notes)
    state.pruned = export_graph(state.graph, state.model)


def _sparsify(state: PruneState) -> None:
    """``--granularity element|N:M``: zero weights in place (shapes unchanged) and record the sparsity per layer."""
    from onnxprune.transform import sparsity

    assert state.graph is not None
    spec = state.spec
    amount = spec.sparsity if spec.sparsity is not None else (spec.ratio if spec.granularity == "element" else None)
    result = sparsity.sparsify(state.graph, spec.granularity, amount,
                               scope="global" if spec.global_ranking else "layer", exclude=spec.exclude)
    state.notes.extend(result.notes)
    if spec.uses_budget:
        state.notes.append("--target-macs/params/latency apply to channel pruning; zeroed weights keep MACs and shapes")
    state.sparsity = result.to_dict()
    state.pruned = export_graph(state.graph, state.model)
    stored = sparsity.to_sparse_initializers(state.pruned, min_saving=SPARSE_MIN_SAVING)
    if stored:
        # Shape inference types sparse initializers as sparse_tensor, which dense ops reject, so the full
        # check stops at the structural one here; stage_verify then runs the model in onnxruntime.
        check_model(state.pruned, full_check=False)
        state.sparsity["sparse_initializers"] = stored
        state.notes.append(f"{len(stored)} weights stored as ONNX sparse initializers (smaller than dense)")


SPARSE_MIN_SAVING = 0.1
"""A zeroed weight is stored sparse when that saves at least this share of its dense bytes."""


def stage_reconstruct(state: PruneState) -> None:
    """``--reconstruct``: refit the layers after the cut by least squares on the calibration data."""
    if not state.spec.reconstruct or state.plan is None or not state.plan.total_removed:
        return
    from onnxprune.repair import reconstruct as refit

    assert state.graph is not None and state.analysis is not None
    with cache_inputs_in_full(state.graph, state.cache):  # the calibration data is made for the original
        result = refit.reconstruct(
            state.working, state.graph, state.analysis, state.plan.removed_classes(state.analysis),
            _calibration_data(state).source, device=_device(state), seed=state.spec.seed,
            progress=lambda f, m: state.reporter("reconstruct", f, m),
        )
    state.notes.extend(result.notes)
    state.notes.append(f"reconstructed {len(result.layers)} layers on {_calibration_data(state).description}")
    state.reconstruct = result
    state.pruned = export_graph(state.graph, state.model)


BN_BATCH = 32
"""Samples per onnxruntime run when re-estimating BatchNorm statistics."""


def stage_refresh_bn(state: PruneState) -> None:
    """After a cut, give the BatchNorm nodes that remain the output statistics they had in the original, measured
    on ``--calib DATA`` (:func:`onnxprune.repair.batchnorm.refresh_batchnorm`).

    On by default when real calibration data is given (never random inputs: statistics of noise would replace
    trained ones), and kept only when it lowers the planning loss (metric drop plus KL or cross-entropy) on that
    data, so a cut that BatchNorm statistics cannot help is left as it was. Reported as a note (nodes, samples,
    losses, kept or undone), its time under ``timings_s`` and, with ``--metric``, a stage metric.
    """
    spec = state.spec
    changed = (state.plan is not None and state.plan.total_removed > 0) or state.depth is not None \
        or state.sparsity is not None
    if state.pruned is None or not changed or not spec.real_calib:
        return
    from onnxprune.repair import batchnorm, calibration

    calib = _calibration_data(state)
    result = batchnorm.refresh_batchnorm(state.pruned, lambda: calibration.stream(calib.source, BN_BATCH),
                                         reference=state.model, device=_device(state),
                                         progress=lambda f, m: state.reporter("refresh-bn", f, m))
    if not result.refreshed:
        if result.skipped:
            state.notes.append(result.summary())
        return
    judge, verdict = _planner(state), ""
    if judge is not None:
        before, after = judge(state.pruned)[1], judge(result.model)[1]
        verdict = f"; {judge.loss_name} {before:.4g} -> {after:.4g}: " + ("kept" if after <= before else "undone")
    state.notes.append(f"{result.summary()} from {calib.description}{verdict}")
    if not verdict.endswith("undone"):
        state.pruned = result.model


def stage_finetune(state: PruneState) -> None:
    """``--finetune-steps N --train-data DATA``: train the pruned model on onnxruntime.

    With ``labels`` in DATA the loss is cross-entropy; without, the pruned model distils from the
    original (``teacher_path`` in iterative runs, so every step learns from the unpruned model).
    """
    spec = state.spec
    if not spec.finetune_steps:
        return
    assert state.pruned is not None
    from onnxprune.training import FinetuneConfig, TrainData, apply_checkpoint, finetune

    data = TrainData.load(spec.train_data)
    teacher = load_model(state.teacher_path).model if state.teacher_path else state.model
    cache_io = state.depth.cache_io if state.depth is not None else {}
    # the data is made for the original: its cache names, and cache inputs with every head (a Gather keeps the cut's)
    student = original_io(full_cache_inputs(state.pruned, state.cache) if state.cache else state.pruned,
                          state.model, cache_io)
    features = (_distill_features(state, data, teacher, student)
                if data.labels is None and spec.feature_distill else ())
    config = FinetuneConfig(steps=spec.finetune_steps, lr=spec.lr, batch_size=spec.batch_size, seed=spec.seed,
                            progress_bar=False, features=features)
    teacher = without_removed_outputs(teacher, cache_io)
    result = finetune(student, data, config, teacher=teacher, device=_device(state), reporter=state.reporter)
    if state.cache:  # trained on a wrapper (renamed IO, cache Gathers): its weights go back into the cut model
        trained = {t.name: onnx.numpy_helper.to_array(t) for t in result.model.graph.initializer}
        state.pruned = export_checked(apply_checkpoint(state.pruned, trained))
    else:
        state.pruned = export_checked(depth_io(result.model, cache_io))
    how = "labels" if data.labels is not None else "distillation from the original model"
    metrics = {k: round(float(v), 6) for k, v in result.final_metrics.items()}
    terms = {t.output: {"term": t.kind.value, "reads": t.tensor, "class_axis": t.class_axis,
                        "output_kind": t.semantics.kind.value} for t in result.loss_terms}
    state.finetune = FinetuneSummary(steps=spec.finetune_steps, loss=how, lr=spec.lr, batch_size=spec.batch_size,
                                     metrics=metrics, terms=terms)
    state.notes.append(f"fine-tuned {spec.finetune_steps} steps with {how}")
    if result.final_metrics.get("best_step") == 0:
        state.notes.append("fine-tuning never lowered the held-out loss below the starting model's: the starting "
                           "weights were kept (try a lower --lr)")


QUANT_BATCH = 32
"""Samples per calibration run of static INT8 (models that fix their batch get theirs)."""


def stage_quantize(state: PruneState) -> None:
    """``--quantize int8|int8-dynamic|fp16``: the final compression, after fine-tuning and before verify
    (:mod:`onnxprune.quantize`: onnxruntime's quantizer and float16 converter).

    The metric is measured before and after (``--eval-data``/``--metric``, else top-1 agreement with the FP32
    model on ``--calib DATA``); with a limit (:func:`_quant_limit`) the accuracy guard keeps the most sensitive
    layers in float until the drop is within it.
    """
    spec = state.spec
    if spec.quantize == "none":
        return
    assert state.pruned is not None
    from onnxprune.quantize.convert import QuantizeOptions
    from onnxprune.quantize.stage import quantize
    from onnxprune.repair import calibration

    calib = _calibration_data(state) if spec.real_calib else None
    batches = (lambda: calibration.stream(calib.source, QUANT_BATCH)) if calib else None
    judge = _quant_judge(state, calib)
    options = QuantizeOptions(spec.quantize, spec.quant_calibration, tuple(spec.quant_exclude), spec.keep_io_types)
    fp32 = state.pruned
    result = quantize(fp32, options, batches=batches, calibration_data=calib.description if calib else None,
                      judge=judge, limit_points=_quant_limit(state, judge))
    state.pruned = result.model
    if state.task is not None and result.metric is not None:
        state.scored = ScoredModel(result.model, result.metric.after)  # measured by the judge: not again
    if spec.bench:
        result.latency = _quant_bench(state, fp32, result.model)
    state.quantize = result
    state.notes.extend(result.notes)
    floats = f", {len(result.kept_float)} weighted layers left float" if result.kept_float else ""
    state.notes.append(f"quantized {spec.quantize}: {result.bytes_before} -> {result.bytes_after} bytes{floats}")


def _quant_judge(state: PruneState, calib: CalibrationData | None) -> Judge | None:
    """The task metric (``--eval-data``) on the FP32 input and the quantized model, else top-1 agreement with the
    FP32 input on the calibration data; None without real data."""
    from onnxprune.quantize.stage import Judge
    from onnxprune.repair import calibration

    assert state.pruned is not None
    task = state.task
    if task is not None:
        return Judge(lambda m: task(m).value, task.label, state.task_data or "", _score(state))
    if calib is None:
        return None
    agree = TaskMetric.create(state.pruned, lambda: calibration.stream(calib.source, EVAL_BATCH), None,
                              has_labels=False, device=_device(state))
    return Judge(lambda m: agree(m).value, agree.label, f"calibration data {calib.description} (against the FP32 "
                 "model)", agree.baseline.value)


def _quant_limit(state: PruneState, judge: Judge | None) -> float | None:
    """Points quantization may lose: ``--quant-max-drop`` against its FP32 input, and with ``--max-drop`` what is
    left of that budget after pruning (so the result stays within ``--max-drop`` of the original)."""
    spec = state.spec
    limits = [spec.quant_max_drop] if spec.quant_max_drop is not None else []
    if spec.max_drop is not None and state.task is not None and judge is not None:
        limits.append(max(0.0, spec.max_drop - state.task.drop_points(judge.before)))
    return min(limits) if limits else None


def _quant_bench(state: PruneState, fp32: onnx.ModelProto, quantized: onnx.ModelProto) -> dict[str, Any]:
    """``--bench``: the FP32 input against the quantized model (batch 1, interleaved); INT8 on CPU, where its
    kernels are, FP16 on the job's device."""
    from onnxprune.measure import bench

    device = "cpu" if state.spec.quantize.startswith("int8") else _device(state)
    result = bench.compare(fp32, quantized, device=device, batch=1, runs=50, shapes=state.spec.shapes or None,
                           seed=state.spec.seed)
    return {"provider": result.b.provider, "batch": 1, "fp32_p50_ms": result.a.p50_ms,
            "quantized_p50_ms": result.b.p50_ms, "speedup": round(result.speedup, 4)}


def _quantize_report(state: PruneState, latency: dict[str, Any] | None) -> dict[str, Any] | None:
    """The ``quantize`` section, with size, metric and (``--bench``) p50 latency of the original, the pruned FP32
    and the quantized model."""
    q = state.quantize
    if q is None:
        return None
    out = q.to_dict()
    task = state.task if q.metric is not None and state.task is not None else None
    metric = q.metric
    out["stages"] = [
        {"stage": "original", "bytes": _original_stats(state).bytes, "metric": task.baseline.value if task else None},
        {"stage": "pruned", "bytes": q.bytes_before, "metric": metric.before if metric else None},
        {"stage": "quantized", "bytes": q.bytes_after, "metric": metric.after if metric else None},
    ]
    if latency is not None and q.latency is not None:  # the FP32/quantized pair was timed in its own run
        for stage, value in zip(out["stages"], (latency["original"]["p50"], q.latency["fp32_p50_ms"],
                                                q.latency["quantized_p50_ms"]), strict=True):
            stage["latency_p50_ms"] = value
    return out


def _distill_features(state: PruneState, data: TrainData, teacher: onnx.ModelProto, student: onnx.ModelProto
                      ) -> tuple[FeatureMatch, ...]:
    """Block and stage outputs ``student`` (the pruned model reading the data's inputs) distils from the original
    besides its outputs (:func:`onnxprune.training.features.choose_features`); channel-matched only against the
    model the plan was made on (an iterative run's teacher is the unpruned original, whose channels the plan does
    not index)."""
    from onnxprune.training.features import choose_features

    same_model = teacher is state.model
    shapes = {name: [1, *value.shape[1:]] for name, value in data.inputs.items()}
    found = choose_features(teacher, student, shapes, analysis=state.analysis if same_model else None,
                            plan=state.plan if same_model else None)
    if found:
        state.notes.append("distilled intermediate features too: " + ", ".join(
            m.tensor + ("" if m.keep is None else f" ({len(m.keep)} kept channels)") for m in found))
    return tuple(found)


def _reference(state: PruneState) -> str:
    """The original model for onnxruntime: its own file, so the loaded copy is not serialised again."""
    return state.model_path


def stage_verify(state: PruneState) -> None:
    """Run both models in onnxruntime on the same inputs: every output keeps its shape, and the first
    output's fidelity is measured over the ``--calib`` data when given, else one batch of random inputs."""
    from onnxprune.runtime.session import make_session

    assert state.pruned is not None
    batches = _fidelity_batches(state)
    choice = _device(state)
    candidate = state.quantize.measurable if state.quantize is not None else state.pruned  # FP16 IO: cast
    unchecked = ops_without_schema(candidate)
    if batches is None:
        if unchecked:  # no inputs to run on, but onnxruntime's load still checks the ops onnx.checker cannot
            with _pruned_session(candidate, choice):
                pass
            state.notes.append(_unchecked_note(unchecked, "loaded the pruned model (not run: no inputs to draw)"))
        return
    compared = FidelityAccumulator(class_axis=_class_axis(state))
    cache_io = state.depth.cache_io if state.depth is not None else {}
    with make_session(_reference(state), choice) as ref, _pruned_session(candidate, choice) as cand:
        names = cand.output_names
        if names != [n for n in (cache_io.get(o, o) for o in ref.output_names) if n is not None]:
            raise InvariantError(f"the pruned model's outputs {names} differ from the original's {ref.output_names}")
        for feeds in batches:
            a = ref.run(feeds)
            b = cand.run(_narrow_cache(_renamed(feeds, cache_io), state.cache))
            a = _narrow_cache(_renamed(a, cache_io), state.cache)
            for name in names:
                if a[name].shape != b[name].shape:
                    raise InvariantError(f"output {name} changed shape from {a[name].shape} to {b[name].shape}")
            compared.add(a[names[0]], b[names[0]])
    state.fidelity = compared.result()
    if unchecked:
        state.notes.append(_unchecked_note(unchecked, "loaded and ran the pruned model"))


def _unchecked_note(ops: list[str], done: str) -> str:
    """The report's note on ops that onnx.checker has no schema for (:func:`onnxprune.io.shapes.check_model`)."""
    return (f"verification via onnxruntime for {', '.join(ops)}: onnx.checker has no schema for "
            f"{'this op' if len(ops) == 1 else 'these ops'} and checked the rest of the graph; onnxruntime {done}")


def _class_axis(state: PruneState) -> int | None:
    """The first output's class axis when the task metric found it (fidelity's own default otherwise)."""
    layout = state.task.layout if state.task is not None else None
    return layout.class_axis if layout is not None and layout.class_span == 1 else None


def _renamed(values: dict[str, np.ndarray], cache_io: dict[str, str | None]) -> dict[str, np.ndarray]:
    """The original model's feeds or outputs under the names ``--depth`` left (its removed cache IO dropped)."""
    return {new: v for name, v in values.items() if (new := cache_io.get(name, name)) is not None}


def _narrow_cache(values: dict[str, np.ndarray], cache: dict[str, CacheCut]) -> dict[str, np.ndarray]:
    """The original model's feeds or outputs as the cut model reads or writes them (its cache keeps fewer heads)."""
    return {name: cache[name].narrow(v) if name in cache else v for name, v in values.items()}


def _narrow_cache_shapes(shapes: dict[str, list[int]] | None, cache: dict[str, CacheCut]) -> dict[str, list[int]] | None:
    """``--shape`` of the cut model: its cache inputs hold only the kept heads."""
    if not shapes or not cache:
        return shapes
    return {name: [len(cache[name].kept) if name in cache and k == cache[name].axis else d for k, d in enumerate(dims)]
            for name, dims in shapes.items()}


def _pruned_session(model: onnx.ModelProto, choice: DeviceChoice) -> Session:
    """A session for the model we produced: if onnxruntime refuses it, that is our bug, not the user's input.

    Raises:
        InvariantError: onnxruntime cannot load the pruned model.
    """
    from onnxprune.runtime.session import make_session

    try:
        return make_session(model, choice)
    except BadInputError as e:
        raise InvariantError(f"onnxruntime cannot load the pruned model: {e}") from e


def _fidelity_batches(state: PruneState) -> Iterable[dict[str, np.ndarray]] | None:
    """The feeds verification runs: the calibration data, else the evaluation data, else random inputs (``--calib
    random``, or one random batch; None, with a note, when they cannot be drawn, e.g. symbolic dims without
    ``--shape``)."""
    from onnxprune.data import model_inputs, open_data
    from onnxprune.repair import calibration
    from onnxprune.runtime.feeds import random_inputs

    spec = state.spec
    if spec.real_calib:
        calib = _calibration_data(state)
        state.fidelity_data = f"calibration data {calib.description}"
        return calibration.stream(calib.source, 64)
    if spec.eval_data:
        source = open_data(spec.eval_data, model_inputs(state.model), limit=spec.calib_samples, shapes=spec.shapes,
                           seed=spec.seed)
        state.fidelity_data = f"evaluation data {spec.eval_data} ({source.count()} samples)"
        return calibration.stream(source, 64)
    if spec.calib:
        calib = _calibration_data(state)
        state.fidelity_data, state.fidelity_random = f"calibration data {calib.description}", True
        return calibration.stream(calib.source, 64)
    try:
        feeds = random_inputs(state.model, spec.shapes, batch=spec.fidelity_samples, seed=spec.seed)
    except BadInputError as e:
        state.notes.append(f"fidelity not measured: {e}")
        return None
    state.fidelity_data, state.fidelity_random = f"random inputs ({spec.fidelity_samples} samples)", True
    return [feeds]


def stage_save(state: PruneState) -> None:
    """Write the model, and an updated ``genai_config.json`` when the input came with one."""
    assert state.pruned is not None
    save_model(state.pruned, state.output_path)
    genai = write_genai_config(state.model_path, state.pruned, state.output_path)
    if genai is not None:
        state.notes.append(genai.note())


def _original_stats(state: PruneState) -> ModelStats:
    """Params/MACs/bytes of the input model, computed once (the budget plan and the report both need them)."""
    if state.original_stats is None:
        state.original_stats = model_stats(state.model, state.spec.shapes or None)
    return state.original_stats


def stage_report(state: PruneState) -> None:
    assert state.analysis is not None and state.pruned is not None and state.plan is not None
    shapes = state.spec.shapes or None
    original = _original_stats(state)
    pruned = _result_stats(state, _narrow_cache_shapes(shapes, state.cache))
    kept = state.group_kept or {}
    groups = [group_to_dict(g, kept.get(g.id, state.plan.kept(g))) for g in state.analysis.groups]
    latency = _bench(state) if state.spec.bench else None
    state.report = build_report(
        original, pruned, groups, state.fidelity, state.spec.criterion, state.device, latency=latency,
        extra={"budget": state.budget.to_dict() if state.budget else None, "sparsity": state.sparsity,
               "latency_speedup": state.latency_speedup,
               "depth": state.depth.to_dict() if state.depth else None,
               "notes": state.notes, "spec": state.spec.to_dict(), "timings_s": state.timings,
               "fidelity_data": state.fidelity_data, "fidelity_from_random": state.fidelity_random,
               "metric": _metric_report(state),
               "max_drop": state.max_drop.to_dict() if state.max_drop else None,
               "reconstruct": _reconstruct_report(state.reconstruct),
               "finetune": state.finetune.to_dict() if state.finetune else None,
               "quantize": _quantize_report(state, latency),
               "cache": {name: cut.shape for name, cut in state.cache.items()} or None},
    )


def _result_stats(state: PruneState, shapes: dict[str, list[int]] | None) -> ModelStats:
    """Params, MACs and layers of the result; after ``--quantize`` those of its FP32 input (a quantized graph
    moves weights into Dequantize nodes, and counts the same MACs) with the bytes of the written quantized file."""
    assert state.pruned is not None
    if state.quantize is None:
        return model_stats(state.pruned, shapes)
    return dataclasses.replace(model_stats(state.quantize.source, shapes), bytes=model_bytes(state.pruned))


def _metric_report(state: PruneState) -> dict[str, Any] | None:
    """The task metric of the original, after each model-changing stage, and of the result."""
    if state.task is None or state.pruned is None:
        return None
    task = state.task
    shown = (task.shown.label, task.shown.convert) if task.shown is not None else None
    return metric_report(task.label, str(task.choice), state.task_data or "", task.baseline.value, _score(state),
                         [(m.stage, m.value) for m in state.stage_metrics], points=POINTS, shown=shown)


def _bench(state: PruneState) -> dict[str, Any]:
    """``--bench``: original and pruned latency (ms, batch 1) measured interleaved in one run."""
    from onnxprune.measure import bench

    assert state.pruned is not None
    result = bench.compare(state.model, state.pruned, device=state.spec.device, batch=1, runs=50,
                           shapes=state.spec.shapes or None, seed=state.spec.seed)
    state.latency_speedup = round(result.speedup, 4)
    pick = ("p50_ms", "p90_ms", "p99_ms", "mean_ms", "throughput_per_s", "provider")
    return {"original": {k.removesuffix("_ms"): getattr(result.a, k) for k in pick},
            "pruned": {k.removesuffix("_ms"): getattr(result.b, k) for k in pick}}


PREPARE_STAGES: list[tuple[str, Stage]] = [
    ("load", stage_load),
    ("measure", stage_measure),
    ("depth", stage_depth),
    ("analyze", stage_analyze),
    ("calibrate", stage_calibrate),
    ("score", stage_score),
]
REPAIR_STAGES: list[tuple[str, Stage]] = [
    ("cut", _measured("cut", stage_cut)),
    ("reconstruct", _measured("reconstruct", stage_reconstruct)),
    ("refresh-bn", _measured("refresh-bn", stage_refresh_bn)),
    ("finetune", _measured("finetune", stage_finetune)),
]
FINISH_STAGES: list[tuple[str, Stage]] = [
    ("quantize", _measured("quantize", stage_quantize)),
    ("verify", stage_verify),
    ("save", stage_save),
    ("report", stage_report),
]
STAGES: list[tuple[str, Stage]] = PREPARE_STAGES + [("plan", stage_plan)] + REPAIR_STAGES + FINISH_STAGES
MAX_DROP_STAGES: list[tuple[str, Stage]] = PREPARE_STAGES + [("max-drop", stage_max_drop)] + FINISH_STAGES
"""``--max-drop``: the search stage plans, cuts and repairs (probes, then the chosen budget) in place of
plan → cut → reconstruct → fine-tune."""


def _run_stages(state: PruneState, stages: list[tuple[str, Stage]], *, finish: bool = True) -> None:
    for k, (name, fn) in enumerate(stages):
        state.reporter(name, 0.0, f"{name} ({k + 1}/{len(stages)})")  # fraction is within the stage
        t0 = time.perf_counter()
        try:
            fn(state)
        except OnnxpruneError:
            raise
        except Exception as e:
            raise OnnxpruneError(f"stage '{name}' failed unexpectedly: {type(e).__name__}: {e}") from e
        state.timings[name] = round(time.perf_counter() - t0, 4)
    if finish:
        state.reporter("done", 1.0, "done")


def prune(
    model_path: str | os.PathLike[str],
    output_path: str | os.PathLike[str],
    spec: PruneSpec | None = None,
    *,
    progress: ProgressFn | None = None,
    cancel: threading.Event | None = None,
) -> PruneResult:
    """Prune ``model_path`` according to ``spec`` and write the result to ``output_path``.

    Raises:
        BadInputError: unreadable model or invalid options.
        PlanError: nothing in the model can be pruned as asked.
        InvariantError: the result failed verification (nothing is written then).
        CancelledError: ``cancel`` was set; stops at the next stage boundary.

    Example:
        >>> result = prune("examples/digits_cnn.onnx", "small.onnx", PruneSpec(ratio=0.5))
        >>> result.report["pruned"]["params"] < result.report["original"]["params"]
        True
    """
    spec = (spec or PruneSpec()).validate()
    if spec.iterations > 1:
        return _prune_iteratively(os.fspath(model_path), os.fspath(output_path), spec, progress, cancel)
    state = PruneState(os.fspath(model_path), os.fspath(output_path), spec, Reporter(progress, cancel))
    _run_stages(state, MAX_DROP_STAGES if spec.max_drop is not None else STAGES)
    return PruneResult(output_path=state.output_path, report=state.report)


def step_spec(spec: PruneSpec, k: int) -> PruneSpec:
    """Options of iteration ``k`` (0-based) of ``spec.iterations``: each removes the same share of what is left.

    Keeping ``q = (1 - ratio) ** (1 / K)`` per step keeps ``1 - ratio`` after K steps; budgets likewise
    shrink by their K-th root per step. Depth pruning happens in the first step only.
    """
    n = spec.iterations
    root = (lambda t: None if t is None else t ** (1.0 / n))
    return dataclasses.replace(
        spec, iterations=1, ratio=1.0 - (1.0 - spec.ratio) ** (1.0 / n), depth=spec.depth if k == 0 else 0,
        target_macs=root(spec.target_macs), target_params=root(spec.target_params),
        target_latency=root(spec.target_latency), bench=False,
    )


def _prune_iteratively(model_path: str, output_path: str, spec: PruneSpec, progress: ProgressFn | None,
                       cancel: threading.Event | None) -> PruneResult:
    """Prune a little, fine-tune, repeat (``--iterations K``); the report compares the final model with the original."""
    if spec.granularity != "channel":
        raise BadInputError("--iterations applies to channel pruning, not --granularity " + spec.granularity,
                            field="iterations")
    n = spec.iterations
    steps: list[dict[str, Any]] = []
    first: PruneState | None = None
    out_dir = os.path.dirname(os.path.abspath(output_path))
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".onnxprune-steps-", dir=out_dir) as tmp:
        src = model_path
        for k in range(n):
            out = output_path if k == n - 1 else os.path.join(tmp, f"step{k + 1}.onnx")
            reporter = Reporter(_step_progress(progress, k, n), cancel)
            state = PruneState(src, out, step_spec(spec, k), reporter, teacher_path=model_path)
            _run_stages(state, STAGES)
            first = first or state
            r = state.report
            steps.append({"iteration": k + 1, "ratio": round(state.spec.ratio, 6), "params": r["pruned"]["params"],
                          "macs": r["pruned"]["macs"], "fidelity_vs_previous": r.get("fidelity"),
                          "finetune": r.get("finetune"), "metric_vs_previous": r.get("metric")})
            src = out
    assert first is not None
    final = PruneState(model_path, output_path, spec, Reporter(progress, cancel), analysis=first.analysis)
    stage_load(final)
    final.pruned = onnx.load(output_path)
    final.plan = Plan()
    final.group_kept = _kept_channels(first, final.pruned)
    final.notes.append(f"pruned in {n} iterations of ratio {steps[0]['ratio']:.4f} each")
    _run_stages(final, [("measure", stage_measure), ("verify", stage_verify), ("report", stage_report)])
    final.report["iterations"] = steps
    return PruneResult(output_path=output_path, report=final.report)


def _step_progress(progress: ProgressFn | None, k: int, n: int) -> ProgressFn | None:
    if progress is None:
        return None
    # Fractions stay within their stage (Progress's contract); the iteration goes into the message.
    return lambda ev: progress(Progress("iteration" if ev.stage == "done" else ev.stage,
                                        1.0 if ev.stage == "done" else ev.fraction,
                                        f"iteration {k + 1}/{n}: {ev.message}"))


def _kept_channels(first: PruneState, final_model: onnx.ModelProto) -> dict[int, int]:
    """Channels each group of the first analysis still has in the final model (read from inferred shapes)."""
    assert first.analysis is not None and first.graph is not None
    shapes = static_shapes(final_model, first.spec.shapes)
    outputs = {n.name: n.outputs[0].name for n in first.graph.nodes if n.outputs}
    kept: dict[int, int] = {}
    for g in first.analysis.groups:
        tensor = outputs.get(g.producers[0]) if g.producers else None
        m = first.analysis.maps.get(tensor) if tensor else None
        dims = shapes.get(tensor) if tensor else None
        if m is not None and dims is not None and isinstance(dims[m.axis], int):
            kept[g.id] = int(dims[m.axis])
    return kept


def analyze(
    model_path: str | os.PathLike[str],
    shapes: dict[str, list[int]] | None = None,
    exclude: list[str] | None = None,
) -> dict[str, Any]:
    """Return the dependency groups of a model as JSON-able data (what ``onnxprune analyze --json`` prints).

    Raises:
        BadInputError: the model cannot be read.
    """
    spec = PruneSpec(shapes=dict(shapes or {}), exclude=list(exclude or []), ratio=0.0).validate()
    state = PruneState(os.fspath(model_path), "", spec, Reporter())
    stage_load(state)
    stage_analyze(state)
    assert state.analysis is not None
    result = state.analysis.to_dict()
    result["model"] = os.path.basename(state.model_path)
    result["removable_blocks"] = _removable_blocks(state)
    result["notes"] = state.notes + result["notes"]
    return result


def _removable_blocks(state: PruneState) -> list[dict[str, Any]]:
    """The residual blocks ``--depth`` could remove (importance is measured only when pruning)."""
    from onnxprune.transform import depth

    assert state.graph is not None  # the graph stage_analyze imported; finding blocks only reads it
    return [b.to_dict() for b in depth.find_residual_blocks(state.graph, state.shapes)]


def sensitivity(
    model_path: str | os.PathLike[str],
    spec: PruneSpec,
    *,
    progress: ProgressFn | None = None,
    cancel: threading.Event | None = None,
) -> SensitivityResult:
    """Prune each group alone at a sweep of ratios and measure the damage: the task metric on ``spec.eval_data``
    when given, else on ``spec.calib`` (accuracy with labels, else top-1 agreement with the original).

    The model goes through the pipeline's own load, analyze, calibrate and score stages, so
    ``--exclude``, ``--heads``, ``--shape`` and data-driven criteria mean what they mean for ``prune``.

    Raises:
        BadInputError: unreadable model or data.
        PlanError: nothing in the model can be pruned.
    """
    from onnxprune.planning import sensitivity as scan

    state = PruneState(os.fspath(model_path), "", spec.validate(), Reporter(progress, cancel), score_always=True)
    _run_stages(state, [("load", stage_load), ("analyze", stage_analyze), ("calibrate", stage_calibrate),
                        ("score", stage_score)])
    assert state.graph is not None and state.analysis is not None
    if not state.scores:
        raise PlanError("the model has no prunable channel groups (see `onnxprune analyze`)")
    evaluate = _planner(state) or scan.evaluator_for(state.working, spec.calib or "random", spec.calib_samples,
                                                     spec.shapes, _device(state), spec.seed)
    result = scan.scan(state.model, state.analysis, state.scores, evaluate, criterion=spec.criterion,
                       cost=CostModel(state.graph, state.analysis, _original_stats(state)))
    result.notes.extend(state.notes)
    return result


run = prune
