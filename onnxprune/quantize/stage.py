"""One quantization job: convert, measure, guard, check, and say what happened (:class:`QuantizeResult`).

The pipeline hands in the FP32 model, the options, the calibration batches and a :class:`Judge` (the task metric
and what it is measured on); this module never opens data or picks devices itself.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import onnx

from onnxprune.errors import BadInputError, InvariantError
from onnxprune.io.shapes import check_model
from onnxprune.measure.metrics import POINTS
from onnxprune.measure.stats import model_bytes
from onnxprune.quantize import convert
from onnxprune.quantize.convert import Batches, FloatNode, QuantizeOptions
from onnxprune.quantize.detect import quantized_nodes
from onnxprune.quantize.guard import GuardResult, keep_sensitive_float


@dataclass(frozen=True)
class Judge:
    """How quantization is measured: ``measure(model)`` is the task metric (higher is better) on ``data``."""

    measure: Callable[[onnx.ModelProto], float]
    label: str
    data: str
    before: float
    """The metric of the FP32 input."""


@dataclass(frozen=True)
class MetricChange:
    """The task metric of the FP32 input and of the quantized result."""

    label: str
    data: str
    before: float
    after: float

    @property
    def drop_points(self) -> float:
        return round((self.before - self.after) * POINTS, 6)

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "data": self.data, "before": self.before, "after": self.after,
                "drop_points": self.drop_points}


@dataclass
class QuantizeResult:
    """The quantized model and the report's ``quantize`` section."""

    model: onnx.ModelProto
    source: onnx.ModelProto
    """The FP32 input (the report takes params, MACs and layers from it)."""
    mode: str
    calibration: str | None
    calibration_data: str | None
    preprocessed: bool
    kept_float: list[FloatNode]
    bytes_before: int
    bytes_after: int
    metric: MetricChange | None = None
    limit_points: float | None = None
    guard: GuardResult | None = None
    notes: list[str] = field(default_factory=list)
    latency: dict[str, Any] | None = None
    """``--bench``: the FP32 input against the quantized model, interleaved in one run (set by the pipeline)."""

    @property
    def measurable(self) -> onnx.ModelProto:
        """The result as float32 data can run it: FP16 IO gets Casts from and to float32 (same computation)."""
        return convert.float32_io(self.model)

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode, "calibration": self.calibration, "calibration_data": self.calibration_data,
            "preprocessed": self.preprocessed,
            "nodes_kept_float": [dataclasses.asdict(f) for f in self.kept_float],
            "bytes_before": self.bytes_before, "bytes_after": self.bytes_after,
            "size_ratio": round(self.bytes_after / self.bytes_before, 6) if self.bytes_before else None,
            "metric": self.metric.to_dict() if self.metric else None, "max_drop_points": self.limit_points,
            "guard": self.guard.to_dict() if self.guard else None, "latency": self.latency, "notes": self.notes,
        }


def quantize(model: onnx.ModelProto, options: QuantizeOptions, *, batches: Batches | None = None,
             calibration_data: str | None = None, judge: Judge | None = None,
             limit_points: float | None = None) -> QuantizeResult:
    """Quantize ``model`` as ``options`` say; with ``judge`` measure the result, and with ``limit_points`` as well
    keep the most sensitive layers in float until the drop is within the limit.

    Args:
        model: the FP32 model (pruned and fine-tuned).
        options: mode, calibration method, ``--quant-exclude`` globs, FP16's IO types.
        batches: calibration batches (required by ``int8``).
        calibration_data: how the report names them.
        judge: the task metric; None leaves the metric unmeasured.
        limit_points: the largest drop allowed (the accuracy guard); needs ``judge``.

    Raises:
        BadInputError: the model is already quantized, ``int8`` without calibration batches, the guard without a
            judge, or data the quantizer cannot use.
        InvariantError: the converter produced a model the ONNX checker rejects.

    Example:
        >>> r = quantize(model, QuantizeOptions("int8"), batches=lambda: calib_batches)  # doctest: +SKIP
        >>> r.bytes_after < r.bytes_before / 3  # doctest: +SKIP
        True
    """
    already = quantized_nodes(model)
    if already:
        raise BadInputError(f"--quantize {options.mode}: the model is already quantized ({len(already)} quantized "
                            f"nodes, e.g. {already[0]}); pass its float version", field="quantize")
    if limit_points is not None and judge is None:
        raise BadInputError("the quantization accuracy guard needs data to measure on: --eval-data DATA or --calib "
                            "DATA", field="quantize")
    with tempfile.TemporaryDirectory(prefix="onnxprune-quantize-") as tmp:
        prepared = convert.prepare(model, tmp)
        notes = [prepared.note] if prepared.note else []
        excluded = convert.matching_nodes(prepared.model, options.exclude)
        if options.exclude and not excluded:
            notes.append(f"--quant-exclude {' '.join(options.exclude)} matched no node")
        cache = f"{tmp}/calibration.json" if options.mode == "int8" else None
        if options.mode == "int8" and options.calibration != "minmax" and batches is not None:
            limit, per_sample = convert.histogram_samples(prepared.model, batches)
            options = dataclasses.replace(options, max_samples=limit)
            notes.append(f"{options.calibration} calibration holds every activation of every sample in memory "
                         f"(~{per_sample >> 20} MB a sample here): calibrated on at most {limit} samples")

        def run(extra: list[str]) -> onnx.ModelProto:
            return convert.converted(prepared, batches, options, excluded + extra, tmp, cache)

        def measure(m: onnx.ModelProto) -> float:
            assert judge is not None
            return judge.measure(convert.float32_io(m))

        result_model = run([])
        static = options.mode == "int8"
        result = QuantizeResult(result_model, model, options.mode, options.calibration if static else None,
                                calibration_data if static else None, prepared.preprocessed, [], model_bytes(model), 0,
                                limit_points=limit_points, notes=notes)
        if judge is not None:
            after = measure(result_model)
            result.metric = MetricChange(judge.label, judge.data, judge.before, after)
            if limit_points is not None and result.metric.drop_points > limit_points:
                _guard(result, prepared, excluded, run, dataclasses.replace(judge, measure=measure), after,
                       limit_points)
    _explain_float(result, prepared.model, excluded, options)
    result.bytes_after = model_bytes(result.model)
    try:
        check_model(result.model, full_check=False)  # ops onnx has no schema for are left to onnxruntime
    except onnx.checker.ValidationError as e:
        raise InvariantError(f"the {options.mode} model fails the ONNX checker: {e}") from e
    return result


