"""Channel dependency analysis: which channels must be removed together, and which must never be.

Every prunable producer (Conv/ConvTranspose output channels, Gemm/MatMul output features) allocates
one integer *id* per output channel. Per-op rules (``channel_rules``) carry a :class:`ChannelMap`
(axis + id per position) forward through the graph; ops that tie channels together (residual Add,
squeeze-excite Mul, depthwise Conv, Concat along another axis) *union* ids. After the walk, each
union-find class is one prunable channel, and producers that share classes form a
:class:`PruningGroup`. Anything not understood **blocks** the ids it touches, with the reason; ids
that reach a graph output are blocked too. Weights that must be sliced when a class goes are recorded
as :class:`Site` objects, and non-weight edits (Conv ``group``, Reshape/Split/Slice constants) as
:class:`Fixup` objects — surgery applies both, importance reads the sites.

The driver also keeps three safety nets that no single rule can: tensors read inside If/Loop/Scan
bodies are blocked, channel counts read by ``Shape`` are followed through shape arithmetic
(:mod:`onnxprune.shape_flow`) and blocked where a cut would change them unseen, and a weight holding
only part of a group keeps one channel so that no plan can empty it.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.index_mapping import FIXED
from onnxprune.shape_flow import check_shape_reads, follow_shape_reads, shape_facts

log = logging.getLogger(__name__)


@dataclass
class ChannelMap:
    """The channel ids carried by a tensor: position ``p`` along ``axis`` belongs to id ``ids[p]``."""

    axis: int
    ids: np.ndarray


@dataclass
class Site:
    """A constant tensor whose slices along ``axis`` follow channel ids.

    ``role``: ``out`` (a producer's output rows), ``in`` (a consumer's input columns), ``param``
    (per-channel parameters: bias, BN γ/β, broadcast constants) or ``stat`` (BN running statistics,
    sliced but never used as importance).
    """

    tensor: str
    axis: int
    ids: np.ndarray
    node: str
    op: str
    role: str


@dataclass
class Fixup:
    """A non-weight edit a cut requires: ``kind`` names the surgery handler, ``ids`` the channels it counts."""

    node: str
    kind: str
    ids: list[np.ndarray]
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class PruningGroup:
    """Channels that are removed together. ``classes[i]`` is channel ``i``'s union-find root."""

    id: int
    producers: list[str]
    members: list[str]
    classes: np.ndarray
    blocked: np.ndarray
    reasons: list[str]

    @property
    def size(self) -> int:
        return int(len(self.classes))

    @property
    def prunable(self) -> int:
        return int((~self.blocked).sum())

    @property
    def blocked_reason(self) -> str | None:
        """Set when no channel of the group may be removed."""
        return "; ".join(self.reasons) if self.prunable == 0 else None


@dataclass
class Analysis:
    """The result of :func:`analyze_graph`: groups plus everything surgery and importance need."""

    groups: list[PruningGroup]
    sites: list[Site]
    fixups: list[Fixup]
    class_of: np.ndarray
    maps: dict[str, ChannelMap]
    notes: list[str] = field(default_factory=list)

    def group_channel_index(self, group: PruningGroup) -> dict[int, int]:
        return {int(c): i for i, c in enumerate(group.classes)}

    def classes_of(self, ids: np.ndarray) -> np.ndarray:
        """Class roots for an id array; fixed positions stay -1."""
        return np.where(ids >= 0, self.class_of[np.maximum(ids, 0)], FIXED)

    def to_dict(self) -> dict[str, Any]:
        return {
            "groups": [group_to_dict(g) for g in self.groups],
            "prunable_groups": sum(1 for g in self.groups if g.prunable),
            "prunable_channels": sum(g.prunable for g in self.groups),
            "total_channels": sum(g.size for g in self.groups),
            "notes": list(self.notes),
        }


def group_to_dict(group: PruningGroup, kept: int | None = None) -> dict[str, Any]:
    return {
        "id": group.id,
        "channels": group.size,
        "prunable": group.prunable,
        "kept": group.size if kept is None else kept,
        "producers": list(group.producers),
        "members": list(group.members),
        "blocked": group.blocked_reason,
        "blocked_channels": int(group.blocked.sum()),
        "reasons": list(group.reasons),
    }


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


class RuleRegistry:
    """Per-op channel propagation rules. Registering an op twice is an error (STYLE.md habit 2)."""

    def __init__(self) -> None:
        self._rules: dict[str, Rule] = {}

    def register(self, *ops: str) -> Callable[[Rule], Rule]:
        def deco(fn: Rule) -> Rule:
            for op in ops:
                if op in self._rules:
                    raise ValueError(f"a channel rule for {op} is already registered")
                self._rules[op] = fn
            return fn

        return deco

    def get(self, op: str) -> Rule | None:
        return self._rules.get(op)

    def ops(self) -> list[str]:
        return sorted(self._rules)


