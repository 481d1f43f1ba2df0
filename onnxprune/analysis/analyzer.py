"""The state of one analysis walk and the per-op rule registry; rules read and extend it."""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.analysis.core import (
    AnalysisOptions,
    ChannelMap,
    Fixup,
    FixupKind,
    Site,
    SiteRole,
)
from onnxprune.registry import OpRegistry

log = logging.getLogger(__name__)


class UnionFind:
    """Union-find over consecutive integer ids, grown on demand."""

    def __init__(self) -> None:
        self.parent: list[int] = []

    def add(self, n: int) -> np.ndarray:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return np.arange(start, start + n, dtype=np.int64)

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:
            self.parent[i], i = root, self.parent[i]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def roots(self) -> np.ndarray:
        return np.array([self.find(i) for i in range(len(self.parent))], dtype=np.int64)


Rule = Callable[["Analyzer", gs.Node], None]


class RuleRegistry(OpRegistry[Rule]):
    """Per-op channel propagation rules; an op without one blocks what it reads (the driver's policy)."""

    def __init__(self) -> None:
        super().__init__("channel rule")


class Analyzer:
    """The state of one analysis walk; rules read and extend it through these methods."""

    def __init__(
        self, graph: gs.Graph, shapes: dict[str, list[int | str]], exclude: Iterable[str] = (),
        options: AnalysisOptions | None = None,
    ) -> None:
        self.graph = graph
        self.shapes = shapes
        self.exclude = list(exclude)
        self.options = options or AnalysisOptions()
        self.uf = UnionFind()
        self.maps: dict[str, ChannelMap] = {}
        self.blocked: dict[int, str] = {}
        self.approximations: dict[int, str] = {}  # id → why cutting it changes values the graph keeps
        self.producer_of: list[str] = []
        self.sites: list[Site] = []
        self.fixups: list[Fixup] = []
        self.shape_reads: dict[str, list[tuple[str, ...]]] = {}
        self.folded: dict[str, np.ndarray] = {}
        self.pinned: set[tuple[str, int, int]] = set()  # (node, input, entry or -1): made constant by the cut
        self.cache_io: dict[str, str] = {}  # cache graph input → the graph output it is concatenated into

    # --- facts about tensors -------------------------------------------------------------
    def map(self, t: gs.Tensor | None) -> ChannelMap | None:
        return None if t is None or not t.name else self.maps.get(t.name)

    def set_map(self, t: gs.Tensor, m: ChannelMap | None) -> None:
        if m is not None and t.name and bool(np.any(m.ids >= 0)):
            self.maps[t.name] = m

    def const(self, t: gs.Tensor | None) -> np.ndarray | None:
        return np.asarray(t.values) if isinstance(t, gs.Constant) else None

    def shape(self, t: gs.Tensor | None) -> list[int | str] | None:
        if t is None:
            return None
        if isinstance(t, gs.Constant):
            return list(t.shape)
        return self.shapes.get(t.name)

    def rank(self, t: gs.Tensor | None) -> int | None:
        s = self.shape(t)
        return None if s is None else len(s)

    @staticmethod
    def present(t: gs.Tensor | None) -> bool:
        return t is not None and (bool(t.name) or isinstance(t, gs.Constant))

    # --- edits to the analysis -----------------------------------------------------------
    def new_ids(self, n: int, node: gs.Node) -> np.ndarray:
        self.producer_of.extend([node.name] * n)
        return self.uf.add(n)

    def block(self, ids: np.ndarray | None, reason: str) -> None:
        if ids is None:
            return
        for i in np.unique(ids[ids >= 0]):
            self.blocked.setdefault(int(i), reason)

    def approximate(self, ids: np.ndarray | None, reason: str) -> None:
        """Allow cutting ``ids`` although it changes what the kept channels compute (a statistic over the
        channel axis): the group is reported as approximate with ``reason``, never silently."""
        if ids is None:
            return
        for i in np.unique(ids[ids >= 0]):
            self.approximations.setdefault(int(i), reason)

    def block_inputs(self, node: gs.Node, reason: str) -> None:
        for t in node.inputs:
            m = self.map(t)
            if m is not None:
                self.block(m.ids, reason)

    def couple(self, a: np.ndarray, b: np.ndarray, reason: str) -> np.ndarray:
        """Tie two equally long id arrays position by position; a fixed side blocks the other."""
        out = a.copy()
        for k, (x, y) in enumerate(zip(a.tolist(), b.tolist())):
            if x >= 0 and y >= 0:
                self.uf.union(x, y)
            elif x >= 0 or y >= 0:
                self.blocked.setdefault(max(x, y), reason)
                out[k] = max(x, y)
        return out

    def proportion(self, whole: np.ndarray, part: np.ndarray) -> int | None:
        """``r`` when every channel class has ``r`` times as many positions in ``whole`` as in ``part`` (so
        any cut keeps ``len(whole) / len(part)`` = r), else None. Fixed positions count as their own class."""
        def counts(ids: np.ndarray) -> dict[int, int]:
            out: dict[int, int] = {}
            for i in ids.tolist():
                key = self.uf.find(i) if i >= 0 else -1
                out[key] = out.get(key, 0) + 1
            return out

        a, b = counts(whole), counts(part)
        if set(a) != set(b) or not b:
            return None
        ratios = {a[k] / b[k] for k in b}
        r = ratios.pop()
        return int(r) if not ratios and float(r).is_integer() else None

    def site(self, t: gs.Tensor, axis: int, ids: np.ndarray, node: gs.Node, role: SiteRole) -> None:
        if isinstance(t, gs.Constant) and bool(np.any(ids >= 0)):
            self.sites.append(Site(t.name, axis, ids, node.name, node.op, role))

    def fixup(self, node: gs.Node, kind: FixupKind, ids: list[np.ndarray], **data: Any) -> None:
        self.fixups.append(Fixup(node.name, kind, ids, dict(data)))

    def excluded(self, node: gs.Node) -> bool:
        return any(fnmatch.fnmatchcase(node.name, p) for p in self.exclude)
