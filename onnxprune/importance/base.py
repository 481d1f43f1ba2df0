"""The criterion contract: a group in, one score per channel out, with the evidence the run gathered."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.analysis.core import Analysis, PruningGroup, Site
from onnxprune.errors import BadInputError


@dataclass
class ScoringContext:
    """Evidence a criterion may use. ``extras`` carries calibration or gradient statistics by name."""

    graph: gs.Graph
    analysis: Analysis
    seed: int = 0
    extras: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    _sites_by_group: dict[int, list[Site]] | None = field(default=None, repr=False)

    def weights(self, site: Site) -> np.ndarray:
        return np.asarray(self.graph.tensors()[site.tensor].values)

    def note(self, message: str) -> None:
        """Record a per-run remark for the report (e.g. a fallback), once."""
        if message not in self.notes:
            self.notes.append(message)

    def sites_of(self, group: PruningGroup) -> list[Site]:
        """Every site touching ``group``'s channels, indexed once per run (not per group and site)."""
        if self._sites_by_group is None:
            group_of = {int(c): g.id for g in self.analysis.groups for c in g.classes}
            index: dict[int, list[Site]] = {}
            for site in self.analysis.sites:
                for gid in {group_of[int(c)] for c in np.unique(self.analysis.classes_of(site.ids)) if c >= 0}:
                    index.setdefault(gid, []).append(site)
            self._sites_by_group = index
        return self._sites_by_group.get(group.id, [])


Criterion = Callable[[ScoringContext, PruningGroup], np.ndarray]


class CriterionRegistry:
    """Name → criterion; registering a name twice is an error."""

    def __init__(self) -> None:
        self._criteria: dict[str, Criterion] = {}
        self.needs: dict[str, set[str]] = {}

    def register(self, name: str, fn: Criterion, needs: set[str] | None = None) -> None:
        if name in self._criteria:
            raise ValueError(f"criterion {name!r} is already registered")
        self._criteria[name] = fn
        self.needs[name] = set(needs or ())

    def get(self, name: str) -> Criterion:
        try:
            return self._criteria[name]
        except KeyError:
            raise BadInputError(f"unknown criterion {name!r}; known: {', '.join(sorted(self._criteria))}",
                                field="criterion") from None

    def names(self) -> list[str]:
        return sorted(self._criteria)


def channel_positions(ctx: ScoringContext, group: PruningGroup, ids: np.ndarray) -> np.ndarray:
    """For each position of an id array, the group channel it belongs to, or -1 (fixed / other group)."""
    classes = ctx.analysis.classes_of(ids)
    order = np.argsort(group.classes)
    sorted_classes = group.classes[order]
    pos = np.clip(np.searchsorted(sorted_classes, classes), 0, len(order) - 1)
    return np.where(sorted_classes[pos] == classes, order[pos], -1)


def per_channel(ctx: ScoringContext, group: PruningGroup, site: Site, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sum per-position ``values`` of a site into the group's channels.

    Returns (sums per channel, mask of channels the site touches).
    """
    ch = channel_positions(ctx, group, site.ids)
    valid = ch >= 0
    sums = np.zeros(group.size)
    np.add.at(sums, ch[valid], np.asarray(values, dtype=np.float64)[valid])
    touched = np.zeros(group.size, dtype=bool)
    touched[ch[valid]] = True
    return sums, touched


def group_sites(ctx: ScoringContext, group: PruningGroup, roles: tuple[str, ...]) -> list[Site]:
    return [site for site in ctx.sites_of(group) if site.role in roles]
