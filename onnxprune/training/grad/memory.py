"""Memory passes over a training graph: drop dead nodes, and recompute cheap activations in the backward.

A backward pass written as plain ONNX keeps every forward tensor a rule reads alive from the forward until
its last reader in the backward, so the activation memory of a step is what the backward reads. Two things
inflate that on real graphs (PP-OCRv4's recognizer: 5.3k nodes, 532 MB of such tensors at batch 4):

* rules emit the gradients of every input and the driver keeps only those that are needed, so unused
  gradient nodes stay in the graph, run, and keep what they read alive (Div's divisor gradient reads its
  output; the data input's gradient is a full ConvTranspose);
* exporters spell activations and affine layers as chains of elementwise ops (HardSwish as
  Add/Clip/Mul/Div, learnable affine blocks as Mul/Add), and each link is read by the next link's rule:
  six tensors of the conv's size saved per layer where one would do.

:func:`prune_dead` removes the first; :func:`recompute_cheap` the second, by making the backward read
copies of such chains re-run from the nearest expensive op's output (a checkpoint), right before the first
backward node that needs them. The recomputation is one extra pass over the elementwise ops; on PP-OCRv4
rec the step time stayed the same within noise.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

import onnx

from onnxprune.training.grad.context import GradContext, TensorInfo, node_inputs

#: Ops whose output costs about one read of their inputs: worth recomputing rather than keeping.
#: Elementwise (broadcasting at most) or layout, deterministic; not Expand/Tile, which grow their input.
CHEAP_OPS = frozenset({
    "Identity", "Cast", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose",
    "Add", "Sub", "Mul", "Div", "Neg", "Abs", "Sqrt", "Reciprocal", "Pow", "Exp", "Log", "Erf",
    "Relu", "LeakyRelu", "PRelu", "Clip", "Elu", "Selu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh",
    "Softplus", "Gelu", "BatchNormalization",
})

#: Largest kernel (elements) of a depthwise convolution that counts as cheap: at one multiply-add per
#: kernel element per output it costs what a few elementwise ops do, and keeping its output would double
#: what MobileNet-style blocks (pointwise, depthwise, pointwise...) keep.
DEPTHWISE_MAX_KERNEL = 25

#: Longest chain of cheap ops re-run to rebuild one tensor; a longer chain (a residual stream through
#: many blocks) keeps a tensor in the middle instead, so a recomputation never pulls in a whole network.
#: 20 covers a depthwise conv between two exporter-spelt HardSwish + affine chains (8 ops each).
MAX_CHAIN = 20

#: How far (in backward nodes) a recomputed copy is shared; beyond it a reader recomputes: about one
#: block's backward (a conv's input and weight gradients and its activation chain's rules).
REUSE_WITHIN = 64

#: Readers that only look at metadata: they run in the forward and do not need the values kept.
_METADATA_READERS = frozenset({"Shape", "Size"})


def prune_dead(nodes: Sequence[onnx.NodeProto], outputs: Iterable[str]) -> list[onnx.NodeProto]:
    """The nodes that contribute to ``outputs`` (order kept); the others would only cost time and memory."""
    need = set(outputs)
    keep: list[onnx.NodeProto] = []
    for node in reversed(nodes):
        if any(o in need for o in node.output if o):
            keep.append(node)
            need.update(node_inputs(node))
    keep.reverse()
    return keep


@dataclass(frozen=True)
class RecomputePlan:
    """Which forward tensors the backward may rebuild, and the forward nodes that produce them."""

    producer: dict[str, onnx.NodeProto]  # recomputable tensor → its forward node

    def __contains__(self, name: object) -> bool:
        return name in self.producer


def is_depthwise(node: onnx.NodeProto, info: Mapping[str, TensorInfo]) -> bool:
    """A Conv with one input channel per group and a small kernel (weight ``[C, 1, k...]``, group C)."""
    if node.op_type != "Conv" or len(node.input) < 2:
        return False
    w = info.get(node.input[1])
    shape = w.shape if w is not None else None
    if shape is None or len(shape) < 3 or not all(isinstance(d, int) for d in shape):
        return False
    group = next((a.i for a in node.attribute if a.name == "group"), 1)
    kernel = math.prod(shape[2:])  # type: ignore[arg-type]
    return shape[1] == 1 and group == shape[0] and kernel <= DEPTHWISE_MAX_KERNEL


def plan_recompute(
    forward: Sequence[onnx.NodeProto], sources: Collection[str], *, max_chain: int = MAX_CHAIN,
    cheap: Collection[str] = CHEAP_OPS, info: Mapping[str, TensorInfo] | None = None,
) -> RecomputePlan:
    """Mark the outputs of cheap forward nodes that can be rebuilt from kept tensors.

    ``sources`` are tensors that exist for the whole step anyway (graph inputs, initializers). Outputs of
    expensive ops are kept (checkpoints); a cheap op's output (``cheap`` op types, and depthwise
    convolutions when ``info`` gives their weight shapes) is recomputable while its chain back to kept
    tensors is at most ``max_chain`` ops long, and becomes a checkpoint itself beyond that.
    """
    depth: dict[str, int] = {name: 0 for name in sources}
    producer: dict[str, onnx.NodeProto] = {}
    for node in forward:
        outs = [o for o in node.output if o]
        cheap_node = node.op_type in cheap or (info is not None and is_depthwise(node, info))
        if (not cheap_node or node.domain not in ("", "ai.onnx") or len(outs) != 1
                or any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)):
            depth.update({o: 0 for o in outs})
            continue
        d = 1 + max((depth.get(i, 0) for i in node.input if i), default=0)
        if d > max_chain:
            depth[outs[0]] = 0
            continue
        depth[outs[0]] = d
        producer[outs[0]] = node
    return RecomputePlan(producer)


def recompute_cheap(ctx: GradContext, backward: Sequence[onnx.NodeProto], plan: RecomputePlan, *,
                    reuse_within: int = REUSE_WITHIN) -> list[onnx.NodeProto]:
    """``backward`` with every read of a recomputable forward tensor redirected to a copy made just before.

    A copy is shared by the readers that come within ``reuse_within`` nodes of it; a later reader gets a
    new one, so rebuilding one tensor (its chain's links come along) never keeps the links alive until
    their own readers, far down the backward. Shape/Size readers keep the original: they run as soon as
    it exists. Copies get fresh names from ``ctx``.
    """
    out: list[onnx.NodeProto] = []
    clones: dict[str, tuple[str, int]] = {}  # recomputable tensor → its latest copy, where it was made

    def copy_of(name: str) -> str:
        if name in clones and len(out) - clones[name][1] <= reuse_within:
            return clones[name][0]
        node = plan.producer[name]
        inputs = [copy_of(i) if i in plan else i for i in node.input]
        clone = onnx.NodeProto()
        clone.CopyFrom(node)
        del clone.input[:]
        clone.input.extend(inputs)
        new = ctx.fresh(f"re/{node.op_type}")
        if name in ctx.info:
            ctx.info[new] = ctx.info[name]
        del clone.output[:]
        clone.output.append(new)
        clone.name = new
        out.append(clone)
        clones[name] = (new, len(out))
        return new

    for node in backward:
        if node.op_type not in _METADATA_READERS and any(i in plan for i in node.input):
            inputs = [copy_of(i) if i in plan else i for i in node.input]
            del node.input[:]
            node.input.extend(inputs)
        out.append(node)
    return out
