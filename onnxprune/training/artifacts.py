"""Training artifacts that stock onnxruntime can run: two graphs, a checkpoint and a manifest.

``training_model.onnx``: batch inputs, loss inputs (labels / teacher logits or outputs / targets), params,
optimizer state, ``lr``, ``step`` → ``loss``, ``<param>__new``…, ``<state>__new``….
``eval_model.onnx``: the inference graph with the trained params as inputs.
``checkpoint.npz``: params, optimizer state and ``__step__``. ``manifest.json``: what feeds what, and
(``loss.reads``) which tensor and class axis each loss term reads: a KL term's teacher input takes the
teacher's logits laid out like the output, not its probabilities.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxprune.errors import BadInputError
from onnxprune.io.limits import readable_ir_version
from onnxprune.io.shapes import set_input_shapes
from onnxprune.quantize.detect import has_float16, quantized_nodes
from onnxprune.training.decompose import expand_contrib
from onnxprune.training.grad.context import FLOAT_TYPES, NON_DIFFERENTIABLE, node_inputs
from onnxprune.training.grad.driver import (
    GradientResult,
    build_gradients,
    upgrade_opset,
)
from onnxprune.training.grad.rules._common import attr_int
from onnxprune.training.losses import LossGraph, LossSpec, LossTerm, add_loss
from onnxprune.training.optimizers import (
    LR_INPUT,
    STEP_INPUT,
    OptimizerSpec,
    ParamSlot,
    add_optimizer,
    new_name,
)

log = logging.getLogger(__name__)

FORMAT = "onnxprune-training/1"
STEP_KEY = "__step__"
#: Manifest ``updates`` value of graphs whose new params/state may overwrite their inputs' buffers.
UPDATES_IN_PLACE = "in_place"

#: (op type, input positions) that hold weights: the tensors fine-tuning trains by default.
WEIGHT_SLOTS: dict[str, tuple[int, ...]] = {
    "Conv": (1, 2), "ConvTranspose": (1, 2), "Gemm": (0, 1, 2), "MatMul": (0, 1),
    "BatchNormalization": (1, 2), "LayerNormalization": (1, 2), "InstanceNormalization": (1, 2),
    "Gather": (0,), "PRelu": (1,),
    # onnxruntime's RMSNorms (onnxruntime-genai builder): scale, and gamma + bias; rotary caches fill no slot
    "SimplifiedLayerNormalization": (1,), "SkipSimplifiedLayerNormalization": (2, 3),
}
#: Elementwise ops whose initializer operand is a weight when it has more than one element (biases,
#: per-channel scales, positional embeddings); single-element ones are constants like HardSwish's 6.
ELEMENTWISE = frozenset({"Add", "Sub", "Mul", "Div"})
#: Values no trained weight holds: an initializer with a non-finite element or one this large is a
#: sentinel (an additive causal mask of -inf or finfo.min), a buffer.
SENTINEL = 1e4


def constants_to_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """Copy of ``model`` with float ``Constant`` nodes of rank ≥ 1 turned into initializers.

    Some exporters (Paddle, older TorchScript) keep weights in Constant nodes; training and
    :func:`apply_checkpoint` address weights as initializers by name.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    keep: list[onnx.NodeProto] = []
    moved: list[onnx.TensorProto] = []
    for node in out.graph.node:
        value = next((a.t for a in node.attribute if a.name == "value"), None)
        if (node.op_type == "Constant" and node.domain in ("", "ai.onnx") and value is not None
                and value.data_type in FLOAT_TYPES and len(value.dims) >= 1):
            tensor = onnx.TensorProto()
            tensor.CopyFrom(value)
            tensor.name = node.output[0]
            moved.append(tensor)
        else:
            keep.append(node)
    if moved:
        del out.graph.node[:]
        out.graph.node.extend(keep)
        out.graph.initializer.extend(moved)
    return out


