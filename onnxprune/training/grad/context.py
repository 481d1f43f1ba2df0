"""What a VJP rule needs: tensor facts, the node emitter, the rule type and the registry that holds rules.

Rule modules import this module only (and the helpers beside them), never the driver, so the driver can
import every rule family without an import circle.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxprune.errors import UnsupportedOpError
from onnxprune.registry import OpRegistry

log = logging.getLogger(__name__)

FLOAT_TYPES = frozenset({TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16})

Dim = int | str | None


@dataclass
class TensorInfo:
    """What shape inference knows about one tensor."""

    dtype: int
    shape: list[Dim] | None  # None: rank unknown; a dim is None when unknown (also for an exporter's -1)


def _info_from_type(tp: onnx.TypeProto) -> TensorInfo | None:
    if not tp.HasField("tensor_type"):
        return None
    tt = tp.tensor_type
    shape: list[Dim] | None = None
    if tt.HasField("shape"):
        shape = []
        for d in tt.shape.dim:
            if d.HasField("dim_value") and d.dim_value >= 0:
                shape.append(int(d.dim_value))
            elif d.HasField("dim_param"):
                shape.append(d.dim_param)
            else:
                shape.append(None)
    return TensorInfo(int(tt.elem_type), shape)


def collect_tensor_info(model: onnx.ModelProto) -> dict[str, TensorInfo]:
    """dtype and shape of every tensor shape inference can see (runs inference on a copy)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception as e:  # noqa: BLE001 - inference is best effort; rules say what they miss
        log.warning("shape inference failed (%s); gradient rules may need static shapes", e)
        inferred = model
    g = inferred.graph
    info: dict[str, TensorInfo] = {}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        ti = _info_from_type(vi.type)
        if ti is not None:
            info[vi.name] = ti
    for init in g.initializer:
        info[init.name] = TensorInfo(int(init.data_type), [int(d) for d in init.dims])
    for node in g.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            value = constant_node_value(node)
            if value is not None:
                info[node.output[0]] = TensorInfo(
                    helper.np_dtype_to_tensor_dtype(value.dtype), [int(d) for d in value.shape]
                )
    return info


def constant_node_value(node: onnx.NodeProto) -> np.ndarray | None:
    for a in node.attribute:
        if a.name == "value":
            return numpy_helper.to_array(a.t)
        if a.name == "value_float":
            return np.array(a.f, np.float32)
        if a.name == "value_floats":
            return np.array(list(a.floats), np.float32)
        if a.name == "value_int":
            return np.array(a.i, np.int64)
        if a.name == "value_ints":
            return np.array(list(a.ints), np.int64)
    return None


def node_inputs(node: onnx.NodeProto) -> list[str]:
    """Explicit inputs plus outer-scope names read inside subgraphs (If/Loop/Scan bodies)."""
    names = [i for i in node.input if i]
    for a in node.attribute:
        graphs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
        for sub in graphs:
            defined = {i.name for i in sub.input} | {t.name for t in sub.initializer}
            for n in sub.node:
                names += [i for i in node_inputs(n) if i and i not in defined]
                defined.update(n.output)
    return names


