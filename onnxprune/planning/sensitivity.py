"""Sensitivity analysis: prune each group alone at a sweep of ratios and measure what it costs.

The curves answer "which layers can lose channels cheaply?": they are saved as JSON, drawn one curve
per group (the usual sensitivity chart), and feed :func:`onnxprune.planning.budget.sensitivity_order`, which
prunes the groups that are cheap to lose and expensive to keep first.

Two numbers per point: ``metric`` (what a person reads: accuracy when the data has labels, else top-1
agreement with the original, else cosine similarity) and ``loss`` (what the allocation uses: the mean
cross-entropy increase with labels, else the KL divergence from the original's outputs, else
1 - cosine). The loss is smooth where accuracy moves in steps of one sample, so small calibration sets
still rank groups.

Example:
    >>> evaluator = Evaluator.from_data(model, batches, labels, device="cpu")
    >>> result = scan(model, analysis, scores, evaluator)
    >>> result.save("sens.json"); plot(result, "sens.png")
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxprune.io.export import export_graph
from onnxprune.analysis.core import Analysis
from onnxprune.errors import BadInputError, OnnxpruneError
from onnxprune.planning.budget import RemovalOrder, greedy_order
from onnxprune.planning.cost import CostModel
from onnxprune.planning.plan import Plan, feasible_removal, lowest
from onnxprune.transform.surgery import cut_channels

log = logging.getLogger(__name__)


DEFAULT_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


@dataclass
class Point:
    """One group pruned alone at one ratio. ``macs``/``params``: fractions of the original model."""

    ratio: float
    removed: int
    metric: float
    loss: float
    macs: float | None = None
    params: float | None = None


@dataclass
class GroupCurve:
    """The sweep of one group."""

    group: int
    producers: list[str]
    channels: int
    points: list[Point] = field(default_factory=list)

    @property
    def label(self) -> str:
        first = self.producers[0] if self.producers else f"group {self.group}"
        more = f" +{len(self.producers) - 1}" if len(self.producers) > 1 else ""
        return f"{self.group}: {first}{more}"


@dataclass
class SensitivityResult:
    """Every group's curve plus what was measured (the JSON ``onnxprune sensitivity`` writes)."""

    metric: str
    loss: str
    baseline: float
    samples: int
    criterion: str
    ratios: list[float]
    groups: list[GroupCurve]
    curves: int = 0
    notes: list[str] = field(default_factory=list)

    def curves_for_plan(self) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """``{group id: (ratios, loss)}`` as :func:`onnxprune.planning.budget.sensitivity_order` takes them."""
        return {
            c.group: (np.array([p.ratio for p in c.points]), np.array([p.loss for p in c.points]))
            for c in self.groups if c.points
        }

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SensitivityResult:
        """Rebuild a result from its JSON form.

        Raises:
            BadInputError: keys are missing.
        """
        try:
            groups = [GroupCurve(g["group"], list(g["producers"]), g["channels"], [Point(**p) for p in g["points"]])
                      for g in data["groups"]]
            fields = {k: data[k] for k in ("metric", "loss", "baseline", "samples", "criterion", "ratios")}
        except (KeyError, TypeError) as e:
            raise BadInputError(f"not a sensitivity result: missing {e}", field="sensitivity") from e
        return cls(groups=groups, curves=int(data.get("curves", 0)), notes=list(data.get("notes", [])), **fields)

    def save(self, path: str | os.PathLike[str]) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SensitivityResult:
        with open(path) as f:
            return cls.from_dict(json.load(f))


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


