"""Losses appended to an inference graph, in standard ONNX ops, so the autodiff driver sees them.

Cross-entropy needs labels; distillation needs only the original model's outputs (fed as inputs),
which is what lets a pipeline with unlabeled calibration data still fine-tune. Class scores are read
*before* a trailing Softmax/LogSoftmax/Sigmoid, over the axis that activation normalises
(:mod:`onnxprune.training.outputs`): cross-entropy on probabilities squashes the gradients, and
``[N, T, C]`` outputs keep their classes on the last axis, not on axis 1.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxprune.errors import BadInputError
from onnxprune.training.grad.context import FLOAT_TYPES, TensorInfo, collect_tensor_info
from onnxprune.training.outputs import (
    OutputKind,
    OutputSemantics,
    add_logits_views,
    as_logits,
    cache_outputs,
    is_token_logits,
    logits_model,
    output_semantics,
    view_name,
    vocabularies,
    with_class_axis,
)

log = logging.getLogger(__name__)

LOSS_OUTPUT = "loss"
LABELS_INPUT = "labels"


def teacher_input(output: str) -> str:
    """Name of the graph input that carries the teacher's value of ``output`` (its logits for KL terms)."""
    return f"teacher/{output}"


def target_input(output: str) -> str:
    """Name of the graph input that carries the regression target for ``output``."""
    return f"target/{output}"


@dataclass(frozen=True)
class FeatureMatch:
    """An intermediate tensor distilled from the teacher's tensor of the same name.

    ``axis``/``keep``: the student lost channels there; the teacher's value is taken at positions ``keep``
    along ``axis`` (the channels the cut kept, in order). None: both have the same shape.
    """

    tensor: str
    axis: int | None = None
    keep: tuple[int, ...] | None = None


@dataclass(frozen=True)
class LossSpec:
    """Which loss, on which outputs.

    ``kind``: ``ce`` (integer labels shaped like the output without its class axis: ``[N]`` for ``[N, C]``,
    ``[N, T]`` for ``[N, T, C]``; Sigmoid outputs get binary cross-entropy with 0/1 labels shaped like the
    output), ``distill`` (against the teacher: KL on temperature-softened logits over the class axis for
    Softmax/LogSoftmax outputs, ``[N, C]`` raw scores and LM token logits ``[N, T, V]``, Bernoulli KL per
    element for Sigmoid outputs, MSE for the rest; ``distill_mode`` forces KL or MSE) or ``mse`` (against ``target/<output>`` inputs).
    ``outputs`` empty means: the first model output for ce, every float output for distill and mse, less KV-cache
    outputs (:func:`~onnxprune.training.outputs.cache_outputs`: generation state, not a task output).
    ``class_axis`` overrides the class axis (in the output's axes) of every output the loss uses.
    ``features`` names intermediate tensors matched against the teacher's same-named tensors (feature
    distillation, ``distill`` only): each adds ``feature_weight / len(features)`` times its squared error
    relative to the teacher's mean square, so tensors of any scale weigh alike.
    """

    kind: str = "ce"
    outputs: tuple[str, ...] = ()
    temperature: float = 2.0
    distill_mode: str = "auto"  # auto | kl | mse
    class_axis: int | None = None
    features: tuple[str, ...] = ()
    feature_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in ("ce", "distill", "mse"):
            raise BadInputError(f"unknown loss {self.kind!r}; use ce, distill or mse", field="loss")
        if self.distill_mode not in ("auto", "kl", "mse"):
            raise BadInputError(f"unknown distill_mode {self.distill_mode!r}; use auto, kl or mse", field="loss")
        if self.temperature <= 0:
            raise BadInputError(f"temperature must be > 0, got {self.temperature}", field="loss")
        if self.features and self.kind != "distill":
            raise BadInputError("feature distillation needs a teacher: loss 'distill'", field="loss")
        if self.feature_weight < 0:
            raise BadInputError(f"feature_weight must be >= 0, got {self.feature_weight}", field="loss")


class LossKind(StrEnum):
    """The per-output loss terms (their values are the strings ``LossGraph.terms`` always held)."""

    CE = "ce"  # softmax cross-entropy with integer labels over the class axis
    BCE = "bce"  # binary cross-entropy of Sigmoid logits with 0/1 labels
    KL = "kl"  # KL(teacher || student) of temperature-softened softmax over the class axis
    BERNOULLI_KL = "bernoulli_kl"  # per-element KL of temperature-softened Sigmoid probabilities
    MSE = "mse"  # mean squared error of the output against a teacher or target
    FEATURE = "feature"  # squared error of an intermediate tensor relative to the teacher's mean square


