"""Parameters, bytes and MACs per layer and per model (MACs from a per-op registry, batch 1).

Conventions (the report's numbers):

- **params**: the number of elements in every floating-point initializer, plus floating-point tensors
  held in ``Constant`` nodes (Paddle exports keep weights there). Integer tensors (shapes, indices) are
  not parameters. A layer's params are those of the tensors it reads, so a weight shared by two nodes
  appears in both rows but once in the total. Sparse initializers count their stored non-zeros. Weights
  computed at run time (e.g. ``ConstantOfShape`` stand-ins) are not counted.
- **MACs**: per sample (a symbolic first input dim is set to 1) from shapes found by ONNX shape
  inference; the shapes it leaves unknown that a MACs counter reads (Reshape targets computed at run
  time in Paddle and Hugging Face exports) come from one onnxruntime run with random feeds
  (:func:`onnxprune.runtime.shapes.run_shapes`). ``Conv`` = output elements × (Cin/groups) × kernel elements (1-D/2-D/3-D alike);
  ``ConvTranspose`` = input elements × (Cout/groups) × kernel elements; ``Gemm``/``MatMul`` = M × N × K,
  batched ``MatMul`` times the broadcast batch dims; com.microsoft ``GroupQueryAttention`` and
  ``MultiHeadAttention`` count q·kᵀ and attention·v, B·S·T·(H·Dk + H·Dv) with T = past + S keys (their
  projections are MatMuls of their own). Every other op counts 0 MACs (elementwise ops,
  pooling and normalization are cheap next to these and counting them is convention-dependent).
  When a needed dim is symbolic and ``shapes`` does not fix it (or the run fails), MACs are ``None``
  with the reason.
- **bytes**: the serialized size of the model plus its external data, summed from the parts so that
  models above 2 GB are never serialized.
- Nodes inside subgraphs (``If``/``Loop``/``Scan`` bodies) are not counted.
- Layers are matched between the original and the pruned model by node name (surgery keeps names);
  unnamed nodes are called ``<op>#<index>``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper

from onnxprune.errors import BadInputError
from onnxprune.io.weightless import weightless
from onnxprune.registry import OpRegistry
from onnxprune.runtime.shapes import complete_shapes

logger = logging.getLogger(__name__)


_FLOAT_TYPES = frozenset(
    t
    for t in (
        onnx.TensorProto.FLOAT,
        onnx.TensorProto.FLOAT16,
        onnx.TensorProto.DOUBLE,
        onnx.TensorProto.BFLOAT16,
        getattr(onnx.TensorProto, "FLOAT8E4M3FN", None),
        getattr(onnx.TensorProto, "FLOAT8E4M3FNUZ", None),
        getattr(onnx.TensorProto, "FLOAT8E5M2", None),
        getattr(onnx.TensorProto, "FLOAT8E5M2FNUZ", None),
    )
    if t is not None
)


class ShapeUnknown(Exception):
    """A MACs handler needs a dim that is symbolic or unknown (internal signal, caught by the driver)."""

    def __init__(self, tensor: str, dims: Sequence[int | str | None] | None) -> None:
        super().__init__(tensor)
        self.tensor = tensor
        self.dims = dims


Dims = list[int | str | None]


@dataclass(frozen=True)
class Shapes:
    """Tensor name → dims (int, symbolic str, or None) after shape inference."""

    dims: Mapping[str, Dims]

    def get(self, name: str) -> list[int]:
        """Concrete dims of ``name``.

        Raises:
            ShapeUnknown: the shape or one of its dims is not a fixed int.
        """
        dims = self.dims.get(name)
        if dims is None or not all(isinstance(d, int) for d in dims):
            raise ShapeUnknown(name, dims)
        return [int(d) for d in dims]  # type: ignore[arg-type]


MacsFn = Callable[[onnx.NodeProto, Shapes], int]


class MacsRegistry(OpRegistry[MacsFn]):
    """Per-op MACs counters keyed by (domain, op type). Ops without a handler count 0 MACs.

    Example:
        >>> reg = MacsRegistry()
        >>> reg.register("Conv", conv_macs)
        >>> reg.register("Conv", conv_macs)
        Traceback (most recent call last):
        ValueError: a MACs handler for ai.onnx::Conv is already registered (registered twice)
    """

    def __init__(self) -> None:
        super().__init__("MACs handler")


def _attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def conv_macs(node: onnx.NodeProto, shapes: Shapes) -> int:
    """Conv: output elements × (Cin/groups) × kernel elements; the weight is [Cout, Cin/groups, k...]."""
    out = shapes.get(node.output[0])
    weight = shapes.get(node.input[1])
    return math.prod(out) * math.prod(weight[1:])


def conv_transpose_macs(node: onnx.NodeProto, shapes: Shapes) -> int:
    """ConvTranspose: input elements × (Cout/groups) × kernel elements; the weight is [Cin, Cout/groups, k...]."""
    x = shapes.get(node.input[0])
    weight = shapes.get(node.input[1])
    return math.prod(x) * math.prod(weight[1:])


def gemm_macs(node: onnx.NodeProto, shapes: Shapes) -> int:
    """Gemm: M × N × K with ``transA``/``transB`` honoured."""
    a = shapes.get(node.input[0])
    b = shapes.get(node.input[1])
    m = a[1] if _attr(node, "transA", 0) else a[0]
    k, n = (b[1], b[0]) if _attr(node, "transB", 0) else (b[0], b[1])
    return m * n * k


def matmul_macs(node: onnx.NodeProto, shapes: Shapes) -> int:
    """MatMul (numpy semantics): output elements × K, i.e. batch × M × N × K."""
    a = shapes.get(node.input[0])
    out = shapes.get(node.output[0])
    return math.prod(out) * a[-1]


def einsum_macs(node: onnx.NodeProto, shapes: Shapes) -> int:
    """Einsum: output elements × the sizes of the contracted indices (a dense ``...i,ij->...j`` is MatMul's count)."""
    from onnxprune.analysis.rules.einsum import expand_term

    equation = _attr(node, "equation", b"")
    lhs, out_term = (equation.decode() if isinstance(equation, bytes) else str(equation)).replace(" ", "").split("->")
    out = shapes.get(node.output[0])
    kept = set(expand_term(out_term, len(out)) or [])
    sizes: dict[str, int] = {}
    for term, name in zip(lhs.split(","), node.input):
        dims = shapes.get(name)
        for index, size in zip(expand_term(term, len(dims)) or [], dims):
            if index not in kept:
                sizes[index] = max(sizes.get(index, 1), size)
    return math.prod(out) * math.prod(sizes.values())


MS_DOMAIN = "com.microsoft"


def _attention_keys(node: onnx.NodeProto, shapes: Shapes, query_len: int) -> int:
    """T, the keys each query attends to: the present key's length (past + S), else the key input's."""
    if len(node.output) > 1 and node.output[1]:
        return shapes.get(node.output[1])[2]  # present_key [B, kv_heads, T, D]
    if len(node.input) > 1 and node.input[1]:
        key = shapes.get(node.input[1])  # [B, L, hidden] or [B, heads, L, D]
        return key[1] if len(key) == 3 else key[2]
    return query_len  # packed q/k/v without a cache: self-attention over S


def attention_macs(node: onnx.NodeProto, shapes: Shapes) -> int:
    """com.microsoft GroupQueryAttention / MultiHeadAttention: q·kᵀ plus attention·v, B·S·T·(H·Dk + H·Dv).

    H·Dv is the output's last dim; H·Dk is the query's when it holds the queries only (rank 3 with separate
    keys), else H·Dv (packed q/k/v; GroupQueryAttention's heads share one size).
    """
    out = shapes.get(node.output[0])  # [B, S, H·Dv]
    batch, seq, hv = out[0], out[1], out[-1]
    query = shapes.get(node.input[0])
    separate = len(node.input) > 1 and bool(node.input[1])
    hk = query[-1] if separate and len(query) == 3 else hv
    return batch * seq * _attention_keys(node, shapes, seq) * (hk + hv)


def default_macs_registry() -> MacsRegistry:
    """A fresh registry with the built-in counters (Conv, ConvTranspose, Gemm, MatMul, Einsum, com.microsoft
    GroupQueryAttention and MultiHeadAttention); other ops count 0."""
    reg = MacsRegistry()
    reg.register("Conv", conv_macs)
    reg.register("ConvTranspose", conv_transpose_macs)
    reg.register("Gemm", gemm_macs)
    reg.register("MatMul", matmul_macs)
    reg.register("Einsum", einsum_macs)
    reg.register(("GroupQueryAttention", "MultiHeadAttention"), attention_macs, MS_DOMAIN)
    return reg


@dataclass
class LayerStats:
    """One node's share: params of the tensors it reads, and its MACs (None when unknown)."""

    node: str
    op: str
    params: int
    macs: int | None


@dataclass
class ModelStats:
    """Totals and per-layer rows for one model (see the module docstring for the conventions).

    Attributes:
        params: elements in floating-point initializers and Constant tensors.
        bytes: serialized size including external data.
        macs: multiply-accumulates per sample, or None when symbolic dims leave them unknown.
        macs_unknown_reason: why ``macs`` is None.
        layers: nodes that hold params or count MACs, in graph order.
    """

    params: int
    bytes: int
    macs: int | None
    macs_unknown_reason: str | None
    layers: list[LayerStats]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def node_names(model: onnx.ModelProto) -> list[str]:
    """Node names as the report uses them: the node's name, or ``<op>#<index>`` when it has none."""
    return [n.name or f"{n.op_type}#{i}" for i, n in enumerate(model.graph.node)]


def _constant_value(node: onnx.NodeProto) -> onnx.TensorProto | None:
    """The tensor of a ``Constant`` node given by its ``value`` attribute, else None."""
    if node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
        return None
    for a in node.attribute:
        if a.name == "value":
            return a.t
    return None


def _param_tensors(model: onnx.ModelProto) -> dict[str, int]:
    g = model.graph
    counts = {t.name: math.prod(t.dims) for t in g.initializer if t.data_type in _FLOAT_TYPES}
    for st in g.sparse_initializer:  # stored non-zeros
        if st.values.data_type in _FLOAT_TYPES:
            counts[st.values.name] = math.prod(st.values.dims)
    for node in g.node:
        value = _constant_value(node)
        if value is not None and value.data_type in _FLOAT_TYPES:
            counts[node.output[0]] = math.prod(value.dims)
    return counts


_FOUR_BIT = frozenset(
    getattr(onnx.TensorProto, n) for n in ("INT4", "UINT4", "FLOAT4E2M1") if hasattr(onnx.TensorProto, n)
)


# Tensors with more elements than this are sized from dtype × count: protobuf's ByteSize walks the data
# (about a second per 600 MB) and cannot be called on the whole model at 2 GB and above.
_EXACT_SIZE_ELEMS = 1 << 20


def _data_bytes(t: onnx.TensorProto) -> int:
    n = math.prod(t.dims)
    if t.data_type in _FOUR_BIT:
        return (n + 1) // 2
    return n * np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize


def _tensor_bytes(t: onnx.TensorProto) -> int:
    if t.data_location == onnx.TensorProto.EXTERNAL:
        entries = {e.key: e.value for e in t.external_data}
        stored = int(entries["length"]) if "length" in entries else _data_bytes(t)
        return t.ByteSize() + stored
    if t.data_type == onnx.TensorProto.STRING or math.prod(t.dims) <= _EXACT_SIZE_ELEMS:
        return t.ByteSize()
    return _data_bytes(t) + len(t.name) + 4 * len(t.dims) + 10  # tags, lengths and varint dims


def model_bytes(model: onnx.ModelProto) -> int:
    """Serialized size plus external data, summed from parts (never serializes the whole model).

    Exact to a few bytes per field (the tag and length prefixes of the top-level parts are estimated).
    """
    g = model.graph
    total = sum(_tensor_bytes(t) + 6 for t in g.initializer)
    for part in (g.node, g.input, g.output, g.value_info, g.sparse_initializer, model.functions, model.opset_import):
        total += sum(p.ByteSize() + 3 for p in part)
    total += len(model.producer_name) + len(model.producer_version) + len(model.doc_string) + len(g.name) + 16
    return total


def _inference_copy(model: onnx.ModelProto, shapes: Mapping[str, list[int]]) -> onnx.ModelProto:
    """A :func:`weightless` copy for shape inference, its inputs fixed (``shapes``, batch 1).

    Large float ``Constant`` nodes (Paddle's weights) become typed inputs as well, declared shapes of
    intermediate tensors and outputs are dropped (inference recomputes them; stale ones would conflict).
    """
    light = weightless(model, constants=True)
    del light.graph.value_info[:]
    for vi in light.graph.output:
        vi.type.tensor_type.ClearField("shape")
    real = {vi.name for vi in model.graph.input} - {t.name for t in model.graph.initializer}
    for vi in light.graph.input:
        if vi.name in real and vi.type.HasField("tensor_type"):
            _fix_input_dims(vi, shapes.get(vi.name))
    del light.graph.sparse_initializer[:]  # shape inference reads the dense shape from a typed input
    for st in model.graph.sparse_initializer:
        light.graph.input.append(helper.make_tensor_value_info(st.values.name, st.values.data_type, list(st.dims)))
    return light


def _fix_input_dims(vi: onnx.ValueInfoProto, fixed: list[int] | None) -> None:
    """Set an input's dims to ``fixed``, else make Paddle's -1 dims unknown and a symbolic first dim 1.

    Raises:
        BadInputError: ``fixed`` has another rank than the input.
    """
    dims = vi.type.tensor_type.shape.dim
    if fixed is not None:
        if len(fixed) != len(dims):
            raise BadInputError(
                f"--shape {vi.name}: the model's input has {len(dims)} dims, got {list(fixed)}", field="shapes"
            )
        for d, value in zip(dims, fixed, strict=True):
            d.Clear()
            d.dim_value = int(value)
        return
    for d in dims:
        if d.HasField("dim_value") and d.dim_value <= 0:
            d.Clear()
    if len(dims) and not dims[0].HasField("dim_value"):
        dims[0].Clear()
        dims[0].dim_value = 1


def _collect_dims(model: onnx.ModelProto) -> dict[str, Dims]:
    out: dict[str, Dims] = {}
    for vi in (*model.graph.input, *model.graph.value_info, *model.graph.output):
        tt = vi.type.tensor_type
        if tt.HasField("shape"):
            out[vi.name] = [
                d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or None)
                for d in tt.shape.dim
            ]
    for t in model.graph.initializer:
        out[t.name] = list(t.dims)
    for node in model.graph.node:
        value = _constant_value(node)
        if value is not None:
            out[node.output[0]] = list(value.dims)
    return out


