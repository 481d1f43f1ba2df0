"""How close the pruned model's outputs stay to the original's on the same inputs."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from onnxprune.errors import BadInputError, InvariantError


@dataclass
class Fidelity:
    """How closely a candidate's first output follows the reference's.

    Attributes:
        samples: samples compared (axis 0 of every batch).
        cosine: mean cosine similarity of the samples' flattened outputs (a 1-D output, one value per
            sample, is compared as one vector per batch; two all-zero vectors count as 1).
        max_abs_err: largest absolute elementwise difference.
        top1_agreement: fraction of positions with the same argmax over the class axis: class scores
            ``[N, K]`` (K ≥ 2), per-position scores ``[N, T, K]`` (recognisers, language models), or any
            output whose class axis the caller names; None for other outputs.
        kl: mean KL(reference ‖ candidate) over the same positions, as distributions (softmax of logits,
            or the scores themselves when they already are probabilities); None where top1 is.
    """

    samples: int
    cosine: float
    max_abs_err: float
    top1_agreement: float | None
    kl: float | None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _class_rows(x: np.ndarray, axis: int) -> np.ndarray:
    """``x`` as one row per position, the class axis last."""
    return np.moveaxis(x, axis, -1).reshape(-1, x.shape[axis])


def _default_class_axis(reference: Sequence[np.ndarray]) -> int | None:
    """Class scores ``[N, K]`` → 1, per-position scores ``[N, T, K]`` → 2; other ranks need the caller's word."""
    ranks = {np.ndim(r) for r in reference}
    if ranks == {2}:
        return 1
    if ranks == {3}:
        return 2
    return None


def _as_distribution(rows: np.ndarray) -> np.ndarray:
    sums = rows.sum(axis=1)
    if rows.min() >= 0 and np.allclose(sums, 1.0, atol=1e-3):
        return np.clip(rows, 1e-12, None)
    shifted = rows - rows.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    return np.clip(e / e.sum(axis=1, keepdims=True), 1e-12, None)


class FidelityAccumulator:
    """:func:`fidelity` one batch at a time, keeping only running sums: memory stays at one batch's outputs
    however many samples are compared (a recogniser's ``[N, 40, 6625]`` scores are 1 MB per sample)."""

    def __init__(self, class_axis: int | None = None) -> None:
        self.class_axis = class_axis
        self._axis: int | None = None
        self._classes = True
        self.samples = 0
        self.batches = 0
        self._cos_sum = 0.0
        self._cos_rows = 0
        self._max_err = 0.0
        self._agree = 0
        self._positions = 0
        self._kl_sum = 0.0

    def add(self, reference: np.ndarray, candidate: np.ndarray) -> None:
        """Raises:
            InvariantError: the batch's output shape changed.
        """
        r, c = np.asarray(reference, dtype=np.float64), np.asarray(candidate, dtype=np.float64)
        if r.shape != c.shape:
            raise InvariantError(f"fidelity: batch {self.batches} output shape changed from {r.shape} to {c.shape}")
        if self.batches == 0:
            self._axis = _default_class_axis([r]) if self.class_axis is None else self.class_axis
        self.batches += 1
        self.samples += r.shape[0] if r.ndim else 1
        rows = r.shape[0] if r.ndim >= 2 else 1  # a 1-D output (one score per sample) is compared as one vector
        ref, cand = r.reshape(rows, -1), c.reshape(rows, -1)
        nr, nc = np.linalg.norm(ref, axis=1), np.linalg.norm(cand, axis=1)
        cos = np.where((nr == 0) & (nc == 0), 1.0, (ref * cand).sum(axis=1) / np.where(nr * nc == 0, 1.0, nr * nc))
        self._cos_sum += float(cos.sum())
        self._cos_rows += rows
        if ref.size:
            self._max_err = max(self._max_err, float(np.max(np.abs(ref - cand))))
        axis = self._axis
        self._classes = self._classes and axis is not None and r.ndim > axis and r.shape[axis] >= 2
        if self._classes:
            assert axis is not None
            rows_r, rows_c = _class_rows(r, axis), _class_rows(c, axis)
            self._agree += int(np.sum(rows_r.argmax(axis=1) == rows_c.argmax(axis=1)))
            self._positions += len(rows_r)
            p, q = _as_distribution(rows_r), _as_distribution(rows_c)
            self._kl_sum += float((p * (np.log(p) - np.log(q))).sum())

    def result(self) -> Fidelity:
        """Raises:
            BadInputError: no batch was added.
        """
        if not self.batches:
            raise BadInputError("fidelity needs at least one batch of outputs", field="fidelity")
        classes = self._classes and self._positions > 0
        return Fidelity(
            samples=self.samples,
            cosine=self._cos_sum / max(self._cos_rows, 1),
            max_abs_err=self._max_err,
            top1_agreement=self._agree / self._positions if classes else None,
            kl=self._kl_sum / self._positions if classes else None,
        )


def fidelity(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray],
             class_axis: int | None = None) -> Fidelity:
    """Compare the first output of two models over the same batches.

    Args:
        reference: one array per batch, from the original model (batch on axis 0).
        candidate: the same batches from the pruned model.
        class_axis: the output's class axis (from its trailing Softmax, say); by default 1 for ``[N, K]``
            and 2 for ``[N, T, K]``.

    Returns:
        The comparison; ``top1_agreement`` and ``kl`` are None unless the output has class scores.

    Raises:
        BadInputError: no batches given.
        InvariantError: the batch counts or shapes differ.

    Example:
        >>> fidelity([np.eye(3)], [np.eye(3)]).top1_agreement
        1.0
    """
    if len(reference) != len(candidate):
        raise InvariantError(f"fidelity: {len(reference)} reference batches but {len(candidate)} candidate batches")
    acc = FidelityAccumulator(class_axis)
    for r, c in zip(reference, candidate, strict=True):
        acc.add(r, c)
    return acc.result()
