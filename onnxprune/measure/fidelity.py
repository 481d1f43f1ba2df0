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
        top1_agreement: fraction of rows with the same argmax; only for class scores [N, K], K ≥ 2.
        kl: mean KL(reference ‖ candidate) of the rows as distributions (softmax of logits, or the rows
            themselves when they already are probabilities); only for class scores [N, K].
    """

    samples: int
    cosine: float
    max_abs_err: float
    top1_agreement: float | None
    kl: float | None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _as_distribution(rows: np.ndarray) -> np.ndarray:
    sums = rows.sum(axis=1)
    if rows.min() >= 0 and np.allclose(sums, 1.0, atol=1e-3):
        return np.clip(rows, 1e-12, None)
    shifted = rows - rows.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    return np.clip(e / e.sum(axis=1, keepdims=True), 1e-12, None)


def fidelity(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> Fidelity:
    """Compare the first output of two models over the same batches.

    Args:
        reference: one array per batch, from the original model (batch on axis 0).
        candidate: the same batches from the pruned model.

    Returns:
        The comparison; ``top1_agreement`` and ``kl`` are None unless the output is 2-D class scores.

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
    classes = all(np.ndim(r) == 2 and np.shape(r)[1] >= 2 for r in reference)
    top1 = kl = None
    if classes:
        top1 = float(np.mean(ref.argmax(axis=1) == cand.argmax(axis=1)))
        p, q = _as_distribution(ref), _as_distribution(cand)
        kl = float(np.mean((p * (np.log(p) - np.log(q))).sum(axis=1)))
    return Fidelity(
        samples=samples,
        cosine=float(np.mean(cos)),
        max_abs_err=float(np.max(np.abs(ref - cand))) if ref.size else 0.0,
        top1_agreement=top1,
        kl=kl,
    )
