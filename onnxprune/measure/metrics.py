"""Task metrics: how well a model still does its job, measured on evaluation data.

One convention for every metric, so one search (``--max-drop``, budget planning, sensitivity) compares any of them:

- A metric value is **higher is better**. ``top1`` (accuracy against the data's ``labels``), ``agreement`` (top-1
  agreement with the original model), ``ctc`` (character accuracy of a CTC recogniser's greedy reading against label
  sequences) and ``cosine`` (similarity to the original's output) lie in [0, 1]; ``kl`` is
  reported as ``-KL(original ‖ candidate)`` in nats (0 for the original itself); a ``python:MODULE:FUNC`` user
  function returns its own value, higher better.
- A **point** is 0.01 of a metric value (:data:`POINTS` per unit): ``--max-drop 1.0`` lets the value fall by 0.01,
  i.e. one percentage point of accuracy or agreement, 0.01 of cosine, 0.01 nats of KL.
- Built-in metrics read the model's first output (``perplexity``: ``logits`` if present). ``top1``, ``agreement`` and ``kl`` compare over its class axis at
  any rank (``[N, C]`` classifiers, ``[N, T, C]`` sequences, ``[N, C, H, W]`` dense maps): the axis of a trailing
  Softmax/LogSoftmax/Sigmoid, else the output-semantics rule by rank (1, but the last axis for ``[N, T, C]``).
  Labels have the output's shape without the class axis (``[N]``, ``[N, T]``, ``[N, H, W]``); negative labels
  (padding) are not counted.
- ``ctc`` reads ``[N, T, C]`` scores of a CTC recogniser (PP-OCR, CRNN, wav2vec2-style heads): greedy decoding
  (argmax over C, repeats collapsed, class 0 = blank dropped) against ``labels`` ``[N, L]`` of class indices padded
  with negatives, scored ``1 - Σ edit distance / Σ label length`` (clipped at 0). Texts become labels through the
  model's own character table, so no text ever reaches onnxprune.
- ``perplexity`` scores a language model's logits ``[N, T, V]`` on its own ``input_ids`` ``[N, T]``: position t
  predicts token t + 1 (the last position predicts nothing), positions where ``attention_mask`` is 0 at t or t + 1
  are not counted (a mask ``[N, P + T]`` of a KV-cache model is read on its last T columns). Perplexity is lower
  is better, so the value is its higher-is-better logarithm ``-ln(perplexity)`` = minus the mean next-token NLL in
  nats, reported as ``negative_log_perplexity`` with the perplexity itself beside it. A point is then 0.01 nats:
  ``--max-drop X`` lets perplexity grow by at most a factor ``exp(X / 100)`` (1.0 -> 1.01x, 14 -> 1.15x), a
  relative bound that means the same on any model and data. It reads the output named ``logits``, else the first.

A user function is called once per evaluated model with every batch::

    def my_metric(outputs: list[dict[str, np.ndarray]], batches: list[dict[str, np.ndarray]]) -> float

``outputs[i]`` maps each graph output name to the model's output on ``batches[i]``; ``batches[i]`` maps input names
to the fed arrays plus ``labels`` when the data has them. It must return a finite float, higher is better.
"""

from __future__ import annotations

import importlib
import logging
import math
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from onnxprune.errors import BadInputError, InvariantError
from onnxprune.spec import MetricChoice

log = logging.getLogger(__name__)

POINTS = 100.0
"""Points per unit of a metric value: ``--max-drop`` and the report's drops are in points."""

LABELS = "labels"

UserMetric = Callable[[list[dict[str, np.ndarray]], list[dict[str, np.ndarray]]], float]
BatchFactory = Callable[[], Iterable[dict[str, np.ndarray]]]
"""Returns a fresh pass over the evaluation batches (inputs, plus ``labels`` when present), the same every call."""

LABEL_NAMES = {"top1": "accuracy", "agreement": "top1_agreement", "kl": "negative_kl", "cosine": "cosine",
               "ctc": "char_accuracy", "perplexity": "negative_log_perplexity"}
