"""``bn-scale``: the |γ| of the BatchNormalization after each channel (Network Slimming, Liu et al. 2017).

BN divides a channel by its running std and multiplies it by γ, so a small |γ| means the channel
reaches the next layer scaled down to almost a constant (β), whatever the convolution computed. It
needs no data. A channel met by several BNs (a residual group) averages each BN's |γ| divided by that
BN's mean |γ|, so BNs of different scale weigh alike. Groups where some channel has no BN fall back to
L2 magnitude, and the report says so.
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
from onnxprune.importance.magnitude import lp_scores


def bn_scale_scores(ctx: ScoringContext, group: PruningGroup) -> np.ndarray:
    nodes = {n.name: n for n in ctx.graph.nodes}
    total, count = np.zeros(group.size), np.zeros(group.size)
    for site in group_sites(ctx, group, (SiteRole.PARAM,)):
        node = nodes.get(site.node)
        if site.op != "BatchNormalization" or node is None or node.inputs[1].name != site.tensor:
            continue
        gamma = np.abs(ctx.weights(site).astype(np.float64).reshape(-1))
        sums, touched = per_channel(ctx, group, site, gamma)
        hits, _ = per_channel(ctx, group, site, np.ones_like(gamma))
        mean = gamma.mean()
        if mean > 0:
            total[touched] += sums[touched] / hits[touched] / mean
            count[touched] += 1
    if not (count > 0).all():
        where = "no BatchNormalization follows" if not count.any() else "some channels have no BatchNormalization"
        ctx.note(f"bn-scale: group {group.id} ({', '.join(group.producers)}): {where}; scored by l2")
        return lp_scores(ctx, group, 2)
    return total / count


def register(reg: CriterionRegistry) -> None:
    reg.register("bn-scale", bn_scale_scores)
