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
    if not reference:
        raise BadInputError("fidelity needs at least one batch of outputs", field="fidelity")
    if len(reference) != len(candidate):
        raise InvariantError(f"fidelity: {len(reference)} reference batches but {len(candidate)} candidate batches")
    refs, cands = [], []
    samples = 0
    for i, (r, c) in enumerate(zip(reference, candidate, strict=True)):
        r, c = np.asarray(r, dtype=np.float64), np.asarray(c, dtype=np.float64)
        if r.shape != c.shape:
            raise InvariantError(f"fidelity: batch {i} output shape changed from {r.shape} to {c.shape}")
        samples += r.shape[0] if r.ndim else 1
        rows = r.shape[0] if r.ndim >= 2 else 1  # a 1-D output (one score per sample) is compared as one vector
        refs.append(r.reshape(rows, -1))
        cands.append(c.reshape(rows, -1))
    ref, cand = np.concatenate(refs), np.concatenate(cands)
    dot = (ref * cand).sum(axis=1)
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1)
    both_zero = (np.linalg.norm(ref, axis=1) == 0) & (np.linalg.norm(cand, axis=1) == 0)
    cos = np.where(both_zero, 1.0, dot / np.where(norms == 0, 1.0, norms))
    axis = _default_class_axis(reference) if class_axis is None else class_axis
    top1 = kl = None
    if axis is not None and all(np.ndim(r) > axis and np.shape(r)[axis] >= 2 for r in reference):
        rows_r = np.concatenate([_class_rows(np.asarray(r, np.float64), axis) for r in reference])
        rows_c = np.concatenate([_class_rows(np.asarray(c, np.float64), axis) for c in candidate])
        top1 = float(np.mean(rows_r.argmax(axis=1) == rows_c.argmax(axis=1)))
        p, q = _as_distribution(rows_r), _as_distribution(rows_c)
        kl = float(np.mean((p * (np.log(p) - np.log(q))).sum(axis=1)))
    return Fidelity(
        samples=samples,
        cosine=float(np.mean(cos)),
        max_abs_err=float(np.max(np.abs(ref - cand))) if ref.size else 0.0,
        top1_agreement=top1,
        kl=kl,
    )
