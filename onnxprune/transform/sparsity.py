"""Fine-grained pruning: zero individual weights (element-wise) or keep N of every M (N:M).

Shapes do not change, so nothing else in the graph needs editing: the model only gets faster on
runtimes and hardware that exploit zeros (sparse kernels, 2:4 sparse tensor cores) or smaller when
compressed. Which weights: the constant weight of every Conv, ConvTranspose, Gemm and MatMul (biases
and normalisation parameters stay dense). N:M groups run along each weight's *input* axis (Conv's
input channels, Gemm's K), the axis sparse tensor cores contract over.

Example:
    >>> report = sparsify(graph, "2:4")
    >>> report.layers[0].sparsity
    0.5
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxprune.errors import BadInputError
from onnxprune.importance.magnitude import elementwise_magnitude_mask

_NM = re.compile(r"^(\d+):(\d+)$")


@dataclass(frozen=True)
class Pattern:
    """``element`` (any ``sparsity``), or ``N:M``: at most ``n`` non-zeros in every ``m`` consecutive inputs."""

    kind: str
    n: int = 0
    m: int = 0

    @classmethod
    def parse(cls, granularity: str) -> Pattern:
        """Parse ``element`` or ``N:M``.

        Raises:
            BadInputError: anything else, or not 0 < N < M.
        """
        if granularity == "element":
            return cls("element")
        match = _NM.match(granularity)
        if not match or not 0 < int(match.group(1)) < int(match.group(2)):
            raise BadInputError(f"granularity must be element or N:M with 0 < N < M, got {granularity!r}",
                                field="granularity")
        return cls("nm", int(match.group(1)), int(match.group(2)))

    @property
    def sparsity(self) -> float | None:
        return 1.0 - self.n / self.m if self.kind == "nm" else None

    def __str__(self) -> str:
        return "element" if self.kind == "element" else f"{self.n}:{self.m}"


@dataclass(frozen=True)
class Target:
    """One weight to sparsify: ``tensor`` read by ``node`` with its input axis ``axis``."""

    node: str
    op: str
    tensor: str
    axis: int


@dataclass
class LayerSparsity:
    """Achieved sparsity of one weight tensor."""

    node: str
    op: str
    tensor: str
    elements: int
    zeros: int

    @property
    def sparsity(self) -> float:
        return self.zeros / self.elements if self.elements else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"node": self.node, "op": self.op, "tensor": self.tensor, "elements": self.elements,
                "zeros": self.zeros, "sparsity": round(self.sparsity, 6)}


@dataclass
class SparsityReport:
    """What :func:`sparsify` did, per layer and overall (the report's ``sparsity`` section)."""

    granularity: str
    target: float | None
    scope: str
    layers: list[LayerSparsity] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def overall(self) -> float:
        total = sum(layer.elements for layer in self.layers)
        return sum(layer.zeros for layer in self.layers) / total if total else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"granularity": self.granularity, "target": self.target, "scope": self.scope,
                "overall": round(self.overall, 6), "layers": [layer.to_dict() for layer in self.layers],
                "notes": list(self.notes)}


def input_axis(node: gs.Node, rank: int) -> int | None:
    """The axis of ``node``'s weight (input 1) that runs over the node's input features, or None."""
    if node.op == "Conv":
        return 1 if rank >= 2 else None
    if node.op == "ConvTranspose":
        return 0
    if node.op == "Gemm":
        return 1 if int(node.attrs.get("transB", 0)) else 0
    if node.op == "MatMul":
        return rank - 2 if rank >= 2 else 0
    return None


def find_targets(graph: gs.Graph, exclude: Iterable[str] = ()) -> list[Target]:
    """Every constant floating-point weight of a Conv/ConvTranspose/Gemm/MatMul, once per tensor."""
    patterns = list(exclude)
    seen: set[str] = set()
    targets: list[Target] = []
    for node in graph.nodes:
        if len(node.inputs) < 2 or any(fnmatch.fnmatchcase(node.name, p) for p in patterns):
            continue
        w = node.inputs[1]
        if not isinstance(w, gs.Constant) or w.name in seen or not np.issubdtype(np.dtype(w.dtype), np.floating):
            continue
        axis = input_axis(node, len(w.shape))
        if axis is not None:
            seen.add(w.name)
            targets.append(Target(node.name, node.op, w.name, axis))
    return targets


def nm_mask(weights: np.ndarray, n: int, m: int, axis: int) -> np.ndarray:
    """Keep-mask with the ``n`` largest |w| of every ``m`` consecutive elements along ``axis``.

    A trailing partial group (the axis is not a multiple of ``m``) also keeps at most ``n``.

    Example:
        >>> nm_mask(np.array([[1.0, -4.0, 3.0, 2.0]]), 2, 4, axis=1)
        array([[False,  True,  True, False]])
    """
    moved = np.moveaxis(np.abs(weights), axis, -1)
    length = moved.shape[-1]
    pad = (-length) % m
    padded = np.concatenate([moved, np.full(moved.shape[:-1] + (pad,), -1.0)], axis=-1) if pad else moved
    blocks = padded.reshape(-1, m)
    order = np.argsort(-blocks, axis=1, kind="stable")
    keep = np.zeros(blocks.shape, dtype=bool)
    np.put_along_axis(keep, order[:, :n], True, axis=1)
    keep = keep.reshape(padded.shape)[..., :length]
    return np.moveaxis(keep, -1, axis)


