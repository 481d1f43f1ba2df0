"""``flap``: the fluctuation metric of FLAP (An et al. 2024), and ``flap-std`` with its standardisation.

FLAP asks how much the output of the layer that consumes a group (o_proj, down_proj) would move if an
input channel ``j`` were replaced by its mean (which a bias can restore): the sample variance of
``X_j`` over calibration tokens times the squared norm of the weights reading it, ``Var(X_j)·‖W_:,j‖²``.
A channel sums this over its consumers' input positions (a KV group over its heads' dims). Channels
no measured consumer reads fall back to L2, noted.

FLAP compares channels across layers after standardising each layer's scores, ``(s − μ)/σ``. The
planner compares groups by ``s / mean(s)``; ``flap-std`` returns ``1 + (s − μ)/σ`` (mean 1), so the
planner's global order is FLAP's.
"""

from __future__ import annotations

import numpy as np

from onnxprune.analysis.core import PruningGroup, Site, SiteRole
from onnxprune.importance.base import CriterionRegistry, ScoringContext
from onnxprune.importance.wanda import along_input, site_sums, weighted_scores
from onnxprune.repair.calibration import LAYER_INPUTS, LinearView, TensorStats


def fluctuation_values(weight: np.ndarray, site: Site, view: LinearView, ts: TensorStats) -> np.ndarray:
    """Per input position of a consumer ``site``: Var(X_j)·‖W_:,j‖² (summed over a Conv's kernel taps)."""
    w = np.asarray(weight, dtype=np.float64)
    return site_sums(w * w * along_input(view, w, ts.variance), site.axis)


def flap_scores(ctx: ScoringContext, group: PruningGroup) -> np.ndarray:
    return weighted_scores(ctx, group, "flap", (SiteRole.IN,), fluctuation_values)


def standardized(scores: np.ndarray) -> np.ndarray:
    """``1 + (s − μ)/σ``: FLAP's per-layer standardisation, shifted to mean 1 for the planner's normalisation."""
    std = float(scores.std())
    return 1.0 + (scores - scores.mean()) / std if std > 0 else np.ones_like(scores)


def flap_std_scores(ctx: ScoringContext, group: PruningGroup) -> np.ndarray:
    return standardized(flap_scores(ctx, group))


def register(reg: CriterionRegistry) -> None:
    reg.register("flap", flap_scores, needs={LAYER_INPUTS})
    reg.register("flap-std", flap_std_scores, needs={LAYER_INPUTS})