@dataclass(frozen=True)
class LossTerm:
    """One output's part of the loss: which tensor it reads, over which axis, against which input.

    ``tensor`` is the output's logits laid out like the output (:func:`~onnxprune.training.outputs.view_name`)
    for every kind but MSE, which reads the output itself. ``feed`` is the teacher or target input (None
    for label losses). Teacher values for KL terms are logits in the output's layout.
    """

    output: str
    kind: LossKind
    tensor: str
    semantics: OutputSemantics
    feed: str | None = None

    @property
    def class_axis(self) -> int | None:
        """The axis the term reduces over, in ``tensor``'s (= the output's) axes."""
        return self.semantics.class_axis

    @property
    def reads_logits(self) -> bool:
        return self.kind not in (LossKind.MSE, LossKind.FEATURE)

    def to_json(self) -> dict[str, Any]:
        """Plain fields for a manifest."""
        return {"output": self.output, "kind": self.kind.value, "tensor": self.tensor, "class_axis": self.class_axis,
                "feed": self.feed, "semantics": self.semantics.to_json()}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LossTerm:
        """Inverse of :meth:`to_json`."""
        return cls(data["output"], LossKind(data["kind"]), data["tensor"],
                   OutputSemantics.from_json(data["semantics"]), data.get("feed"))


@dataclass(frozen=True)
class LossGraph:
    """The model with a scalar ``loss`` output and the extra inputs the loss reads.

    ``terms`` maps each output to its term kind's string (as before); ``loss_terms`` says what each
    term read: the tensor, class axis and the output's semantics.
    """

    model: onnx.ModelProto
    loss: str
    labels: str | None
    teacher: dict[str, str] = field(default_factory=dict)  # model output → teacher input
    targets: dict[str, str] = field(default_factory=dict)  # model output → target input
    terms: dict[str, str] = field(default_factory=dict)  # model output → LossKind value
    loss_terms: tuple[LossTerm, ...] = ()


class _Builder:
    def __init__(self, graph: onnx.GraphProto, dtype: int) -> None:
        self.graph = graph
        self.np_dtype = helper.tensor_dtype_to_np_dtype(dtype)
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

    def scalar(self, value: float) -> str:
        return self.const(np.asarray(value, self.np_dtype))

    def ints(self, values: Sequence[int]) -> str:
        return self.const(np.asarray(list(values), np.int64))

    def mean_all(self, x: str) -> str:
        return self.node("ReduceMean", [x], keepdims=0)

    def input(self, name: str, dtype: int, shape: Sequence[object] | None) -> str:
        if name not in {i.name for i in self.graph.input}:
            self.graph.input.append(helper.make_tensor_value_info(name, dtype, None if shape is None else list(shape)))
        return name


def _is_classifier(ti: TensorInfo) -> bool:
    shape = ti.shape or []
    return len(shape) == 2 and (not isinstance(shape[1], int) or shape[1] > 1)


def _label_shape(ti: TensorInfo, sem: OutputSemantics, binary: bool) -> list[object] | None:
    """Labels are shaped like the output without its class axes (like the output for binary CE)."""
    if ti.shape is None or binary:
        return ti.shape
    axis = sem.class_axis
    assert axis is not None  # _choose_kind checked
    return list(ti.shape[:axis]) + list(ti.shape[axis + sem.class_span:])


def _choose_kind(spec: LossSpec, sem: OutputSemantics, ti: TensorInfo, token_logits: bool = False) -> LossKind:
    """The term for one output; a class-axis loss on an output whose axis is unknown is an error or MSE.

    ``token_logits``: the output is an LM's raw ``[N, T, V]`` scores
    (:func:`~onnxprune.training.outputs.is_token_logits`), distilled by KL over V per position.

    Raises:
        BadInputError: ce or distill_mode="kl" on an output whose class axis could not be followed.
    """
    sigmoid = sem.kind is OutputKind.SIGMOID
    if spec.kind == "mse" or (spec.kind == "distill" and spec.distill_mode == "mse"):
        return LossKind.MSE
    if sigmoid:
        return LossKind.BCE if spec.kind == "ce" else LossKind.BERNOULLI_KL
    categorical = sem.kind.categorical or _is_classifier(ti) or token_logits
    if spec.kind == "distill" and spec.distill_mode == "auto" and not categorical:
        return LossKind.MSE  # raw scores of another shape may be regression values: no classes assumed
    if sem.class_axis is None:
        if spec.kind == "distill" and spec.distill_mode == "auto":
            log.warning("output %r: %s; distilling it with MSE (set class_axis for KL)", sem.output, sem.note)
            return LossKind.MSE
        raise BadInputError(f"output {sem.output!r}: {sem.note}; pass the class axis (class_axis)", field="class_axis")
    return LossKind.CE if spec.kind == "ce" else LossKind.KL


