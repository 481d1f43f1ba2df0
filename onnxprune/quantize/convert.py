"""The quantizers themselves: onnxruntime's static QDQ and dynamic INT8 quantizers and its float16 converter.

Nothing here invents a quantization scheme. This module prepares the model the way onnxruntime's quantization
guide asks (every node named, so exclusions can name them; ``quant_pre_process`` for shape inference and graph
optimisation), calls the maintained converter, and reads back which weighted layers stayed in float.

Static INT8 uses unsigned 8-bit activations and signed 8-bit per-channel weights without range reduction
(``U8S8``): onnxruntime's recommendation for x86 CPUs with VNNI, and what its QDQ CPU kernels run fastest.
"""

from __future__ import annotations

import fnmatch
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from onnxprune.errors import BadInputError

log = logging.getLogger(__name__)

MODES = ("int8", "int8-dynamic", "fp16")
CALIBRATIONS = ("minmax", "entropy", "percentile")
WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
"""The layers the guard and the report talk about: the ops whose weights quantization stores in 8 bits."""

LAYOUT_OPS = frozenset({"Constant", "Cast", "Shape", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten",
                        "Identity", "Concat", "Slice", "Split", "Gather", "Expand", "Tile", "Range", "ConstantOfShape"})
"""Ops that only move values: the guard never offers them as float candidates for FP16."""

HISTOGRAM_BUDGET = 2 << 30
"""Bytes of activations entropy/percentile calibration may hold: onnxruntime's HistogramCalibrater keeps every
intermediate tensor of every calibration sample in memory before building histograms (PP-OCR's recogniser: about
200 MB a line), so those methods calibrate on as many samples as fit."""

Batches = Callable[[], Iterable[dict[str, np.ndarray]]]
"""A fresh pass over calibration batches (input name → array) per call."""


@dataclass(frozen=True)
class QuantizeOptions:
    """How to quantize: the mode, static calibration, node-name globs to leave float, FP16's IO types."""

    mode: str
    calibration: str = "minmax"
    exclude: tuple[str, ...] = ()
    keep_io_types: bool = True
    per_channel: bool = True
    max_samples: int | None = None
    """Calibration samples at most (entropy/percentile: what fits :data:`HISTOGRAM_BUDGET`)."""


@dataclass(frozen=True)
class FloatNode:
    """A weighted layer left in float in the quantized model, and why."""

    node: str
    op: str
    reason: str


@dataclass(frozen=True)
class Candidate:
    """What the accuracy guard may leave float: one weighted layer, or every node of one other quantized op type
    (activation quantization of Add, Mul, Softmax… can cost more than any weight)."""

    label: str
    op: str
    nodes: tuple[str, ...]


@dataclass(frozen=True)
class Prepared:
    """The FP32 model as the quantizer gets it: pre-processed (when that worked), every node named."""

    path: str
    model: onnx.ModelProto
    preprocessed: bool
    note: str | None = None