class Evaluator:
    """Runs candidate models on fixed batches and scores them against the original (or labels).

    Build it with :meth:`from_data`; calling it with a model returns ``(metric, loss)``.
    """

    def __init__(self, batches: list[dict[str, np.ndarray]], labels: np.ndarray | None, device: Any,
                 reference: list[np.ndarray]) -> None:
        self.batches = batches
        self.labels = labels
        self.device = device
        self.reference = np.concatenate([r.reshape(r.shape[0], -1) for r in reference]).astype(np.float64)
        self.classes = all(r.ndim == 2 and r.shape[1] >= 2 for r in reference)
        if labels is not None and not self.classes:
            raise BadInputError("labels need a model whose first output is class scores [N, K]", field="calib")
        if self.labels is not None:
            self.metric_name, self.loss_name = "accuracy", "cross_entropy_increase"
        elif self.classes:
            self.metric_name, self.loss_name = "top1_agreement", "kl"
        else:
            self.metric_name, self.loss_name = "cosine", "one_minus_cosine"
        self.samples = int(self.reference.shape[0])
        self._ref_ce = self._ce(self.reference) if labels is not None else 0.0
        self.baseline, _ = self.score(self.reference)

    @classmethod
    def from_data(cls, model: onnx.ModelProto, batches: Sequence[dict[str, np.ndarray]],
                  labels: np.ndarray | None = None, device: Any = "auto") -> Evaluator:
        """Run the original on ``batches`` once; later candidates are compared with these outputs."""
        from onnxprune.runtime.device import select_device

        if not batches:
            raise BadInputError("sensitivity needs at least one calibration sample", field="calib")
        batches = list(batches)
        choice = select_device(device) if isinstance(device, str) else device
        return cls(batches, labels, choice, _run(model, batches, choice))

    def _ce(self, out: np.ndarray) -> float:
        assert self.labels is not None
        p = np.clip(_softmax(out), 1e-12, None)
        return float(-np.mean(np.log(p[np.arange(len(self.labels)), self.labels])))

    def score(self, out: np.ndarray) -> tuple[float, float]:
        """``(metric, loss)`` of outputs [N, ...] against the labels or the reference."""
        if self.labels is not None:
            return float(np.mean(out.argmax(axis=1) == self.labels)), max(0.0, self._ce(out) - self._ref_ce)
        if self.classes:
            p, q = np.clip(_softmax(self.reference), 1e-12, None), np.clip(_softmax(out), 1e-12, None)
            kl = float(np.mean((p * (np.log(p) - np.log(q))).sum(axis=1)))
            return float(np.mean(out.argmax(axis=1) == self.reference.argmax(axis=1))), kl
        dot = (out * self.reference).sum(axis=1)
        norms = np.linalg.norm(out, axis=1) * np.linalg.norm(self.reference, axis=1)
        cos = float(np.mean(np.where(norms > 0, dot / np.where(norms > 0, norms, 1.0), 1.0)))
        return cos, 1.0 - cos

    def __call__(self, model: onnx.ModelProto) -> tuple[float, float]:
        outs = _run(model, self.batches, self.device)
        return self.score(np.concatenate([o.reshape(o.shape[0], -1) for o in outs]).astype(np.float64))


def _run(model: onnx.ModelProto, batches: list[dict[str, np.ndarray]], device: Any) -> list[np.ndarray]:
    from onnxprune.runtime.session import make_session

    with make_session(model, device) as session:
        name = session.output_names[0]
        return [session.run(b, [name])[name] for b in batches]


def cut_copy(model: onnx.ModelProto, analysis: Analysis, plan: Plan) -> onnx.ModelProto:
    """``model`` with ``plan`` applied, leaving ``model`` untouched (re-importing is cheap)."""
    graph = gs.import_onnx(model)
    cut_channels(graph, analysis, plan.removed_classes(analysis))
    return export_graph(graph, model, check=False)