HEAD_GRANULARITIES = ("whole", "dims")


@dataclass(frozen=True)
class AnalysisOptions:
    """Choices the graph leaves open.

    ``heads``: ``whole`` prunes attention heads as units (a channel = a head: Q/K/V columns and the
    output-projection rows of that head); ``dims`` prunes the same dims of every head instead (a channel =
    dim j of every head; Q and K together, V with the output projection), keeping the head count.
    """

    heads: str = "whole"

    def __post_init__(self) -> None:
        if self.heads not in HEAD_GRANULARITIES:
            raise ValueError(f"heads must be one of {', '.join(HEAD_GRANULARITIES)}, got {self.heads!r}")


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
        self.producer_of: list[str] = []
        self.sites: list[Site] = []
        self.fixups: list[Fixup] = []
        self.shape_reads: dict[str, list[tuple[str, ...]]] = {}
        self.folded: dict[str, np.ndarray] = {}
        self.pinned: set[tuple[str, int, int]] = set()  # (node, input, entry or -1): made constant by the cut

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

    def site(self, t: gs.Tensor, axis: int, ids: np.ndarray, node: gs.Node, role: str) -> None:
        if isinstance(t, gs.Constant) and bool(np.any(ids >= 0)):
            self.sites.append(Site(t.name, axis, ids, node.name, node.op, role))

    def fixup(self, node: gs.Node, kind: str, ids: list[np.ndarray], **data: Any) -> None:
        self.fixups.append(Fixup(node.name, kind, ids, dict(data)))

    def excluded(self, node: gs.Node) -> bool:
        return any(fnmatch.fnmatchcase(node.name, p) for p in self.exclude)


def analyze_graph(
    graph: gs.Graph,
    shapes: dict[str, list[int | str]],
    *,
    exclude: Iterable[str] = (),
    registry: RuleRegistry | None = None,
    options: AnalysisOptions | None = None,
) -> Analysis:
    """Find the channel dependency groups of ``graph``.

    Args:
        graph: the model as imported by graphsurgeon, weights as ``gs.Constant``.
        shapes: tensor name → shape with the batch (and ``--shape`` dims) fixed, from shape inference.
        exclude: glob patterns of node names to leave intact (their channels are blocked).
        registry: the per-op rules; ``channel_rules.default_registry()`` when omitted.
        options: choices such as whole heads or per-head dims (:class:`AnalysisOptions`).

    Example:
        >>> analysis = analyze_graph(graph, model.static_shapes(proto, None))
        >>> [g.size for g in analysis.groups if g.prunable]
    """
    if registry is None:
        from onnxprune.channel_rules import default_registry

        registry = default_registry()
    facts = shape_facts(graph, shapes)
    az = Analyzer(graph, facts.shapes, exclude, options)
    az.folded = facts.values
    graph.toposort()
    _name_nodes(graph)
    for node in graph.nodes:
        _block_outer_scope(az, node)
        reads = follow_shape_reads(az, node)
        if az.excluded(node):
            az.block_inputs(node, f"node {node.name} excluded by --exclude")
        else:
            rule = registry.get(node.op) if node.domain in (None, "", "ai.onnx") else None
            if rule is None:
                az.block_inputs(node, f"{node.op} at node {node.name} not understood")
            else:
                rule(az, node)
        check_shape_reads(az, node, reads)
    for out in graph.outputs:
        m = az.map(out)
        if m is not None:
            az.block(m.ids, f"reaches graph output {out.name}")
    _check_sites(az)
    return _build_groups(az)


def _name_nodes(graph: gs.Graph) -> None:
    """Give unnamed nodes unique names: sites and fixups refer to nodes by name."""
    taken = {n.name for n in graph.nodes if n.name}
    for k, node in enumerate(graph.nodes):
        if not node.name:
            name = f"{node.op}_onnxprune_{k}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)


def _subgraph_reads(node: gs.Node) -> set[str]:
    """Names of tensors a node's subgraphs (If/Loop/Scan bodies, recursively) read from outside themselves."""
    reads: set[str] = set()
    for value in node.attrs.values():
        graphs = value if isinstance(value, list) else [value]
        for sub in graphs:
            if not isinstance(sub, gs.Graph):
                continue
            made = {t.name for n in sub.nodes for t in n.outputs} | {t.name for t in sub.inputs}
            for n in sub.nodes:
                reads.update(t.name for t in n.inputs if t.name and t.name not in made)
                reads.update(r for r in _subgraph_reads(n) if r not in made)
            reads.update(t.name for t in sub.outputs if t.name not in made)
    return reads


