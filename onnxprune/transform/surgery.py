"""Physical channel removal with onnx-graphsurgeon.

The analysis already says which constant slices follow which channel (:class:`~onnxprune.analysis.core.Site`)
and which shape constants count them (:class:`~onnxprune.analysis.core.Fixup`). ``cut_channels`` first
computes *every* new value and checks it, then applies them all, so a failure leaves
the graph untouched. Fixup handlers live in a registry keyed by kind, like the analysis rules.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxprune.analysis.core import Analysis, Fixup, FixupKind
from onnxprune.analysis.index_mapping import keep_positions
from onnxprune.errors import SurgeryError
from onnxprune.io.export import clear_inferred_shapes, export_graph
from onnxprune.registry import Registry

log = logging.getLogger(__name__)


@dataclass
class Edit:
    """One change to apply: set ``node``'s attribute, or replace its input ``index`` with a new constant
    (``array``, or the current constant with the flat entries in ``updates`` changed)."""

    node: str
    attr: str | None = None
    value: object = None
    input_index: int | None = None
    array: np.ndarray | None = None
    updates: dict[int, int] | None = None


@dataclass
class CutSummary:
    """What ``cut_channels`` changed."""

    tensors_sliced: int
    edits: int
    params_removed: int
    notes: list[str] = field(default_factory=list)
    cache: dict[str, CacheCut] = field(default_factory=dict)
    """The KV-cache inputs and outputs the cut shrank (generation state, see ``Analysis.cache_io``)."""


@dataclass(frozen=True)
class CacheCut:
    """A cache tensor after the cut: the heads it keeps (positions on ``axis`` of the original) and its
    new declared shape, which a generator must allocate."""

    axis: int
    kept: np.ndarray
    shape: list[int | str]
    size: int
    """Heads on ``axis`` before the cut."""

    def narrow(self, value: np.ndarray) -> np.ndarray:
        """The original model's value of this tensor, as the cut model reads or writes it."""
        return np.take(value, self.kept, axis=self.axis)


def full_cache_inputs(model: onnx.ModelProto, cache: dict[str, CacheCut]) -> onnx.ModelProto:
    """A copy of the cut model that reads cache inputs with the original head count and keeps the cut's heads
    (a Gather on their axis), so that data made for the original runs on it; present outputs stay cut.

    For measuring on the original's evaluation data only: a generator feeds the cut model its own cache.
    """
    graph = gs.import_onnx(model)
    with cache_inputs_in_full(graph, cache):
        return export_graph(graph, model, check=False)


@contextmanager
def cache_inputs_in_full(graph: gs.Graph, cache: dict[str, CacheCut]) -> Iterator[gs.Graph]:
    """While inside, the cut ``graph`` reads cache inputs with every head (a Gather keeps the cut's), so stages
    that feed the original's data to both models (reconstruction) run; on exit its own inputs are back, and
    weights written meanwhile stay."""
    saved, added = list(graph.inputs), []
    for k, t in enumerate(graph.inputs):
        cut = cache.get(t.name)
        if cut is None:
            continue
        shape = list(t.shape) if t.shape is not None else None
        if shape is not None:
            shape[cut.axis] = cut.size
        full = gs.Variable(t.name, dtype=t.dtype, shape=shape)
        t.name = f"{t.name}_kept_heads"
        index = gs.Constant(f"{t.name}_index", np.asarray(cut.kept, dtype=np.int64))
        node = gs.Node("Gather", f"{t.name}_gather", {"axis": cut.axis}, inputs=[full, index], outputs=[t])
        graph.nodes.append(node)
        added.append((node, t, full.name))
        graph.inputs[k] = full
    graph.toposort()
    try:
        yield graph
    finally:
        for node, t, name in added:
            node.inputs.clear()
            node.outputs.clear()
            graph.nodes.remove(node)
            t.name = name
        graph.inputs[:] = saved


FixupHandler = Callable[[Fixup, gs.Node, Callable[[np.ndarray], np.ndarray]], list[Edit]]


class FixupRegistry(Registry[FixupKind, FixupHandler]):
    """Fixup kind → handler that returns the edits it needs (registering twice is an error)."""

    def __init__(self) -> None:
        super().__init__("fixup handler")

    def register(self, kind: FixupKind, handler: FixupHandler) -> None:
        self.add(kind, handler)

    def get(self, kind: FixupKind) -> FixupHandler:
        handler = self.lookup(kind)
        if handler is None:
            raise SurgeryError(f"no surgery handler for fixup kind {kind!r}")
        return handler


def _conv_group(fix: Fixup, node: gs.Node, keep: Callable[[np.ndarray], np.ndarray]) -> list[Edit]:
    return [Edit(node.name, attr="group", value=int(keep(fix.ids[0]).sum()))]


def _reshape(fix: Fixup, node: gs.Node, keep: Callable[[np.ndarray], np.ndarray]) -> list[Edit]:
    target = np.array(node.inputs[1].values, dtype=np.int64).copy()
    target[fix.data["index"]] = int(keep(fix.ids[0]).sum())
    return [Edit(node.name, input_index=1, array=target)]