"""How reports name each built-in metric's value."""
INPUT_IDS, ATTENTION_MASK, LM_LOGITS = "input_ids", "attention_mask", "logits"


@dataclass(frozen=True)
class Shown:
    """A second, familiar reading of a metric's value for reports (``perplexity`` beside ``-ln perplexity``)."""

    label: str
    convert: Callable[[float], float]


SHOWN = {"perplexity": Shown("perplexity", lambda value: math.exp(-value))}
"""Metrics whose reports also give the value in the form users know (lower-is-better ones)."""


# -- the class axis and what the output holds ---------------------------------------------------------------------

LOGITS, PROBABILITIES, LOG_PROBABILITIES, SIGMOID = "logits", "probabilities", "log_probabilities", "sigmoid"


@dataclass(frozen=True)
class OutputLayout:
    """What the metrics need to know about the output they read.

    Attributes:
        name: the graph output.
        rank: its rank.
        class_axis: the axis holding classes (non-negative), or None when the output has none (e.g. ``[N]``).
        class_span: consecutive axes from ``class_axis`` that hold the classes together (1 but for a Softmax
            before opset 13, which normalises over every axis from its ``axis`` on).
        form: what the values are along that axis: ``logits``, ``probabilities`` (a trailing Softmax),
            ``log_probabilities`` (LogSoftmax) or ``sigmoid`` (independent probabilities).
        note: how the axis was found, when it was not the graph's own word.
    """

    name: str
    rank: int
    class_axis: int | None
    class_span: int
    form: str
    note: str = ""

    def view(self, out: np.ndarray) -> np.ndarray:
        """``out`` with a multi-axis class span merged into one axis at ``class_axis``."""
        if self.class_axis is None or self.class_span == 1:
            return out
        a, b = self.class_axis, self.class_axis + self.class_span
        return out.reshape(out.shape[:a] + (-1,) + out.shape[b:])


def output_layout(model: onnx.ModelProto, name: str, sample: np.ndarray) -> OutputLayout:
    """The class axis and value form of output ``name``, from the output-semantics analysis
    (:func:`onnxprune.training.outputs.output_semantics`: the trailing Softmax/LogSoftmax/Sigmoid and its axis,
    else its one rule for outputs without one), checked against ``sample``'s real rank.

    Axis 0 is the batch, never a class axis: ``[N]`` outputs have none.
    """
    from onnxprune.training.outputs import (
        OutputKind,
        default_class_axis,
        output_semantics,
    )

    rank = sample.ndim
    sem = output_semantics(model).get(name)
    if sem is None or sem.rank not in (None, rank):
        axis, span, kind, note = default_class_axis(rank), 1, OutputKind.LOGITS, "class axis guessed from the rank"
    else:
        axis, span, kind, note = sem.class_axis, sem.class_span, sem.kind, sem.note
    if axis is not None:
        axis = axis + rank if axis < 0 else axis
        if not 0 < axis < rank or axis + span > rank:
            axis, span = None, 1
    form = _FORMS.get(kind.value, LOGITS)
    if axis is not None and form == LOGITS:
        form = _form_from_values(sample, axis, span)
    return OutputLayout(name, rank, axis, span, form, note)


_FORMS = {"probs": PROBABILITIES, "log_probs": LOG_PROBABILITIES, "sigmoid": SIGMOID, "logits": LOGITS}


def _form_from_values(x: np.ndarray, axis: int, span: int = 1) -> str:
    """For outputs with no trailing activation in the graph (a custom op, say): probabilities when every slice
    along ``axis`` is non-negative and sums to 1; log-probabilities when every value is ≤ 0 and the
    exponentials sum to 1; logits otherwise."""
    if x.size == 0:
        return LOGITS
    if span > 1:
        x = x.reshape(x.shape[:axis] + (-1,) + x.shape[axis + span:])
    x = x.astype(np.float64)
    if x.min() >= 0 and np.allclose(x.sum(axis=axis), 1.0, atol=1e-3):
        return PROBABILITIES
    if x.max() <= 0 and np.allclose(np.exp(x).sum(axis=axis), 1.0, atol=1e-3):
        return LOG_PROBABILITIES
    return LOGITS


