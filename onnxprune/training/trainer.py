"""Fine-tuning on onnxruntime with the exported training graph.

Parameters and optimizer state live in two sets of device buffers (OrtValues) bound with IO binding:
step k reads set k%2 and writes set (k+1)%2, so nothing crosses to the host between steps except the
batch in and the scalar loss out. The provider comes from :mod:`onnxprune.runtime` (CUDA when usable,
CPU otherwise, logged there); the teacher and held-out runs use its sessions too.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper

from onnxprune.errors import BadInputError
from onnxprune.training.artifacts import (
    STEP_KEY,
    TrainingArtifacts,
    apply_checkpoint,
    constants_to_initializers,
    export_artifacts,
    params_to_inputs,
)
from onnxprune.training.data import TrainData
from onnxprune.training.grad.driver import upgrade_opset
from onnxprune.training.losses import LossSpec, LossTerm, TeacherPlan, teacher_plan, term_metrics
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


def _training_session(model: onnx.ModelProto, providers: list[str], threads: int | None) -> Any:
    """A raw onnxruntime session: IO binding needs it (runtime.Session only offers numpy in/out)."""
    ort = _ort()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads is not None:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), opts, providers=providers)


class _DeviceState:
    """Ping-pong OrtValues for params and optimizer state on the session's device."""

    def __init__(self, values: dict[str, np.ndarray], device: str) -> None:
        ort = _ort()
        self.device = device
        self.sets = [
            {k: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v), device, 0) for k, v in values.items()},
            {k: ort.OrtValue.ortvalue_from_shape_and_type(list(v.shape), v.dtype, device, 0) for k, v in values.items()},
        ]
        self.current = 0

    def read(self, names: list[str]) -> dict[str, np.ndarray]:
        cur = self.sets[self.current]
        return {n: cur[n].numpy().copy() for n in names}

    def write(self, values: dict[str, np.ndarray]) -> None:
        """Overwrite the current values (e.g. restore the best parameters before a final evaluation)."""
        cur = self.sets[self.current]
        for name, value in values.items():
            cur[name].update_inplace(np.ascontiguousarray(value))


class Trainer:
    """Runs training artifacts on onnxruntime; one instance per fine-tuning run (not shared)."""

    def __init__(self, arts: TrainingArtifacts, providers: list[str], threads: int | None = None) -> None:
        self.arts = arts
        self.manifest = arts.manifest
        self.session = _training_session(arts.training_model, providers, threads)
        self.providers = list(providers)
        self.provider = self.session.get_providers()[0]
        self.device = "cuda" if self.provider == "CUDAExecutionProvider" else "cpu"
        self.params = [p["name"] for p in self.manifest["params"]]
        carried = self.params + [s["name"] for s in self.manifest["state"]]
        self.carried = carried
        self.new_of = {p["name"]: p["output"] for p in self.manifest["params"] + self.manifest["state"]}
        self.state = _DeviceState({k: arts.checkpoint[k] for k in carried}, self.device)
        self.step = int(arts.checkpoint.get(STEP_KEY, 0))
        self.binding = self.session.io_binding()
        ort = _ort()
        self.loss_value = ort.OrtValue.ortvalue_from_shape_and_type([], np.float32, "cpu", 0)
        self.input_dtypes = {
            i.name: np.dtype(helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type))
            for i in arts.training_model.graph.input
        }

    def train_step(self, feeds: dict[str, np.ndarray], lr: float) -> float:
        """One optimizer step on one batch (model inputs plus labels/teacher arrays); returns the loss."""
        b = self.binding
        cur, nxt = self.state.sets[self.state.current], self.state.sets[1 - self.state.current]
        for name, arr in feeds.items():
            b.bind_cpu_input(name, np.ascontiguousarray(arr, dtype=self.input_dtypes.get(name, arr.dtype)))
        b.bind_cpu_input(LR_INPUT, np.asarray(lr, np.float32))
        b.bind_cpu_input(STEP_INPUT, np.asarray(self.step + 1, np.int64))
        for name in self.carried:
            b.bind_ortvalue_input(name, cur[name])
            b.bind_ortvalue_output(self.new_of[name], nxt[name])
        b.bind_ortvalue_output(self.manifest["outputs"]["loss"], self.loss_value)
        self.session.run_with_iobinding(b)
        self.state.current = 1 - self.state.current
        self.step += 1
        return float(self.loss_value.numpy())

    def params_numpy(self) -> dict[str, np.ndarray]:
        return self.state.read(self.params)


