"""What a plan costs: params and MACs of any keep-count per group, exact without cutting."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.analysis.core import Analysis
from onnxprune.errors import PlanError
from onnxprune.measure.stats import MacsRegistry, ModelStats, default_macs_registry
from onnxprune.planning.plan import Plan


@dataclass(frozen=True)
class Cost:
    """Params and MACs (per sample) of a model after a candidate plan."""

    params: int
    macs: int | None


class CostModel:
    """Params and MACs of a candidate plan without cutting the model.

    Cutting ResNet-50 takes seconds, and a budget search looks at dozens of plans, so the cost of a
    plan is computed from the analysis instead: every weight tensor with sliced axes loses
    ``numel × Π kept/len`` elements, and a Conv/ConvTranspose/Gemm/MatMul node's MACs scale like its
    weight's size (spatial sizes do not change when channels go). Nodes without a constant weight
    (attention MatMuls) scale with the channel maps of their output and contracted input axis. The
    totals start from :func:`onnxprune.measure.stats.model_stats` of the original, so they use the report's
    conventions, and tests compare them with the stats of really cut models.

    Example:
        >>> cost = CostModel(graph, analysis, model_stats(model))
        >>> cost.fraction(plan, "macs")
        0.49
    """

    def __init__(self, graph: gs.Graph, analysis: Analysis, stats: ModelStats,
                 macs: MacsRegistry | None = None) -> None:
        self.base = Cost(stats.params, stats.macs)
        self.macs_unknown_reason = stats.macs_unknown_reason
        self._offsets: dict[int, int] = {}
        total = 0
        for g in analysis.groups:
            self._offsets[g.id] = total
            total += g.size
        self._sentinel = total
        flat_of = {int(c): self._offsets[g.id] + i for g in analysis.groups for i, c in enumerate(g.classes)}
        self._analysis = analysis
        self._flat_of = flat_of
        self._axes: list[np.ndarray] = []
        self._axis_key: dict[tuple[str, int | str], int] = {}
        tensors = graph.tensors()
        site_axes: dict[str, list[int]] = {}
        for site in analysis.sites:
            ref = self._axis(("site", f"{site.tensor}\x00{site.axis}"), site.ids)
            axes = site_axes.setdefault(site.tensor, [])
            if ref not in axes:
                axes.append(ref)
        # weight tensors: (numel, axis refs)
        self._tensors: list[tuple[int, list[int]]] = []
        for name, refs in site_axes.items():
            t = tensors.get(name)
            if isinstance(t, gs.Constant) and np.issubdtype(np.dtype(t.dtype), np.floating):
                self._tensors.append((int(np.prod(t.shape, dtype=np.int64)), refs))
        # MAC nodes: (base MACs, axis refs)
        self._nodes: list[tuple[int, list[int]]] = []
        layer_macs = {layer.node: layer.macs for layer in stats.layers}
        macs = macs or default_macs_registry()
        for node in graph.nodes:
            base = layer_macs.get(node.name)
            if macs.get(node.op, node.domain or "") is None or not base:
                continue
            refs = self._node_refs(node, site_axes)
            if refs:
                self._nodes.append((int(base), refs))
        self._lengths = np.array([len(a) for a in self._axes], dtype=np.int64)
        if self._axes:
            cat = np.concatenate(self._axes)
            self._cat = np.where(cat >= 0, cat, self._sentinel)
            self._starts = np.concatenate([[0], np.cumsum(self._lengths)[:-1]]).astype(np.int64)
        else:
            self._cat = np.zeros(0, dtype=np.int64)
            self._starts = np.zeros(0, dtype=np.int64)

    def _axis(self, key: tuple[str, int | str], ids: np.ndarray) -> int:
        ref = self._axis_key.get(key)
        if ref is None:
            classes = self._analysis.classes_of(np.asarray(ids))
            flat = np.array([self._flat_of.get(int(c), -1) for c in classes.tolist()], dtype=np.int64)
            ref = len(self._axes)
            self._axes.append(flat)
            self._axis_key[key] = ref
        return ref

    def _node_refs(self, node: gs.Node, site_axes: dict[str, list[int]]) -> list[int]:
        weight = node.inputs[1] if len(node.inputs) > 1 else None
        if isinstance(weight, gs.Constant):
            return list(site_axes.get(weight.name, []))
        refs: list[int] = []
        maps = self._analysis.maps
        out = maps.get(node.outputs[0].name) if node.outputs else None
        if out is not None:
            refs.append(self._axis(("map", node.outputs[0].name), out.ids))
        a = maps.get(node.inputs[0].name) if node.inputs else None
        if a is not None:
            rank = len(node.inputs[0].shape) if node.inputs[0].shape is not None else None
            conv = node.op in ("Conv", "ConvTranspose")
            contracted = a.axis == 1 if conv else rank is not None and a.axis == rank - 1
            if contracted:
                ref = self._axis(("map", node.inputs[0].name), a.ids)
                same = out is not None and np.array_equal(self._axes[ref], self._axes[refs[0]])
                if not same:
                    refs.append(ref)
        return refs

    def kept_fractions(self, plan: Plan) -> np.ndarray:
        """Kept share of every tracked axis under ``plan``."""
        if not self._axes:
            return np.zeros(0)
        removed = np.zeros(self._sentinel + 1, dtype=np.int64)
        for gid, idx in plan.removed.items():
            if len(idx):
                removed[self._offsets[gid] + np.asarray(idx, dtype=np.int64)] = 1
        gone = np.add.reduceat(removed[self._cat], self._starts)
        return (self._lengths - gone) / self._lengths

    def evaluate(self, plan: Plan) -> Cost:
        """Params and MACs after ``plan`` (MACs None when the original's are unknown)."""
        frac = self.kept_fractions(plan)
        params = self.base.params
        for numel, refs in self._tensors:
            params -= numel - int(round(numel * float(np.prod(frac[refs]))))
        macs = self.base.macs
        if macs is not None:
            for base, refs in self._nodes:
                macs -= base - int(round(base * float(np.prod(frac[refs]))))
        return Cost(params, macs)

    def fraction(self, plan: Plan, metric: str) -> float:
        """``metric`` ("macs" or "params") after ``plan`` as a fraction of the original.

        Raises:
            PlanError: MACs are unknown (symbolic dims without ``--shape``).
        """
        cost = self.evaluate(plan)
        if metric == "params":
            return cost.params / self.base.params if self.base.params else 1.0
        if cost.macs is None or not self.base.macs:
            raise PlanError(f"--target-macs needs the model's MACs, which are unknown: {self.macs_unknown_reason}")
        return cost.macs / self.base.macs