# -- the metrics on arrays (one batch: sums and counts, so batches add up) -----------------------------------------

@dataclass
class Tally:
    """A running sum over compared items (samples or positions)."""

    total: float = 0.0
    count: int = 0

    def add(self, total: float, count: int) -> None:
        self.total += float(total)
        self.count += int(count)

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else math.nan


def top1_hits(output: np.ndarray, labels: np.ndarray, axis: int) -> tuple[int, int]:
    """(correct, counted) of the argmax over ``axis`` against ``labels`` (negative labels are not counted).

    Raises:
        BadInputError: the labels' shape is not the output's without the class axis.
    """
    pred = output.argmax(axis=axis)
    labels = np.asarray(labels)
    if labels.shape != pred.shape:
        if labels.size == pred.size and labels.ndim == 1 and pred.ndim == 1:
            labels = labels.reshape(pred.shape)
        else:
            raise BadInputError(
                f"labels have shape {list(labels.shape)}, but the output {list(output.shape)} over class axis {axis} "
                f"needs {list(pred.shape)} (one class index per sample or position)", field="eval_data")
    mask = labels >= 0
    return int(np.count_nonzero((pred == labels) & mask)), int(np.count_nonzero(mask))


def ctc_greedy(output: np.ndarray, axis: int, blank: int = 0) -> list[np.ndarray]:
    """Greedy CTC reading of each sequence: argmax over ``axis``, repeats collapsed, ``blank`` dropped."""
    best = output.argmax(axis=axis)
    if best.ndim != 2:
        raise BadInputError(f"--metric ctc reads [N, T, C] scores; the output's class axis {axis} leaves shape "
                            f"{list(best.shape)}, not [N, T]", field="metric")
    keep = np.ones(best.shape, dtype=bool)
    keep[:, 1:] = best[:, 1:] != best[:, :-1]
    keep &= best != blank
    return [row[mask] for row, mask in zip(best, keep)]


def edit_distance(a: np.ndarray, b: np.ndarray) -> int:
    """Levenshtein distance of two index sequences (unit insert, delete, substitute); one numpy row per step."""
    if len(a) < len(b):
        a, b = b, a
    previous = np.arange(len(b) + 1)
    for i, x in enumerate(a, 1):
        substitute = previous[:-1] + (b != x)
        current = np.empty_like(previous)
        current[0] = i
        current[1:] = np.minimum(previous[1:] + 1, substitute)
        current = np.minimum.accumulate(current - np.arange(len(current))) + np.arange(len(current))  # inserts
        previous = current
    return int(previous[-1])


def ctc_hits(output: np.ndarray, labels: np.ndarray, axis: int) -> tuple[int, int]:
    """(label characters minus edit errors, label characters) of the greedy reading against ``labels`` ``[N, L]``.

    Raises:
        BadInputError: labels that are not one padded index sequence per sample.
    """
    labels = np.asarray(labels)
    reads = ctc_greedy(output, axis)
    if labels.ndim != 2 or len(labels) != len(reads):
        raise BadInputError(f"--metric ctc needs labels [N, L] (class indices per sample, padded with -1); got shape "
                            f"{list(labels.shape)} for {len(reads)} samples", field="eval_data")
    truth = [row[row >= 0] for row in labels]
    errors = sum(edit_distance(r, t) for r, t in zip(reads, truth))
    total = sum(len(t) for t in truth)
    return total - errors, total


def agreement_hits(reference_argmax: np.ndarray, output: np.ndarray, axis: int) -> tuple[int, int]:
    """(agreeing, compared) positions: the candidate's argmax over ``axis`` equals the original's."""
    pred = output.argmax(axis=axis)
    return int(np.count_nonzero(pred == reference_argmax)), int(pred.size)