def scan(
    model: onnx.ModelProto,
    analysis: Analysis,
    scores: dict[int, np.ndarray],
    evaluate: Evaluator,
    ratios: Sequence[float] = DEFAULT_RATIOS,
    *,
    round_to: int = 1,
    criterion: str = "l2",
    cost: CostModel | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> SensitivityResult:
    """Prune every scored group alone at each ratio (lowest-scoring channels first) and evaluate.

    Args:
        model: the original model (not changed).
        analysis: its dependency groups.
        scores: importance per group (only these groups are scanned).
        evaluate: scores a candidate model, see :class:`Evaluator`.
        ratios: shares of each group's channels to remove.
        round_to: keep channel counts multiples of this (as the final plan will).
        criterion: recorded in the result.
        cost: when given, each point records the candidate's MACs and params fractions.
        progress: called with (done, total) after each candidate.

    Raises:
        BadInputError: a ratio outside (0, 1).
    """
    if not ratios or any(not 0.0 < r < 1.0 for r in ratios):
        raise BadInputError(f"sensitivity ratios must lie in (0, 1), got {list(ratios)}", field="ratios")
    groups = [g for g in analysis.groups if g.id in scores and g.prunable]
    result = SensitivityResult(evaluate.metric_name, evaluate.loss_name, evaluate.baseline, evaluate.samples,
                               criterion, [float(r) for r in ratios], [])
    total, done = len(groups) * len(ratios), 0
    for g in groups:
        curve = GroupCurve(g.id, list(g.producers), g.size)
        seen: dict[int, tuple[float, float]] = {0: (evaluate.baseline, 0.0)}
        for r in ratios:
            n = feasible_removal(g, int(np.floor(r * g.size + 1e-9)), round_to)
            plan = Plan({g.id: lowest(g, scores[g.id], n)} if n else {})
            if n not in seen:
                try:
                    seen[n] = evaluate(cut_copy(model, analysis, plan))
                except OnnxpruneError as e:
                    note = f"group {g.id} at ratio {r}: not evaluated ({e})"
                    log.warning("%s", note)
                    result.notes.append(note)
                    break
            metric, loss = seen[n]
            point = Point(float(r), n, metric, loss)
            if cost is not None:
                point.params = cost.fraction(plan, "params")
                point.macs = cost.fraction(plan, "macs") if cost.base.macs else None
            curve.points.append(point)
            done += 1
            if progress is not None:
                progress(done, total)
        result.groups.append(curve)
    result.curves = sum(1 for c in result.groups if c.points)
    return result


def plot(result: SensitivityResult, path: str | os.PathLike[str]) -> int:
    """Draw one curve per group (metric against ratio) as a PNG; return the number of curves drawn.

    Raises:
        BadInputError: matplotlib is not installed (it is an optional extra).
    """
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        from matplotlib.figure import Figure
    except ImportError as e:
        raise BadInputError("--plot needs matplotlib: pip install 'onnxprune[plot]' (or matplotlib)",
                            field="plot") from e
    fig = Figure(figsize=(9, 5.5), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    for curve in result.groups:
        if curve.points:
            xs = [0.0] + [p.ratio for p in curve.points]
            ys = [result.baseline] + [p.metric for p in curve.points]
            ax.plot(xs, ys, marker="o", markersize=3, linewidth=1.2, label=curve.label)
    count = len(ax.lines)
    ax.set_xlabel("share of the group's channels removed")
    ax.set_ylabel(result.metric.replace("_", " "))
    ax.set_title(f"sensitivity per group ({result.samples} samples, criterion {result.criterion})")
    ax.grid(True, alpha=0.3)
    if count <= 40:
        ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    fig.savefig(path, format="png")
    return count


def evaluator_for(model: onnx.ModelProto, calib: str, samples: int = 64, shapes: dict[str, list[int]] | None = None,
                  device: str = "auto", seed: int = 0) -> Evaluator:
    """An :class:`Evaluator` over up to ``samples`` of ``calib`` (labels used when the data has them).

    Raises:
        BadInputError: the data cannot be opened or does not fit the model.
    """
    from onnxprune.data import model_inputs, open_data

    inputs = model_inputs(model)
    source = open_data(calib, inputs, limit=samples, shapes=shapes, seed=seed)
    fixed = inputs[0].shape[0] if inputs and inputs[0].shape else None
    batch = fixed if isinstance(fixed, int) and fixed > 0 else 64
    labels = source.has_labels
    batches, ys = [], []
    for feeds in source.batches(batch, with_labels=labels):
        if labels:
            ys.append(np.asarray(feeds.pop("labels")).astype(np.int64).reshape(-1))
        if isinstance(fixed, int) and len(next(iter(feeds.values()))) != fixed:
            continue  # a fixed-batch model cannot take the last, shorter batch
        batches.append(feeds)
    y = np.concatenate(ys)[: sum(len(next(iter(b.values()))) for b in batches)] if labels else None
    return Evaluator.from_data(model, batches, y, device)


def budget_order(
    model: onnx.ModelProto,
    analysis: Analysis,
    scores: dict[int, np.ndarray],
    cost: CostModel,
    metric: str,
    target: float,
    evaluate: Evaluator,
    *,
    round_to: int = 1,
    time_budget_s: float = 300.0,
) -> RemovalOrder:
    """The calibrated allocation for a budget: :func:`onnxprune.planning.budget.greedy_order` with real cuts as the loss."""

    def loss(plan: Plan) -> float:
        return evaluate(cut_copy(model, analysis, plan))[1]

    return greedy_order(analysis, scores, cost, metric, target, loss, round_to=round_to,
                                 time_budget_s=time_budget_s)


def latency_measure(model: onnx.ModelProto, analysis: Analysis, device: str = "auto",
                    shapes: dict[str, list[int]] | None = None, runs: int = 30) -> Callable[[Plan], float]:
    """``plan -> latency of the cut model / latency of the original``, measured interleaved in one run."""
    from onnxprune.measure import bench
    from onnxprune.runtime.device import select_device

    choice = select_device(device)

    def measure(plan: Plan) -> float:
        result = bench.compare(model, cut_copy(model, analysis, plan), device=choice, batch=1, runs=runs,
                               warmup=3, shapes=shapes)
        return 1.0 / result.speedup if result.speedup > 0 else float("inf")

    return measure
