"""Fine-tuning on onnxruntime with the exported training graph.

Parameters and optimizer state live in device buffers (OrtValues) bound with IO binding, each update
written over its input (the graph orders every update after the last read; older artifacts ping-pong
between two sets), so nothing crosses to the host between steps except the batch in and the scalar loss
out. The provider comes from :mod:`onnxprune.runtime` (CUDA when usable, CPU otherwise, logged there).

Memory (PP-OCRv4 rec, distillation, measured in ``benchmarks/bench_train_memory.py``): the training
session runs without onnxruntime's memory pattern, buffer reuse and common-subexpression elimination
(:func:`training_session`); the teacher runs per batch at the training batch size unless its values for
all samples are small; held-out metrics are computed a few samples at a time by a session that exists
only while evaluating.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper

from onnxprune.errors import BadInputError
from onnxprune.training.artifacts import (
    STEP_KEY,
    UPDATES_IN_PLACE,
    TrainingArtifacts,
    apply_checkpoint,
    constants_to_initializers,
    export_artifacts,
    params_to_inputs,
)
from onnxprune.training.data import TrainData
from onnxprune.training.decompose import expand_contrib
from onnxprune.training.grad.driver import upgrade_opset
from onnxprune.training.losses import (
    FeatureMatch,
    LossKind,
    LossSpec,
    LossTerm,
    TeacherPlan,
    teacher_plan,
    term_metrics,
    with_outputs,
)
from onnxprune.training.optimizers import LR_INPUT, STEP_INPUT, OptimizerSpec
from onnxprune.training.outputs import logits_model

log = logging.getLogger(__name__)

ReporterFn = Callable[[str, float, str], None]
DEFAULT_STEPS = 200


@dataclass
class FinetuneConfig:
    """Options of one fine-tuning run. ``steps`` wins over ``epochs``; with neither, 200 steps.

    ``loss="auto"`` is cross-entropy when the data has labels, else distillation from the teacher.
    ``class_axis`` overrides the class axis of the outputs (see :class:`LossSpec`); by default it comes
    from each output's trailing Softmax/LogSoftmax/Sigmoid, or its rank.
    ``patience`` counts evaluations without improvement of the held-out loss before stopping; the
    best parameters seen are the ones returned.
    """

    steps: int | None = None
    epochs: int | None = None
    lr: float = 1e-3
    batch_size: int = 32
    optimizer: str = "adamw"
    momentum: float = 0.9
    weight_decay: float = 0.0
    max_grad_norm: float | None = None
    schedule: str = "cosine"  # cosine | constant
    warmup_steps: int | None = None  # default: 5 % of the steps
    min_lr_ratio: float = 0.0
    loss: str = "auto"  # auto | ce | distill | mse
    temperature: float = 2.0
    class_axis: int | None = None
    trainable: list[str] | None = None
    eval_fraction: float = 0.1
    eval_every: int = 50
    patience: int | None = None
    seed: int = 0
    threads: int | None = None
    progress_bar: bool = True
    recompute: bool = True  # rebuild cheap activations in the backward: about half the memory, ~10 % slower
    features: tuple[FeatureMatch, ...] = ()  # intermediate tensors matched to the teacher's when distilling
    feature_weight: float = 1.0

    def validate(self) -> FinetuneConfig:
        """Raises BadInputError naming the bad option."""
        if (self.steps is not None and self.steps < 1) or (self.epochs is not None and self.epochs < 1):
            raise BadInputError("steps and epochs must be >= 1", field="steps")
        if self.lr <= 0 or self.batch_size < 1:
            raise BadInputError("lr must be > 0 and batch_size >= 1", field="lr")
        if self.schedule not in ("cosine", "constant"):
            raise BadInputError(f"schedule must be cosine or constant, got {self.schedule!r}", field="schedule")
        if self.loss not in ("auto", "ce", "distill", "mse"):
            raise BadInputError(f"loss must be auto, ce, distill or mse, got {self.loss!r}", field="loss")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise BadInputError("eval_fraction must be in [0, 1)", field="eval_fraction")
        return self


@dataclass
class FinetuneResult:
    """The fine-tuned inference model, per-step/per-eval history, the final held-out metrics and what
    each loss term read (tensor, class axis)."""

    model: onnx.ModelProto
    history: list[dict[str, float]] = field(default_factory=list)
    final_metrics: dict[str, float] = field(default_factory=dict)
    loss_terms: tuple[LossTerm, ...] = ()


def lr_at(step: int, total: int, config: FinetuneConfig) -> float:
    """Learning rate for 0-based ``step``: linear warmup, then cosine decay to ``min_lr_ratio``·lr."""
    warmup = config.warmup_steps if config.warmup_steps is not None else int(round(0.05 * total))
    if step < warmup:
        return config.lr * (step + 1) / warmup
    if config.schedule == "constant":
        return config.lr
    progress = (step - warmup) / max(1, total - warmup)
    floor = config.lr * config.min_lr_ratio
    return floor + 0.5 * (config.lr - floor) * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _ort() -> Any:
    import onnxruntime

    return onnxruntime


#: onnxruntime graph rewrites that would undo the training graph's memory plan: common-subexpression
#: elimination merges the backward's recomputed activations back into the forward ones (PP-OCRv4 rec at
#: batch 4: 569 MB peak with it, 377 MB without, before in-place updates and without buffer reuse).
TRAINING_DISABLED_OPTIMIZERS = ("CommonSubexpressionElimination",)

#: Samples whose float64 metric temporaries are computed at once are capped at this many elements
#: (held-out metrics of PP-OCR rec hold 2 MB per sample per temporary).
METRIC_CHUNK_ELEMENTS = 1 << 20


def training_session(model: onnx.ModelProto, providers: list[str], threads: int | None, *,
                      training: bool = True) -> Any:
    """A raw onnxruntime session: IO binding needs it (runtime.Session only offers numpy in/out).

    Training sessions (each measured on PP-OCRv4 rec at batch 4):

    * no memory pattern: it plans one block for the whole step on top of what the first step took from
      the arena (1404 MB peak with it, 790 MB without, before the other changes);
    * no buffer reuse: onnxruntime keeps a dead tensor's buffer for a later tensor of the same size, so a
      forward activation's memory stays taken until a backward tensor of that size comes along (live
      tensors at the peak: 188 MB with it, 111 MB without);
    * no common-subexpression elimination (:data:`TRAINING_DISABLED_OPTIMIZERS`).

    ``training=False`` is for the inference sessions beside the training one (teacher, held-out
    evaluation): onnxruntime's defaults but the memory pattern.
    """
    ort = _ort()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.enable_mem_pattern = False
    if training:
        opts.enable_mem_reuse = False
    if threads is not None:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    disabled = list(TRAINING_DISABLED_OPTIMIZERS) if training else []
    return ort.InferenceSession(model.SerializeToString(), opts, providers=providers, disabled_optimizers=disabled)


def _release_options(providers: Sequence[str]) -> Any:
    """Run options that shrink the CPU arena after the run (its free chunks go back to the system)."""
    options = _ort().RunOptions()
    if "CUDAExecutionProvider" not in providers:
        options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    return options


class _DeviceState:
    """Params and optimizer state as OrtValues on the session's device.

    With ``in_place`` (graphs whose updates wait for every gradient, manifest ``updates: in_place``) each
    output is bound to its input's buffer: one copy. Otherwise two sets ping-pong: step k reads set k%2
    and writes set (k+1)%2.
    """

    def __init__(self, values: dict[str, np.ndarray], device: str, in_place: bool) -> None:
        ort = _ort()
        self.device = device
        # own copies: on CPU an OrtValue wraps the numpy array, and training must not write into the caller's
        first = {k: ort.OrtValue.ortvalue_from_numpy(np.array(v, order="C", copy=True), device, 0)
                 for k, v in values.items()}
        second = first if in_place else {
            k: ort.OrtValue.ortvalue_from_shape_and_type(list(v.shape), v.dtype, device, 0) for k, v in values.items()
        }
        self.sets = [first, second]
        self.current = 0

    @property
    def live(self) -> dict[str, Any]:
        """The OrtValues holding the current values."""
        return self.sets[self.current]

    @property
    def next(self) -> dict[str, Any]:
        """The OrtValues the next step writes (the same as :attr:`live` when updating in place)."""
        return self.sets[1 - self.current]

    def advance(self) -> None:
        self.current = 1 - self.current

    def read(self, names: list[str]) -> dict[str, np.ndarray]:
        cur = self.live
        return {n: cur[n].numpy().copy() for n in names}

    def write(self, values: dict[str, np.ndarray]) -> None:
        """Overwrite the current values (e.g. restore the best parameters before a final evaluation)."""
        cur = self.live
        for name, value in values.items():
            cur[name].update_inplace(np.ascontiguousarray(value))


class Trainer:
    """Runs training artifacts on onnxruntime; one instance per fine-tuning run (not shared)."""

    def __init__(self, arts: TrainingArtifacts, providers: list[str], threads: int | None = None) -> None:
        self.arts = arts
        self.manifest = arts.manifest
        self.session = training_session(arts.training_model, providers, threads)
        self.providers = list(providers)
        self.provider = self.session.get_providers()[0]
        self.device = "cuda" if self.provider == "CUDAExecutionProvider" else "cpu"
        self.params = [p["name"] for p in self.manifest["params"]]
        carried = self.params + [s["name"] for s in self.manifest["state"]]
        self.carried = carried
        self.new_of = {p["name"]: p["output"] for p in self.manifest["params"] + self.manifest["state"]}
        self.in_place = self.manifest.get("updates") == UPDATES_IN_PLACE
        self.state = _DeviceState({k: arts.checkpoint[k] for k in carried}, self.device, self.in_place)
        self.step = int(arts.checkpoint.get(STEP_KEY, 0))
        self.binding = self.session.io_binding()
        ort = _ort()
        self.loss_value = ort.OrtValue.ortvalue_from_shape_and_type([], np.float32, "cpu", 0)
        self.release_options = _release_options(self.providers)
        self.input_dtypes = {
            i.name: np.dtype(helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type))
            for i in arts.training_model.graph.input
        }

    def train_step(self, feeds: dict[str, np.ndarray], lr: float, *, release: bool = False) -> float:
        """One optimizer step on one batch (model inputs plus labels/teacher arrays); returns the loss.

        ``release`` gives the step's working memory back to the system afterwards (the arena keeps it
        otherwise, for the next step): before something else runs, such as a held-out evaluation.
        """
        b = self.binding
        cur, nxt = self.state.live, self.state.next
        for name, arr in feeds.items():
            b.bind_cpu_input(name, np.ascontiguousarray(arr, dtype=self.input_dtypes.get(name, arr.dtype)))
        b.bind_cpu_input(LR_INPUT, np.asarray(lr, np.float32))
        b.bind_cpu_input(STEP_INPUT, np.asarray(self.step + 1, np.int64))
        for name in self.carried:
            b.bind_ortvalue_input(name, cur[name])
            b.bind_ortvalue_output(self.new_of[name], nxt[name])
        b.bind_ortvalue_output(self.manifest["outputs"]["loss"], self.loss_value)
        self.session.run_with_iobinding(b, self.release_options if release else None)
        self.state.advance()
        self.step += 1
        return float(self.loss_value.numpy())

    def params_numpy(self) -> dict[str, np.ndarray]:
        return self.state.read(self.params)


class _Evaluator:
    """Runs the eval graph with the live device params bound as inputs (no host round trip for them).

    The session exists only during :meth:`evaluate`, so its memory is not held beside the training
    session's between evaluations.
    """

    def __init__(self, eval_model: onnx.ModelProto, trainer: Trainer, threads: int | None) -> None:
        self.model = eval_model
        self.threads = threads
        self.trainer = trainer
        self.outputs = [o.name for o in eval_model.graph.output]
        self.dtypes = {
            i.name: np.dtype(helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type))
            for i in eval_model.graph.input
        }

    def predict(self, session: Any, batch: TrainData) -> dict[str, np.ndarray]:
        """The eval graph's outputs for one batch."""
        params = self.trainer.state.live
        b = session.io_binding()
        for name, arr in batch.feeds(self.dtypes).items():
            b.bind_cpu_input(name, arr)
        for name in self.trainer.params:
            b.bind_ortvalue_input(name, params[name])
        for o in self.outputs:
            b.bind_output(o, "cpu")
        session.run_with_iobinding(b)
        return dict(zip(self.outputs, b.copy_outputs_to_cpu()))

    def evaluate(self, data: _Samples, batch_size: int, loss: LossSpec, terms: Sequence[LossTerm],
                 teacher: _Teacher | None) -> dict[str, float]:
        """:func:`metrics` over ``data``, a few samples at a time: every metric is a mean over samples (and
        positions, the same number per sample), so the sample-weighted mean of the parts' values is the
        whole set's, without holding every output (PP-OCR rec: 2 MB of float64 logits per sample)."""
        session = training_session(self.model, self.trainer.providers, self.threads, training=False)
        sums: dict[str, float] = {}
        count = 0
        for batch in data.batches(batch_size, None, drop_last=False):
            if teacher is not None:
                batch = teacher.attach(batch)
            outputs = self.predict(session, batch)
            per_sample = max(math.prod(v.shape[1:]) for v in outputs.values()) if outputs else 1
            step = max(1, METRIC_CHUNK_ELEMENTS // max(per_sample, 1))
            for start in range(0, len(batch), step):
                part = np.arange(start, min(start + step, len(batch)))
                n = len(part)
                chunk = {k: v[part] for k, v in outputs.items()}
                for k, v in metrics(chunk, batch.take(part), loss, terms).items():
                    sums[k] = sums.get(k, 0.0) + v * n
                count += n
        del session
        return {k: v / max(count, 1) for k, v in sums.items()}


def metrics(outputs: dict[str, np.ndarray], data: TrainData, loss: LossSpec,
            terms: Sequence[LossTerm]) -> dict[str, float]:
    """Held-out metrics: loss (same definition as training) plus accuracy or top-1 agreement.

    ``outputs`` holds the tensors the terms read (logits views included, see :func:`_eval_model`).
    """
    out: dict[str, float] = {}
    total = 0.0
    for term in terms:
        m = term_metrics(term, outputs[term.tensor], labels=data.labels, reference=data.teacher.get(term.output),
                         temperature=loss.temperature,
                         feature_weight=loss.feature_weight / max(len(loss.features), 1))
        total += m.pop("loss", 0.0)
        out.update(m)
    out["loss"] = total
    return out


#: Teacher values for every sample are computed once and kept while they fit in this many bytes; beyond
#: it (PP-OCRv4 rec: 1 MB of logits per sample, a few thousand samples) the teacher runs on each batch.
TEACHER_CACHE_BYTES = 16 * 2**20


class _Teacher:
    """The teacher inputs' values (teacher logits for KL terms) of a batch, by student output.

    One inference session run at the training batch size (an inference peak, not a bigger one);
    :meth:`precompute` keeps every sample's values when they are small, else :meth:`attach` runs the
    teacher on each batch.
    """

    def __init__(self, plan: TeacherPlan, providers: list[str], threads: int | None) -> None:
        self.session = training_session(plan.model, providers, threads, training=False)
        self.dtypes = {
            i.name: np.dtype(helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type))
            for i in plan.model.graph.input
        }
        self.plan = TeacherPlan(onnx.ModelProto(), plan.fetches)  # the session holds the weights now
        self.inputs = {i.name for i in self.session.get_inputs()}
        self.runs = 0
        # the teacher runs once per step beside the training session: its arena gives its memory back after
        # each run instead of holding an inference's working set for the whole fine-tuning
        self.run_options = _release_options(providers)

    def values(self, batch: TrainData) -> dict[str, np.ndarray]:
        """The teacher's values for ``batch`` (one run)."""
        feeds = {k: v for k, v in batch.feeds(self.dtypes).items() if k in self.inputs}
        self.runs += 1
        fetched = self.session.run(self.plan.tensors, feeds, self.run_options)
        return self.plan.values(dict(zip(self.plan.tensors, fetched)))

    def attach(self, batch: TrainData) -> TrainData:
        """``batch`` with its teacher values (computed now unless it already has them)."""
        if batch.teacher:
            return batch
        return TrainData(batch.inputs, batch.labels, self.values(batch))

    def precompute(self, data: TrainData, batch_size: int, budget: int | None = None) -> TrainData | None:
        """``data`` with every sample's teacher values when they fit in ``budget`` bytes (default
        :data:`TEACHER_CACHE_BYTES`), else None."""
        budget = TEACHER_CACHE_BYTES if budget is None else budget
        chunks: dict[str, list[np.ndarray]] = {}
        for i, batch in enumerate(data.batches(batch_size, None, drop_last=False)):
            for name, value in self.values(batch).items():
                chunks.setdefault(name, []).append(value)
            if i == 0:
                per_sample = sum(c[0].nbytes for c in chunks.values()) / max(len(batch), 1)
                if per_sample * len(data) > budget:
                    log.info("teacher values need %.0f MB for %d samples; the teacher runs on each batch instead",
                             per_sample * len(data) / 2**20, len(data))
                    return None
        return TrainData(data.inputs, data.labels, {n: np.concatenate(c) for n, c in chunks.items()})


