"""``wanda``: weight magnitude times input-feature norm (Sun et al. 2023, summed per channel for structure).

Wanda scores a weight ``W_ij`` (input feature ``j``) by ``|W_ij|·‖X_j‖₂``, with ``‖X_j‖`` the L2 norm of
feature ``j`` over every calibration token: a large weight reading a feature that is almost always near
zero moves little. A channel's score sums this over all the weights the group removes with it: the
output column of each producer (q/k/v, gate/up: ``Σ_j |W_jc|·‖X_j‖`` with ``X`` the producer's input)
and the input row of each consumer (o_proj, down_proj: ``‖X_c‖·Σ_k |W_ck|`` with ``X`` the activation
entering that layer). Biases and norm parameters do not count. Layers whose input was not measured
(an Einsum, a grouped Conv, a weight behind a Transpose) are left out, noted; a group with channels no
measured layer touches falls back to L2.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from onnxprune.analysis.core import PruningGroup, Site, SiteRole
from onnxprune.importance.apoz import calibration_stats
from onnxprune.importance.base import (
    CriterionRegistry,
    ScoringContext,
    group_sites,
    per_channel,
)
from onnxprune.importance.magnitude import lp_scores
from onnxprune.repair.calibration import (
    LAYER_INPUTS,
    CalibrationStats,
    LinearView,
    TensorStats,
)

WEIGHT_SLOTS = (SiteRole.OUT, SiteRole.IN)

SiteValues = Callable[[np.ndarray, Site, LinearView, TensorStats], np.ndarray]
"""(weight, site, its layer, the layer's input statistics) -> one value per position of the site."""


def layer_input(stats: CalibrationStats, site: Site) -> tuple[LinearView, TensorStats] | None:
    """The layer holding ``site``'s weight and its measured input statistics, or None when not measured."""
    view = stats.layers.get(site.node)
    ts = stats.tensors.get(view.input) if view is not None and view.weight == site.tensor else None
    if view is None or ts is None or ts.count == 0:
        return None
    return view, ts


def along_input(view: LinearView, w: np.ndarray, per_input: np.ndarray) -> np.ndarray:
    """``per_input`` (one value per input channel) shaped to broadcast over the stored weight ``w``."""
    shape = [1] * w.ndim
    shape[view.input_axis] = len(per_input)
    return per_input.reshape(shape)


def site_sums(w: np.ndarray, axis: int) -> np.ndarray:
    """Sum of ``w`` over every axis but ``axis`` (one value per position of the site)."""
    return np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1).sum(axis=1)


def weighted_scores(ctx: ScoringContext, group: PruningGroup, name: str, roles: tuple[SiteRole, ...],
                    site_values: SiteValues) -> np.ndarray:
    """Σ over the group's measured weight slots of ``site_values`` per position, channels summed; L2 when a
    channel has no measured slot (noted)."""
    stats = calibration_stats(ctx, name)
    total = np.zeros(group.size)
    touched = np.zeros(group.size, dtype=bool)
    for site in group_sites(ctx, group, roles):
        measured = layer_input(stats, site)
        if measured is None:
            continue
        sums, hit = per_channel(ctx, group, site, site_values(ctx.weights(site), site, *measured))
        total += sums
        touched |= hit
    if not touched.all():
        ctx.note(f"{name}: group {group.id} ({', '.join(group.producers)}) has channels in no measured "
                 "Conv/Gemm/MatMul layer; scored by l2")
        return lp_scores(ctx, group, 2)
    return total


def wanda_values(weight: np.ndarray, site: Site, view: LinearView, ts: TensorStats) -> np.ndarray:
    """Per position of ``site``: Σ |W|·‖X_in‖ over the weights at that position."""
    w = np.abs(np.asarray(weight, dtype=np.float64))
    return site_sums(w * along_input(view, w, ts.l2_norm), site.axis)


def wanda_scores(ctx: ScoringContext, group: PruningGroup) -> np.ndarray:
    return weighted_scores(ctx, group, "wanda", WEIGHT_SLOTS, wanda_values)


def register(reg: CriterionRegistry) -> None:
    reg.register("wanda", wanda_scores, needs={LAYER_INPUTS})
