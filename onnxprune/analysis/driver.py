"""Channel dependency analysis: which channels must be removed together, and which must never be.

Every prunable producer (Conv/ConvTranspose output channels, Gemm/MatMul output features) allocates
one integer *id* per output channel. Per-op rules (:mod:`onnxprune.analysis.rules`) carry a :class:`ChannelMap`
(axis + id per position) forward through the graph; ops that tie channels together (residual Add,
squeeze-excite Mul, depthwise Conv, Concat along another axis) *union* ids. After the walk, each
union-find class is one prunable channel, and producers that share classes form a
:class:`PruningGroup`. Anything not understood **blocks** the ids it touches, with the reason; ids
that reach a graph output are blocked too. Weights that must be sliced when a class goes are recorded
as :class:`Site` objects, and non-weight edits (Conv ``group``, Reshape/Split/Slice constants) as
:class:`Fixup` objects — surgery applies both, importance reads the sites.

The driver also keeps three safety nets that no single rule can: tensors read inside If/Loop/Scan
bodies are blocked, channel counts read by ``Shape`` are followed through shape arithmetic
(:mod:`onnxprune.analysis.shape_reads`) and blocked where a cut would change them unseen, and a weight holding
only part of a group keeps one channel so that no plan can empty it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.analysis.analyzer import Analyzer, RuleRegistry, UnionFind
from onnxprune.analysis.core import Analysis, AnalysisOptions, PruningGroup, Site
from onnxprune.analysis.graph import find_cache_io
from onnxprune.analysis.shape_reads import check_frozen_entries, check_shape_reads, follow_shape_reads
from onnxprune.analysis.shape_values import shape_facts

log = logging.getLogger(__name__)


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
        registry: the per-op rules; ``rules.default_registry()`` when omitted.
        options: choices such as whole heads or per-head dims (:class:`AnalysisOptions`).

    Example:
        >>> analysis = analyze_graph(graph, model.static_shapes(proto, None))
        >>> [g.size for g in analysis.groups if g.prunable]
    """
    if registry is None:
        from onnxprune.analysis.rules import default_registry

        registry = default_registry()
    facts = shape_facts(graph, shapes)
    az = Analyzer(graph, facts.shapes, exclude, options)
    az.folded = facts.values
    az.cache_io = find_cache_io(graph)
    graph.toposort()
    _name_nodes(graph)
    for node in graph.nodes:
        _block_outer_scope(az, node)
        reads = follow_shape_reads(az, node)
        if az.excluded(node):
            az.block_inputs(node, f"node {node.name} excluded by --exclude")
        else:
            rule = registry.get(node.op, node.domain or "")
            if rule is None:
                az.block_inputs(node, f"{node.op} at node {node.name} not understood")
            else:
                rule(az, node)
        check_shape_reads(az, node, reads)
    cache_outputs = set(az.cache_io.values())
    for out in graph.outputs:
        m = az.map(out)
        if m is not None and out.name not in cache_outputs:
            az.block(m.ids, f"reaches graph output {out.name}")
    if not az.options.lm_stream:
        _keep_lm_stream(az, graph)
    check_frozen_entries(az)
    _check_sites(az)
    return _build_groups(az)


def _keep_lm_stream(az: Analyzer, graph: gs.Graph) -> None:
    """Block the residual stream of a language model: the channels of a token embedding (a Gather from a
    [V, D] table) when a graph output's last axis has the V entries of the vocabulary (logits). A classifier
    on token embeddings keeps its prunable stream."""
    tables = {n.name: int(n.inputs[0].shape[0]) for n in graph.nodes
              if n.op == "Gather" and isinstance(n.inputs[0], gs.Constant) and len(n.inputs[0].shape) == 2}
    vocab = {dims[-1] for dims in (az.shape(t) for t in graph.outputs) if dims}
    embeddings = {name for name, rows in tables.items() if rows in vocab}
    ids = np.array([i for i, p in enumerate(az.producer_of) if p in embeddings], dtype=np.int64)
    az.block(ids, "the hidden size of a language model (the residual stream from its token embedding) stays "
                  "intact: only heads and MLP width are cut (--prune-lm-hidden cuts it)")


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
    approx_class: dict[int, list[str]] = {}
    for i, reason in az.approximations.items():
        approx_class.setdefault(int(roots[i]), []).append(reason)
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
        approx = list(dict.fromkeys(r for c in classes if c not in blocked_class for r in approx_class.get(c, [])))
        groups.append(PruningGroup(gid, prods, sorted(members.get(comp, set())), cls, blocked, reasons, approx))
    cache = [name for pair in az.cache_io.items() for name in pair if name in az.maps]
    return Analysis(groups=groups, sites=az.sites, fixups=az.fixups, class_of=roots, maps=az.maps, cache_io=cache)
