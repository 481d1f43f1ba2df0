"""Activation criteria from calibration: ``apoz`` (Hu et al. 2016) and ``activation`` (mean |x|).

``apoz``: the average percentage of zeros a channel has after the ReLU-like op that follows it; a
channel that is almost always zero passes almost nothing on, so its score is ``1 - APoZ``. Several
ReLU outputs carrying the same channel (a residual group) are averaged, weighted by how many elements
each one saw. ``activation``: mean |x| of what the consuming layers read, each tensor divided by its
mean so tensors of different scale weigh alike — a cheap data-driven baseline. Groups without a
ReLU-like op (``apoz``) or without measured consumers (``activation``) fall back to L2 magnitude,
noted for the report.
"""

from __future__ import annotations

import numpy as np

from onnxprune.analysis.core import PruningGroup
from onnxprune.importance.base import CriterionRegistry, ScoringContext
from onnxprune.importance.magnitude import lp_scores
from onnxprune.repair.calibration import (
    ACTIVATIONS,
    CalibrationStats,
    activation_tensors,
    channel_values,
    consumer_inputs,
)


def calibration_stats(ctx: ScoringContext, criterion: str) -> CalibrationStats:
    """The statistics the calibrate stage gathered (InvariantError when it did not run)."""
    return ctx.evidence.require_calibration(criterion)


def _average(ctx: ScoringContext, group: PruningGroup, names: list[str], stats: CalibrationStats,
             value: str) -> tuple[np.ndarray, np.ndarray]:
    total, weight = np.zeros(group.size), np.zeros(group.size)
    for name in names:
        ts = stats.tensors.get(name)
        if ts is None or ts.count == 0:
            continue
        values = ts.zero_fraction if value == "zeros" else ts.mean_abs
        if value == "abs":
            mean = float(values.mean())
            values = values / mean if mean > 0 else values
        per, touched = channel_values(ctx.analysis, group, ctx.analysis.maps[name].ids, values)
        total[touched] += per[touched]
        weight[touched] += 1
    return np.divide(total, weight, out=np.zeros(group.size), where=weight > 0), weight > 0


def apoz_scores(ctx: ScoringContext, group: PruningGroup) -> np.ndarray:
    stats = calibration_stats(ctx, "apoz")
    zeros, touched = _average(ctx, group, activation_tensors(ctx.graph, ctx.analysis, group), stats, "zeros")
    if not touched.all():
        ctx.note(f"apoz: group {group.id} ({', '.join(group.producers)}) has no ReLU-like activation "
                 f"on {'any' if not touched.any() else 'some'} channels; scored by l2")
        return lp_scores(ctx, group, 2)
    return 1.0 - zeros


def activation_scores(ctx: ScoringContext, group: PruningGroup) -> np.ndarray:
    stats = calibration_stats(ctx, "activation")
    means, touched = _average(ctx, group, consumer_inputs(ctx.graph, ctx.analysis, group), stats, "abs")
    if not touched.all():
        ctx.note(f"activation: group {group.id} ({', '.join(group.producers)}) has unmeasured channels; scored by l2")
        return lp_scores(ctx, group, 2)
    return means


def register(reg: CriterionRegistry) -> None:
    reg.register("apoz", apoz_scores, needs={ACTIVATIONS})
    reg.register("activation", activation_scores, needs={ACTIVATIONS})
