"""Small readers shared by the rule families."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.analysis.analyzer import Analyzer
from onnxprune.analysis.graph import optional_input


def first_input(node: gs.Node) -> gs.Tensor:
    return node.inputs[0]


def int_list(az: Analyzer, node: gs.Node, i: int, attr: str) -> list[int] | None:
    """An axes-like list given as input ``i`` (newer opsets) or attribute ``attr`` (older ones)."""
    t = optional_input(node, i)
    if t is not None:
        v = az.const(t)
        return None if v is None else [int(x) for x in v.reshape(-1)]
    value = node.attrs.get(attr)
    return None if value is None else [int(x) for x in value]


def is_static(dims: list[int | str] | None) -> bool:
    return dims is not None and all(isinstance(d, int) and d > 0 for d in dims)


def runtime_ints(az: Analyzer, node: gs.Node, i: int) -> np.ndarray | None:
    """A constant input, or one computed from shapes whose value folding found (``x.chunk(2)`` bounds)."""
    t = optional_input(node, i)
    if t is None:
        return None
    value = az.const(t)
    return value if value is not None else az.folded.get(t.name)