def log_distribution(x: np.ndarray, axis: int, form: str) -> np.ndarray:
    """Log-probabilities along ``axis`` (for ``sigmoid``: the log-probability of each independent class)."""
    x = x.astype(np.float64)
    if form == PROBABILITIES:
        return np.log(np.clip(x, 1e-12, None))
    if form == LOG_PROBABILITIES:
        return x
    if form == SIGMOID:
        return np.log(np.clip(x, 1e-12, 1.0))
    shifted = x - x.max(axis=axis, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))


def kl_sum(reference_logp: np.ndarray, output: np.ndarray, axis: int, form: str) -> tuple[float, int]:
    """(sum over positions of KL(original ‖ candidate) in nats, positions) along the class axis.

    ``sigmoid`` outputs are independent yes/no probabilities: their KL is the Bernoulli one, summed over classes.
    """
    q = log_distribution(output, axis, form)
    p = np.exp(reference_logp)
    if form == SIGMOID:
        p1, q1 = np.clip(p, 1e-12, 1 - 1e-12), np.clip(np.exp(q), 1e-12, 1 - 1e-12)
        per = p1 * np.log(p1 / q1) + (1 - p1) * np.log((1 - p1) / (1 - q1))
    else:
        per = p * (reference_logp - q)
    kl = per.sum(axis=axis)
    return float(np.maximum(kl, 0.0).sum()), int(kl.size)


def cross_entropy_sum(output: np.ndarray, labels: np.ndarray, axis: int, form: str) -> tuple[float, int]:
    """(sum of -log p(label) over counted positions, positions): the smooth counterpart of :func:`top1_hits`.

    Raises:
        BadInputError: as :func:`top1_hits`.
    """
    top1_hits(output, labels, axis)  # the same shape check and message
    logp = log_distribution(output, axis, form)
    labels = np.asarray(labels).reshape(logp.shape[:axis] + logp.shape[axis + 1:])
    mask = labels >= 0
    picked = np.take_along_axis(logp, np.expand_dims(np.where(mask, labels, 0), axis), axis=axis).squeeze(axis)
    return float(-(picked * mask).sum()), int(np.count_nonzero(mask))


def next_token_nll_sum(output: np.ndarray, input_ids: np.ndarray, attention_mask: np.ndarray | None, axis: int,
                       form: str = LOGITS) -> tuple[float, int]:
    """(sum of -ln p(next token) in nats, counted positions) of LM scores ``output`` on their own ``input_ids``.

    Position t is scored on token t + 1; the last position is not; with ``attention_mask`` a position counts only
    when the mask is 1 at both t and t + 1.

    Raises:
        BadInputError: ``input_ids`` or ``attention_mask`` do not line up with the output's ``[N, T]``.

    Example:
        >>> next_token_nll_sum(np.zeros((1, 3, 4)), np.array([[0, 1, 2]]), None, axis=2)[1]
        2
    """
    ids = np.asarray(input_ids)
    rows = output.shape[:axis] + output.shape[axis + 1:]
    if axis != output.ndim - 1 or ids.shape != rows or ids.ndim != 2:
        raise BadInputError(f"--metric perplexity needs logits [N, T, V] over input_ids [N, T]; got output "
                            f"{list(output.shape)} (vocab axis {axis}) for input_ids {list(ids.shape)}",
                            field="eval_data")
    keep = np.ones(ids.shape, dtype=bool)
    if attention_mask is not None:
        mask = np.asarray(attention_mask)
        if mask.ndim != 2 or mask.shape[0] != ids.shape[0] or mask.shape[1] < ids.shape[1]:
            raise BadInputError(f"attention_mask {list(mask.shape)} does not cover input_ids {list(ids.shape)}",
                                field="eval_data")
        keep = mask[:, mask.shape[1] - ids.shape[1]:] != 0
    counted = keep[:, :-1] & keep[:, 1:]
    targets = ids[:, 1:]
    if targets.size and (targets.min() < 0 or targets.max() >= output.shape[axis]):
        raise BadInputError(f"input_ids hold tokens outside the vocabulary of {output.shape[axis]}", field="eval_data")
    logp = log_distribution(output[:, :-1], axis, form)
    picked = np.take_along_axis(logp, targets[..., None], axis=axis)[..., 0]
    return float(-(picked * counted).sum()), int(np.count_nonzero(counted))


