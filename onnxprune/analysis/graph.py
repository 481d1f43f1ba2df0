"""Small graph readers the analysis modules share."""

from __future__ import annotations

import onnx_graphsurgeon as gs


def producer(t: gs.Tensor) -> gs.Node | None:
    """The node that makes ``t`` (None for graph inputs and constants)."""
    return t.inputs[0] if t.inputs else None


def optional_input(node: gs.Node, i: int) -> gs.Tensor | None:
    if len(node.inputs) > i and (node.inputs[i].name or isinstance(node.inputs[i], gs.Constant)):
        return node.inputs[i]
    return None