def _global_masks(values: list[np.ndarray], sparsity: float) -> list[np.ndarray]:
    """One magnitude threshold for all tensors: the ``sparsity`` share of all weights with the smallest |w|."""
    flat = np.concatenate([np.abs(v).reshape(-1) for v in values])
    mask = elementwise_magnitude_mask(flat, sparsity)
    out, start = [], 0
    for v in values:
        out.append(mask[start : start + v.size].reshape(v.shape))
        start += v.size
    return out


def sparsify(
    graph: gs.Graph,
    granularity: str,
    sparsity: float | None = None,
    *,
    scope: str = "layer",
    exclude: Iterable[str] = (),
) -> SparsityReport:
    """Zero weights of ``graph`` in place and report the achieved sparsity per layer.

    Args:
        graph: the model; weights must be ``gs.Constant``.
        granularity: ``element`` or ``N:M`` (e.g. ``2:4``).
        sparsity: share of zeros for ``element`` (required there); ignored by N:M, whose share is 1 - N/M.
        scope: ``layer`` (every weight gets exactly ``sparsity`` zeros, ±1 element of rounding) or
            ``global`` (one magnitude threshold over all weights: layers with small weights lose more).
            N:M is always per group of M.
        exclude: glob patterns of node names to leave dense.

    Raises:
        BadInputError: bad granularity, scope or sparsity.
    """
    pattern = Pattern.parse(granularity)
    if scope not in ("layer", "global"):
        raise BadInputError(f"sparsity scope must be layer or global, got {scope!r}", field="scope")
    report = SparsityReport(str(pattern), pattern.sparsity if pattern.kind == "nm" else sparsity, scope)
    if pattern.kind == "element":
        if sparsity is None or not 0.0 <= sparsity < 1.0:
            raise BadInputError(f"--granularity element needs --sparsity in [0, 1), got {sparsity}", field="sparsity")
    else:
        if sparsity is not None and abs(sparsity - (pattern.sparsity or 0.0)) > 1e-9:
            report.notes.append(f"--sparsity {sparsity} ignored: {pattern} fixes the sparsity at {pattern.sparsity:g}")
        if scope == "global":
            report.notes.append(f"{pattern} keeps {pattern.n} of every {pattern.m} weights; "
                                "a global threshold does not apply")
            report.scope = "layer"
    tensors = graph.tensors()
    targets = find_targets(graph, exclude)
    values = [np.asarray(tensors[t.tensor].values) for t in targets]
    if pattern.kind == "nm":
        masks = [nm_mask(v, pattern.n, pattern.m, t.axis) for v, t in zip(values, targets)]
    elif scope == "global" and values:
        masks = _global_masks(values, float(sparsity or 0.0))
    else:
        masks = [elementwise_magnitude_mask(v, float(sparsity or 0.0)) for v in values]
    for t, v, mask in zip(targets, values, masks):
        new = np.where(mask, v, np.zeros((), dtype=v.dtype)).astype(v.dtype)
        tensors[t.tensor].values = np.ascontiguousarray(new)
        zeros = int(new.size - np.count_nonzero(new))
        report.layers.append(LayerSparsity(t.node, t.op, t.tensor, int(new.size), zeros))
    if not targets:
        report.notes.append("no Conv/ConvTranspose/Gemm/MatMul with a constant float weight to sparsify")
    return report


def to_sparse_initializers(model: onnx.ModelProto, min_saving: float = 0.0) -> list[str]:
    """Store initializers as ONNX sparse initializers where that is smaller, in place; return their names.

    A sparse initializer holds the non-zero values plus one int64 linear index each, so it only pays
    off above ~2/3 zeros for float32 (``min_saving`` asks for that share of the dense bytes saved).
    Initializers that are also graph inputs (IR < 4 models) stay dense: an input can be overridden.

    Example:
        >>> to_sparse_initializers(model)
        ['fc.weight']
    """
    from onnx import numpy_helper

    inputs = {i.name for i in model.graph.input}
    converted: list[str] = []
    keep: list[onnx.TensorProto] = []
    for init in model.graph.initializer:
        if init.name in inputs or init.data_location == onnx.TensorProto.EXTERNAL:
            keep.append(init)
            continue
        dense = numpy_helper.to_array(init)
        if not np.issubdtype(dense.dtype, np.floating) or dense.ndim == 0 or dense.size == 0:
            keep.append(init)
            continue
        nz = np.flatnonzero(dense.reshape(-1))
        sparse_bytes = nz.size * (dense.itemsize + 8)
        if sparse_bytes > (1.0 - min_saving) * dense.nbytes:
            keep.append(init)
            continue
        values = numpy_helper.from_array(dense.reshape(-1)[nz], init.name)
        indices = numpy_helper.from_array(nz.astype(np.int64), f"{init.name}_indices")
        model.graph.sparse_initializer.append(onnx.helper.make_sparse_tensor(values, indices, list(dense.shape)))
        converted.append(init.name)
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    return converted