class _Evaluator:
    """Runs the eval graph with the live device params bound as inputs (no host round trip for them)."""

    def __init__(self, eval_model: onnx.ModelProto, trainer: Trainer, threads: int | None) -> None:
        self.session = _training_session(eval_model, trainer.providers, threads)
        self.trainer = trainer
        self.outputs = [o.name for o in eval_model.graph.output]
        self.dtypes = {
            i.name: np.dtype(helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type))
            for i in eval_model.graph.input
        }

    def predict(self, data: TrainData, batch_size: int) -> dict[str, np.ndarray]:
        chunks: dict[str, list[np.ndarray]] = {o: [] for o in self.outputs}
        params = self.trainer.state.sets[self.trainer.state.current]
        for batch in data.batches(batch_size, None, drop_last=False):
            b = self.session.io_binding()
            for name, arr in batch.feeds(self.dtypes).items():
                b.bind_cpu_input(name, arr)
            for name in self.trainer.params:
                b.bind_ortvalue_input(name, params[name])
            for o in self.outputs:
                b.bind_output(o, "cpu")
            self.session.run_with_iobinding(b)
            for o, v in zip(self.outputs, b.copy_outputs_to_cpu()):
                chunks[o].append(v)
        return {o: np.concatenate(v) for o, v in chunks.items()}


def metrics(outputs: dict[str, np.ndarray], data: TrainData, loss: LossSpec,
            terms: Sequence[LossTerm]) -> dict[str, float]:
    """Held-out metrics: loss (same definition as training) plus accuracy or top-1 agreement.

    ``outputs`` holds the tensors the terms read (logits views included, see :func:`_eval_model`).
    """
    out: dict[str, float] = {}
    total = 0.0
    for term in terms:
        m = term_metrics(term, outputs[term.tensor], labels=data.labels, reference=data.teacher.get(term.output),
                         temperature=loss.temperature)
        total += m.pop("loss", 0.0)
        out.update(m)
    out["loss"] = total
    return out


def _teacher_values(plan: TeacherPlan, data: TrainData, device: object, batch_size: int,
                    threads: int | None) -> dict[str, np.ndarray]:
    """The teacher inputs' values (teacher logits for KL terms) for every sample, by student output."""
    from onnxprune.runtime.session import make_session

    chunks: dict[str, list[np.ndarray]] = {f.output: [] for f in plan.fetches}
    with make_session(plan.model, device, threads=threads) as sess:  # type: ignore[arg-type]
        dtypes = {s.name: s.dtype for s in sess.input_specs}
        for batch in data.batches(max(batch_size, 64), None, drop_last=False):
            for name, value in plan.values(sess.run(batch.feeds(dtypes), plan.tensors)).items():
                chunks[name].append(value)
    return {n: np.concatenate(c) for n, c in chunks.items()}