def name_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` in which every node has a unique name: exclusions and the report name nodes."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    taken = {n.name for n in out.graph.node if n.name}
    for k, node in enumerate(out.graph.node):
        if not node.name:
            name = f"{node.op_type}_{k}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)
    return out


def prepare(model: onnx.ModelProto, workdir: str) -> Prepared:
    """Run onnxruntime's ``quant_pre_process`` (onnx shape inference, basic graph optimisation such as folding
    BatchNorm into Conv), which its quantizer expects; fall back to the model as it is, with a note, when the
    pre-processing fails on it.

    Its symbolic shape inference is skipped: where it cannot infer every shape (PP-OCR's recogniser) it saves a
    temporary model with uuid-named external data into the process's working directory, which a library (or a
    server running many jobs) must not do; onnx's shape inference covers the graphs quantization handles.
    """
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src, dst = os.path.join(workdir, "fp32.onnx"), os.path.join(workdir, "fp32.pre.onnx")
    onnx.save(name_nodes(model), src)
    try:
        quant_pre_process(src, dst, skip_symbolic_shape=True)
        prepared = name_nodes(onnx.load(dst))
        onnx.save(prepared, dst)
        return Prepared(dst, prepared, True)
    except Exception as e:  # noqa: BLE001 - any failure of the optional pre-processing falls back to the input
        log.info("quant_pre_process failed (%s); quantizing the model as it is", e)
        return Prepared(src, onnx.load(src), False, f"onnxruntime's quantization pre-processing failed "
                                                    f"({type(e).__name__}: {e}); quantized without it")


def matching_nodes(model: onnx.ModelProto, patterns: Sequence[str]) -> list[str]:
    """Names of the nodes that match any glob in ``patterns`` (``--quant-exclude``)."""
    return [n.name for n in model.graph.node if any(fnmatch.fnmatchcase(n.name, p) for p in patterns)]


def weighted_nodes(model: onnx.ModelProto) -> list[tuple[str, str]]:
    """``(name, op)`` of the layers with a constant weight, in graph order: the guard's candidates."""
    consts = {t.name for t in model.graph.initializer}
    consts |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    return [(n.name, n.op_type) for n in model.graph.node
            if n.op_type in WEIGHTED_OPS and any(i in consts for i in n.input[:2])]


def _converted_op_types(mode: str) -> frozenset[str]:
    """The op types the converter of ``mode`` turns into quantized (or float16) form."""
    if mode == "fp16":
        return frozenset()  # every op but LAYOUT_OPS, see guard_candidates
    from onnxruntime.quantization.registry import IntegerOpsRegistry, QDQRegistry, QLinearOpsRegistry

    return frozenset(IntegerOpsRegistry) if mode == "int8-dynamic" else frozenset(QDQRegistry) | set(QLinearOpsRegistry)


def guard_candidates(model: onnx.ModelProto, mode: str, exclude: Sequence[str] = ()) -> list[Candidate]:
    """Each weighted layer on its own, then each other converted op type as one group (graph order), leaving out
    the nodes ``exclude`` keeps float anyway."""
    skip = set(exclude)
    layers = [Candidate(name, op, (name,)) for name, op in weighted_nodes(model) if name not in skip]
    types = _converted_op_types(mode)
    groups: dict[str, list[str]] = {}
    for n in model.graph.node:
        converted = n.op_type not in LAYOUT_OPS if mode == "fp16" else n.op_type in types
        if converted and n.op_type not in WEIGHTED_OPS and n.name not in skip:
            groups.setdefault(n.op_type, []).append(n.name)
    return layers + [Candidate(f"every {op} ({len(names)} nodes)", op, tuple(names)) for op, names in groups.items()]


class _Reader:
    """onnxruntime's ``CalibrationDataReader`` protocol (``get_next``, ``rewind``) over our calibration batches,
    ``limit`` samples at most."""

    def __init__(self, batches: Batches, names: Sequence[str], limit: int | None = None):
        self._batches, self._names, self._limit = batches, list(names), limit
        self._it: Iterator[dict[str, np.ndarray]] | None = None
        self._left = limit

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._it is None:
            self._it, self._left = iter(self._batches()), self._limit
        feeds = next(self._it, None)
        if feeds is None or self._left == 0:
            return None
        out = {k: feeds[k] for k in self._names}
        if self._left is not None:
            out = {k: v[: self._left] for k, v in out.items()}
            self._left -= len(next(iter(out.values())))
        return out

    def rewind(self) -> None:
        self._it = None


def histogram_samples(model: onnx.ModelProto, batches: Batches) -> tuple[int, int]:
    """(samples that fit :data:`HISTOGRAM_BUDGET`, estimated activation bytes per sample), from the shapes onnx
    infers for one calibration sample (tensors it cannot size are not counted)."""
    from onnxprune.io.shapes import static_shapes

    first = next(iter(batches()), None)
    if first is None:
        return 1, 0
    dims = static_shapes(model, {k: [1, *v.shape[1:]] for k, v in first.items() if k != "labels"})
    consts = {t.name for t in model.graph.initializer}
    per_sample = sum(4 * int(np.prod(d)) for name, d in dims.items()
                     if name not in consts and all(isinstance(x, int) and x > 0 for x in d))
    return max(1, HISTOGRAM_BUDGET // max(per_sample, 1)), per_sample

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        self.rewind()
        while (feeds := self.get_next()) is not None:
            yield feeds


def _graph_inputs(model: onnx.ModelProto) -> list[str]:
    inits = {t.name for t in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits]


def quantize_static(prepared: Prepared, batches: Batches, options: QuantizeOptions, exclude: Sequence[str],
                    out_path: str, cache_path: str | None = None) -> onnx.ModelProto:
    """Static QDQ INT8 (U8S8, per-channel weights) calibrated on ``batches``, ``exclude`` left in float.

    ``cache_path`` keeps onnxruntime's calibration ranges between calls, so the guard's re-quantizations with
    other exclusions calibrate once.

    Raises:
        BadInputError: the calibration data do not fit the model.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static as ort_quantize_static

    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[options.calibration]
    # onnxruntime's reader ABC accepts any object with get_next()
    reader = _Reader(batches, _graph_inputs(prepared.model), options.max_samples)
    try:
        ort_quantize_static(
            prepared.path, out_path, reader, quant_format=QuantFormat.QDQ, per_channel=options.per_channel,
            reduce_range=False, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            nodes_to_exclude=list(exclude), calibrate_method=method, calibration_providers=["CPUExecutionProvider"],
            calibration_cache_path=cache_path,
        )
    except (ValueError, KeyError, RuntimeError) as e:
        raise BadInputError(f"--quantize int8: onnxruntime's quantizer failed on this model with the --calib data: "
                            f"{type(e).__name__}: {e}", field="quantize") from e
    return onnx.load(out_path)


def quantize_dynamic(prepared: Prepared, options: QuantizeOptions, exclude: Sequence[str],
                     out_path: str) -> onnx.ModelProto:
    """Dynamic INT8: weights stored in 8 bits, activations quantized per run (no calibration; suits MatMul-heavy
    transformer graphs)."""
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization import quantize_dynamic as ort_quantize_dynamic

    # The dynamic quantizer first rewrites Gemm into MatMul "<name>_MatMul" + Add and then applies the exclusions,
    # so an excluded Gemm is named both ways.
    gemms = {n.name for n in prepared.model.graph.node if n.op_type == "Gemm"}
    names = list(exclude) + [f"{n}_MatMul" for n in exclude if n in gemms]
    ort_quantize_dynamic(prepared.path, out_path, per_channel=options.per_channel, reduce_range=False,
                         weight_type=QuantType.QInt8, nodes_to_exclude=names)
    return onnx.load(out_path)


def convert_fp16(prepared: Prepared, options: QuantizeOptions, exclude: Sequence[str]) -> onnx.ModelProto:
    """FP16 weights and activations by onnxruntime's float16 converter; IO types stay float32 unless
    ``keep_io_types`` is false, and ``exclude`` nodes run in float32 (Cast nodes around them)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = onnx.ModelProto()
    model.CopyFrom(prepared.model)
    out = convert_float_to_float16(model, keep_io_types=options.keep_io_types, node_block_list=list(exclude) or None)
    OnnxModel(out).topological_sort()  # the converter appends the IO Casts at the end of the node list
    return out


def float_layers(model: onnx.ModelProto, mode: str) -> list[tuple[str, str]]:
    """``(name, op)`` of the weighted layers of a converted model whose weight is still a float32 constant: INT8
    graphs feed a converted layer's weight through DequantizeLinear (QDQ) or an integer op, FP16 graphs store
    it as float16."""
    f32 = {t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    f32 |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output
            if any(a.t.data_type == onnx.TensorProto.FLOAT for a in n.attribute if a.name == "value")}
    return [(n.name, n.op_type) for n in model.graph.node
            if n.op_type in WEIGHTED_OPS and any(i in f32 for i in n.input[:2])]


def converted(prepared: Prepared, batches: Batches | None, options: QuantizeOptions, exclude: Sequence[str],
              workdir: str | Path, cache_path: str | None = None) -> onnx.ModelProto:
    """``prepared`` converted as ``options.mode`` says, with ``exclude`` left in float."""
    out = os.path.join(os.fspath(workdir), f"quantized-{len(exclude)}.onnx")
    if options.mode == "int8":
        if batches is None:
            raise BadInputError("--quantize int8 calibrates on real samples: pass --calib DATA (not random)",
                                field="quantize")
        return quantize_static(prepared, batches, options, exclude, out, cache_path)
    if options.mode == "int8-dynamic":
        return quantize_dynamic(prepared, options, exclude, out)
    if options.mode == "fp16":
        return convert_fp16(prepared, options, exclude)
    raise BadInputError(f"--quantize must be one of none, {', '.join(MODES)}, got {options.mode!r}", field="quantize")


def float32_io(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` (FP16 converted with ``keep_io_types`` false) with Casts from and to float32 at its inputs and
    outputs: the same computation, fed and read as float32, so the metric and verification run on the same data as
    for the FP32 model. Returns ``model`` itself when its IO is float32 already."""
    half = onnx.TensorProto.FLOAT16
    inputs = [v for v in model.graph.input if v.type.tensor_type.elem_type == half]
    outputs = [v for v in model.graph.output if v.type.tensor_type.elem_type == half]
    if not inputs and not outputs:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    rename = {v.name: f"{v.name}__fp16" for v in [*inputs, *outputs]}
    for node in graph.node:
        node.input[:] = [rename.get(i, i) if i in {v.name for v in inputs} else i for i in node.input]
        node.output[:] = [rename.get(o, o) if o in {v.name for v in outputs} else o for o in node.output]
    casts_in = [onnx.helper.make_node("Cast", [v.name], [rename[v.name]], name=f"{v.name}__to_fp16", to=half)
                for v in inputs]
    casts_out = [onnx.helper.make_node("Cast", [rename[v.name]], [v.name], name=f"{v.name}__to_fp32",
                                       to=onnx.TensorProto.FLOAT) for v in outputs]
    nodes = casts_in + list(graph.node) + casts_out
    del graph.node[:]
    graph.node.extend(nodes)
    names = {v.name for v in [*inputs, *outputs]}
    for v in [*graph.input, *graph.output]:
        if v.name in names:
            v.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
    return out

