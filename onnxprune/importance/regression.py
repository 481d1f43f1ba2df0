"""``regression``: channel selection by LASSO regression on the next layer's output (He et al. 2017).

For each consumer of a group (Conv via im2col patches, Gemm, MatMul), calibration kept the Gram
matrix ``G = Σ aᵀa`` of its input feature rows ``a`` at sampled output positions. Channel ``i``'s
contribution to the consumer's output is ``Z_i = A_i B_i`` (its features times its weight rows), and
the output the group provides is ``Y = Σ_i Z_i``. The paper's channel-selection step solves

    min_β ‖Y − Σ_i β_i Z_i‖² + λ‖β‖₁

and keeps the channels with β ≠ 0. Everything it needs is the contribution Gram ``C_ij = ⟨Z_i, Z_j⟩
= 1ᵀ(G_ij ∘ B_i B_jᵀ)1`` (so the Xy of the problem is ``C·1``), which scikit-learn's ``lars_path_gram``
takes directly: the whole LASSO path in one call, no λ search. A channel's score is how early (at
which λ) it enters the path; channels that never enter score below all that do, ordered by their own
contribution energy. Consumers are weighed alike by dividing each ``C`` by ``‖Y‖²``.

``B`` is the least-squares weight on the sampled inputs, ``(G + εI)⁻¹ G W`` — equal to the layer's
own weight ``W`` when the inputs are linearly independent. When a channel is (nearly) a linear
combination of others, the least-squares (minimum-norm) weight spreads over them, so their
contributions become collinear and LASSO drops the redundant one: the reconstruction step of the
paper, folded into the selection. Groups with no usable consumer fall back to L2, noted.
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.analysis.core import PruningGroup, Site, SiteRole
from onnxprune.importance.apoz import calibration_stats
from onnxprune.importance.base import CriterionRegistry, ScoringContext
from onnxprune.importance.magnitude import lp_scores
from onnxprune.repair.calibration import FEATURES, FeatureGram

RIDGE = 1e-6
"""Relative ridge of the least-squares weights (times mean diag(G)): only guards singular Grams."""


def contribution_gram(ctx: ScoringContext, group: PruningGroup, fg: FeatureGram, site: Site) -> np.ndarray | None:
    """``C`` (group.size × group.size) for one consumer, normalised to ``1ᵀC1 = 1``; None when it carries nothing."""
    g = fg.gram
    k = g.shape[0]
    w = fg.view.matrix(ctx.weights(site)) * _bn_scale(ctx, fg.view.node)
    scale = float(np.trace(g)) / k if k else 0.0
    if scale <= 0:
        return None
    b = np.linalg.solve(g + RIDGE * scale * np.eye(k), g @ w)
    features = np.repeat(site.ids, fg.view.per_channel())
    index = ctx.analysis.group_channel_index(group)
    e = np.zeros((k, group.size))
    for pos, cls in enumerate(ctx.analysis.classes_of(features).tolist()):
        ch = index.get(cls)
        if ch is not None:
            e[pos, ch] = 1.0
    c = e.T @ (g * (b @ b.T)) @ e
    energy = float(c.sum())
    return c / energy if energy > 0 else None


def _bn_scale(ctx: ScoringContext, node_name: str) -> np.ndarray | float:
    """γ/σ of a BatchNormalization that alone reads the consumer's output: the scale its output errors get."""
    node = next((n for n in ctx.graph.nodes if n.name == node_name), None)
    users = node.outputs[0].outputs if node is not None else []
    if len(users) != 1 or users[0].op != "BatchNormalization":
        return 1.0
    bn = users[0]
    if not all(isinstance(t, gs.Constant) for t in (bn.inputs[1], bn.inputs[4])):
        return 1.0
    gamma, var = (np.asarray(bn.inputs[i].values, dtype=np.float64) for i in (1, 4))
    return gamma / np.sqrt(var + float(bn.attrs.get("epsilon", 1e-5)))


def lasso_scores(c: np.ndarray) -> np.ndarray:
    """Scores from the LASSO path on contribution Gram ``c``: 1 + (entry λ / first λ) for channels that enter,
    their energy share (< 1) for those that never do."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import lars_path_gram

    n = c.shape[0]
    diag = np.diag(c).clip(min=0)
    fallback = diag / diag.max() if diag.max() > 0 else np.zeros(n)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        alphas, _, coefs = lars_path_gram(c.sum(axis=1), c, n_samples=1, method="lasso", max_iter=10 * n)
    scores = 0.999 * fallback
    if alphas[0] <= 0:
        return scores
    nonzero = np.abs(coefs) > 1e-12
    for i in range(n):
        steps = np.flatnonzero(nonzero[i])
        if steps.size:
            scores[i] = 1.0 + alphas[steps[0]] / alphas[0]
    return scores


def regression_scores(ctx: ScoringContext, group: PruningGroup) -> np.ndarray:
    stats = calibration_stats(ctx, "regression")
    total = np.zeros((group.size, group.size))
    used = 0
    members = set(group.classes.tolist())
    for site in ctx.analysis.sites:
        fg = stats.grams.get(site.node)
        if site.role != SiteRole.IN or fg is None or site.tensor != fg.view.weight:
            continue
        if not members.intersection(ctx.analysis.classes_of(site.ids).tolist()):
            continue
        c = contribution_gram(ctx, group, fg, site)
        if c is not None:
            total += c
            used += 1
    if not used:
        ctx.note(f"regression: group {group.id} ({', '.join(group.producers)}) has no sampled Conv/Gemm/MatMul "
                 "consumer; scored by l2")
        return lp_scores(ctx, group, 2)
    return lasso_scores(total)


def register(reg: CriterionRegistry) -> None:
    reg.register("regression", regression_scores, needs={FEATURES})