def activations(model: onnx.ModelProto) -> set[str]:
    """Tensors that carry the batch's values: float graph inputs, embedding lookups, one-hot encodings of an input
    cast to float, and what is computed from them.

    Shapes, indices and comparisons (:data:`~onnxprune.training.grad.context.NON_DIFFERENTIABLE`) and casts to
    non-float types stop the flow, so positions cast to float (``Cast(Range(...))``) are not activations.
    """
    graph = model.graph
    consts = {t.name for t in graph.initializer}
    tables = {t.name for t in graph.initializer if t.data_type in FLOAT_TYPES}
    sizes = {t.name: int(np.prod(t.dims, dtype=np.int64)) for t in graph.initializer}
    act = {i.name for i in graph.input if i.name not in consts and i.type.tensor_type.elem_type in FLOAT_TYPES}
    data = {i.name for i in graph.input if i.name not in consts}  # every input's values, not its shape
    onehot: set[str] = set()
    for node in graph.node:
        ins = node_inputs(node)
        if node.op_type not in ("Shape", "Size") and any(i in data for i in ins):
            data.update(o for o in node.output if o)
            # an input's values compared with a table of classes (jax2tf's one-hot of byte values): a Cast of
            # it to float is the encoded batch (a mask compared with a scalar is not)
            if node.op_type == "OneHot" or (node.op_type == "Equal" and any(sizes.get(i, 0) > 1 for i in ins)):
                onehot.update(o for o in node.output if o)
        if node.op_type in NON_DIFFERENTIABLE or (node.op_type == "Cast" and attr_int(node, "to", 0) not in FLOAT_TYPES):
            continue
        embedding = node.op_type == "Gather" and bool(node.input) and node.input[0] in tables
        encoded = node.op_type == "Cast" and any(i in onehot for i in ins)
        if embedding or encoded or any(i in act for i in ins):
            act.update(o for o in node.output if o)
    return act


def _is_buffer_value(t: onnx.TensorProto) -> bool:
    """A mask or sentinel table: non-finite or huge values (:data:`SENTINEL`)."""
    values = numpy_helper.to_array(t)
    return values.size > 0 and bool(not np.all(np.isfinite(values)) or np.max(np.abs(values)) >= SENTINEL)


def select_trainable(model: onnx.ModelProto) -> list[str]:
    """Float initializers of rank ≥ 1 that are weights of a layer; buffers stay constant.

    The rule: an initializer is trained when it fills a weight slot (:data:`WEIGHT_SLOTS`: Conv/ConvTranspose/
    Gemm/MatMul weights and biases, normalisation scales and biases, PRelu slopes, Gather tables = embeddings;
    or a multi-element operand of Add/Sub/Mul/Div: biases, per-channel scales, positional embeddings) of a
    node that also reads an activation (:func:`activations`; a Gather's indices count). Not trained:
    BatchNormalization running statistics; tensors combined only with constants or positions (a rotary
    ``inv_freq`` multiplied by ``Cast(Range)``, so no gradient is needed through Sin/Cos); initializers
    with -inf or huge values (:data:`SENTINEL`: additive causal masks); single-element constants (eps,
    scale factors). A cos/sin table stored as an initializer and gathered by position looks like an
    embedding and is trained unless ``trainable`` is given.
    """
    inits = {t.name: t for t in model.graph.initializer}
    # exporters sometimes put an Identity between a weight and its consumer
    alias = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "Identity" and n.input[0] in inits}
    act = activations(model)
    chosen: dict[str, None] = {}
    for node in model.graph.node:
        for pos, name in enumerate(node.input):
            t = inits.get(alias.get(name, name))
            if t is None or t.data_type not in FLOAT_TYPES or len(t.dims) < 1:
                continue
            slot = pos in WEIGHT_SLOTS.get(node.op_type, ()) or (
                node.op_type in ELEMENTWISE and int(np.prod(t.dims)) > 1)
            fed = node.op_type == "Gather" or any(i in act for j, i in enumerate(node.input) if j != pos)
            if slot and fed:
                chosen[t.name] = None
    frozen = {n.input[i] for n in model.graph.node if n.op_type == "BatchNormalization" for i in (3, 4) if len(n.input) > i}
    buffers = [n for n in chosen if n not in frozen and _is_buffer_value(inits[n])]
    if buffers:
        log.info("not training %d mask/sentinel initializer(s): %s", len(buffers), ", ".join(buffers[:8]))
    return [n for n in chosen if n not in frozen and n not in buffers]