def _eval_model(model: onnx.ModelProto, params: list[str], terms: Sequence[LossTerm]) -> onnx.ModelProto:
    """The inference graph with params as inputs and the logits the loss terms read as extra outputs."""
    base = params_to_inputs(upgrade_opset(model), params)
    return logits_model(base, [t.semantics for t in terms if t.reads_logits])[0]


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
    model = constants_to_initializers(model)
    _check_inputs(model, data)
    choice = device if not isinstance(device, str) else select_device(device)
    kind = config.loss if config.loss != "auto" else ("ce" if data.labels is not None else "distill")
    if kind == "ce" and data.labels is None:
        raise BadInputError("loss 'ce' needs 'labels' in the training data", field="train_data")
    train, held = data.split(config.eval_fraction, config.seed)
    batch = min(config.batch_size, len(train))
    # "mse" matches the teacher's outputs by mean squared error (regression heads)
    loss_spec = LossSpec(kind="distill" if kind == "mse" else kind, temperature=config.temperature,
                         distill_mode="mse" if kind == "mse" else "auto", class_axis=config.class_axis)
    opt = OptimizerSpec(kind=config.optimizer, momentum=config.momentum, weight_decay=config.weight_decay,
                        max_grad_norm=config.max_grad_norm)
    arts = export_artifacts(model, loss=loss_spec, optimizer=opt, trainable=config.trainable,
                            shapes=_fixed_shapes(model, data, batch))
    terms = arts.loss_terms
    if kind in ("distill", "mse") and not data.teacher:
        plan = teacher_plan(teacher if teacher is not None else model, terms, [o.name for o in model.graph.output])
        data = TrainData(data.inputs, data.labels,
                         _teacher_values(plan, data, choice, config.batch_size, config.threads))
        train, held = data.split(config.eval_fraction, config.seed)  # the same split, now with teacher values
    trainer = Trainer(arts, list(choice.providers), config.threads)  # type: ignore[attr-defined]
    evaluator = None
    if held is not None:
        evaluator = _Evaluator(_eval_model(model, trainer.params, terms), trainer, config.threads)
    run = _Run(trainer, evaluator, train, held, config, batch, loss_spec, arts.manifest, terms, reporter)
    log.info("fine-tuning %d params for %d steps on %s (batch %d, %s, %s)", len(trainer.params), run.total,
             trainer.provider, batch, kind, config.optimizer)
    started = time.perf_counter()
    params = run.loop()
    final: dict[str, float] = {"steps": float(trainer.step), "seconds": time.perf_counter() - started}
    recent = [h["loss"] for h in run.history if "loss" in h][-20:]
    final["train_loss"] = float(np.mean(recent)) if recent else float("nan")
    if evaluator is not None and held is not None:
        trainer.state.write(params)
        final.update(run.evaluate())
    if reporter is not None:
        reporter("finetune", 1.0, "done")
    return FinetuneResult(apply_checkpoint(model, params), run.history, final, terms)


@dataclass
class _Run:
    """The training loop of one :func:`finetune` call: batches, schedule, evaluation, early stop."""

    trainer: Trainer
    evaluator: _Evaluator | None
    train: TrainData
    held: TrainData | None
    config: FinetuneConfig
    batch: int
    loss: LossSpec
    manifest: dict[str, Any]
    terms: tuple[LossTerm, ...]
    reporter: ReporterFn | None
    history: list[dict[str, float]] = field(default_factory=list)

    @property
    def total(self) -> int:
        if self.config.steps is not None:
            return self.config.steps
        if self.config.epochs is not None:
            return self.config.epochs * (len(self.train) // self.batch)
        return DEFAULT_STEPS

    def evaluate(self) -> dict[str, float]:
        assert self.evaluator is not None and self.held is not None  # callers check
        outputs = self.evaluator.predict(self.held, self.batch)
        return metrics(outputs, self.held, self.loss, self.terms)

    def _feeds(self, b: TrainData) -> dict[str, np.ndarray]:
        names = self.manifest["inputs"]
        feeds = dict(b.inputs)
        if names["labels"]:
            assert b.labels is not None  # finetune() checked the data has labels
            feeds[names["labels"]] = b.labels
        for out, name in {**names["teacher"], **names["targets"]}.items():
            feeds[name] = b.teacher[out]
        return feeds

    def loop(self) -> dict[str, np.ndarray]:
        """Train; return the parameters with the best held-out loss (the last ones without a split)."""
        total, config = self.total, self.config
        best: tuple[float, dict[str, np.ndarray]] | None = None
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
                loss = self.trainer.train_step(self._feeds(b), lr)
                if not math.isfinite(loss):
                    raise BadInputError(f"loss became {loss} at step {step + 1}; lower the learning rate", field="lr")
                self.history.append({"step": step + 1, "lr": lr, "loss": loss})
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")
                if self.evaluator is None or ((step + 1) % config.eval_every and step + 1 != total):
                    continue
                m = self.evaluate()
                self.history.append({"step": step + 1, **{f"eval_{k}": v for k, v in m.items()}})
                if best is None or m["loss"] < best[0]:
                    best, stale = (m["loss"], self.trainer.params_numpy()), 0
                    continue
                stale += 1
                if config.patience is not None and stale >= config.patience:
                    log.info("early stop at step %d: no held-out improvement in %d evaluations", step + 1, stale)
                    break
        finally:
            bar.close()
        return best[1] if best is not None else self.trainer.params_numpy()


def _progress_bar(total: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="finetune", unit="step", disable=not enabled, leave=False)