def infer_dims(model: onnx.ModelProto, shapes: Mapping[str, list[int]] | None = None) -> tuple[Shapes, str | None]:
    """Shapes of every tensor with a symbolic first input dim set to 1 and ``shapes`` applied.

    Returns:
        The shapes, and an error text when shape inference failed (shapes are then what the model declares).

    Raises:
        BadInputError: ``shapes`` names an unknown input or has the wrong rank.
    """
    shapes = dict(shapes or {})
    real_inputs = {vi.name for vi in model.graph.input} - {t.name for t in model.graph.initializer}
    unknown = sorted(set(shapes) - real_inputs)
    if unknown:
        raise BadInputError(
            f"--shape names unknown input(s) {unknown}; inputs are {sorted(real_inputs)}", field="shapes"
        )
    light = _inference_copy(model, shapes)
    try:
        inferred = onnx.shape_inference.infer_shapes(light, strict_mode=False, data_prop=True)
    except Exception as e:  # onnx raises InferenceError and others; MACs become unknown, not a crash
        logger.warning("shape inference failed (%s); MACs that need inferred shapes will be unknown", e)
        return Shapes(_collect_dims(light)), f"shape inference failed: {e}"
    return Shapes(_collect_dims(inferred)), None


def macs_tensors(model: onnx.ModelProto, dims: Shapes, registry: MacsRegistry) -> list[str]:
    """Inputs and outputs of nodes that have a MACs handler whose shapes are not fully known.

    These are the only tensors a run must measure: most of a big model's shapes never enter a MACs count.
    """
    unknown: list[str] = []
    for node in model.graph.node:
        if registry.get(node.op_type, node.domain) is None:
            continue
        for name in (*node.input, *node.output):
            known = dims.dims.get(name)
            if name and (known is None or not all(isinstance(d, int) for d in known)):
                unknown.append(name)
    return list(dict.fromkeys(unknown))


