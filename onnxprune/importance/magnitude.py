"""Weight-magnitude criteria (L1, L2), element-wise magnitude, and the random baseline.

Channel score (``l1``/``l2``): for every weight tensor that follows the group (producer output rows,
consumer input columns, biases, BN γ/β — not running statistics), take the Lp norm of each channel's
slice, divide by that tensor's mean channel norm so tensors of different scale weigh alike, and average
over the tensors. A Flatten→Gemm consumer contributes one norm per channel over all its H·W columns.
"""

from __future__ import annotations

import numpy as np

from onnxprune.analysis.core import PruningGroup, SiteRole
from onnxprune.importance.base import (
    CriterionRegistry,
    ScoringContext,
    group_sites,
    per_channel,
)

WEIGHT_ROLES = (SiteRole.OUT, SiteRole.IN, SiteRole.PARAM)


def lp_scores(ctx: ScoringContext, group: PruningGroup, p: int) -> np.ndarray:
    total = np.zeros(group.size)
    count = np.zeros(group.size)
    for site in group_sites(ctx, group, WEIGHT_ROLES):
        w = np.moveaxis(ctx.weights(site), site.axis, 0).reshape(len(site.ids), -1)
        # float32 rows, float64 sums: no full-size float64 copy of large weights.
        powered = (np.einsum("ij,ij->i", w, w, dtype=np.float64) if p == 2
                   else np.abs(w).sum(axis=1, dtype=np.float64))
        sums, touched = per_channel(ctx, group, site, powered)
        norms = sums ** (1.0 / p)
        mean = norms[touched].mean() if touched.any() else 0.0
        if mean > 0:
            total[touched] += norms[touched] / mean
            count[touched] += 1
    return np.divide(total, count, out=np.zeros_like(total), where=count > 0)


def random_scores(ctx: ScoringContext, group: PruningGroup) -> np.ndarray:
    """Uniform random scores: the baseline every criterion should beat. Seeded per run and group."""
    return np.random.default_rng((ctx.seed, group.id)).random(group.size)


def elementwise_magnitude_mask(weights: np.ndarray, sparsity: float) -> np.ndarray:
    """Keep-mask zeroing the ``sparsity`` fraction of smallest-|w| elements (ties broken by position).

    Example:
        >>> w = np.array([-2.0, 3.0, -5.0, 1.0])
        >>> w * elementwise_magnitude_mask(w, 0.5)
        array([ 0.,  3., -5.,  0.])
    """
    flat = np.abs(weights).reshape(-1)
    n_zero = int(round(sparsity * flat.size))
    mask = np.ones(flat.size, dtype=bool)
    if n_zero:
        mask[np.argsort(flat, kind="stable")[:n_zero]] = False
    return mask.reshape(weights.shape)


def register(reg: CriterionRegistry) -> None:
    reg.register("l1", lambda ctx, g: lp_scores(ctx, g, 1))
    reg.register("l2", lambda ctx, g: lp_scores(ctx, g, 2))
    reg.register("random", random_scores)