def perplexity(output: np.ndarray, input_ids: np.ndarray, attention_mask: np.ndarray | None = None) -> float:
    """exp(mean next-token NLL) of logits ``[N, T, V]`` on ``input_ids`` ``[N, T]`` (see :func:`next_token_nll_sum`).

    Example:
        >>> round(perplexity(np.zeros((1, 3, 4)), np.array([[0, 1, 2]])), 6)  # uniform over 4 tokens
        4.0
    """
    total, n = next_token_nll_sum(output, input_ids, attention_mask, output.ndim - 1)
    return math.exp(total / n) if n else math.nan


def cosine_sum(reference: np.ndarray, output: np.ndarray) -> tuple[float, int]:
    """(sum of per-sample cosine similarities of the flattened outputs, samples); two zero vectors count as 1."""
    rows = reference.shape[0] if reference.ndim >= 2 else 1
    a = reference.reshape(rows, -1).astype(np.float64)
    b = output.reshape(rows, -1).astype(np.float64)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    both_zero = (na == 0) & (nb == 0)
    cos = np.where(both_zero, 1.0, (a * b).sum(axis=1) / np.where(na * nb == 0, 1.0, na * nb))
    return float(cos.sum()), rows


def top1(output: np.ndarray, labels: np.ndarray, axis: int) -> float:
    """Accuracy of ``output``'s argmax over ``axis`` (see :func:`top1_hits`).

    Example:
        >>> top1(np.array([[0.1, 0.9], [0.8, 0.2]]), np.array([1, 1]), axis=1)
        0.5
    """
    hits, n = top1_hits(output, labels, axis)
    return hits / n if n else math.nan


def agreement(reference: np.ndarray, output: np.ndarray, axis: int) -> float:
    """Share of samples/positions whose argmax over ``axis`` matches the reference's."""
    hits, n = agreement_hits(reference.argmax(axis=axis), output, axis)
    return hits / n if n else math.nan


def negative_kl(reference: np.ndarray, output: np.ndarray, axis: int, form: str = LOGITS) -> float:
    """``-mean KL(reference ‖ output)`` over positions (higher is better; 0 when equal)."""
    total, n = kl_sum(log_distribution(reference, axis, form), output, axis, form)
    return -total / n if n else math.nan


def cosine(reference: np.ndarray, output: np.ndarray) -> float:
    """Mean per-sample cosine similarity of the flattened outputs."""
    total, n = cosine_sum(reference, output)
    return total / n if n else math.nan


# -- user metrics ---------------------------------------------------------------------------------------------------

def load_user_metric(choice: MetricChoice) -> UserMetric:
    """Import ``python:MODULE:FUNC`` (the module runs its import-time code here).

    Raises:
        BadInputError: the module cannot be imported or has no callable of that name.
    """
    assert choice.module is not None and choice.function is not None
    try:
        module = importlib.import_module(choice.module)
    except Exception as e:  # noqa: BLE001 - any import failure is the user's module
        raise BadInputError(f"--metric {choice}: cannot import {choice.module!r}: {type(e).__name__}: {e}",
                            field="metric") from e
    fn = getattr(module, choice.function, None)
    if not callable(fn):
        raise BadInputError(f"--metric {choice}: {choice.module} has no function {choice.function!r}", field="metric")
    return fn  # type: ignore[no-any-return]


