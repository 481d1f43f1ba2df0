"""The accuracy guard: when INT8 costs more task metric than allowed, leave the most sensitive layers in float.

Candidates are the weighted layers one by one and, as one group each, the other op types the converter touches
(the activation quantization of Add, Mul, Softmax… can cost more than any weight: PP-OCR's recogniser stays
more than a point of character accuracy below its FP32 model with every Conv and MatMul float). A sensitivity pass quantizes the model once per
candidate with that candidate left in float and ranks them by the metric this recovers (the candidate whose float
copy helps most is the most sensitive). The
smallest prefix of that ranking that brings the drop within the limit is then found by bisection over its length,
and pruned back: from the least sensitive member up, each is quantized again when the drop stays within the limit
without it (single-layer gains are noisy and do not add up, so a prefix carries passengers). Every set tried is
measured, so the answer is a measured model, never an estimate. When even every candidate in float stays outside
the limit, the guard says so and the caller keeps the FP32 model.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import onnx

from onnxprune.measure.metrics import POINTS
from onnxprune.quantize.convert import Candidate

log = logging.getLogger(__name__)

SLACK = 1e-9
"""Points of float rounding a drop may exceed the limit by (a drop of exactly the limit passes)."""


@dataclass(frozen=True)
class LayerSensitivity:
    """The metric with every candidate quantized but ``node`` (a layer, or ``every OP (n nodes)``), and the points
    that recovers."""

    node: str
    op: str
    nodes: int
    value: float
    gain_points: float


@dataclass(frozen=True)
class GuardStep:
    """One measured set: ``float_layers`` candidates left in float (a prefix of the ranking while bisecting; then
    the chosen set without ``requantized``, when the pass back tried to quantize that one again)."""

    float_layers: int
    value: float
    drop_points: float
    passed: bool
    requantized: str | None = None


@dataclass
class GuardResult:
    """What the guard measured and chose."""

    limit_points: float
    before: float
    """The metric of the FP32 input."""
    all_quantized: float
    ranking: list[LayerSensitivity] = field(default_factory=list)
    steps: list[GuardStep] = field(default_factory=list)
    kept_float: list[str] = field(default_factory=list)
    final: float | None = None
    fell_back: bool = False
    """Even with every candidate in float the drop stayed outside the limit: the FP32 model is kept."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _drop(before: float, value: float) -> float:
    return (before - value) * POINTS


def keep_sensitive_float(
    candidates: Sequence[Candidate],
    quantize: Callable[[list[str]], onnx.ModelProto],
    measure: Callable[[onnx.ModelProto], float],
    before: float,
    all_quantized: float,
    limit: float,
) -> tuple[GuardResult, onnx.ModelProto | None]:
    """Rank ``candidates`` by sensitivity and leave the fewest most sensitive ones in float so that the metric
    stays within ``limit`` points of ``before``.

    Args:
        candidates: what may stay float, in graph order.
        quantize: the model quantized with the named nodes left in float.
        measure: the task metric of a model (higher is better).
        before: the FP32 model's metric.
        all_quantized: the metric with every candidate quantized (already measured by the caller).
        limit: the largest drop allowed, in points.

    Returns:
        The result, and the chosen quantized model (None when it fell back to float).
    """
    result = GuardResult(limit, before, all_quantized)
    nodes = {c.label: c.nodes for c in candidates}
    for c in candidates:
        value = measure(quantize(list(c.nodes)))
        result.ranking.append(LayerSensitivity(c.label, c.op, len(c.nodes), value,
                                               round((value - all_quantized) * POINTS, 6)))
        log.info("guard: %s float -> %.4f", c.label, value)
    result.ranking.sort(key=lambda s: -s.value)  # stable: ties keep graph order
    order = [s.node for s in result.ranking]

    def probe(labels: list[str], requantized: str | None = None) -> tuple[GuardStep, onnx.ModelProto]:
        model = quantize([n for label in labels for n in nodes[label]])
        value = measure(model)
        drop = _drop(before, value)
        step = GuardStep(len(labels), value, round(drop, 6), drop <= limit + SLACK, requantized)
        result.steps.append(step)
        return step, model

    n = len(order)
    if not n:
        result.fell_back = True
        return result, None
    step, best = probe(order)
    if not step.passed:
        result.fell_back = True
        return result, None
    final = step.value
    lo, hi = 0, n  # lo fails (everything quantized), hi passes
    while hi - lo > 1:
        mid = (lo + hi) // 2
        step, model = probe(order[:mid])
        if step.passed:
            hi, best, final = mid, model, step.value
        else:
            lo = mid
    chosen = order[:hi]
    for label in reversed(order[:hi]) if hi > 1 else ():  # the pass back, least sensitive first
        trial = [c for c in chosen if c != label]
        step, model = probe(trial, requantized=label)
        if step.passed:
            chosen, best, final = trial, model, step.value
    result.kept_float, result.final = chosen, final
    return result, best