def _over_classes(b: _Builder, x: str, sem: OutputSemantics) -> tuple[str, int]:
    """``x`` with its classes on one axis: classes spanning several trailing axes are flattened."""
    axis = sem.class_axis
    assert axis is not None
    if sem.class_span == 1:
        return x, axis
    return b.node("Flatten", [x], axis=axis), 1


def _ce(b: _Builder, logits: str, labels: str, sem: OutputSemantics) -> str:
    x, axis = _over_classes(b, logits, sem)
    if sem.class_span > 1:
        labels = b.node("Reshape", [labels, b.ints([-1])])
    logp = b.node("LogSoftmax", [x], axis=axis)
    picked = b.node("GatherElements", [logp, b.node("Unsqueeze", [labels, b.ints([axis])])], axis=axis)
    return b.node("Neg", [b.mean_all(picked)])  # mean over every position: N, and T for sequences


def _bce(b: _Builder, logits: str, labels: str, dtype: int) -> str:
    y = b.node("Cast", [labels], to=dtype)
    # softplus(z) - y·z = -[y·log σ(z) + (1-y)·log(1-σ(z))], finite for any z
    return b.mean_all(b.node("Sub", [b.node("Softplus", [logits]), b.node("Mul", [y, logits])]))


def _kl(b: _Builder, student: str, teacher: str, sem: OutputSemantics, temperature: float) -> str:
    t = b.scalar(temperature)
    s_x, axis = _over_classes(b, b.node("Div", [student, t]), sem)
    t_x, _ = _over_classes(b, b.node("Div", [teacher, t]), sem)
    logq = b.node("LogSoftmax", [s_x], axis=axis)
    logp = b.node("LogSoftmax", [t_x], axis=axis)
    kl = b.node("ReduceSum", [b.node("Mul", [b.node("Exp", [logp]), b.node("Sub", [logp, logq])]), b.ints([axis])],
                keepdims=0)
    # × T² keeps gradient magnitudes comparable across temperatures (Hinton et al.)
    return b.node("Mul", [b.mean_all(kl), b.scalar(temperature * temperature)])


def _bernoulli_kl(b: _Builder, student: str, teacher: str, temperature: float) -> str:
    t = b.scalar(temperature)
    s, u = b.node("Div", [student, t]), b.node("Div", [teacher, t])
    p = b.node("Sigmoid", [u])
    # KL(Bern(σ(u)) || Bern(σ(s))) = softplus(s) - softplus(u) - σ(u)·(s - u), per element
    kl = b.node("Sub", [b.node("Sub", [b.node("Softplus", [s]), b.node("Softplus", [u])]),
                        b.node("Mul", [p, b.node("Sub", [s, u])])])
    return b.node("Mul", [b.mean_all(kl), b.scalar(temperature * temperature)])


def _mse(b: _Builder, x: str, ref: str) -> str:
    d = b.node("Sub", [x, ref])
    return b.mean_all(b.node("Mul", [d, d]))


FEATURE_EPS = 1e-6
"""Added to the teacher's mean square in feature terms (an all-zero teacher tensor stays finite)."""


def _feature(b: _Builder, x: str, ref: str, weight: float) -> str:
    """``weight · mean((x - ref)²) / (mean(ref²) + eps)``: the relative error, scale-free across tensors."""
    energy = b.node("Add", [_mse(b, ref, b.scalar(0.0)), b.scalar(FEATURE_EPS)])
    return b.node("Mul", [b.node("Div", [_mse(b, x, ref), energy]), b.scalar(weight)])