def _split(fix: Fixup, node: gs.Node, keep: Callable[[np.ndarray], np.ndarray]) -> list[Edit]:
    sizes = np.array([int(keep(part).sum()) for part in fix.ids], dtype=np.int64)
    if "split" in node.attrs:
        return [Edit(node.name, attr="split", value=[int(s) for s in sizes])]
    return [Edit(node.name, input_index=1, array=sizes), Edit(node.name, attr="num_outputs", value=None)]


def _slice(fix: Fixup, node: gs.Node, keep: Callable[[np.ndarray], np.ndarray]) -> list[Edit]:
    in_ids, out_ids = fix.ids
    k, start = fix.data["index"], fix.data["start"]
    new_start = int(keep(in_ids[:start]).sum())
    new_end = new_start + int(keep(out_ids).sum())
    starts = np.array(fix.data["starts"] if "starts" in fix.data else node.inputs[1].values).reshape(-1).copy()
    ends = np.array(fix.data["ends"] if "ends" in fix.data else node.inputs[2].values).reshape(-1).copy()
    starts[k], ends[k] = new_start, new_end
    return [Edit(node.name, input_index=1, array=starts), Edit(node.name, input_index=2, array=ends)]


def _shape_value(fix: Fixup, node: gs.Node, keep: Callable[[np.ndarray], np.ndarray]) -> list[Edit]:
    """One entry of a shape constant (a Reshape target, or a piece of the Concat that builds one)."""
    kept = int(keep(fix.ids[0]).sum())
    return [Edit(node.name, input_index=fix.data["input"], updates={int(fix.data["position"]): kept})]


def _shape_pin(fix: Fixup, node: gs.Node, keep: Callable[[np.ndarray], np.ndarray]) -> list[Edit]:
    """A one-entry piece of a shape Concat computed at runtime becomes the kept count (a constant)."""
    return [Edit(node.name, input_index=fix.data["input"], array=np.array([int(keep(fix.ids[0]).sum())], np.int64))]


def _shape_freeze(fix: Fixup, node: gs.Node, keep: Callable[[np.ndarray], np.ndarray]) -> list[Edit]:
    """A one-entry piece of a shape Concat computed from a cut count becomes its value in the original."""
    return [Edit(node.name, input_index=fix.data["input"], array=np.array([int(fix.data["value"])], np.int64))]


def _resize_sizes(fix: Fixup, node: gs.Node, keep: Callable[[np.ndarray], np.ndarray]) -> list[Edit]:
    sizes = np.array(node.inputs[3].values, dtype=np.int64).copy()
    sizes[fix.data["axis"]] = int(keep(fix.ids[0]).sum())
    return [Edit(node.name, input_index=3, array=sizes)]


def _attr_count(fix: Fixup, node: gs.Node, keep: Callable[[np.ndarray], np.ndarray]) -> list[Edit]:
    """An attribute counting heads (GroupQueryAttention's ``num_heads``/``kv_num_heads``): the kept count."""
    return [Edit(node.name, attr=fix.data["attr"], value=int(keep(fix.ids[0]).sum()))]


def default_fixups() -> FixupRegistry:
    reg = FixupRegistry()
    reg.register(FixupKind.CONV_GROUP, _conv_group)
    reg.register(FixupKind.RESHAPE, _reshape)
    reg.register(FixupKind.SPLIT, _split)
    reg.register(FixupKind.SLICE, _slice)
    reg.register(FixupKind.RESIZE_SIZES, _resize_sizes)
    reg.register(FixupKind.SHAPE_VALUE, _shape_value)
    reg.register(FixupKind.SHAPE_PIN, _shape_pin)
    reg.register(FixupKind.SHAPE_FREEZE, _shape_freeze)
    reg.register(FixupKind.ATTR_COUNT, _attr_count)
    return reg


