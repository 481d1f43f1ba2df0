"""Losses appended to an inference graph, in standard ONNX ops, so the autodiff driver sees them.

Cross-entropy needs labels; distillation needs only the original model's outputs (fed as inputs),
which is what lets a pipeline with unlabeled calibration data still fine-tune.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxprune.errors import BadInputError
from onnxprune.training.grad.context import FLOAT_TYPES, TensorInfo, collect_tensor_info

LOSS_OUTPUT = "loss"
LABELS_INPUT = "labels"


def teacher_input(output: str) -> str:
    """Name of the graph input that carries the teacher's value of ``output``."""
    return f"teacher/{output}"


def target_input(output: str) -> str:
    """Name of the graph input that carries the regression target for ``output``."""
    return f"target/{output}"


@dataclass(frozen=True)
class LossSpec:
    """Which loss, on which outputs.

    ``kind``: ``ce`` (integer class labels on axis 1 of ``outputs[0]``), ``distill`` (against teacher
    outputs: KL on temperature-softened logits for classifier outputs, MSE for the rest; ``distill_mode``
    forces one) or ``mse`` (against ``target/<output>`` inputs). ``outputs`` empty means: the first
    model output for ce, every float output for distill and mse.
    """

    kind: str = "ce"
    outputs: tuple[str, ...] = ()
    temperature: float = 2.0
    distill_mode: str = "auto"  # auto | kl | mse

    def __post_init__(self) -> None:
        if self.kind not in ("ce", "distill", "mse"):
            raise BadInputError(f"unknown loss {self.kind!r}; use ce, distill or mse", field="loss")
        if self.distill_mode not in ("auto", "kl", "mse"):
            raise BadInputError(f"unknown distill_mode {self.distill_mode!r}; use auto, kl or mse", field="loss")
        if self.temperature <= 0:
            raise BadInputError(f"temperature must be > 0, got {self.temperature}", field="loss")


@dataclass(frozen=True)
class LossGraph:
    """The model with a scalar ``loss`` output and the extra inputs the loss reads."""

    model: onnx.ModelProto
    loss: str
    labels: str | None
    teacher: dict[str, str] = field(default_factory=dict)  # model output → teacher input
    targets: dict[str, str] = field(default_factory=dict)  # model output → target input
    terms: dict[str, str] = field(default_factory=dict)  # model output → "ce" | "kl" | "mse"


class _Builder:
    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.n = 0

    def node(self, op: str, inputs: list[str], **attrs: object) -> str:
        self.n += 1
        out = f"loss/{op}_{self.n}"
        self.graph.node.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def const(self, value: np.ndarray) -> str:
        self.n += 1
        name = f"loss/const_{self.n}"
        self.graph.initializer.append(numpy_helper.from_array(value, name))
        return name

    def mean_all(self, x: str) -> str:
        return self.node("ReduceMean", [x], keepdims=0)


def _is_classifier(ti: TensorInfo) -> bool:
    shape = ti.shape or []
    return len(shape) == 2 and (not isinstance(shape[1], int) or shape[1] > 1)


def add_loss(model: onnx.ModelProto, spec: LossSpec) -> LossGraph:
    """Return a copy of ``model`` whose graph also computes the scalar ``loss``.

    Raises:
        BadInputError: an output named in ``spec`` does not exist or is not a float tensor.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    info = collect_tensor_info(out)
    names = [o.name for o in g.output]
    float_outs = [n for n in names if info.get(n) and info[n].dtype in FLOAT_TYPES]
    chosen = list(spec.outputs) or (float_outs[:1] if spec.kind == "ce" else float_outs)
    for n in chosen:
        if n not in float_outs:
            raise BadInputError(f"loss output {n!r} is not a float output of the model (outputs: {names})", field="loss")
    if not chosen:
        raise BadInputError("the model has no float output to put a loss on", field="loss")
    b = _Builder(g)
    terms: list[str] = []
    kinds: dict[str, str] = {}
    teacher: dict[str, str] = {}
    targets: dict[str, str] = {}
    labels = None
    for name in chosen:
        ti = info[name]
        dtype = ti.dtype
        if spec.kind == "ce":
            labels = LABELS_INPUT
            shape = ti.shape or []
            label_shape = ([shape[0]] + list(shape[2:])) if shape else None
            g.input.append(helper.make_tensor_value_info(labels, TensorProto.INT64, label_shape))
            logp = b.node("LogSoftmax", [name], axis=1)
            index = b.node("Unsqueeze", [labels, b.const(np.array([1], np.int64))])
            picked = b.node("GatherElements", [logp, index], axis=1)
            terms.append(b.node("Neg", [b.mean_all(picked)]))
            kinds[name] = "ce"
        elif spec.kind == "distill":
            t_in = teacher_input(name)
            teacher[name] = t_in
            g.input.append(helper.make_tensor_value_info(t_in, dtype, ti.shape))
            use_kl = spec.distill_mode == "kl" or (spec.distill_mode == "auto" and _is_classifier(ti))
            if use_kl:
                temp = np.asarray(spec.temperature, helper.tensor_dtype_to_np_dtype(dtype))
                t = b.const(temp)
                logq = b.node("LogSoftmax", [b.node("Div", [name, t])], axis=1)
                logp = b.node("LogSoftmax", [b.node("Div", [t_in, t])], axis=1)
                kl = b.node("ReduceSum", [b.node("Mul", [b.node("Exp", [logp]), b.node("Sub", [logp, logq])]),
                                          b.const(np.array([1], np.int64))], keepdims=0)
                # × T² keeps gradient magnitudes comparable across temperatures (Hinton et al.)
                terms.append(b.node("Mul", [b.mean_all(kl), b.const(temp * temp)]))
                kinds[name] = "kl"
            else:
                d = b.node("Sub", [name, t_in])
                terms.append(b.mean_all(b.node("Mul", [d, d])))
                kinds[name] = "mse"
        else:
            t_in = target_input(name)
            targets[name] = t_in
            g.input.append(helper.make_tensor_value_info(t_in, dtype, ti.shape))
            d = b.node("Sub", [name, t_in])
            terms.append(b.mean_all(b.node("Mul", [d, d])))
            kinds[name] = "mse"
    g.node.append(helper.make_node("Sum" if len(terms) > 1 else "Identity", terms, [LOSS_OUTPUT], name=LOSS_OUTPUT))
    g.output.append(helper.make_tensor_value_info(LOSS_OUTPUT, info[chosen[0]].dtype, []))
    return LossGraph(out, LOSS_OUTPUT, labels, teacher, targets, kinds)
