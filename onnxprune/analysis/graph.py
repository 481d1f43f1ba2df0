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


def find_cache_io(graph: gs.Graph) -> dict[str, str]:
    """KV-cache pairs: a graph input read only by one Concat (and ``Shape``, for the past length) whose
    output is a graph output (``past_key_values.i.key`` → ``present.i.key``). Both are generation state,
    not task outputs: they may shrink with the heads they carry, consistently."""
    outputs = {t.name for t in graph.outputs}
    pairs: dict[str, str] = {}
    for t in graph.inputs:
        users = [u for u in t.outputs if u.op != "Shape"]
        if len(users) == 1 and users[0].op == "Concat" and users[0].outputs[0].name in outputs:
            pairs[t.name] = users[0].outputs[0].name
    return pairs