@dataclass(frozen=True)
class _Samples:
    """A subset of a :class:`TrainData` by index, without copying it (the train/held-out split)."""

    data: TrainData
    index: np.ndarray

    @classmethod
    def split(cls, data: TrainData, fraction: float, seed: int) -> tuple[_Samples, _Samples | None]:
        """Same samples and order as :meth:`TrainData.split`, as index views."""
        n = len(data)
        n_held = int(round(n * fraction))
        if n_held < 1 or n_held >= n:
            return cls(data, np.arange(n)), None
        order = np.random.default_rng(seed).permutation(n)
        return cls(data, np.sort(order[n_held:])), cls(data, np.sort(order[:n_held]))

    def __len__(self) -> int:
        return len(self.index)

    @property
    def labels(self) -> np.ndarray | None:
        return None if self.data.labels is None else self.data.labels[self.index]

    def batches(self, batch_size: int, rng: np.random.Generator | None, drop_last: bool = True) -> Iterator[TrainData]:
        """One epoch of batches, as :meth:`TrainData.batches` on the subset would give them."""
        order = rng.permutation(len(self)) if rng is not None else np.arange(len(self))
        stop = len(self) - (len(self) % batch_size if drop_last else 0)
        for start in range(0, stop, batch_size):
            yield self.data.take(self.index[order[start:start + batch_size]])