def _unfixed_inputs(model: onnx.ModelProto, shapes: Mapping[str, list[int]]) -> dict[str, list[int | str]]:
    """Inputs that keep symbolic dims after the batch is set to 1 and ``shapes`` applied: name → dims."""
    inits = {t.name for t in model.graph.initializer}
    out: dict[str, list[int | str]] = {}
    for vi in model.graph.input:
        if vi.name in inits or vi.name in shapes:
            continue
        dims: list[int | str] = [
            d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or "?")
            for d in vi.type.tensor_type.shape.dim
        ]
        if dims and isinstance(dims[0], str):
            dims[0] = 1
        if any(isinstance(d, str) for d in dims):
            out[vi.name] = dims
    return out


def _unknown_reason(node: str, op: str, err: ShapeUnknown, unfixed: Mapping[str, list[int | str]]) -> str:
    head = f"MACs of {node} ({op}) need the shape of {err.tensor!r}, which is not fixed"
    if unfixed:
        names = ", ".join(f"{k} {v}" for k, v in unfixed.items())
        hints = " ".join(f"--shape {k}={'x'.join(str(d) for d in v)}" for k, v in unfixed.items())
        return f"{head}: input(s) with symbolic dims: {names}; fix them with {hints} (numbers for the names)"
    dims = "unknown" if err.dims is None else str(list(err.dims))
    return f"{head} (inferred dims {dims}: data-dependent or an op shape inference does not know)"