@dataclass
class GradContext:
    """Everything a VJP rule may use: tensor facts, constants, and a node emitter.

    Rules never touch the graph directly; they call :meth:`emit` and friends, which append to
    ``nodes``/``initializers`` with names that cannot clash with the forward graph.
    """

    info: dict[str, TensorInfo]
    constants: dict[str, np.ndarray]
    opset: int
    taken: set[str]
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    initializers: list[onnx.TensorProto] = field(default_factory=list)
    scope: str = "grad"
    _counter: int = 0
    _const_cache: dict[tuple[bytes, str, tuple[int, ...]], str] = field(default_factory=dict)
    _shape_cache: dict[str, str] = field(default_factory=dict)

    # -- naming and emission -------------------------------------------------------------------
    def fresh(self, hint: str = "t") -> str:
        """A tensor name unused in the forward and backward graphs."""
        while True:
            self._counter += 1
            name = f"{self.scope}/{hint}_{self._counter}"
            if name not in self.taken:
                self.taken.add(name)
                return name

    def emit(self, op_type: str, inputs: Sequence[str], n_out: int = 1, **attrs: object) -> str:
        """Append one node; return its first output (see :meth:`emit_multi` for several)."""
        return self.emit_multi(op_type, inputs, n_out, **attrs)[0]

    def emit_multi(self, op_type: str, inputs: Sequence[str], n_out: int, **attrs: object) -> list[str]:
        outs = [self.fresh(op_type) for _ in range(n_out)]
        clean = {k: v for k, v in attrs.items() if v is not None}
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=outs[0], **clean))
        return outs

    def const(self, value: np.ndarray, hint: str = "c") -> str:
        """An initializer holding ``value`` (deduplicated)."""
        value = np.asarray(value)
        key = (value.tobytes(), str(value.dtype), tuple(value.shape))
        if key not in self._const_cache:
            name = self.fresh(hint)
            self.initializers.append(numpy_helper.from_array(value, name))
            self.info[name] = TensorInfo(helper.np_dtype_to_tensor_dtype(value.dtype), list(value.shape))
            self._const_cache[key] = name
        return self._const_cache[key]

    def ints(self, values: Sequence[int]) -> str:
        """A 1-D int64 constant (axes, shapes, starts...)."""
        return self.const(np.asarray(list(values), np.int64), "ints")

    def int_scalar(self, value: int) -> str:
        return self.const(np.asarray(value, np.int64), "i")

    def scalar(self, value: float, like: str) -> str:
        """A rank-0 constant with the float dtype of tensor ``like``."""
        return self.const(np.asarray(value, dtype=self.np_dtype(like)), "s")

    # -- tensor facts ----------------------------------------------------------------------------
    def dtype(self, name: str) -> int:
        ti = self.info.get(name)
        if ti is None:
            raise UnsupportedOpError(f"no type known for tensor {name!r}; run shape inference on the model")
        return ti.dtype

    def np_dtype(self, name: str) -> np.dtype:
        return np.dtype(helper.tensor_dtype_to_np_dtype(self.dtype(name)))

    def shape(self, name: str) -> list[Dim] | None:
        ti = self.info.get(name)
        return None if ti is None else ti.shape

    def rank(self, name: str, node: onnx.NodeProto | None = None) -> int:
        """Rank of ``name``; raises when shape inference could not tell."""
        shape = self.shape(name)
        if shape is None:
            raise UnsupportedOpError(
                f"gradient needs the rank of {name!r}; fix the input shapes (--shape)",
                op_type=node.op_type if node else None,
                node=node.name if node else None,
            )
        return len(shape)

    def static_shape(self, name: str, node: onnx.NodeProto | None = None) -> list[int]:
        """Fully known shape of ``name``; raises with a hint when a dim is symbolic."""
        shape = self.shape(name)
        if shape is None or not all(isinstance(d, int) for d in shape):
            where = f" (node {node.name!r}, {node.op_type})" if node else ""
            raise UnsupportedOpError(
                f"gradient{where} needs static dims for {name!r}, got {shape}; fix input shapes with --shape",
                op_type=node.op_type if node else None,
                node=node.name if node else None,
            )
        return [int(d) for d in shape]  # type: ignore[arg-type]

    def const_value(self, name: str) -> np.ndarray | None:
        """The value of an initializer or Constant output, else None."""
        return self.constants.get(name) if name else None

    # -- small op helpers ------------------------------------------------------------------------
    def shape_of(self, name: str) -> str:
        """The shape of ``name`` as a 1-D int64 tensor: a constant when static, else a Shape node (which
        would make the backward read ``name``)."""
        if name not in self._shape_cache:
            shape = self.shape(name)
            if shape is not None and all(isinstance(d, int) for d in shape):
                self._shape_cache[name] = self.ints([int(d) for d in shape])  # type: ignore[arg-type]
            else:
                self._shape_cache[name] = self.emit("Shape", [name])
        return self._shape_cache[name]

    def reduce(self, op_type: str, x: str, axes: Sequence[int], keepdims: bool) -> str:
        """ReduceSum/ReduceMean over ``axes`` in the form the opset wants (input vs attribute)."""
        axes_input = op_type == "ReduceSum" and self.opset >= 13 or self.opset >= 18
        if axes_input:
            return self.emit(op_type, [x, self.ints(axes)], keepdims=int(keepdims))
        return self.emit(op_type, [x], keepdims=int(keepdims), axes=list(axes))

    def unsqueeze(self, x: str, axes: Sequence[int]) -> str:
        return self.emit("Unsqueeze", [x, self.ints(axes)])

    def reshape(self, x: str, shape: str | Sequence[int]) -> str:
        target = shape if isinstance(shape, str) else self.ints(shape)
        return self.emit("Reshape", [x, target])

    def reshape_like(self, x: str, like: str) -> str:
        """Reshape ``x`` to the shape of ``like`` (static constant when known)."""
        shape = self.shape(like)
        if shape is not None and all(isinstance(d, int) for d in shape):
            return self.reshape(x, [int(d) for d in shape])  # type: ignore[arg-type]
        return self.reshape(x, self.shape_of(like))

    def zeros_like(self, name: str) -> str:
        """Zeros with the shape and dtype of ``name``."""
        value = helper.make_tensor("v", self.dtype(name), [1], [0])
        return self.emit("ConstantOfShape", [self.shape_of(name)], value=value)

    def transpose(self, x: str, perm: Sequence[int]) -> str:
        return self.emit("Transpose", [x], perm=list(perm))

    def reduce_to(self, grad: str, target: str, out: str, node: onnx.NodeProto | None = None) -> str:
        """Sum a gradient shaped like broadcast result ``out`` down to the shape of ``target``.

        Static where shape inference decides which axes were broadcast; otherwise the axes are
        found at run time (Shape/Equal/NonZero), so symbolic dims still work.
        """
        ts, os_ = self.shape(target), self.shape(out)
        if ts is None or os_ is None:
            raise UnsupportedOpError(
                f"gradient needs the ranks of {target!r} and {out!r} to undo broadcasting",
                op_type=node.op_type if node else None,
                node=node.name if node else None,
            )
        if ts == os_ and all(d is not None for d in ts):
            return grad
        lead = len(os_) - len(ts)
        axes = list(range(lead))
        decidable = True
        for i, td in enumerate(ts):
            od = os_[lead + i]
            if td == od and td is not None:
                continue
            if td == 1:
                if od != 1:
                    axes.append(lead + i)
            elif isinstance(td, int) and isinstance(od, int) and td == od:
                continue
            elif isinstance(td, int) and td > 1:
                continue  # broadcasting never grows a dim > 1
            else:
                decidable = False
        if decidable:
            if not axes:
                return grad if lead == 0 else self.reshape_like(grad, target)
            summed = self.reduce("ReduceSum", grad, axes, keepdims=True)
            return self.reshape_like(summed, target)
        return self.sum_to_runtime_shape(grad, target, lead)

    def sum_to_runtime_shape(self, grad: str, target: str, lead: int) -> str:
        """Sum ``grad`` down to the shape of ``target``, choosing the axes at run time.

        Reduces every axis where the target's dim (front-padded with ``lead`` ones) is 1 and the grad's
        is not (Shape/Equal/NonZero), so symbolic dims still work.
        """
        gshape = self.shape_of(grad)
        tshape = self.shape_of(target)
        padded = self.emit("Concat", [self.ints([1] * lead), tshape], axis=0) if lead > 0 else tshape
        one = self.int_scalar(1)
        mask = self.emit(
            "And", [self.emit("Equal", [padded, one]), self.emit("Not", [self.emit("Equal", [gshape, one])])]
        )
        axes_t = self.reshape(self.emit("NonZero", [mask]), [-1])
        summed = self.emit("ReduceSum", [grad, axes_t], keepdims=1, noop_with_empty_axes=1)
        return self.reshape(summed, tshape)

    def forward_output(self, node: onnx.NodeProto, index: int, dtype: int, shape: list[Dim] | None) -> str:
        """Name of optional output ``index`` of forward ``node``, adding it when the model left it off."""
        while len(node.output) <= index:
            node.output.append("")
        if not node.output[index]:
            node.output[index] = self.fresh(f"{node.op_type}_out{index}")
            self.info[node.output[index]] = TensorInfo(dtype, shape)
        return node.output[index]