def _guard(result: QuantizeResult, prepared: convert.Prepared, excluded: list[str],
           run: Callable[[list[str]], onnx.ModelProto], judge: Judge, after: float, limit: float) -> None:
    """Leave the most sensitive layers float (:func:`keep_sensitive_float`), or keep the FP32 model."""
    candidates = convert.guard_candidates(prepared.model, result.mode, excluded)
    guard, model = keep_sensitive_float(candidates, run, judge.measure, judge.before, after, limit)
    result.guard = guard
    assert result.metric is not None
    if model is None:
        result.model = prepared.model
        result.metric = dataclasses.replace(result.metric, after=judge.before)
        result.notes.append(f"{result.mode} stayed {guard.steps[-1].drop_points if guard.steps else 'n/a'} points "
                            f"below the FP32 model with every candidate in float, outside {limit} points: "
                            "the FP32 model is kept")
        return
    result.model = model
    assert guard.final is not None
    result.metric = dataclasses.replace(result.metric, after=guard.final)
    result.notes.append(f"accuracy guard: {len(guard.kept_float)} of {len(candidates)} candidates kept in float "
                        f"({', '.join(guard.kept_float)}) to stay within {limit} points ({judge.label} {after:.4f} -> "
                        f"{guard.final:.4f})")


def _explain_float(result: QuantizeResult, prepared: onnx.ModelProto, excluded: list[str],
                   options: QuantizeOptions) -> None:
    """Every weighted layer of the result that computes in float, with the reason."""
    if result.guard is not None and result.guard.fell_back:
        result.kept_float = [FloatNode(n, op, "accuracy guard: no quantized model stayed within the drop")
                             for n, op in convert.weighted_nodes(prepared)]
        return
    rank = {s.node: (k + 1, s) for k, s in enumerate(result.guard.ranking)} if result.guard else {}
    guarded = set(result.guard.kept_float) if result.guard else set()
    groups = {c.label: c for c in convert.guard_candidates(prepared, result.mode, excluded) if c.label in guarded}

    def why(label: str) -> str:
        k, s = rank[label]
        return f"accuracy guard: sensitivity rank {k} of {len(rank)} (float alone recovers {s.gain_points:.2f} points)"
    kept = []
    for name, op in convert.float_layers(result.model, result.mode):
        if name not in excluded and name not in guarded and name.endswith("_MatMul"):
            name = name.removesuffix("_MatMul")  # a Gemm the dynamic quantizer rewrote (see convert.quantize_dynamic)
        if name in excluded:
            pattern = next(p for p in options.exclude if fnmatch.fnmatchcase(name, p))
            reason = f"--quant-exclude {pattern}"
        elif name in guarded:
            reason = why(name)
        else:
            reason = f"not converted by onnxruntime's {result.mode} quantizer (op or tensor types not supported)"
        kept.append(FloatNode(name, op, reason))
    for label, group in groups.items():  # the op types the guard kept float as a whole
        if len(group.nodes) > 1 or group.nodes[0] != label:
            kept += [FloatNode(n, group.op, f"{why(label)}: {label} kept float") for n in group.nodes]
    result.kept_float = kept
