"""Importance criteria: a group in, one score per channel out (higher = more important).

Criteria are looked up in a :class:`CriterionRegistry`; each gets a :class:`ScoringContext` holding
whatever evidence the run gathered (weights always; calibration statistics and gradients when the
criterion asks for them) and returns scores for one group. Per-tensor weight access goes through the
analysis' sites, so no criterion re-walks the graph.
"""

from __future__ import annotations

import numpy as np

from onnxprune.importance.base import CriterionRegistry, ScoringContext


def default_criteria() -> CriterionRegistry:
    """A fresh registry with every built-in criterion."""
    from onnxprune.importance import magnitude

    reg = CriterionRegistry()
    magnitude.register(reg)
    for module in ("scaling", "apoz", "regression", "taylor", "wanda", "flap"):
        try:
            mod = __import__(f"onnxprune.importance.{module}", fromlist=["register"])
        except ModuleNotFoundError as e:
            if e.name != f"onnxprune.importance.{module}":
                raise
            continue
        mod.register(reg)
    return reg

def score_groups(ctx: ScoringContext, criterion: str, registry: CriterionRegistry | None = None) -> dict[int, np.ndarray]:
    """Scores for every group that has prunable channels, keyed by group id."""
    fn = (registry or default_criteria()).get(criterion)
    scores: dict[int, np.ndarray] = {}
    for group in ctx.analysis.groups:
        if group.prunable:
            s = np.asarray(fn(ctx, group), dtype=np.float64)
            if s.shape != (group.size,):
                raise ValueError(f"criterion {criterion} returned shape {s.shape} for a group of {group.size}")
            scores[group.id] = s
    return scores