#: Gradients of a node's outputs, one per output (None where no gradient flows).
Grads = Sequence[str | None]
#: A VJP rule: (context, forward node, output gradients) → one gradient name (or None) per node input.
#: Rules emit nodes only through the context and never touch the graph; the driver wires their results.
Rule = Callable[[GradContext, onnx.NodeProto, Grads], list[str | None]]

#: Ops whose outputs carry no gradient: shapes, indices, comparisons, piecewise-constant maths.
NON_DIFFERENTIABLE = frozenset({
    "Shape", "Size", "Constant", "ConstantOfShape", "Range", "NonZero", "ArgMax", "ArgMin",
    "Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "Not", "And", "Or", "Xor",
    "Floor", "Ceil", "Round", "Sign", "EyeLike", "RandomNormal", "RandomNormalLike", "RandomUniform",
    "RandomUniformLike", "Multinomial", "Bernoulli", "IsNaN", "IsInf", "OneHot",
})


class VJPRegistry(OpRegistry[Rule]):
    """Maps (domain, op type) to a VJP rule. Build one per use; registering an op twice is an error."""

    def __init__(self, non_differentiable: frozenset[str] = NON_DIFFERENTIABLE) -> None:
        super().__init__("VJP rule")
        self.non_differentiable = non_differentiable
