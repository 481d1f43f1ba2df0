"""Which intermediate tensors a pruned model can distil from its original (feature distillation).

Why: after a heavy cut, matching the outputs alone gives the student one weak signal at the end of a deep
network; matching the original's activations at a few block and stage boundaries as well tells every part
of it what to compute (FitNets, Romero et al. 2015). Tensors the cut left the same shape compare directly; a
tensor that lost channels compares with the original's kept channels (the surgery keeps channel order, and
the analysis knows which positions stayed), so no adapter is needed either way. Only tensors downstream of a
pruned weight carry any signal (the rest are equal by construction).

Example:
    >>> [m.tensor for m in choose_features(original, pruned, {"x": [1, 3, 48, 320]}, analysis=a, plan=p)]
    ... # doctest: +SKIP
    ['p2o.Add.95', 'p2o.Add.159', 'conv2d_143.tmp_0', 'p2o.Add.271']
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx

from onnxprune.analysis.core import Analysis
from onnxprune.analysis.index_mapping import keep_positions
from onnxprune.planning.plan import Plan
from onnxprune.runtime.shapes import run_shapes
from onnxprune.training.losses import FeatureMatch

DEFAULT_FEATURES = 4
"""Tensors matched by default: enough to reach every stage of a backbone, few enough to keep memory small."""
BOUNDARY_OPS = frozenset({"Add", "Concat", "Relu", "HardSwish", "Sigmoid", "Gelu", "LayerNormalization", "Mul",
                          "Conv", "Transpose", "Reshape", "Flatten", "MaxPool", "AveragePool", "GlobalAveragePool"})
"""Producers whose outputs are block or stage outputs in common backbones (residual sums, activations after a
conv, pools, head reshapes). MatMul/Gemm outputs are left out: they are mid-block."""


def _changed_weights(teacher: onnx.ModelProto, student: onnx.ModelProto) -> set[str]:
    """Initializers of the student whose shape differs from the teacher's (or that the teacher lacks)."""
    dims = {t.name: list(t.dims) for t in teacher.graph.initializer}
    return {t.name for t in student.graph.initializer if dims.get(t.name) != list(t.dims)}


def affected_tensors(teacher: onnx.ModelProto, student: onnx.ModelProto) -> set[str]:
    """Tensors of ``student``'s main graph computed from a weight the cut changed (their values differ)."""
    changed = _changed_weights(teacher, student)
    affected: set[str] = set()
    for node in student.graph.node:  # topological order, as onnx requires
        if any(i in changed or i in affected for i in node.input if i):
            affected.update(o for o in node.output if o)
    return affected


def _candidates(teacher: onnx.ModelProto, student: onnx.ModelProto) -> list[str]:
    """Float node outputs both graphs compute, downstream of the cut, in student topological order."""
    affected = affected_tensors(teacher, student)
    in_teacher = {o for n in teacher.graph.node for o in n.output if o}
    outputs = {o.name for o in student.graph.output}
    return [n.output[0] for n in student.graph.node
            if n.domain in ("", "ai.onnx") and n.op_type in BOUNDARY_OPS and n.output
            and n.output[0] in affected and n.output[0] in in_teacher and n.output[0] not in outputs]


def _spread(names: Sequence[FeatureMatch], k: int) -> list[FeatureMatch]:
    """``k`` of ``names`` evenly spaced, the last one always in (the deepest carries the most signal)."""
    if len(names) <= k:
        return list(names)
    step = len(names) / k
    return [names[min(len(names) - 1, round((i + 1) * step) - 1)] for i in range(k)]


def _match(name: str, student: list[int] | None, teacher: list[int] | None, analysis: Analysis | None,
           removed: np.ndarray | None) -> FeatureMatch | None:
    """How ``name`` compares: as is (same shape), through the kept channels of its channel map, or not at all."""
    if student is None or teacher is None or len(student) < 3 or len(student) != len(teacher):
        return None
    if sum(d > 1 for d in teacher[1:]) < 2:  # a pooled vector ([N, C, 1, 1]): one number per channel, no map
        return None
    if student == teacher:
        return FeatureMatch(name)
    cmap = analysis.maps.get(name) if analysis is not None else None
    if cmap is None or removed is None or any(a != b for i, (a, b) in enumerate(zip(student, teacher)) if i != cmap.axis):
        return None
    keep = np.flatnonzero(keep_positions(cmap.ids, removed, analysis.class_of))  # type: ignore[union-attr]
    if len(cmap.ids) != teacher[cmap.axis] or len(keep) != student[cmap.axis]:
        return None
    return FeatureMatch(name, cmap.axis, tuple(int(i) for i in keep))


def choose_features(teacher: onnx.ModelProto, student: onnx.ModelProto, shapes: Mapping[str, list[int]], *,
                    analysis: Analysis | None = None, plan: Plan | None = None,
                    k: int = DEFAULT_FEATURES) -> list[FeatureMatch]:
    """Up to ``k`` block/stage outputs to distil, spread evenly over the student's depth: at least 3-D (feature
    maps or sequences, not pooled vectors), downstream of the cut, and either the same shape in both models
    (read from one onnxruntime run of each at ``shapes``) or, given the ``analysis`` of ``teacher`` and the
    ``plan`` that cut it, short of exactly the channels the plan removed.

    Returns an empty list when no tensor qualifies.
    """
    names = _candidates(teacher, student)
    if not names or k <= 0:
        return []
    got_s = run_shapes(student, dict(shapes), names)
    got_t = run_shapes(teacher, dict(shapes), names)
    removed = plan.removed_classes(analysis) if plan is not None and analysis is not None else None
    found = [m for n in names if (m := _match(n, got_s.get(n), got_t.get(n), analysis, removed)) is not None]
    return _spread(found, k)