def fix_input_shapes(model: onnx.ModelProto, shapes: Mapping[str, Sequence[int]] | None) -> onnx.ModelProto:
    """Copy of ``model`` with the named inputs' dims fixed (``--shape NAME=1x3x224x224``).

    Raises:
        BadInputError: an unknown input name or a rank mismatch.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    if not shapes:
        return out
    set_input_shapes(out, shapes)
    del out.graph.value_info[:]  # stale intermediate shapes would contradict the new ones
    return out


def params_to_inputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """Copy of ``model`` with initializers ``names`` turned into graph inputs (eval/training graphs feed them)."""
    wanted = set(names)
    keep = [t for t in model.graph.initializer if t.name not in wanted]
    moved = {t.name: t for t in model.graph.initializer if t.name in wanted}
    existing = {i.name for i in model.graph.input}
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.initializer[:]
    out.graph.initializer.extend(keep)
    for name in dict.fromkeys(names):
        if name not in existing:
            t = moved[name]
            out.graph.input.append(helper.make_tensor_value_info(name, t.data_type, list(t.dims)))
    return out


def refuse_quantized(model: onnx.ModelProto) -> None:
    """Training needs float32 weights: a QDQ/INT8 graph stores its weights as 8-bit integers (nothing to train, the
    float bias alone would move) and an FP16 graph overflows the float32 loss and optimizer, so both are refused
    rather than trained into garbage.

    Raises:
        BadInputError: the model holds quantized ops or float16 weights.
    """
    nodes = quantized_nodes(model)
    if nodes:
        raise BadInputError(f"the model is quantized ({len(nodes)} quantized nodes, e.g. {nodes[0]}) and cannot be "
                            "fine-tuned: fine-tune its float model and quantize afterwards (onnxprune prune "
                            "--finetune-steps N --train-data DATA --quantize int8 runs them in that order)",
                            field="model")
    if has_float16(model):
        raise BadInputError("the model stores float16 weights and cannot be fine-tuned: fine-tune its float32 model "
                            "and convert afterwards (--finetune-steps N ... --quantize fp16)", field="model")


@dataclass(frozen=True)
class GradientModel:
    """A model computing ``loss`` and one ``<param>__grad`` per trained parameter (params as inputs)."""

    result: GradientResult
    loss: LossGraph
    params: dict[str, np.ndarray]  # trained name → initial value
    batch_inputs: tuple[str, ...]
    base: onnx.ModelProto  # the inference model as differentiated (opset upgraded, shapes fixed)


def build_gradient_model(
    model: onnx.ModelProto,
    loss: LossSpec,
    *,
    trainable: Sequence[str] | None = None,
    shapes: Mapping[str, Sequence[int]] | None = None,
    recompute: bool = True,
) -> GradientModel:
    """The loss and its gradients w.r.t. ``trainable`` (default :func:`select_trainable`).

    Contrib ops (onnxruntime-genai's RMSNorms, rotary, GroupQueryAttention) are differentiated through their
    standard-op expansions (:func:`~onnxprune.training.decompose.expand_contrib`); ``base`` is that expansion.

    Parameters with no path to the loss stay frozen initializers (logged). ``recompute``: the backward
    re-runs cheap elementwise chains instead of keeping their outputs (see :func:`build_gradients`).

    Raises:
        BadInputError: a named trainable tensor is not a float initializer, or the model is quantized.
        UnsupportedOpError: an op on the differentiated path has no VJP rule.
    """
    refuse_quantized(model)
    prepared = fix_input_shapes(constants_to_initializers(model), shapes)
    # chosen on the deployed ops: their slots say which inputs are weights (rotary caches are not)
    names = list(trainable) if trainable is not None else select_trainable(prepared)
    base = upgrade_opset(expand_contrib(prepared))
    inits = {t.name: t for t in base.graph.initializer}
    for n in names:
        if n not in inits or inits[n].data_type not in FLOAT_TYPES:
            raise BadInputError(f"trainable tensor {n!r} is not a float initializer of the model", field="trainable")
    init_names = set(inits)
    batch_inputs = tuple(i.name for i in base.graph.input if i.name not in init_names)
    lg = add_loss(base, loss)
    result = build_gradients(params_to_inputs(lg.model, names), lg.loss, names, recompute=recompute)
    if result.missing:  # put the unreachable ones back as constants
        graph = result.model.graph
        keep_inputs = [i for i in graph.input if i.name not in set(result.missing)]
        del graph.input[:]
        graph.input.extend(keep_inputs)
        graph.initializer.extend(inits[n] for n in result.missing)
    params = {n: numpy_helper.to_array(inits[n]) for n in names if n in result.grads}
    return GradientModel(result, lg, params, batch_inputs, base)


@dataclass
class TrainingArtifacts:
    """The four artifacts in memory; :meth:`save` writes them, :meth:`load` reads them back."""

    training_model: onnx.ModelProto
    eval_model: onnx.ModelProto
    checkpoint: dict[str, np.ndarray]
    manifest: dict[str, Any]

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write the artifacts into ``directory`` (created); returns its path."""
        from onnxprune.io.save import save_model

        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        save_model(self.training_model, path / "training_model.onnx")
        save_model(self.eval_model, path / "eval_model.onnx")
        np.savez(path / "checkpoint.npz", **self.checkpoint)
        (path / "manifest.json").write_text(json.dumps(self.manifest, indent=2) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> TrainingArtifacts:
        """Read artifacts written by :meth:`save`.

        Raises:
            BadInputError: a file is missing or the manifest is of another format.
        """
        path = Path(directory)
        try:
            manifest = json.loads((path / "manifest.json").read_text())
            training = onnx.load(str(path / "training_model.onnx"))
            evaluation = onnx.load(str(path / "eval_model.onnx"))
            checkpoint = load_checkpoint(path / "checkpoint.npz")
        except (OSError, ValueError) as e:
            raise BadInputError(f"cannot read training artifacts from {path}: {e}", field="artifacts") from e
        if manifest.get("format") != FORMAT:
            raise BadInputError(f"{path}/manifest.json is not {FORMAT}", field="artifacts")
        return cls(training, evaluation, checkpoint, manifest)

    @property
    def param_names(self) -> list[str]:
        return [p["name"] for p in self.manifest["params"]]

    @property
    def loss_terms(self) -> tuple[LossTerm, ...]:
        """What each loss term reads (tensor, class axis, the output's semantics), from the manifest."""
        return tuple(LossTerm.from_json(t) for t in self.manifest["loss"].get("reads", []))


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def export_artifacts(
    model: onnx.ModelProto,
    *,
    loss: LossSpec | str = "ce",
    optimizer: OptimizerSpec | str = "sgd",
    trainable: Sequence[str] | None = None,
    shapes: Mapping[str, Sequence[int]] | None = None,
    output_dir: str | os.PathLike[str] | None = None,
    recompute: bool = True,
) -> TrainingArtifacts:
    """Build the training and eval graphs, initial checkpoint and manifest for ``model``.

    Args:
        model: an inference model (BatchNormalization in inference mode).
        loss: a :class:`LossSpec` or its kind (``ce``, ``distill``, ``mse``).
        optimizer: an :class:`OptimizerSpec` or its kind (``sgd``, ``adamw``).
        trainable: initializer names to train; default :func:`select_trainable`.
        shapes: fixed dims for inputs (Conv/pool gradients need static spatial dims). Fixing the batch
            too (as :func:`~onnxprune.training.finetune` does) makes every shape in the training graph
            static, so no Shape nodes keep forward tensors alive.
        output_dir: also write the four files there.
        recompute: rebuild cheap activations (elementwise chains after a Conv or MatMul) in the
            backward instead of keeping them from the forward: the same values in a fraction of the
            memory (PP-OCRv4 rec, batch 4: 532 MB of saved activations down to about 110 MB).

    Raises:
        BadInputError: bad loss/optimizer/trainable/shape options.
        UnsupportedOpError: an op on the differentiated path has no VJP rule (names op and node).

    Example:
        >>> arts = export_artifacts(onnx.load("m.onnx"), loss="ce", optimizer="adamw")  # doctest: +SKIP
        >>> arts.save("artifacts/")  # doctest: +SKIP
    """
    from onnxprune import __version__

    loss_spec = LossSpec(kind=loss) if isinstance(loss, str) else loss
    opt_spec = OptimizerSpec(kind=optimizer) if isinstance(optimizer, str) else optimizer
    gm = build_gradient_model(model, loss_spec, trainable=trainable, shapes=shapes, recompute=recompute)
    train = onnx.ModelProto()
    train.CopyFrom(gm.result.model)
    graph = train.graph
    grad_outputs = set(gm.result.grads.values())
    keep = [o for o in graph.output if o.name not in grad_outputs]
    del graph.output[:]
    graph.output.extend(keep)
    slots = [
        ParamSlot(n, gm.result.grads[n], tuple(int(d) for d in v.shape), helper.np_dtype_to_tensor_dtype(v.dtype))
        for n, v in gm.params.items()
    ]
    states = add_optimizer(graph, slots, opt_spec)
    train.graph.name = f"{model.graph.name or 'model'}_training"
    train.ir_version = readable_ir_version(train)
    if train.ByteSize() < 2**31 - 2**24:  # the checker cannot take larger protos in memory
        onnx.checker.check_model(train)

    evaluation = params_to_inputs(gm.base, list(gm.params))
    evaluation.ir_version = readable_ir_version(evaluation)
    checkpoint: dict[str, np.ndarray] = dict(gm.params)
    for s in states:
        checkpoint[s.name] = np.zeros(s.shape, helper.tensor_dtype_to_np_dtype(s.dtype))
    checkpoint[STEP_KEY] = np.asarray(0, np.int64)
    manifest = {
        "format": FORMAT,
        "onnxprune_version": __version__,
        "opset": int(max(i.version for i in train.opset_import if i.domain in ("", "ai.onnx"))),
        "inputs": {
            "batch": list(gm.batch_inputs),
            "labels": gm.loss.labels,
            "teacher": gm.loss.teacher,
            "targets": gm.loss.targets,
            "lr": LR_INPUT,
            "step": STEP_INPUT,
        },
        "outputs": {"loss": gm.loss.loss},
        "params": [
            {"name": s.name, "shape": list(s.shape), "dtype": str(np.dtype(helper.tensor_dtype_to_np_dtype(s.dtype))),
             "input": s.name, "output": new_name(s.name)}
            for s in slots
        ],
        "state": [
            {"name": s.name, "param": s.param, "kind": s.kind, "shape": list(s.shape), "input": s.name,
             "output": new_name(s.name)}
            for s in states
        ],
        "frozen": list(gm.result.missing),
        "loss": {**asdict(loss_spec), "outputs": list(gm.loss.terms), "terms": gm.loss.terms,
                 "reads": [t.to_json() for t in gm.loss.loss_terms]},
        "optimizer": asdict(opt_spec),
        "eval": {"inputs": [i.name for i in evaluation.graph.input], "outputs": [o.name for o in evaluation.graph.output]},
        "checkpoint": {"step": STEP_KEY},
        # every update waits for all gradients (optimizers._after), so each output may share its input's buffer
        "updates": UPDATES_IN_PLACE,
    }
    arts = TrainingArtifacts(train, evaluation, checkpoint, manifest)
    if output_dir is not None:
        arts.save(output_dir)
    return arts


def apply_checkpoint(
    model: onnx.ModelProto, checkpoint: Mapping[str, np.ndarray] | str | os.PathLike[str] | TrainingArtifacts
) -> onnx.ModelProto:
    """Return a copy of ``model`` with its initializers replaced by the checkpoint's parameters.

    ``checkpoint`` is a name → array mapping, a ``checkpoint.npz`` path, an artifacts directory or
    :class:`TrainingArtifacts`. Entries that are not initializers of ``model`` (optimizer state, step)
    are ignored.

    Raises:
        BadInputError: a parameter's shape differs from the model's initializer.

    Example:
        >>> tuned = apply_checkpoint(onnx.load("m.onnx"), "artifacts/")  # doctest: +SKIP
    """
    if isinstance(checkpoint, TrainingArtifacts):
        values: Mapping[str, np.ndarray] = checkpoint.checkpoint
    elif isinstance(checkpoint, (str, os.PathLike)):
        p = Path(checkpoint)
        values = load_checkpoint(p / "checkpoint.npz" if p.is_dir() else p)
    else:
        values = checkpoint
    out = constants_to_initializers(model)
    replaced = 0
    for i, init in enumerate(out.graph.initializer):
        if init.name not in values:
            continue
        old = numpy_helper.to_array(init)
        new = np.asarray(values[init.name])
        if tuple(new.shape) != tuple(old.shape):
            raise BadInputError(
                f"checkpoint tensor {init.name!r} has shape {list(new.shape)}, the model's is {list(old.shape)}",
                field="checkpoint",
            )
        out.graph.initializer[i].CopyFrom(numpy_helper.from_array(new.astype(old.dtype), init.name))
        replaced += 1
    log.info("applied %d checkpoint tensors", replaced)
    return out