def call_user_metric(fn: UserMetric, choice: MetricChoice, outputs: list[dict[str, np.ndarray]],
                     batches: list[dict[str, np.ndarray]]) -> float:
    """Call a user metric and insist on a finite float.

    Raises:
        BadInputError: the function raised or returned something other than a finite number.
    """
    try:
        value = fn(outputs, batches)
    except Exception as e:  # noqa: BLE001 - the user's code failed; say so with its error
        raise BadInputError(f"--metric {choice} raised {type(e).__name__}: {e}", field="metric") from e
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number):
        raise BadInputError(f"--metric {choice} must return a finite float, got {value!r}", field="metric")
    return number


# -- measuring models -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Measurement:
    """One model on the evaluation data.

    Attributes:
        value: the metric (higher is better).
        divergence: the metric's smooth counterpart, which moves where ``value`` moves in steps: the mean
            cross-entropy against the labels for ``top1``, else the mean KL from the original's output over the
            class axis, else 1 - cosine. Only when the evaluator was built with ``divergence=True``.
        compared: samples or positions behind ``value`` (its resolution is 1 / compared for counting metrics).
    """

    value: float
    divergence: float | None
    compared: int


@dataclass
class _Reference:
    """What is kept of the original's output on one batch: only what the metric compares against."""

    argmax: np.ndarray | None = None
    logp: np.ndarray | None = None
    flat: np.ndarray | None = None


