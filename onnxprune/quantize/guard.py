"""The accuracy guard: when INT8 costs more task metric than allowed, leave the most sensitive layers in float.

Candidates are the weighted layers one by one and, as one group each, the other op types the converter touches
(the activation quantization of Add, Mul, Softmax… can cost more than any weight: PP-OCR's recogniser stays
21 points below its FP32 model with every Conv and MatMul float). A sensitivity pass quantizes the model once per
candidate with that candidate left in float and ranks them by the metric this recovers (the candidate whose float
copy helps most is the most sensitive). The
smallest prefix of that ranking that brings the drop within the limit is then found by bisection over its length;
every prefix tried is measured, so the answer is a measured model, never an estimate. When even every candidate
in float stays outside the limit, the guard says so and the caller keeps the FP32 model.
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
    """One bisection probe: the first ``float_layers`` of the ranking left in float."""

    float_layers: int
    value: float
    drop_points: float
    passed: bool


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

    def probe(k: int) -> tuple[bool, onnx.ModelProto]:
        model = quantize([n for label in order[:k] for n in nodes[label]])
        value = measure(model)
        drop = _drop(before, value)
        step = GuardStep(k, value, round(drop, 6), drop <= limit + SLACK)
        result.steps.append(step)
        return step.passed, model

    n = len(order)
    passed, best = probe(n) if n else (False, None)
    if not passed:
        result.fell_back = True
        return result, None
    lo, hi = 0, n  # lo fails (everything quantized), hi passes
    while hi - lo > 1:
        mid = (lo + hi) // 2
        ok, model = probe(mid)
        if ok:
            hi, best = mid, model
        else:
            lo = mid
    result.kept_float = order[:hi]
    result.final = next(s.value for s in reversed(result.steps) if s.float_layers == hi)
    return result, best