def _eval_model(model: onnx.ModelProto, params: list[str], terms: Sequence[LossTerm]) -> onnx.ModelProto:
    """The inference graph with params as inputs and the logits the loss terms read as extra outputs."""
    base = params_to_inputs(upgrade_opset(expand_contrib(model)), params)
    shown = logits_model(base, [t.semantics for t in terms if t.reads_logits])[0]
    features = [t.tensor for t in terms if t.kind is LossKind.FEATURE]
    return with_outputs(shown, features) if features else shown


def _check_inputs(model: onnx.ModelProto, data: TrainData) -> None:
    inits = {t.name for t in model.graph.initializer}
    wanted = [i.name for i in model.graph.input if i.name not in inits]
    if sorted(wanted) != sorted(data.inputs):
        raise BadInputError(
            f"training data has arrays {sorted(data.inputs)}, the model takes {sorted(wanted)} (plus optional 'labels')",
            field="train_data",
        )


def _fixed_shapes(model: onnx.ModelProto, data: TrainData, batch: int) -> dict[str, list[int]]:
    """Static input shapes with the training batch (gradients of Conv/pools need static dims)."""
    return {k: [batch] + list(v.shape[1:]) for k, v in data.inputs.items()}


def finetune(
    model: onnx.ModelProto,
    data: TrainData,
    config: FinetuneConfig | None = None,
    *,
    teacher: onnx.ModelProto | None = None,
    device: object = "auto",
    reporter: ReporterFn | None = None,
) -> FinetuneResult:
    """Fine-tune ``model`` on ``data`` with onnxruntime and return the tuned inference model.

    With labels the loss is cross-entropy; without, the model distils from ``teacher`` (default: a
    copy of ``model`` as given, i.e. the original before fine-tuning), whose logits (the tensors before
    its outputs' Softmax/Sigmoid) are computed once. Losses read the logits over each output's class
    axis (:mod:`onnxprune.training.outputs`), so Softmax-terminated and ``[N, T, C]`` models train too.

    Args:
        model: inference model (BN in inference mode); initializers are what gets trained.
        data: inputs by name, optional labels.
        config: options; defaults to :class:`FinetuneConfig`.
        teacher: model to distil from when ``data`` has no labels.
        device: ``auto``, ``cuda``, ``cpu`` or a ``runtime.DeviceChoice``.
        reporter: ``reporter(stage, fraction, message)`` per step; an
            :class:`onnxprune.progress.Reporter` also raises CancelledError when cancelled.

    Raises:
        BadInputError: data/model mismatch or bad options.
        UnsupportedOpError: an op on the trained path has no gradient rule.
        CancelledError: the reporter's cancel event was set.

    Example:
        >>> res = finetune(model, TrainData.load("train.npz"), FinetuneConfig(steps=300))  # doctest: +SKIP
        >>> res.final_metrics["accuracy"]  # doctest: +SKIP
    """
    from onnxprune.runtime.device import select_device

    config = (config or FinetuneConfig()).validate()
    source, model = model, constants_to_initializers(model)
    _check_inputs(model, data)
    choice = device if not isinstance(device, str) else select_device(device)
    kind = config.loss if config.loss != "auto" else ("ce" if data.labels is not None else "distill")
    if kind == "ce" and data.labels is None:
        raise BadInputError("loss 'ce' needs 'labels' in the training data", field="train_data")
    train, held = _Samples.split(data, config.eval_fraction, config.seed)
    batch = min(config.batch_size, len(train))
    # "mse" matches the teacher's outputs by mean squared error (regression heads)
    features = tuple(config.features) if kind == "distill" else ()
    loss_spec = LossSpec(kind="distill" if kind == "mse" else kind, temperature=config.temperature,
                         distill_mode="mse" if kind == "mse" else "auto", class_axis=config.class_axis,
                         features=tuple(m.tensor for m in features), feature_weight=config.feature_weight)
    opt = OptimizerSpec(kind=config.optimizer, momentum=config.momentum, weight_decay=config.weight_decay,
                        max_grad_norm=config.max_grad_norm)
    arts = export_artifacts(model, loss=loss_spec, optimizer=opt, trainable=config.trainable,
                            shapes=_fixed_shapes(model, data, batch), recompute=config.recompute)
    terms = arts.loss_terms
    eval_model = _eval_model(model, arts.param_names, terms) if held is not None else None
    outputs = [o.name for o in model.graph.output]
    del model  # a copy of every weight; the end applies the result to ``source`` (converting it again)
    providers = list(choice.providers)  # type: ignore[attr-defined]
    teacher_run = None
    if kind in ("distill", "mse") and not data.teacher:
        teacher_run = _Teacher(teacher_plan(teacher if teacher is not None else source, terms, outputs, features),
                               providers, config.threads)
        cached = teacher_run.precompute(data, batch)
        if cached is not None:  # small enough to keep: the same split, now with teacher values
            data, teacher_run = cached, None
            train, held = _Samples.split(data, config.eval_fraction, config.seed)
    trainer = Trainer(arts, providers, config.threads)
    arts.checkpoint.clear()  # the trainer holds its own copy of these initial values
    evaluator = _Evaluator(eval_model, trainer, config.threads) if eval_model is not None else None
    run = _Run(trainer, evaluator, train, held, config, batch, loss_spec, arts.manifest, terms, reporter, teacher_run)
    log.info("fine-tuning %d params for %d steps on %s (batch %d, %s, %s)", len(trainer.params), run.total,
             trainer.provider, batch, kind, config.optimizer)
    started = time.perf_counter()
    params = run.loop()
    final: dict[str, float] = {"steps": float(trainer.step), "seconds": time.perf_counter() - started}
    recent = [h["loss"] for h in run.history if "loss" in h][-20:]
    final["train_loss"] = float(np.mean(recent)) if recent else float("nan")
    if run.best_step is not None:
        final["best_step"] = float(run.best_step)
    if evaluator is not None and held is not None:
        trainer.state.write(params)
        final.update(run.evaluate())
    if reporter is not None:
        reporter("finetune", 1.0, "done")
    return FinetuneResult(apply_checkpoint(source, params), run.history, final, terms)