@dataclass
class TaskMetric:
    """Scores models on fixed evaluation batches against their labels or the original model's outputs.

    Build it with :meth:`create`, which runs the original once and keeps only what the metric compares against
    (argmax indices for agreement, log-probabilities for KL, flattened outputs for cosine); calling it with a
    candidate model streams the same batches again. ``baseline`` is the original's own value.

    Example:
        >>> task = TaskMetric.create(model, lambda: batches, parse_metric("top1"), device="cpu")
        >>> task(pruned).value <= task.baseline.value
        True
    """

    choice: MetricChoice
    batches: BatchFactory
    device: Any
    layout: OutputLayout | None = None
    divergence: bool = False
    samples: int = 0
    notes: list[str] = field(default_factory=list)
    baseline: Measurement = field(default_factory=lambda: Measurement(math.nan, None, 0))
    _refs: list[_Reference] = field(default_factory=list)
    _user: UserMetric | None = None

    @classmethod
    def create(cls, model: onnx.ModelProto | str | os.PathLike[str], batches: BatchFactory, choice: MetricChoice | None, *,
               has_labels: bool, device: Any = "auto", divergence: bool = False) -> TaskMetric:
        """Run the original (``model``) once on ``batches`` and measure its own value.

        Args:
            model: the original model (or its path).
            batches: a fresh pass over the data per call (inputs, plus ``labels`` when ``has_labels``).
            choice: the metric; None picks ``top1`` with labels, else ``agreement`` (``cosine`` with a note when
                the output has no class axis).
            has_labels: whether the batches carry ``labels``.
            device: ``auto|cuda|cpu`` or a ``DeviceChoice``.
            divergence: also measure KL / 1 - cosine against the original (for planning's tie-breaks).

        Raises:
            BadInputError: ``top1`` without labels, a class metric on an output without classes, an unloadable
                user metric, data that does not fit the model.
        """
        from onnxprune.runtime.device import as_choice

        if choice is None:
            choice = MetricChoice("top1" if has_labels else "agreement")
            explicit = False
        else:
            explicit = True
        if choice.name == "ctc" and not has_labels:
            raise BadInputError("--metric ctc needs labels in the evaluation data: an array named 'labels' [N, L] of "
                                "character indices padded with -1", field="metric")
        if choice.name == "perplexity" and _first_batch_lacks(batches, INPUT_IDS):
            raise BadInputError("--metric perplexity needs the evaluation data to hold 'input_ids' [N, T] (token ids "
                                "the model reads; each position is scored on the next token)", field="metric")
        if choice.name == "top1" and not has_labels:
            raise BadInputError("--metric top1 needs labels in the evaluation data (an array named 'labels'); "
                                "use --metric agreement to compare with the original model instead", field="metric")
        task = cls(choice, batches, as_choice(device), divergence=divergence)
        if choice.is_python:
            task._user = load_user_metric(choice)
        task._measure_reference(model, explicit)
        return task

    @property
    def label(self) -> str:
        """The metric as reports name it (``accuracy``, ``top1_agreement``, ``negative_kl``, ``cosine``, ``python:…``)."""
        return LABEL_NAMES.get(self.choice.name, str(self.choice))

    @property
    def needs_class_axis(self) -> bool:
        return self.choice.name in ("top1", "agreement", "kl", "ctc", "perplexity")

    @property
    def shown(self) -> Shown | None:
        """The familiar form reports give beside the value (perplexity), if the metric has one."""
        return SHOWN.get(self.choice.name)

    def __call__(self, model: onnx.ModelProto | str | os.PathLike[str]) -> Measurement:
        """The metric of ``model`` on the same batches.

        Raises:
            BadInputError: the model rejects the data or a user metric fails.
            InvariantError: the data yielded a different number of batches than for the original.
        """
        return self._measure(model, None)

    def drop_points(self, value: float) -> float:
        """How many points ``value`` lies below the original's (negative: better than the original)."""
        return (self.baseline.value - value) * POINTS

    # -- internals ---------------------------------------------------------------------------------------------

    def _measure_reference(self, model: onnx.ModelProto | str | os.PathLike[str], explicit: bool) -> None:
        self._refs = []
        self.baseline = self._measure(model, self._refs, explicit=explicit)
        if not self._refs:
            raise BadInputError("the evaluation data yielded no batch the model can take", field="eval_data")

    def _measure(self, model: onnx.ModelProto | str | os.PathLike[str], keep: list[_Reference] | None, explicit: bool = True) -> Measurement:
        from onnxprune.runtime.session import make_session

        score, spread = Tally(), Tally()
        outputs_seen: list[dict[str, np.ndarray]] = []
        batches_seen: list[dict[str, np.ndarray]] = []
        index = 0
        samples = 0
        with make_session(model, self.device) as session:
            first = self._output(session.output_names)
            for batch in self.batches():
                feeds = {k: v for k, v in batch.items() if k != LABELS}
                wanted = session.output_names if self._user is not None else [first]
                outputs = session.run(feeds, wanted)
                out = np.asarray(outputs[first])
                if keep is not None and self.layout is None:
                    self.layout = self._layout(model, first, out, explicit)
                assert self.layout is not None
                out = self.layout.view(out)
                if keep is not None:
                    keep.append(self._reference(out))
                elif index >= len(self._refs):
                    raise InvariantError("the evaluation data yielded more batches than for the original model")
                ref = self._refs[index] if keep is None else keep[-1]
                samples += len(next(iter(feeds.values()))) if feeds else 0
                if self._user is not None:
                    outputs_seen.append(outputs)
                    batches_seen.append(batch)
                else:
                    score.add(*self._score(out, ref, batch.get(LABELS), batch))
                if self.divergence:
                    spread.add(*self._spread(out, ref, batch.get(LABELS)))
                index += 1
        if keep is None and index != len(self._refs):
            raise InvariantError(f"the evaluation data yielded {index} batches, {len(self._refs)} for the original")
        if keep is not None:
            self.samples = samples
        if self._user is not None:
            value = call_user_metric(self._user, self.choice, outputs_seen, batches_seen)
            return Measurement(value, self._divergence(spread), samples)
        value = max(0.0, score.mean) if self.choice.name == "ctc" and score.count else score.mean
        return Measurement(value, self._divergence(spread), score.count)

    def _layout(self, model: onnx.ModelProto | str | os.PathLike[str], name: str, out: np.ndarray, explicit: bool) -> OutputLayout:
        proto = model if isinstance(model, onnx.ModelProto) else onnx.load(model, load_external_data=False)
        layout = output_layout(proto, name, out)
        if layout.class_axis is None and self.needs_class_axis:
            if explicit:
                raise BadInputError(f"--metric {self.choice} compares classes, but output {name!r} has shape "
                                    f"{list(out.shape)} with no class axis; use --metric cosine or a python: metric",
                                    field="metric")
            self.choice = MetricChoice("cosine")
            self.notes.append(f"output {name!r} {list(out.shape)} has no class axis: measured by cosine similarity")
        return layout

    def _reference(self, out: np.ndarray) -> _Reference:
        layout = self.layout
        assert layout is not None
        ref = _Reference()
        name = self.choice.name
        axis = layout.class_axis
        if axis is not None and name == "agreement":
            ref.argmax = out.argmax(axis=axis)
        if axis is not None and (name == "kl" or (self.divergence and name != "top1")):
            ref.logp = log_distribution(out, axis, layout.form).astype(np.float32)
        if name == "cosine" or (self.divergence and axis is None):
            ref.flat = np.asarray(out, dtype=np.float32).copy()
        return ref

    def _output(self, names: list[str]) -> str:
        """The output the metric reads: an LM's ``logits`` for perplexity when the graph has one, else the first."""
        return LM_LOGITS if self.choice.name == "perplexity" and LM_LOGITS in names else names[0]

    def _score(self, out: np.ndarray, ref: _Reference, labels: np.ndarray | None,
               batch: dict[str, np.ndarray] | None = None) -> tuple[float, int]:
        layout = self.layout
        assert layout is not None
        name = self.choice.name
        if name == "top1":
            assert labels is not None and layout.class_axis is not None
            return top1_hits(out, labels, layout.class_axis)
        if name == "ctc":
            assert labels is not None and layout.class_axis is not None
            return ctc_hits(out, labels, layout.class_axis)
        if name == "agreement":
            assert ref.argmax is not None and layout.class_axis is not None
            return agreement_hits(ref.argmax, out, layout.class_axis)
        if name == "kl":
            assert ref.logp is not None and layout.class_axis is not None
            total, n = kl_sum(ref.logp.astype(np.float64), out, layout.class_axis, layout.form)
            return -total, n
        if name == "perplexity":
            assert batch is not None and layout.class_axis is not None
            total, n = next_token_nll_sum(out, batch[INPUT_IDS], batch.get(ATTENTION_MASK), layout.class_axis,
                                          layout.form)
            return -total, n
        assert ref.flat is not None
        return cosine_sum(ref.flat, out)

    def _spread(self, out: np.ndarray, ref: _Reference, labels: np.ndarray | None) -> tuple[float, int]:
        layout = self.layout
        assert layout is not None
        if self.choice.name == "top1" and labels is not None and layout.class_axis is not None:
            return cross_entropy_sum(out, labels, layout.class_axis, layout.form)
        if ref.logp is not None and layout.class_axis is not None:
            return kl_sum(ref.logp.astype(np.float64), out, layout.class_axis, layout.form)
        assert ref.flat is not None
        total, n = cosine_sum(ref.flat, out)
        return n - total, n

    def _divergence(self, spread: Tally) -> float | None:
        return spread.mean if self.divergence else None


def _first_batch_lacks(batches: BatchFactory, name: str) -> bool:
    """Whether the data's first batch has no array ``name`` (no batch at all is reported later, with its reason)."""
    first = next(iter(batches()), None)
    return first is not None and name not in first


def batches_with_labels(batches: Iterable[dict[str, np.ndarray]], labels: np.ndarray | None) -> Iterator[dict[str, np.ndarray]]:
    """Attach consecutive slices of ``labels`` to in-memory batches (for callers holding labels apart)."""
    start = 0
    for batch in batches:
        if labels is None:
            yield dict(batch)
            continue
        n = len(next(iter(batch.values())))
        yield {**batch, LABELS: np.asarray(labels[start:start + n])}
        start += n
