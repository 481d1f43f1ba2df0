"""Optimizer steps written into the training graph (SGD with momentum, AdamW).

Stock onnxruntime has no optimizer kernels, so the update is plain arithmetic on the gradient
outputs; learning rate and step count are graph inputs so the trainer can schedule them.

Every update reads the learning rate through a barrier that depends on all gradients, so no new value
is written before the forward and backward have read the old ones: the trainer may bind each
``<name>__new`` output to the very buffer that feeds ``<name>`` (updates in place, one copy of the
parameters and state instead of two).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxprune.errors import BadInputError

LR_INPUT = "lr"
STEP_INPUT = "step"


def new_name(name: str) -> str:
    """Output that carries the updated value of parameter or state ``name``."""
    return f"{name}__new"


@dataclass(frozen=True)
class OptimizerSpec:
    """Hyper-parameters. ``weight_decay`` applies to tensors of rank ≥ 2 unless ``decay_vectors``.

    SGD follows PyTorch: ``v = μ·v + g + λ·w``, ``w -= lr·v`` (Nesterov: ``w -= lr·(g + λ·w + μ·v)``).
    AdamW decouples decay: ``w = w·(1 - lr·λ) - lr·m̂/(√v̂ + ε)`` with bias correction from ``step``
    (the 1-based number of the step being taken).
    """

    kind: str = "sgd"
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    decay_vectors: bool = False
    max_grad_norm: float | None = None  # clip the global gradient norm (all params together) to this

    def __post_init__(self) -> None:
        if self.kind not in ("sgd", "adamw"):
            raise BadInputError(f"unknown optimizer {self.kind!r}; use sgd or adamw", field="optimizer")
        if not 0.0 <= self.momentum < 1.0 or not 0.0 <= self.beta1 < 1.0 or not 0.0 <= self.beta2 < 1.0:
            raise BadInputError("momentum and betas must be in [0, 1)", field="optimizer")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise BadInputError("max_grad_norm must be > 0", field="optimizer")

    def state_kinds(self) -> tuple[str, ...]:
        if self.kind == "adamw":
            return ("m", "v")
        return ("momentum",) if self.momentum > 0 else ()


@dataclass(frozen=True)
class ParamSlot:
    """One trained tensor: graph input ``name``, its gradient tensor and updated output."""

    name: str
    grad: str
    shape: tuple[int, ...]
    dtype: int


@dataclass(frozen=True)
class StateSlot:
    """One optimizer state tensor (zeros at the start), fed as input and returned updated."""

    name: str
    param: str
    kind: str
    shape: tuple[int, ...]
    dtype: int


def state_name(param: str, kind: str) -> str:
    return f"{param}__{kind}"


def add_optimizer(graph: onnx.GraphProto, params: list[ParamSlot], spec: OptimizerSpec) -> list[StateSlot]:
    """Append update nodes, ``lr``/``step`` and state inputs, and new-value outputs to ``graph``.

    Returns the state tensors the caller must feed (zeros at step 1) and carry between steps.
    """
    graph.input.append(helper.make_tensor_value_info(LR_INPUT, TensorProto.FLOAT, []))
    graph.input.append(helper.make_tensor_value_info(STEP_INPUT, TensorProto.INT64, []))
    b = _Emit(graph)
    squares = _global_square_norm(b, params)
    lr = _after(b, LR_INPUT, squares)
    step_f = b.node("Cast", [STEP_INPUT], to=TensorProto.FLOAT)
    shared = _adam_shared(b, spec, step_f) if spec.kind == "adamw" else {}
    if spec.max_grad_norm is not None:
        params = _clip_global_norm(b, params, squares, spec.max_grad_norm)
    states: list[StateSlot] = []
    for p in params:
        decay = spec.weight_decay if (len(p.shape) >= 2 or spec.decay_vectors) else 0.0
        lr_p = lr if p.dtype == TensorProto.FLOAT else b.node("Cast", [lr], to=p.dtype)
        slots = [StateSlot(state_name(p.name, k), p.name, k, p.shape, p.dtype) for k in spec.state_kinds()]
        for s in slots:
            graph.input.append(helper.make_tensor_value_info(s.name, s.dtype, list(s.shape)))
        if spec.kind == "sgd":
            new_w, new_states = _sgd(b, p, slots, spec, decay, lr_p)
        else:
            new_w, new_states = _adamw(b, p, slots, spec, decay, lr_p, shared)
        outputs = [(p.name, new_w, p.dtype, p.shape)] + [(s.name, v, s.dtype, s.shape) for s, v in zip(slots, new_states)]
        for name, value, dtype, shape in outputs:
            graph.node.append(helper.make_node("Identity", [value], [new_name(name)], name=new_name(name)))
            graph.output.append(helper.make_tensor_value_info(new_name(name), dtype, list(shape)))
        states.extend(slots)
    return states


class _Emit:
    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.n = 0

    def node(self, op: str, inputs: list[str], **attrs: object) -> str:
        self.n += 1
        out = f"opt/{op}_{self.n}"
        self.graph.node.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def const(self, value: float, dtype: int = TensorProto.FLOAT) -> str:
        self.n += 1
        name = f"opt/const_{self.n}"
        self.graph.initializer.append(
            numpy_helper.from_array(np.asarray(value, helper.tensor_dtype_to_np_dtype(dtype)), name)
        )
        return name


def _global_square_norm(b: _Emit, params: list[ParamSlot]) -> str | None:
    """‖g‖² over every gradient (float32 scalar), or None without params."""
    squares = [b.node("ReduceSumSquare", [p.grad], keepdims=0) for p in params]
    squares = [s if p.dtype == TensorProto.FLOAT else b.node("Cast", [s], to=TensorProto.FLOAT)
               for s, p in zip(squares, params)]
    if not squares:
        return None
    return b.node("Sum", squares) if len(squares) > 1 else squares[0]


def _after(b: _Emit, value: str, barrier: str | None) -> str:
    """``value`` unchanged, but computed only once ``barrier`` exists (a data dependency, whatever its value)."""
    if barrier is None:
        return b.node("Identity", [value])
    return b.node("Where", [b.node("IsNaN", [barrier]), value, value])


def _clip_global_norm(b: _Emit, params: list[ParamSlot], squares: str | None, max_norm: float) -> list[ParamSlot]:
    """Scale every gradient by min(1, max_norm / ‖g‖) with ‖g‖ over all params (PyTorch's clip_grad_norm_)."""
    if squares is None:
        return params
    norm = b.node("Sqrt", [squares])
    scale = b.node("Min", [b.const(1.0), b.node("Div", [b.const(max_norm), b.node("Add", [norm, b.const(1e-6)])])])
    out = []
    for p in params:
        s = scale if p.dtype == TensorProto.FLOAT else b.node("Cast", [scale], to=p.dtype)
        out.append(ParamSlot(p.name, b.node("Mul", [p.grad, s]), p.shape, p.dtype))
    return out


def _decayed_grad(b: _Emit, p: ParamSlot, decay: float) -> str:
    if not decay:
        return p.grad
    return b.node("Add", [p.grad, b.node("Mul", [p.name, b.const(decay, p.dtype)])])


def _sgd(
    b: _Emit, p: ParamSlot, slots: list[StateSlot], spec: OptimizerSpec, decay: float, lr: str
) -> tuple[str, list[str]]:
    g = _decayed_grad(b, p, decay)
    if not slots:
        return b.node("Sub", [p.name, b.node("Mul", [g, lr])]), []
    v = b.node("Add", [b.node("Mul", [slots[0].name, b.const(spec.momentum, p.dtype)]), g])
    direction = b.node("Add", [g, b.node("Mul", [v, b.const(spec.momentum, p.dtype)])]) if spec.nesterov else v
    return b.node("Sub", [p.name, b.node("Mul", [direction, lr])]), [v]


def _adam_shared(b: _Emit, spec: OptimizerSpec, step: str) -> dict[str, str]:
    """Bias corrections 1/(1-β1^t) and 1/(1-β2^t), computed once per step for all params."""
    one = b.const(1.0)
    c1 = b.node("Reciprocal", [b.node("Sub", [one, b.node("Pow", [b.const(spec.beta1), step])])])
    c2 = b.node("Reciprocal", [b.node("Sub", [one, b.node("Pow", [b.const(spec.beta2), step])])])
    return {"c1": c1, "c2": c2}


def _adamw(
    b: _Emit, p: ParamSlot, slots: list[StateSlot], spec: OptimizerSpec, decay: float, lr: str, shared: dict[str, str]
) -> tuple[str, list[str]]:
    m_in, v_in = slots[0].name, slots[1].name
    dt = p.dtype
    c1, c2 = shared["c1"], shared["c2"]
    if dt != TensorProto.FLOAT:
        c1, c2 = b.node("Cast", [c1], to=dt), b.node("Cast", [c2], to=dt)
    m = b.node("Add", [b.node("Mul", [m_in, b.const(spec.beta1, dt)]), b.node("Mul", [p.grad, b.const(1 - spec.beta1, dt)])])
    gg = b.node("Mul", [p.grad, p.grad])
    v = b.node("Add", [b.node("Mul", [v_in, b.const(spec.beta2, dt)]), b.node("Mul", [gg, b.const(1 - spec.beta2, dt)])])
    denom = b.node("Add", [b.node("Sqrt", [b.node("Mul", [v, c2])]), b.const(spec.eps, dt)])
    update = b.node("Div", [b.node("Mul", [m, c1]), denom])
    w = p.name
    if decay:
        w = b.node("Mul", [w, b.node("Sub", [b.const(1.0, dt), b.node("Mul", [lr, b.const(decay, dt)])])])
    return b.node("Sub", [w, b.node("Mul", [update, lr])]), [m, v]