def _block_outer_scope(az: Analyzer, node: gs.Node) -> None:
    for name in _subgraph_reads(node):
        m = az.maps.get(name)
        if m is not None:
            az.block(m.ids, f"{node.op} {node.name} reads {name} inside a subgraph")


def _check_sites(az: Analyzer) -> None:
    """Block ids whose weights are shared in ways one slice cannot serve."""
    by_tensor: dict[str, list[Site]] = {}
    for s in az.sites:
        by_tensor.setdefault(s.tensor, []).append(s)
    consumers = {name: {n.name for n in t.outputs} for name, t in az.graph.tensors().items()}
    for name, sites in by_tensor.items():
        users = {s.node for s in sites}
        others = consumers.get(name, set()) - users
        if others:
            for s in sites:
                az.block(s.ids, f"weight {name} is also used by {sorted(others)[0]}")
        by_axis: dict[int, list[Site]] = {}
        for s in sites:
            by_axis.setdefault(s.axis, []).append(s)
        for axis_sites in by_axis.values():
            first = axis_sites[0].ids
            for s in axis_sites[1:]:
                if s.ids.shape != first.shape:
                    az.block(s.ids, f"weight {name} is shared with a different channel layout")
                    az.block(first, f"weight {name} is shared with a different channel layout")
                else:
                    az.couple(first, s.ids, f"weight {name} is shared")


def _reserve_partial_sites(
    az: Analyzer, roots: np.ndarray, comp_classes: dict[int, list[int]], class_comp: dict[int, int],
    blocked_class: dict[int, list[str]],
) -> None:
    """Keep one channel of every weight axis that a plan could otherwise empty.

    A plan keeps at least one channel per group, which protects a weight only if it holds every channel
    of some group. A weight that holds part of one (a Split half feeding a conv; a shuffle branch coupled
    with half of the stream) gets one of its channels marked unremovable instead.
    """
    by_axis: dict[tuple[str, int], set[int]] = {}
    first: dict[tuple[str, int], int] = {}
    for site in az.sites:
        ids = site.ids[site.ids >= 0]
        if not ids.size:
            continue
        key = (site.tensor, site.axis)
        by_axis.setdefault(key, set()).update(int(r) for r in roots[ids])
        first.setdefault(key, int(roots[ids[0]]))
    for key, covered in by_axis.items():
        if any(r in blocked_class for r in covered):
            continue
        if any(set(comp_classes[c]) <= covered for c in {class_comp[r] for r in covered}):
            continue
        blocked_class[first[key]] = [f"one channel stays so that {key[0]} is never emptied"]


def _build_groups(az: Analyzer) -> Analysis:
    roots = az.uf.roots()
    n = len(roots)
    blocked_class: dict[int, list[str]] = {}
    for i, reason in az.blocked.items():
        reasons = blocked_class.setdefault(int(roots[i]), [])
        if reason not in reasons:
            reasons.append(reason)
    producers = sorted(set(az.producer_of), key=az.producer_of.index)
    p_index = {p: k for k, p in enumerate(producers)}
    puf = UnionFind()
    puf.add(len(producers))
    first_producer: dict[int, int] = {}
    for i in range(n):
        p = p_index[az.producer_of[i]]
        r = int(roots[i])
        puf.union(p, first_producer.setdefault(r, p))
    comp_classes: dict[int, list[int]] = {}
    seen: set[int] = set()
    for i in range(n):
        r = int(roots[i])
        if r in seen:
            continue
        seen.add(r)
        comp_classes.setdefault(puf.find(p_index[az.producer_of[i]]), []).append(r)
    members: dict[int, set[str]] = {}
    class_comp = {r: c for c, rs in comp_classes.items() for r in rs}
    _reserve_partial_sites(az, roots, comp_classes, class_comp, blocked_class)
    for s in az.sites:
        for r in np.unique(roots[s.ids[s.ids >= 0]]):
            members.setdefault(class_comp[int(r)], set()).add(s.node)
    groups: list[PruningGroup] = []
    for gid, (comp, classes) in enumerate(sorted(comp_classes.items())):
        cls = np.array(classes, dtype=np.int64)
        blocked = np.array([c in blocked_class for c in classes], dtype=bool)
        reasons: list[str] = []
        for c in classes:
            for reason in blocked_class.get(c, []):
                if reason not in reasons:
                    reasons.append(reason)
        prods = [producers[k] for k in range(len(producers)) if puf.find(k) == comp]
        groups.append(PruningGroup(gid, prods, sorted(members.get(comp, set())), cls, blocked, reasons))
    return Analysis(groups=groups, sites=az.sites, fixups=az.fixups, class_of=roots, maps=az.maps)
