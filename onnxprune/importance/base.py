"""The criterion contract: a group in, one score per channel out, with the evidence the run gathered."""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.analysis.core import Analysis, PruningGroup, Site, SiteRole
from onnxprune.errors import BadInputError, InvariantError
from onnxprune.registry import Registry

if TYPE_CHECKING:
    from onnxprune.repair.calibration import CalibrationStats
    from onnxprune.training.grads import GradStats


class Need(str, enum.Enum):
    """Evidence beyond the weights that a criterion asks the pipeline to gather before scoring."""

    ACTIVATIONS = "activations"
    """Per-channel activation statistics (zero counts, mean |x|) from calibration runs."""
    FEATURES = "features"
    """Gram matrices of the consumers' input features (regression), from calibration runs."""
    GRADIENTS = "gradients"
    """Per-weight gradient statistics from backward passes on the calibration data."""
    LAYER_INPUTS = "layer inputs"
    """Per-feature Σx and Σx² of the inputs of the layers holding a group's weights (wanda, flap)."""


@dataclass
class Evidence:
    """What the calibrate stage gathered for the criterion; a field stays None when it was not asked for."""

    calibration: CalibrationStats | None = None
    gradients: GradStats | None = None

    def require_calibration(self, criterion: str) -> CalibrationStats:
        """Raises:
            InvariantError: the criterion was run without calibrating first.
        """
        if self.calibration is None:
            raise InvariantError(f"criterion {criterion} needs calibration statistics; run the calibrate stage first")
        return self.calibration

    def require_gradients(self, criterion: str) -> GradStats:
        """Raises:
            InvariantError: the criterion was run without gradient statistics.
        """
        if self.gradients is None:
            raise InvariantError(f"criterion {criterion} needs gradient statistics; the calibrate stage did not run")
        return self.gradients


@dataclass
class ScoringContext:
    """What a criterion may read: the graph's weights through the analysis' sites, and the evidence gathered."""

    graph: gs.Graph
    analysis: Analysis
    seed: int = 0
    evidence: Evidence = field(default_factory=Evidence)
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


class CriterionRegistry(Registry[str, Criterion]):
    """Name → criterion, with the evidence each one needs gathered first; registering a name twice is an error."""

    def __init__(self) -> None:
        super().__init__("criterion")
        self.needs: dict[str, set[Need]] = {}

    def register(self, name: str, fn: Criterion, needs: set[Need] | None = None) -> None:
        self.add(name, fn)
        self.needs[name] = set(needs or ())

    def get(self, name: str) -> Criterion:
        """Raises:
            BadInputError: no criterion has that name.
        """
        fn = self.lookup(name)
        if fn is None:
            raise BadInputError(f"unknown criterion {name!r}; known: {', '.join(self.names())}", field="criterion")
        return fn

    def names(self) -> list[str]:
        return self.keys()


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


def group_sites(ctx: ScoringContext, group: PruningGroup, roles: tuple[SiteRole, ...]) -> list[Site]:
    return [site for site in ctx.sites_of(group) if site.role in roles]