def _feature_terms(b: _Builder, spec: LossSpec, info: Mapping[str, TensorInfo]) -> list[tuple[LossTerm, str]]:
    """One term per ``spec.features`` tensor, fed the teacher's value of the same tensor."""
    found: list[tuple[LossTerm, str]] = []
    for name in spec.features:
        ti = info.get(name)
        if ti is None or ti.dtype not in FLOAT_TYPES:
            raise BadInputError(f"feature {name!r} is not a float tensor of the model", field="loss")
        feed = b.input(teacher_input(name), ti.dtype, ti.shape)
        rank = None if ti.shape is None else len(ti.shape)
        sem = OutputSemantics(name, OutputKind.LOGITS, name, None, rank, note="intermediate feature")
        found.append((LossTerm(name, LossKind.FEATURE, name, sem, feed),
                      _feature(b, name, feed, spec.feature_weight / len(spec.features))))
    return found


def _semantics(model: onnx.ModelProto, spec: LossSpec, info: Mapping[str, TensorInfo],
               given: Mapping[str, OutputSemantics] | None) -> dict[str, OutputSemantics]:
    sems = dict(output_semantics(model, info=info))
    sems.update(given or {})
    if spec.class_axis is not None:
        sems = {k: with_class_axis(v, spec.class_axis) for k, v in sems.items()}
    return sems