@dataclass
class _Run:
    """The training loop of one :func:`finetune` call: batches, schedule, evaluation, early stop."""

    trainer: Trainer
    evaluator: _Evaluator | None
    train: _Samples
    held: _Samples | None
    config: FinetuneConfig
    batch: int
    loss: LossSpec
    manifest: dict[str, Any]
    terms: tuple[LossTerm, ...]
    reporter: ReporterFn | None
    teacher: _Teacher | None = None  # runs on each batch when the data carries no teacher values
    history: list[dict[str, float]] = field(default_factory=list)
    best_step: int | None = None  # the step whose parameters loop() returned (0: the starting ones); None: the last

    @property
    def total(self) -> int:
        if self.config.steps is not None:
            return self.config.steps
        if self.config.epochs is not None:
            return self.config.epochs * (len(self.train) // self.batch)
        return DEFAULT_STEPS

    def evaluate(self) -> dict[str, float]:
        assert self.evaluator is not None and self.held is not None  # callers check
        return self.evaluator.evaluate(self.held, self.batch, self.loss, self.terms, self.teacher)

    def _feeds(self, b: TrainData) -> dict[str, np.ndarray]:
        names = self.manifest["inputs"]
        if (names["teacher"] or names["targets"]) and self.teacher is not None:
            b = self.teacher.attach(b)
        feeds = dict(b.inputs)
        if names["labels"]:
            assert b.labels is not None  # finetune() checked the data has labels
            feeds[names["labels"]] = b.labels
        for out, name in {**names["teacher"], **names["targets"]}.items():
            feeds[name] = b.teacher[out]
        return feeds

    def loop(self) -> dict[str, np.ndarray]:
        """Train; return the parameters with the best held-out loss (the last ones without a split).

        The starting parameters are measured first and compete too: a run that only makes the model worse (a
        learning rate too high for it) gives back the model it started from, and ``best_step`` says so (0).
        """
        total, config = self.total, self.config
        best: tuple[float, dict[str, np.ndarray]] | None = None
        if self.evaluator is not None:
            start = self.evaluate()
            self.history.append({"step": 0, **{f"eval_{k}": v for k, v in start.items()}})
            best = (start["loss"], self.trainer.params_numpy())
        stale = 0
        rng = np.random.default_rng(config.seed)
        batches = self.train.batches(self.batch, rng)
        bar = _progress_bar(total, config.progress_bar)
        try:
            for step in range(total):
                if self.reporter is not None:
                    self.reporter("finetune", step / total, f"step {step}/{total}")
                b = next(batches, None)
                if b is None:  # next epoch, reshuffled
                    batches = self.train.batches(self.batch, rng)
                    b = next(batches)
                lr = lr_at(step, total, config)
                evaluating = self.evaluator is not None and (not (step + 1) % config.eval_every or step + 1 == total)
                loss = self.trainer.train_step(self._feeds(b), lr, release=evaluating)
                if not math.isfinite(loss):
                    raise BadInputError(f"loss became {loss} at step {step + 1}; lower the learning rate", field="lr")
                self.history.append({"step": step + 1, "lr": lr, "loss": loss})
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")
                if not evaluating:
                    continue
                m = self.evaluate()
                self.history.append({"step": step + 1, **{f"eval_{k}": v for k, v in m.items()}})
                if best is None or m["loss"] < best[0]:
                    best, stale = (m["loss"], self.trainer.params_numpy()), 0
                    self.best_step = step + 1
                    continue
                stale += 1
                if config.patience is not None and stale >= config.patience:
                    log.info("early stop at step %d: no held-out improvement in %d evaluations", step + 1, stale)
                    break
        finally:
            bar.close()
        if best is not None and self.best_step is None:
            self.best_step = 0
        return best[1] if best is not None else self.trainer.params_numpy()


def _progress_bar(total: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="finetune", unit="step", disable=not enabled, leave=False)