def cut_channels(
    graph: gs.Graph,
    analysis: Analysis,
    removed_classes: np.ndarray,
    *,
    fixups: FixupRegistry | None = None,
) -> CutSummary:
    """Remove the channels whose union-find classes are in ``removed_classes``, in place.

    Raises:
        SurgeryError: a slice would empty a tensor axis or a fixup cannot be computed; the graph is
            unchanged in that case.
    """
    fixups = fixups or default_fixups()
    removed = np.asarray(removed_classes, dtype=np.int64)

    def keep(ids: np.ndarray) -> np.ndarray:
        return keep_positions(ids, removed, analysis.class_of)

    tensors = graph.tensors()
    nodes = {n.name: n for n in graph.nodes}
    new_values: dict[str, np.ndarray] = {}
    masks: dict[tuple[str, int], np.ndarray] = {}
    for site in analysis.sites:
        mask = keep(site.ids)
        if mask.all():
            continue
        prev = masks.get((site.tensor, site.axis))
        if prev is not None and not np.array_equal(prev, mask):
            raise SurgeryError(f"weight {site.tensor} would be sliced two different ways on axis {site.axis}")
        masks[(site.tensor, site.axis)] = mask
    for (name, axis), mask in masks.items():
        value = new_values.get(name)
        if value is None:
            value = np.asarray(tensors[name].values)
        if value.shape[axis] != len(mask):
            raise SurgeryError(
                f"weight {name} has {value.shape[axis]} entries on axis {axis}, the analysis expected {len(mask)}"
            )
        if not mask.any():
            raise SurgeryError(f"the cut would remove every channel of weight {name} (axis {axis})")
        new_values[name] = np.compress(mask, value, axis=axis)
    edits: list[Edit] = []
    for fix in analysis.fixups:
        if all(keep(ids).all() for ids in fix.ids):
            continue
        node = nodes.get(fix.node)
        if node is None:
            raise SurgeryError(f"fixup for missing node {fix.node}")
        try:
            edits.extend(fixups.get(fix.kind)(fix, node, keep))
        except (KeyError, IndexError, TypeError, AttributeError) as e:
            raise SurgeryError(f"cannot update {node.op} {node.name} ({fix.kind}): {e}") from e
    for edit in edits:
        if edit.attr is not None and isinstance(edit.value, int) and edit.value < 1:  # a group or head count
            raise SurgeryError(f"the cut would leave {edit.node} with no channels ({edit.attr} = {edit.value})")
    edits = _merge_updates(edits, nodes)
    cache = _cache_cuts(graph, analysis, keep)

    before = sum(int(np.asarray(tensors[n].values).size) for n in new_values)
    for name, value in new_values.items():
        tensors[name].values = np.ascontiguousarray(value)
    for edit in edits:
        node = nodes[edit.node]
        if edit.attr is not None:
            if edit.value is None:
                node.attrs.pop(edit.attr, None)
            else:
                node.attrs[edit.attr] = edit.value
        else:
            const = gs.Constant(f"{node.name}_pruned_{edit.input_index}", np.array(edit.array, order="C"))
            if len(node.inputs) <= edit.input_index:
                node.inputs.extend([gs.Variable.empty()] * (edit.input_index + 1 - len(node.inputs)))
            node.inputs[edit.input_index] = const
    for t in [*graph.inputs, *graph.outputs]:
        if t.name in cache:
            t.shape = list(cache[t.name].shape)
    after = sum(int(v.size) for v in new_values.values())
    clear_inferred_shapes(graph)
    graph.cleanup()
    notes = [f"cache {name} is now {cut.shape}" for name, cut in cache.items()]
    return CutSummary(tensors_sliced=len(new_values), edits=len(edits), params_removed=before - after, notes=notes,
                      cache=cache)


def _cache_cuts(graph: gs.Graph, analysis: Analysis, keep: Callable[[np.ndarray], np.ndarray]
                ) -> dict[str, CacheCut]:
    """The cache inputs/outputs that lose heads: kept positions and declared shapes with the kept count.

    Raises:
        SurgeryError: a cache tensor has no declared shape there, or would lose every head.
    """
    io = {t.name: t for t in [*graph.inputs, *graph.outputs]}
    cuts: dict[str, CacheCut] = {}
    for name in analysis.cache_io:
        m, t = analysis.maps[name], io.get(name)
        mask = keep(m.ids)
        if mask.all():
            continue
        if t is None or t.shape is None or len(t.shape) <= m.axis:
            raise SurgeryError(f"cache tensor {name} has no declared shape to shrink on axis {m.axis}")
        if not mask.any():
            raise SurgeryError(f"the cut would remove every head of cache tensor {name}")
        shape = list(t.shape)
        shape[m.axis] = int(mask.sum())
        cuts[name] = CacheCut(m.axis, np.flatnonzero(mask), shape, len(mask))
    return cuts


def _merge_updates(edits: list[Edit], nodes: dict[str, gs.Node]) -> list[Edit]:
    """Turn entry updates into whole-array edits, one per (node, input); conflicting entries are an error.

    Raises:
        SurgeryError: two fixups want different values in one entry, or the input is not a constant.
    """
    merged: dict[tuple[str, int], dict[int, int]] = {}
    plain: list[Edit] = []
    for edit in edits:
        if edit.updates is None:
            plain.append(edit)
            continue
        entries = merged.setdefault((edit.node, int(edit.input_index)), {})
        for pos, value in edit.updates.items():
            if entries.get(pos, value) != value:
                raise SurgeryError(f"{edit.node} input {edit.input_index} entry {pos} would be set to "
                                   f"{entries[pos]} and {value}")
            entries[pos] = value
    for (name, index), entries in merged.items():
        src = nodes[name].inputs[index]
        if not isinstance(src, gs.Constant):
            raise SurgeryError(f"{name} input {index} is no longer a constant")
        array = np.array(src.values).copy()
        flat = array.reshape(-1)
        for pos, value in entries.items():
            flat[pos] = value
        plain.append(Edit(name, input_index=index, array=flat.reshape(array.shape)))
    return plain