def model_stats(
    model: onnx.ModelProto,
    shapes: Mapping[str, list[int]] | None = None,
    registry: MacsRegistry | None = None,
) -> ModelStats:
    """Params, bytes, MACs and per-layer rows of a model (conventions in the module docstring).

    Args:
        model: the model; external data need not be loaded for params and bytes, MACs use shapes only.
        shapes: input name → full shape (``--shape``) to fix symbolic dims for MACs.
        registry: MACs handlers; :func:`default_macs_registry` when None.

    Returns:
        The statistics.

    Raises:
        BadInputError: ``shapes`` names an unknown input or has the wrong rank.

    Example:
        >>> model_stats(model, {"x": [1, 3, 640, 640]}).macs
        123456789
    """
    registry = registry or default_macs_registry()
    params = _param_tensors(model)
    dims, infer_error = infer_dims(model, shapes)
    unfixed = _unfixed_inputs(model, shapes or {})
    if not unfixed:
        measured, run_error = complete_shapes(model, shapes, dims.dims, macs_tensors(model, dims, registry))
        dims = Shapes(measured)
        infer_error = "; ".join(e for e in (infer_error, run_error) if e) or None
    layers: list[LayerStats] = []
    reason: str | None = None
    for name, node in zip(node_names(model), model.graph.node, strict=True):
        if node.op_type == "Constant":
            continue
        layer_params = sum(params.get(i, 0) for i in dict.fromkeys(node.input) if i)
        handler = registry.get(node.op_type, node.domain)
        macs: int | None = 0
        if handler is not None:
            try:
                macs = int(handler(node, dims))
            except ShapeUnknown as e:
                macs = None
                if reason is None:
                    reason = _unknown_reason(name, node.op_type, e, unfixed)
                    if infer_error:
                        reason += f" ({infer_error})"
        if layer_params or macs != 0:
            layers.append(LayerStats(name, node.op_type, layer_params, macs))
    total_macs = None if reason else sum(layer.macs or 0 for layer in layers)
    return ModelStats(sum(params.values()), model_bytes(model), total_macs, reason, layers)