def add_loss(model: onnx.ModelProto, spec: LossSpec, *,
             semantics: Mapping[str, OutputSemantics] | None = None) -> LossGraph:
    """Return a copy of ``model`` whose graph also computes the scalar ``loss``.

    Each term reads the output's logits (the tensor before its Softmax/LogSoftmax/Sigmoid, replayed into
    the output's layout) over its class axis; ``semantics`` replaces what
    :func:`~onnxprune.training.outputs.output_semantics` finds for the outputs it names. The model should
    be at opset ≥ 13 (per-axis Softmax, ReduceSum axes as input), as training graphs are.

    Raises:
        BadInputError: an output named in ``spec`` does not exist or is not a float tensor, or a class
            loss needs the class axis of an output where it cannot be told.

    Example:
        >>> lg = add_loss(model, LossSpec("ce"))  # doctest: +SKIP
        >>> lg.loss_terms[0].tensor, lg.loss_terms[0].class_axis  # doctest: +SKIP
        ('logits', 2)
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    info = collect_tensor_info(out)
    names = [o.name for o in g.output]
    state = set(cache_outputs(out))  # a KV cache is generation state: no loss unless named
    float_outs = [n for n in names if info.get(n) and info[n].dtype in FLOAT_TYPES]
    task_outs = [n for n in float_outs if n not in state]
    chosen = list(spec.outputs) or (task_outs[:1] if spec.kind == "ce" else task_outs)
    for n in chosen:
        if n not in float_outs:
            raise BadInputError(f"loss output {n!r} is not a float output of the model (outputs: {names})", field="loss")
    if not chosen:
        raise BadInputError("the model has no float output to put a loss on", field="loss")
    sems = _semantics(out, spec, info, semantics)
    vocab = vocabularies(out)
    b = _Builder(g, info[chosen[0]].dtype)
    values: list[str] = []
    terms: list[LossTerm] = []
    labels = None
    for name in chosen:
        ti, sem = info[name], sems[name]
        kind = _choose_kind(spec, sem, ti, is_token_logits(sem, info, vocab))
        x = name if kind is LossKind.MSE else add_logits_views(g, [sem])[name]
        feed: str | None = None
        if kind in (LossKind.CE, LossKind.BCE):
            labels = b.input(LABELS_INPUT, TensorProto.INT64, _label_shape(ti, sem, kind is LossKind.BCE))
            values.append(_ce(b, x, labels, sem) if kind is LossKind.CE else _bce(b, x, labels, ti.dtype))
        else:
            feed = b.input(target_input(name) if spec.kind == "mse" else teacher_input(name), ti.dtype, ti.shape)
            if kind is LossKind.KL:
                values.append(_kl(b, x, feed, sem, spec.temperature))
            elif kind is LossKind.BERNOULLI_KL:
                values.append(_bernoulli_kl(b, x, feed, spec.temperature))
            else:
                values.append(_mse(b, x, feed))
        terms.append(LossTerm(name, kind, x, sem, feed))
    for term, value in _feature_terms(b, spec, info):
        terms.append(term)
        values.append(value)
    g.node.append(helper.make_node("Sum" if len(values) > 1 else "Identity", values, [LOSS_OUTPUT], name=LOSS_OUTPUT))
    g.output.append(helper.make_tensor_value_info(LOSS_OUTPUT, info[chosen[0]].dtype, []))
    teacher = {t.output: t.feed for t in terms if t.feed and spec.kind != "mse"}
    targets = {t.output: t.feed for t in terms if t.feed and spec.kind == "mse"}
    return LossGraph(out, LOSS_OUTPUT, labels, teacher, targets, {t.output: t.kind.value for t in terms}, tuple(terms))


# ------------------------------------------------------------------------------------------------
# teacher values


@dataclass(frozen=True)
class TeacherFetch:
    """Where one teacher input's values come from: ``tensor`` of the plan's model, converted to logits
    with ``convert`` (the teacher output's semantics) when only its outputs fit."""

    output: str  # the student output whose teacher input this feeds (``TrainData.teacher`` key)
    tensor: str
    convert: OutputSemantics | None = None
    keep: FeatureMatch | None = None  # a feature whose student lost channels: take the kept ones

    def read(self, fetched: Mapping[str, np.ndarray]) -> np.ndarray:
        """This fetch's teacher value from one run's fetched tensors."""
        value = fetched[self.tensor]
        if self.convert is not None:
            return as_logits(value, self.convert)
        if self.keep is not None and self.keep.axis is not None and self.keep.keep is not None:
            return np.ascontiguousarray(np.take(value, list(self.keep.keep), axis=self.keep.axis))
        return np.asarray(value)


@dataclass(frozen=True)
class TeacherPlan:
    """A teacher model exposing what the loss's teacher inputs need, and how to read it.

    Example:
        >>> plan = teacher_plan(original, lg.loss_terms, [o.name for o in student.graph.output])  # doctest: +SKIP
        >>> values = plan.values(session.run(feeds, plan.tensors))  # doctest: +SKIP
    """

    model: onnx.ModelProto
    fetches: tuple[TeacherFetch, ...]

    @property
    def tensors(self) -> list[str]:
        """Tensors to fetch from :attr:`model` (graph outputs of it)."""
        return list(dict.fromkeys(f.tensor for f in self.fetches))

    def values(self, fetched: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Student output → teacher input values, from one run's fetched tensors."""
        return {f.output: f.read(fetched) for f in self.fetches}


def teacher_plan(teacher: onnx.ModelProto, terms: Sequence[LossTerm], student_outputs: Sequence[str],
                 features: Sequence[FeatureMatch] = ()) -> TeacherPlan:
    """How to compute the teacher inputs of ``terms`` with ``teacher`` (outputs matched by position).

    KL terms want the teacher's logits: when the teacher's output has the same semantics as the
    student's (the original model of a pruned one), its pre-activation tensor is exposed as an extra
    output; otherwise its output values are converted (:func:`~onnxprune.training.outputs.as_logits`).
    MSE terms take the teacher's outputs as they are. Feature terms take the teacher's tensor of the same
    name, at the kept channels when ``features`` says the student lost some.

    Raises:
        BadInputError: the teacher has another number of outputs than the student.
    """
    t_names = [o.name for o in teacher.graph.output]
    if len(t_names) != len(student_outputs):
        raise BadInputError(f"the teacher has {len(t_names)} outputs, the model {len(student_outputs)}",
                            field="teacher")
    t_sems = output_semantics(teacher)
    by_student = dict(zip(student_outputs, t_names))
    views: list[OutputSemantics] = []
    fetches: list[TeacherFetch] = []
    exposed: list[str] = []
    matches = {m.tensor: m for m in features}
    for term in terms:
        if term.feed is None:
            continue
        if term.kind is LossKind.FEATURE:  # the teacher's tensor of the same name, exposed as an output
            exposed.append(term.tensor)
            fetches.append(TeacherFetch(term.output, term.tensor, keep=matches.get(term.tensor)))
            continue
        t_sem = t_sems[by_student[term.output]]
        if not term.reads_logits:
            fetches.append(TeacherFetch(term.output, t_sem.output))
        elif t_sem.compatible(term.semantics):
            views.append(t_sem)
            fetches.append(TeacherFetch(term.output, view_name(t_sem)))
        else:
            if t_sem.kind is not OutputKind.LOGITS:
                log.warning("teacher output %r (%s, class axis %s) differs from the model's %r (%s, class axis %s); "
                            "its values are converted to logits", t_sem.output, t_sem.kind.value, t_sem.class_axis,
                            term.output, term.semantics.kind.value, term.class_axis)
            fetches.append(TeacherFetch(term.output, t_sem.output, t_sem))
    model = logits_model(teacher, views)[0] if views else teacher
    if exposed:
        model = with_outputs(model, exposed)
    return TeacherPlan(model, tuple(fetches))


def with_outputs(model: onnx.ModelProto, tensors: Sequence[str]) -> onnx.ModelProto:
    """Copy of ``model`` with ``tensors`` (node outputs of its main graph) as extra graph outputs.

    Raises:
        BadInputError: a tensor the graph does not compute (a teacher without that feature).
    """
    produced = {o for n in model.graph.node for o in n.output if o}
    missing = [t for t in tensors if t not in produced]
    if missing:
        raise BadInputError(f"feature tensor(s) {missing[:5]} are not computed by the teacher model", field="teacher")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    present = {o.name for o in out.graph.output}
    info = collect_tensor_info(out)
    for name in dict.fromkeys(tensors):
        if name not in present:
            ti = info.get(name)
            out.graph.output.append(helper.make_tensor_value_info(name, ti.dtype if ti else TensorProto.FLOAT, None))
    return out


# ------------------------------------------------------------------------------------------------
# the same losses in numpy, for held-out evaluation


def _classes_last(x: np.ndarray, sem: OutputSemantics) -> np.ndarray:
    axis = sem.class_axis
    assert axis is not None
    if sem.class_span > 1:
        x = x.reshape(x.shape[:axis] + (-1,))
    return np.moveaxis(x, axis, -1)


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return np.exp(-np.logaddexp(0.0, -z))


def term_metrics(term: LossTerm, value: np.ndarray, *, labels: np.ndarray | None = None,
                 reference: np.ndarray | None = None, temperature: float = 2.0,
                 feature_weight: float = 1.0) -> dict[str, float]:
    """The term's loss computed in float64 numpy from the tensor it reads, plus a task metric.

    ``value`` is the term's tensor (logits view, or the output for MSE); ``reference`` the teacher or
    target value it is compared with. ``accuracy`` needs labels; ``agreement`` is the fraction of
    positions where student and teacher pick the same class (same side of 0.5 for Sigmoid outputs).
    ``feature_weight`` is the weight of a feature term (:class:`LossSpec`'s, divided by the number of features).
    """
    x = np.asarray(value, np.float64)
    t2 = temperature * temperature
    if term.kind is LossKind.CE:
        assert labels is not None
        z = _classes_last(x, term.semantics)
        lab = np.asarray(labels).reshape(z.shape[:-1])
        picked = np.take_along_axis(_log_softmax(z), lab[..., None], axis=-1)
        return {"loss": float(-np.mean(picked)), "accuracy": float(np.mean(z.argmax(-1) == lab))}
    if term.kind is LossKind.BCE:
        assert labels is not None
        y = np.asarray(labels, np.float64).reshape(x.shape)
        return {"loss": float(np.mean(np.logaddexp(0.0, x) - y * x)), "accuracy": float(np.mean((x > 0) == (y > 0.5)))}
    if reference is None:
        return {}
    ref = np.asarray(reference, np.float64)
    if term.kind is LossKind.KL:
        zs, zt = _classes_last(x, term.semantics), _classes_last(ref, term.semantics)
        logq, logp = _log_softmax(zs / temperature), _log_softmax(zt / temperature)
        kl = np.sum(np.exp(logp) * (logp - logq), axis=-1)
        out = {"loss": float(t2 * np.mean(kl)), "agreement": float(np.mean(zs.argmax(-1) == zt.argmax(-1)))}
        if labels is not None and labels.shape == zs.shape[:-1]:
            out["accuracy"] = float(np.mean(zs.argmax(-1) == labels))
        return out
    if term.kind is LossKind.BERNOULLI_KL:
        s, u = x / temperature, ref / temperature
        kl = np.logaddexp(0.0, s) - np.logaddexp(0.0, u) - _sigmoid(u) * (s - u)
        return {"loss": float(t2 * np.mean(kl)), "agreement": float(np.mean((s > 0) == (u > 0)))}
    if term.kind is LossKind.FEATURE:
        relative = float(np.mean((x - ref) ** 2) / (np.mean(ref ** 2) + FEATURE_EPS))
        return {"loss": relative * feature_weight, f"feature_error/{term.output}": relative}
    return {"loss": float(np.mean((x - ref) ** 2))}
