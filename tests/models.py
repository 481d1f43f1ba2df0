"""The test-model zoo: small ONNX models built in code, one per architecture pattern onnxprune must handle.

Why builders instead of checked-in files: each pattern (residual Add, depthwise, squeeze-excite, Concat,
Flatten->Gemm, head Reshape/Transpose, ...) needs a model that is tiny, deterministic and easy to vary
(seed, opset, gate kind), and a test can read exactly which nodes couple which channels.

Conventions shared by every ``build_<name>(*, seed=0, opset=17, **kw) -> onnx.ModelProto``:

* one graph input ``input`` with a symbolic batch dim ``N`` (e.g. ``["N", 3, 8, 8]``; float32 except the int64
  token ids of ``text_transformer``), one output ``output``;
* float32 weights as initializers (He-normal scale; ``paddle_constants`` deliberately uses Constant nodes),
  BatchNormalization with non-trivial gamma/beta/mean/var;
* every node named: producers get readable names (``conv1``, ``block1.conv2``, ``fc2``); the BN after a conv
  is ``<conv>.bn``; the bias Add after a MatMul is ``<matmul>.add``; other nodes are ``<op>_<k>`` (``relu_3``);
  tensors are ``<node>_out``; weights ``<node>.weight``/``.bias`` (BN adds ``.running_mean``/``.running_var``);
* IR version 8 (or the minimum the opset needs), so onnxruntime 1.31 (IR <= 13) loads it;
* passes ``onnx.checker.check_model(full_check=True)`` and runs in onnxruntime; no value_info is stored
  except the graph output's shape, so pruning code never meets stale intermediate shapes.

``zero_channels`` sets a producer's output channels to exactly zero (``zero_head`` a whole attention head), for
the exactness tests: pruning channels that contribute nothing must leave the outputs unchanged.
``randomize_light_weights`` gives the onnx wheel's light models distinct weights. ``BUILDERS`` / ``VARIANTS``
list every model for parametrized tests; ``random_inputs`` and ``run`` feed and run one on onnxruntime's CPU.

Example:
    >>> from tests.models import build_vgg, random_inputs, run
    >>> model = build_vgg(seed=1)
    >>> run(model, random_inputs(model))["output"].shape
    (2, 10)
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

MIN_OPSET = 13
MAX_OPSET = 21
NUM_CLASSES = 10


# --------------------------------------------------------------------------------------------------------------
# Builder machinery
# --------------------------------------------------------------------------------------------------------------
class _Graph:
    """Accumulates nodes and initializers with deterministic names and weights (one per model build)."""

    def __init__(self, name: str, seed: int, opset: int, min_opset: int = MIN_OPSET) -> None:
        if not min_opset <= opset <= MAX_OPSET:
            raise ValueError(f"{name}: opset {opset} not supported (this builder needs {min_opset}..{MAX_OPSET})")
        self.name = name
        self.opset = opset
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self._names: set[str] = set()
        self._counts: dict[str, int] = {}

    # -- naming -----------------------------------------------------------------------------------------------
    def _unique(self, base: str) -> str:
        if base not in self._names:
            self._names.add(base)
            return base
        k = self._counts.get(base, 1)
        while f"{base}_{k}" in self._names:
            k += 1
        self._counts[base] = k + 1
        name = f"{base}_{k}"
        self._names.add(name)
        return name

    def _auto(self, op: str) -> str:
        k = self._counts.get(op, 0)
        self._counts[op] = k + 1
        return self._unique(f"{op.lower()}_{k}")

    # -- tensors ----------------------------------------------------------------------------------------------
    def const(self, name: str, value: np.ndarray | Sequence[float] | Sequence[int], dtype: Any = None) -> str:
        """Add an initializer and return its (unique) name."""
        array = np.asarray(value, dtype=dtype)
        tname = self._unique(name)
        self.initializers.append(numpy_helper.from_array(array, tname))
        return tname

    def he(self, shape: Sequence[int], fan_in: int) -> np.ndarray:
        """He-normal weights: the scale real trained ReLU nets have, so activations neither vanish nor explode."""
        return (self.rng.standard_normal(shape) * math.sqrt(2.0 / fan_in)).astype(np.float32)

    def small(self, shape: Sequence[int], scale: float = 0.1) -> np.ndarray:
        return (self.rng.standard_normal(shape) * scale).astype(np.float32)

    # -- nodes ------------------------------------------------------------------------------------------------
    def node(self, op: str, inputs: Sequence[str], name: str | None = None, n_out: int = 1, **attrs: Any) -> Any:
        """Add a node; returns its output name (or a list of names when ``n_out > 1``)."""
        nname = self._unique(name) if name else self._auto(op)
        outputs = [f"{nname}_out"] if n_out == 1 else [f"{nname}_out{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op, list(inputs), outputs, name=nname, **attrs))
        return outputs[0] if n_out == 1 else outputs

    def conv(
        self,
        x: str,
        cin: int,
        cout: int,
        k: int | Sequence[int] = 3,
        *,
        name: str,
        stride: int = 1,
        pad: int | None = None,
        group: int = 1,
        bias: bool = True,
    ) -> str:
        """N-d convolution (rank taken from ``k``), 'same' padding by default."""
        ks = [k, k] if isinstance(k, int) else list(k)
        pad = (ks[0] // 2) if pad is None else pad
        w = self.const(f"{name}.weight", self.he([cout, cin // group, *ks], (cin // group) * int(np.prod(ks))))
        inputs = [x, w]
        if bias:
            inputs.append(self.const(f"{name}.bias", self.small([cout])))
        return self.node(
            "Conv", inputs, name=name, kernel_shape=ks, strides=[stride] * len(ks), pads=[pad] * (2 * len(ks)),
            group=group,
        )

    def bn(self, x: str, c: int, *, name: str) -> str:
        """Inference BatchNormalization with non-trivial statistics (gamma ~ 1, var ~ 1, beta/mean ~ 0.1)."""
        gamma = (1.0 + 0.2 * self.rng.standard_normal(c)).astype(np.float32)
        beta = self.small([c])
        mean = self.small([c])
        var = (0.5 + self.rng.random(c)).astype(np.float32)
        ins = [x, *(self.const(f"{name}.{p}", a) for p, a in
                    (("weight", gamma), ("bias", beta), ("running_mean", mean), ("running_var", var)))]
        return self.node("BatchNormalization", ins, name=name, epsilon=1e-5)

    def conv_bn_act(
        self,
        x: str,
        cin: int,
        cout: int,
        k: int | Sequence[int] = 3,
        *,
        name: str,
        act: str | None = "Relu",
        **conv_kw: Any,
    ) -> str:
        """Conv (no bias, as exporters emit it before BN) + BN + activation."""
        y = self.bn(self.conv(x, cin, cout, k, name=f"{name}", bias=False, **conv_kw), cout, name=f"{name}.bn")
        return self.act(y, act) if act else y

    def act(self, x: str, kind: str, name: str | None = None) -> str:
        """Activation by kind, incl. the composite forms exporters produce (Swish, Erf-GELU, ReLU6 as Clip)."""
        if kind == "Relu6":
            return self.clip(x, 0.0, 6.0, name=name)
        if kind == "Swish":
            return self.node("Mul", [x, self.node("Sigmoid", [x])], name=name)
        if kind == "Gelu":
            return self.gelu(x, name=name)
        if kind == "LeakyRelu":
            return self.node("LeakyRelu", [x], name=name, alpha=0.1)
        if kind == "HardSigmoid":
            return self.node("HardSigmoid", [x], name=name, alpha=0.2, beta=0.5)
        return self.node(kind, [x], name=name)

    def clip(self, x: str, lo: float, hi: float, name: str | None = None) -> str:
        return self.node(
            "Clip", [x, self.const("clip_min", np.float32(lo)), self.const("clip_max", np.float32(hi))], name=name
        )

    def gelu(self, x: str, name: str | None = None) -> str:
        """x * 0.5 * (1 + Erf(x / sqrt(2))): the form the PyTorch exporters emit below opset 20."""
        erf = self.node("Erf", [self.node("Div", [x, self.const("sqrt2", np.float32(math.sqrt(2.0)))])])
        one_plus = self.node("Add", [erf, self.const("one", np.float32(1.0))])
        return self.node("Mul", [self.node("Mul", [x, one_plus]), self.const("half", np.float32(0.5))], name=name)

    def gemm(self, x: str, fin: int, fout: int, *, name: str, trans_b: bool = True) -> str:
        """Fully connected layer as Gemm (PyTorch's Linear layout when ``trans_b``)."""
        w = self.he([fout, fin] if trans_b else [fin, fout], fin)
        return self.node(
            "Gemm", [x, self.const(f"{name}.weight", w), self.const(f"{name}.bias", self.small([fout]))],
            name=name, transB=int(trans_b),
        )

    def linear(self, x: str, fin: int, fout: int, *, name: str, weight_shape: Sequence[int] | None = None) -> str:
        """Fully connected layer as MatMul + Add (the form for >2-D inputs and the dynamo exporter)."""
        shape = list(weight_shape) if weight_shape is not None else [fin, fout]
        mm = self.node("MatMul", [x, self.const(f"{name}.weight", self.he(shape, fin))], name=name)
        return self.node("Add", [mm, self.const(f"{name}.bias", self.small([fout]))], name=f"{name}.add")

    def reduce(self, op: str, x: str, axes: Sequence[int] | None, keepdims: int, name: str | None = None) -> str:
        """Reduce* with axes as attribute (opset < 18) or as input (opset >= 18); None reduces all axes."""
        if axes is None:
            return self.node(op, [x], name=name, keepdims=keepdims)
        if self.opset >= 18:
            return self.node(op, [x, self.const("axes", np.array(axes, np.int64))], name=name, keepdims=keepdims)
        return self.node(op, [x], name=name, axes=list(axes), keepdims=keepdims)

    def head(self, x: str, c: int, *, name: str = "fc") -> str:
        """GlobalAveragePool -> Flatten -> Gemm classifier writing the graph output."""
        flat = self.node("Flatten", [self.node("GlobalAveragePool", [x], name="gap")], name="flatten", axis=1)
        return self.gemm(flat, c, NUM_CLASSES, name=name)

    # -- finish -----------------------------------------------------------------------------------------------
    def finish(
        self, output: str, input_shape: Sequence[int | str], doc: str = "", input_type: int = TensorProto.FLOAT
    ) -> onnx.ModelProto:
        """Rename ``output`` to ``output``, infer its shape, and return a checked model."""
        for node in self.nodes:
            node.output[:] = ["output" if o == output else o for o in node.output]
            node.input[:] = ["output" if i == output else i for i in node.input]
        graph = helper.make_graph(
            self.nodes,
            self.name,
            [helper.make_tensor_value_info("input", input_type, list(input_shape))],
            [helper.make_tensor_value_info("output", TensorProto.FLOAT, None)],
            self.initializers,
            doc_string=doc,
        )
        opsets = [helper.make_opsetid("", self.opset)]
        model = helper.make_model(
            graph, opset_imports=opsets, producer_name="onnxprune-tests",
            ir_version=max(8, helper.find_min_ir_version_for(opsets)),
        )
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
        model.graph.output[0].CopyFrom(next(o for o in inferred.graph.output if o.name == "output"))
        onnx.checker.check_model(model, full_check=True)
        return model


# --------------------------------------------------------------------------------------------------------------
# MLPs and Flatten/Reshape -> Gemm heads
# --------------------------------------------------------------------------------------------------------------
def build_mlp(*, seed: int = 0, opset: int = 17, trans_b: bool = True) -> onnx.ModelProto:
    """Gemm(16->32) -> Relu -> Gemm(32->24) -> Relu -> Gemm(24->10); input [N, 16].

    ``trans_b=False`` stores weights as [in, out] (Keras/tf2onnx layout) instead of PyTorch's [out, in].
    """
    g = _Graph("mlp", seed, opset)
    x = g.node("Relu", [g.gemm("input", 16, 32, name="fc1", trans_b=trans_b)])
    x = g.node("Relu", [g.gemm(x, 32, 24, name="fc2", trans_b=trans_b)])
    return g.finish(g.gemm(x, 24, NUM_CLASSES, name="fc3", trans_b=trans_b), ["N", 16])


def build_mlp_matmul(*, seed: int = 0, opset: int = 17) -> onnx.ModelProto:
    """The MLP as MatMul + Add bias (dynamo / tf2onnx style): 16 -> 32 -> 24 -> 10; input [N, 16]."""
    g = _Graph("mlp_matmul", seed, opset)
    x = g.node("Relu", [g.linear("input", 16, 32, name="fc1")])
    x = g.node("Relu", [g.linear(x, 32, 24, name="fc2")])
    return g.finish(g.linear(x, 24, NUM_CLASSES, name="fc3"), ["N", 16])


def build_vgg(*, seed: int = 0, opset: int = 17) -> onnx.ModelProto:
    """VGG-style: conv1(3->8)/conv2(8->16) Conv-BN-Relu, MaxPool 2, conv3(16->16), Flatten -> fc1(256->32) -> fc2.

    Input [N, 3, 8, 8]; conv3's 16 channels x 4x4 spatial reach fc1 as 256 Flatten columns.
    """
    g = _Graph("vgg", seed, opset)
    x = g.conv_bn_act("input", 3, 8, name="conv1")
    x = g.conv_bn_act(x, 8, 16, name="conv2")
    x = g.node("MaxPool", [x], name="pool", kernel_shape=[2, 2], strides=[2, 2])
    x = g.conv_bn_act(x, 16, 16, name="conv3")
    x = g.node("Flatten", [x], name="flatten", axis=1)
    x = g.node("Relu", [g.gemm(x, 16 * 4 * 4, 32, name="fc1")])
    return g.finish(g.gemm(x, 32, NUM_CLASSES, name="fc2"), ["N", 3, 8, 8])


def build_flatten_gemm(*, seed: int = 0, opset: int = 17) -> onnx.ModelProto:
    """conv1(3->8, stride 2) + BN + Relu -> Flatten -> fc(8*4*4 -> 10): each channel owns 16 Gemm columns.

    Input [N, 3, 8, 8]. Channel c of conv1 maps to fc columns ``c*16 .. c*16+15`` (TorchScript style).
    """
    g = _Graph("flatten_gemm", seed, opset)
    x = g.conv_bn_act("input", 3, 8, name="conv1", stride=2)
    x = g.node("Flatten", [x], name="flatten", axis=1)
    return g.finish(g.gemm(x, 8 * 16, NUM_CLASSES, name="fc"), ["N", 3, 8, 8])


def build_reshape_gemm(*, seed: int = 0, opset: int = 17) -> onnx.ModelProto:
    """As ``flatten_gemm`` but flattening with Reshape(x, [0, -1]) (dynamo / ``x.view(n, -1)`` style)."""
    g = _Graph("reshape_gemm", seed, opset)
    x = g.conv_bn_act("input", 3, 8, name="conv1", stride=2)
    x = g.node("Reshape", [x, g.const("flatten_shape", np.array([0, -1], np.int64))], name="reshape")
    return g.finish(g.gemm(x, 8 * 16, NUM_CLASSES, name="fc"), ["N", 3, 8, 8])


def build_gap_gemm(*, seed: int = 0, opset: int = 17) -> onnx.ModelProto:
    """conv1(3->8) + conv2(8->16) Conv-BN-Relu -> GlobalAveragePool -> Flatten -> fc(16 -> 10); input [N, 3, 8, 8]."""
    g = _Graph("gap_gemm", seed, opset)
    x = g.conv_bn_act("input", 3, 8, name="conv1")
    x = g.conv_bn_act(x, 8, 16, name="conv2")
    return g.finish(g.head(x, 16), ["N", 3, 8, 8])


# --------------------------------------------------------------------------------------------------------------
# Residual CNNs
# --------------------------------------------------------------------------------------------------------------
def build_resnet_basic(*, seed: int = 0, opset: int = 17) -> onnx.ModelProto:
    """Stem conv(3->8) and two basic blocks; input [N, 3, 8, 8].

    ``block1``: conv(8->8)-BN-Relu, conv(8->8)-BN, Add(stem), Relu (identity shortcut: couples stem, block1.conv2).
    ``block2``: conv(8->16, stride 2)-BN-Relu, conv(16->16)-BN, shortcut ``block2.downsample`` conv1x1(8->16,
    stride 2)-BN, Add, Relu. Then GlobalAveragePool -> Flatten -> fc(16->10).
    """
    g = _Graph("resnet_basic", seed, opset)
    stem = g.conv_bn_act("input", 3, 8, name="stem")
    y = g.conv_bn_act(stem, 8, 8, name="block1.conv1")
    y = g.conv_bn_act(y, 8, 8, name="block1.conv2", act=None)
    b1 = g.node("Relu", [g.node("Add", [y, stem], name="block1.add")])
    y = g.conv_bn_act(b1, 8, 16, name="block2.conv1", stride=2)
    y = g.conv_bn_act(y, 16, 16, name="block2.conv2", act=None)
    sc = g.conv_bn_act(b1, 8, 16, 1, name="block2.downsample", act=None, stride=2)
    b2 = g.node("Relu", [g.node("Add", [y, sc], name="block2.add")])
    return g.finish(g.head(b2, 16), ["N", 3, 8, 8])


def build_resnet_bottleneck(*, seed: int = 0, opset: int = 17, blocks: int = 2) -> onnx.ModelProto:
    """Stem conv(3->16) then ``blocks`` bottlenecks 1x1(16->8)-3x3(8->8)-1x1(8->16) with identity Add; input [N,3,8,8].

    Blocks are named ``block{i}.conv1/conv2/conv3`` and ``block{i}.add``; the head is GAP -> Flatten -> fc(16->10).
    """
    g = _Graph("resnet_bottleneck", seed, opset)
    x = g.conv_bn_act("input", 3, 16, name="stem")
    for i in range(1, blocks + 1):
        y = g.conv_bn_act(x, 16, 8, 1, name=f"block{i}.conv1")
        y = g.conv_bn_act(y, 8, 8, 3, name=f"block{i}.conv2")
        y = g.conv_bn_act(y, 8, 16, 1, name=f"block{i}.conv3", act=None)
        x = g.node("Relu", [g.node("Add", [y, x], name=f"block{i}.add")])
    return g.finish(g.head(x, 16), ["N", 3, 8, 8])


def build_mobilenetv2(*, seed: int = 0, opset: int = 17) -> onnx.ModelProto:
    """MobileNetV2 inverted residuals with ReLU6 as Clip(0, 6); input [N, 3, 8, 8].

    stem conv(3->16)-BN-Clip; ``block1`` and ``block2``: expand 1x1(16->32)-BN-Clip, depthwise 3x3 group=32-BN-Clip,
    project 1x1(32->16)-BN, Add; then ``last`` 1x1(16->32)-BN-Clip, GAP -> Flatten -> fc(32->10).
    """
    g = _Graph("mobilenetv2", seed, opset)
    x = g.conv_bn_act("input", 3, 16, name="stem", act="Relu6")
    for i in (1, 2):
        y = g.conv_bn_act(x, 16, 32, 1, name=f"block{i}.expand", act="Relu6")
        y = g.conv_bn_act(y, 32, 32, 3, name=f"block{i}.dw", act="Relu6", group=32)
        y = g.conv_bn_act(y, 32, 16, 1, name=f"block{i}.project", act=None)
        x = g.node("Add", [x, y], name=f"block{i}.add")
    x = g.conv_bn_act(x, 16, 32, 1, name="last", act="Relu6")
    return g.finish(g.head(x, 32), ["N", 3, 8, 8])


def build_squeeze_excite(
    *, seed: int = 0, opset: int = 17, gate: str = "sigmoid", pool: str = "gap", fc: str = "conv"
) -> onnx.ModelProto:
    """Squeeze-excite block; input [N, 3, 8, 8].

    stem conv(3->16)-BN-Relu; ``block`` conv(16->16)-BN-Relu = t; pool(t) -> ``se.reduce`` (16->4) -> Relu ->
    ``se.expand`` (4->16) -> gate -> Mul(t, gate) -> ``post`` conv(16->16)-BN-Relu -> GAP -> Flatten -> fc.

    Args:
        gate: ``"sigmoid"`` or ``"hardsigmoid"`` (MobileNetV3 / PP-OCR style).
        pool: ``"gap"`` (GlobalAveragePool) or ``"reducemean"`` (ReduceMean axes [2, 3] keepdims=1, dynamo style).
        fc: ``"conv"`` (1x1 convs on [N,C,1,1]) or ``"gemm"`` (Flatten -> Gemm -> ... -> Reshape [0, -1, 1, 1]).
    """
    if gate not in ("sigmoid", "hardsigmoid") or pool not in ("gap", "reducemean") or fc not in ("conv", "gemm"):
        raise ValueError(f"squeeze_excite: bad variant gate={gate!r} pool={pool!r} fc={fc!r}")
    g = _Graph("squeeze_excite", seed, opset)
    x = g.conv_bn_act("input", 3, 16, name="stem")
    t = g.conv_bn_act(x, 16, 16, name="block")
    if pool == "gap":
        s = g.node("GlobalAveragePool", [t], name="se.pool")
    else:
        s = g.reduce("ReduceMean", t, [2, 3], keepdims=1, name="se.pool")
    if fc == "conv":
        s = g.node("Relu", [g.conv(s, 16, 4, 1, name="se.reduce")])
        s = g.conv(s, 4, 16, 1, name="se.expand")
    else:
        s = g.node("Flatten", [s], name="se.flatten", axis=1)
        s = g.node("Relu", [g.gemm(s, 16, 4, name="se.reduce")])
        s = g.gemm(s, 4, 16, name="se.expand")
    s = g.act(s, "Sigmoid" if gate == "sigmoid" else "HardSigmoid", name="se.gate")
    if fc == "gemm":
        s = g.node("Reshape", [s, g.const("se.shape", np.array([0, -1, 1, 1], np.int64))], name="se.reshape")
    y = g.node("Mul", [t, s], name="se.scale")
    y = g.conv_bn_act(y, 16, 16, name="post")
    return g.finish(g.head(y, 16), ["N", 3, 8, 8])


def build_densenet(*, seed: int = 0, opset: int = 17, layers: int = 3, growth: int = 4) -> onnx.ModelProto:
    """DenseNet-style dense block: features concatenated along channels; input [N, 3, 8, 8].

    stem conv(3->8)-BN-Relu = f0; layer i: BN-Relu-conv(c_i -> growth) on Concat(f0..f_{i-1}) (pre-activation, so
    a consumer-side BN sits on the Concat); ``transition`` BN-Relu-conv1x1(8+layers*growth -> 8), then the head.
    """
    g = _Graph("densenet", seed, opset)
    feats = [g.conv_bn_act("input", 3, 8, name="stem")]
    c = 8
    for i in range(1, layers + 1):
        cat = feats[0] if len(feats) == 1 else g.node("Concat", feats, name=f"layer{i}.concat", axis=1)
        y = g.node("Relu", [g.bn(cat, c, name=f"layer{i}.bn")])
        feats.append(g.conv(y, c, growth, name=f"layer{i}.conv", bias=False))
        c += growth
    cat = g.node("Concat", feats, name="transition.concat", axis=1)
    y = g.node("Relu", [g.bn(cat, c, name="transition.bn")])
    y = g.node("Relu", [g.conv(y, c, 8, 1, name="transition.conv")])
    return g.finish(g.head(y, 8), ["N", 3, 8, 8])


# --------------------------------------------------------------------------------------------------------------
# Channel-preserving ops
# --------------------------------------------------------------------------------------------------------------
ACTIVATIONS = ("Relu", "Relu6", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Swish", "Gelu", "Tanh")


def build_activations(*, seed: int = 0, opset: int = 17) -> onnx.ModelProto:
    """A conv chain with one activation kind after each conv; input [N, 3, 8, 8].

    ``conv0`` (3->8) then ``conv{i}`` (8->8) for i=1..8; activation i follows conv{i-1}-BN in the order of
    ``ACTIVATIONS``: Relu, Clip(0,6), LeakyRelu, Sigmoid, HardSigmoid, HardSwish, Swish (Sigmoid*Mul),
    Erf-GELU, Tanh. The node producing activation i is named ``act{i}.<kind>``.
    """
    g = _Graph("activations", seed, opset, min_opset=14)  # HardSwish needs opset 14
    x, cin = "input", 3
    for i, kind in enumerate(ACTIVATIONS):
        y = g.bn(g.conv(x, cin, 8, name=f"conv{i}", bias=False), 8, name=f"conv{i}.bn")
        x, cin = g.act(y, kind, name=f"act{i}.{kind.lower()}"), 8
    return g.finish(g.head(x, 8), ["N", 3, 8, 8])


def build_misc_passthrough(*, seed: int = 0, opset: int = 17) -> onnx.ModelProto:
    """conv0(3->8)-BN-Relu -> Resize(x2, nearest) -> Pad(spatial 1) -> Dropout -> Identity -> Cast(float)
    -> AveragePool 2 -> MaxPool 2 -> conv1(8->16, valid) -> head; input [N, 3, 8, 8].

    One channel group of conv0 must flow through every one of these ops to conv1.
    """
    g = _Graph("misc_passthrough", seed, opset)
    x = g.conv_bn_act("input", 3, 8, name="conv0")
    x = g.node("Resize", [x, "", g.const("resize.scales", np.array([1, 1, 2, 2], np.float32))], name="resize",
               mode="nearest")  # 16x16
    x = g.node("Pad", [x, g.const("pad.pads", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))], name="pad",
               mode="constant")  # 18x18
    x = g.node("Dropout", [x], name="dropout")
    x = g.node("Identity", [x], name="identity")
    x = g.node("Cast", [x], name="cast", to=TensorProto.FLOAT)
    x = g.node("AveragePool", [x], name="avgpool", kernel_shape=[2, 2], strides=[2, 2])  # 9x9
    x = g.node("MaxPool", [x], name="maxpool", kernel_shape=[3, 3], strides=[2, 2])  # 4x4
    x = g.node("Relu", [g.conv(x, 8, 16, name="conv1", pad=0)])  # 2x2
    return g.finish(g.head(x, 16), ["N", 3, 8, 8])


def build_residual_sub_mul(*, seed: int = 0, opset: int = 17) -> onnx.ModelProto:
    """Branches combined by Sub and Mul, and scaled/shifted by per-channel [1, C, 1, 1] constants; input [N,3,8,8].

    stem conv(3->8)-BN-Relu = x; ``branch_a``/``branch_b``/``branch_c`` conv(8->8)-BN;
    ``combine.sub`` = a - b; ``combine.mul`` = sub * c; ``affine.mul`` = * gamma[1,8,1,1];
    ``affine.sub`` = - beta[1,8,1,1]; Relu; ``post`` conv(8->16)-BN-Relu; head.
    """
    g = _Graph("residual_sub_mul", seed, opset)
    x = g.conv_bn_act("input", 3, 8, name="stem")
    a, b, c = (g.conv_bn_act(x, 8, 8, name=f"branch_{k}", act=None) for k in "abc")
    y = g.node("Mul", [g.node("Sub", [a, b], name="combine.sub"), c], name="combine.mul")
    gamma = (1.0 + 0.2 * g.rng.standard_normal((1, 8, 1, 1))).astype(np.float32)
    y = g.node("Mul", [y, g.const("affine.gamma", gamma)], name="affine.mul")
    y = g.node("Sub", [y, g.const("affine.beta", g.small([1, 8, 1, 1]))], name="affine.sub")
    y = g.conv_bn_act(g.node("Relu", [y]), 8, 16, name="post")
    return g.finish(g.head(y, 16), ["N", 3, 8, 8])


# --------------------------------------------------------------------------------------------------------------
# Exporter styles
# --------------------------------------------------------------------------------------------------------------
def build_paddle_constants(*, seed: int = 0, opset: int = 17) -> onnx.ModelProto:
    """Weights in ``Constant`` nodes (Paddle) and behind ``Identity`` (TorchScript); input [N, 3, 8, 8].

    ``conv1`` (3->8) + ``bn1`` take every parameter from Constant nodes named ``<tensor>.const``; ``conv2`` (8->16)
    reads its weight through ``conv2.weight.identity`` on an initializer; ``fc`` (16->10) reads Constant weights.
    """
    g = _Graph("paddle_constants", seed, opset)

    def constant(name: str, array: np.ndarray) -> str:
        return g.node("Constant", [], name=f"{name}.const", value=numpy_helper.from_array(array, name))

    w1 = constant("conv1.weight", g.he([8, 3, 3, 3], 27))
    b1 = constant("conv1.bias", g.small([8]))
    x = g.node("Conv", ["input", w1, b1], name="conv1", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    bn = [constant(f"bn1.{p}", a) for p, a in (
        ("scale", (1.0 + 0.2 * g.rng.standard_normal(8)).astype(np.float32)), ("bias", g.small([8])),
        ("mean", g.small([8])), ("var", (0.5 + g.rng.random(8)).astype(np.float32)))]
    x = g.node("Relu", [g.node("BatchNormalization", [x, *bn], name="bn1", epsilon=1e-5)])
    w2 = g.node("Identity", [g.const("conv2.weight", g.he([16, 8, 3, 3], 72))], name="conv2.weight.identity")
    x = g.node("Conv", [x, w2, g.const("conv2.bias", g.small([16]))], name="conv2", kernel_shape=[3, 3],
               pads=[1, 1, 1, 1])
    x = g.node("Relu", [x])
    x = g.node("Flatten", [g.node("GlobalAveragePool", [x], name="gap")], name="flatten", axis=1)
    wf, bf = constant("fc.weight", g.he([16, NUM_CLASSES], 16)), constant("fc.bias", g.small([NUM_CLASSES]))
    return g.finish(g.node("Gemm", [x, wf, bf], name="fc"), ["N", 3, 8, 8])


def build_symbolic_spatial(*, seed: int = 0, opset: int = 17) -> onnx.ModelProto:
    """Fully convolutional, FPN-like text-detector head on input [N, 3, H, W] (H, W symbolic, even).

    ``stem`` conv(3->8) at H; ``down`` conv(8->16, stride 2) at H/2; ``up`` Resize x2 nearest; ``lateral``
    conv1x1(8->16) on stem; ``fuse`` Add; ``head1`` conv(16->8)-BN-Relu; ``head2`` conv1x1(8->1) -> Sigmoid
    -> output [N, 1, H, W].
    """
    g = _Graph("symbolic_spatial", seed, opset)
    c1 = g.conv_bn_act("input", 3, 8, name="stem")
    c2 = g.conv_bn_act(c1, 8, 16, name="down", stride=2)
    up = g.node("Resize", [c2, "", g.const("up.scales", np.array([1, 1, 2, 2], np.float32))], name="up",
                mode="nearest")
    lat = g.conv(c1, 8, 16, 1, name="lateral")
    y = g.conv_bn_act(g.node("Add", [up, lat], name="fuse"), 16, 8, name="head1")
    y = g.node("Sigmoid", [g.conv(y, 8, 1, 1, name="head2")])
    return g.finish(y, ["N", 3, "H", "W"])


# --------------------------------------------------------------------------------------------------------------
# Issue 3: transformers, channel shuffle, grouped/transposed/1-d/3-d conv, batched MatMul, RNN, control flow
# --------------------------------------------------------------------------------------------------------------
class _Encoder:
    """Pre-LN transformer encoder blocks written into a ``_Graph`` (shared by the transformer builders).

    ``layernorm="op"`` uses LayerNormalization (opset 17+); ``"decomposed"`` the ReduceMean/Sub/Pow/Sqrt/Div form
    of older exporters and tf2onnx. ``gelu="erf"`` is x*0.5*(1+Erf(x/sqrt2)); ``"tanh"`` the tanh approximation.
    """

    def __init__(self, g: _Graph, dim: int, heads: int, mlp: int, layernorm: str, gelu: str) -> None:
        if dim % heads:
            raise ValueError(f"{g.name}: dim {dim} not divisible by heads {heads}")
        if layernorm not in ("op", "decomposed") or gelu not in ("erf", "tanh"):
            raise ValueError(f"{g.name}: bad variant layernorm={layernorm!r} gelu={gelu!r}")
        if layernorm == "op" and g.opset < 17:
            raise ValueError(
                f"{g.name}: opset {g.opset} has no LayerNormalization (needs 17; or layernorm='decomposed')"
            )
        self.g, self.dim, self.heads, self.mlp = g, dim, heads, mlp
        self.layernorm, self.gelu = layernorm, gelu
        self.hd = dim // heads
        self.split_shape = g.const("heads_shape", np.array([0, 0, heads, self.hd], np.int64))
        self.merge_shape = g.const("merge_shape", np.array([0, 0, dim], np.int64))

    def norm(self, x: str, name: str) -> str:
        """LayerNorm over the last axis; the node named ``name`` is the one writing the normalized output."""
        g = self.g
        scale = g.const(f"{name}.weight", (1.0 + 0.1 * g.rng.standard_normal(self.dim)).astype(np.float32))
        bias = g.const(f"{name}.bias", g.small([self.dim]))
        if self.layernorm == "op":
            return g.node("LayerNormalization", [x, scale, bias], name=name, axis=-1, epsilon=1e-5)
        mean = g.reduce("ReduceMean", x, [-1], keepdims=1, name=f"{name}.mean")
        d = g.node("Sub", [x, mean], name=f"{name}.sub")
        var = g.reduce("ReduceMean", g.node("Pow", [d, g.const("two", np.float32(2.0))], name=f"{name}.pow"), [-1],
                       keepdims=1, name=f"{name}.var")
        std = g.node("Sqrt", [g.node("Add", [var, g.const("ln_eps", np.float32(1e-5))], name=f"{name}.add_eps")],
                     name=f"{name}.sqrt")
        y = g.node("Mul", [g.node("Div", [d, std], name=f"{name}.div"), scale], name=f"{name}.mul")
        return g.node("Add", [y, bias], name=name)

    def act(self, x: str, name: str) -> str:
        g = self.g
        if self.gelu == "erf":
            return g.gelu(x, name=name)
        cube = g.node("Mul", [g.node("Pow", [x, g.const("three", np.float32(3.0))]), g.const("gelu_c",
                      np.float32(0.044715))])
        inner = g.node("Mul", [g.node("Add", [x, cube]), g.const("sqrt_2_pi", np.float32(math.sqrt(2 / math.pi)))])
        one_plus = g.node("Add", [g.node("Tanh", [inner]), g.const("one", np.float32(1.0))])
        return g.node("Mul", [g.node("Mul", [x, g.const("half", np.float32(0.5))]), one_plus], name=name)

    def block(self, x: str, p: str) -> str:
        """One encoder block ``p``: attention sub-block then MLP sub-block, each with its residual Add."""
        g, dim = self.g, self.dim
        h = self.norm(x, f"{p}.ln1")
        q, k, v = (g.linear(h, dim, dim, name=f"{p}.{n}") for n in "qkv")
        q, k, v = (g.node("Reshape", [t, self.split_shape], name=f"{p}.{n}.split_heads") for t, n in
                   zip((q, k, v), "qkv"))
        q = g.node("Transpose", [q], name=f"{p}.q.transpose", perm=[0, 2, 1, 3])
        k = g.node("Transpose", [k], name=f"{p}.k.transpose", perm=[0, 2, 3, 1])
        v = g.node("Transpose", [v], name=f"{p}.v.transpose", perm=[0, 2, 1, 3])
        s = g.node("MatMul", [q, k], name=f"{p}.scores")
        s = g.node("Mul", [s, g.const("attn_scale", np.float32(1.0 / math.sqrt(self.hd)))], name=f"{p}.scale")
        a = g.node("Softmax", [s], name=f"{p}.softmax", axis=-1)
        c = g.node("MatMul", [a, v], name=f"{p}.context")
        c = g.node("Transpose", [c], name=f"{p}.context.transpose", perm=[0, 2, 1, 3])
        c = g.node("Reshape", [c, self.merge_shape], name=f"{p}.merge_heads")
        x = g.node("Add", [x, g.linear(c, dim, dim, name=f"{p}.o")], name=f"{p}.attn.add")
        h = self.norm(x, f"{p}.ln2")
        h = self.act(g.linear(h, dim, self.mlp, name=f"{p}.fc1"), name=f"{p}.gelu")
        return g.node("Add", [x, g.linear(h, self.mlp, dim, name=f"{p}.fc2")], name=f"{p}.mlp.add")


def build_transformer_block(
    *, seed: int = 0, opset: int = 17, tokens: int = 8, dim: int = 16, heads: int = 2, mlp: int = 32, blocks: int = 1,
    layernorm: str = "op", gelu: str = "erf",
) -> onnx.ModelProto:
    """Pre-LN transformer encoder classifier on tokens [N, tokens, dim] (PyTorch TorchScript-export style).

    Per block ``block{i}``: ``ln1`` LayerNormalization; ``q``/``k``/``v`` MatMul + Add bias; Reshape [0, 0, heads,
    head_dim] -> Transpose (q, v: [0,2,1,3]; k: [0,2,3,1]); ``scores`` MatMul * 1/sqrt(head_dim); Softmax;
    ``context`` MatMul; Transpose [0,2,1,3]; Reshape [0, 0, dim] (merge heads); ``o`` MatMul + Add; ``attn.add``
    residual; ``ln2``; ``fc1`` MatMul(dim->mlp) + Add -> GELU ``gelu`` -> ``fc2`` MatMul(mlp->dim) + Add;
    ``mlp.add`` residual. Then ``ln_f``, ReduceMean over tokens -> ``classifier`` Gemm(dim->10).
    ``layernorm="decomposed"`` / ``gelu="tanh"`` give the other exporters' forms (see ``_Encoder``).
    """
    g = _Graph("transformer_block", seed, opset)
    enc = _Encoder(g, dim, heads, mlp, layernorm, gelu)
    x = "input"
    for i in range(blocks):
        x = enc.block(x, f"block{i}")
    x = g.reduce("ReduceMean", enc.norm(x, "ln_f"), [1], keepdims=0, name="pool")
    return g.finish(g.gemm(x, dim, NUM_CLASSES, name="classifier"), ["N", tokens, dim])


def build_vit(
    *, seed: int = 0, opset: int = 17, dim: int = 16, heads: int = 2, mlp: int = 32, blocks: int = 2,
    layernorm: str = "op", gelu: str = "erf",
) -> onnx.ModelProto:
    """Tiny ViT on images [N, 3, 8, 8]: the embedding width couples patch embedding, class token, positional
    embedding, every block's residual stream and LayerNorm, and the classifier.

    ``patch_embed`` Conv(3->dim, 4x4, stride 4) -> ``patch_flatten`` Reshape [0, dim, -1] -> ``patch_transpose``
    [0,2,1] -> [N, 4, dim]; class token: ``cls.expand`` Expand(cls_token [1,1,dim], Concat(Shape(x)[0:1], [1, 1]))
    -> ``cls.concat`` along tokens -> ``pos.add`` pos_embed [1, 5, dim]; ``blocks`` encoder blocks ``block{i}``
    (as in ``build_transformer_block``); ``ln_f``; ``cls.gather`` Gather index 0 on axis 1 -> ``classifier``.
    """
    g = _Graph("vit", seed, opset)
    enc = _Encoder(g, dim, heads, mlp, layernorm, gelu)
    x = g.conv("input", 3, dim, 4, name="patch_embed", stride=4, pad=0)
    x = g.node("Reshape", [x, g.const("patch_shape", np.array([0, dim, -1], np.int64))], name="patch_flatten")
    x = g.node("Transpose", [x], name="patch_transpose", perm=[0, 2, 1])  # [N, 4, dim]
    batch = g.node("Slice", [g.node("Shape", [x], name="cls.shape"), g.const("zero", np.array([0], np.int64)),
                             g.const("one_i", np.array([1], np.int64))], name="cls.batch")
    shape = g.node("Concat", [batch, g.const("cls.ones", np.array([1, 1], np.int64))], name="cls.expand_shape", axis=0)
    cls = g.node("Expand", [g.const("cls_token", g.small([1, 1, dim], 0.02)), shape], name="cls.expand")
    x = g.node("Concat", [cls, x], name="cls.concat", axis=1)
    x = g.node("Add", [x, g.const("pos_embed", g.small([1, 5, dim], 0.02))], name="pos.add")
    for i in range(blocks):
        x = enc.block(x, f"block{i}")
    x = g.node("Gather", [enc.norm(x, "ln_f"), g.const("cls_index", np.array(0, np.int64))], name="cls.gather", axis=1)
    return g.finish(g.gemm(x, dim, NUM_CLASSES, name="classifier"), ["N", 3, 8, 8])


VOCAB = 32


def build_text_transformer(
    *, seed: int = 0, opset: int = 17, tokens: int = 8, dim: int = 16, heads: int = 2, mlp: int = 32, blocks: int = 1,
    layernorm: str = "op", gelu: str = "erf",
) -> onnx.ModelProto:
    """Text classifier: int64 token ids ``input`` [N, tokens] in [0, VOCAB) -> ``embed`` Gather on a [VOCAB, dim]
    table -> ``pos.add`` positional embedding [1, tokens, dim] -> encoder blocks -> ``ln_f`` -> ReduceMean over
    tokens -> ``classifier``. The one zoo model whose input is not float (``random_inputs`` draws ids for it)."""
    g = _Graph("text_transformer", seed, opset)
    enc = _Encoder(g, dim, heads, mlp, layernorm, gelu)
    x = g.node("Gather", [g.const("embed.weight", g.small([VOCAB, dim], 1.0)), "input"], name="embed", axis=0)
    x = g.node("Add", [x, g.const("pos_embed", g.small([1, tokens, dim], 0.1))], name="pos.add")
    for i in range(blocks):
        x = enc.block(x, f"block{i}")
    x = g.reduce("ReduceMean", enc.norm(x, "ln_f"), [1], keepdims=0, name="pool")
    return g.finish(g.gemm(x, dim, NUM_CLASSES, name="classifier"), ["N", tokens], input_type=TensorProto.INT64)


def build_shufflenet(*, seed: int = 0, opset: int = 17, split: str = "split", units: int = 2) -> onnx.ModelProto:
    """ShuffleNetV2 stride-1 units on input [N, 3, 8, 8].

    ``stem`` conv(3->16)-BN-Relu; unit i: halves of 8 channels by ``unit{i}.split`` (Split) or ``unit{i}.slice_a``/
    ``slice_b`` (Slice); branch on the second half: ``pw1`` 1x1-BN-Relu, ``dw`` 3x3 group=8-BN, ``pw2`` 1x1-BN-Relu;
    ``unit{i}.concat`` (first half, branch); channel shuffle ``unit{i}.shuffle.reshape1`` [0, 2, 8, 8, 8] ->
    Transpose [0,2,1,3,4] -> ``reshape2`` [0, 16, 8, 8]. Then ``last`` conv1x1(16->32)-BN-Relu and the head.
    """
    if split not in ("split", "slice"):
        raise ValueError(f"shufflenet: split must be 'split' or 'slice', got {split!r}")
    g = _Graph("shufflenet", seed, opset)
    x = g.conv_bn_act("input", 3, 16, name="stem")
    for i in range(1, units + 1):
        p = f"unit{i}"
        if split == "split":
            a, b = g.node("Split", [x, g.const("split_sizes", np.array([8, 8], np.int64))], name=f"{p}.split",
                          n_out=2, axis=1)
        else:
            def sl(start: int, end: int, tag: str) -> str:
                ins = [x, g.const("slice_start", np.array([start], np.int64)), g.const("slice_end", np.array(
                    [end], np.int64)), g.const("slice_axes", np.array([1], np.int64))]
                return g.node("Slice", ins, name=f"{p}.slice_{tag}")
            a, b = sl(0, 8, "a"), sl(8, 16, "b")
        y = g.conv_bn_act(b, 8, 8, 1, name=f"{p}.pw1")
        y = g.conv_bn_act(y, 8, 8, 3, name=f"{p}.dw", act=None, group=8)
        y = g.conv_bn_act(y, 8, 8, 1, name=f"{p}.pw2")
        x = g.node("Concat", [a, y], name=f"{p}.concat", axis=1)
        x = g.node("Reshape", [x, g.const("shuffle_shape1", np.array([0, 2, 8, 8, 8], np.int64))],
                   name=f"{p}.shuffle.reshape1")
        x = g.node("Transpose", [x], name=f"{p}.shuffle.transpose", perm=[0, 2, 1, 3, 4])
        x = g.node("Reshape", [x, g.const("shuffle_shape2", np.array([0, 16, 8, 8], np.int64))],
                   name=f"{p}.shuffle.reshape2")
    x = g.conv_bn_act(x, 16, 32, 1, name="last")
    return g.finish(g.head(x, 32), ["N", 3, 8, 8])


def build_grouped_conv(*, seed: int = 0, opset: int = 17, groups: int = 4) -> onnx.ModelProto:
    """``conv1`` 1x1(3->16)-BN-Relu -> ``gconv`` 3x3 (16->16, group=``groups``)-BN-Relu -> ``conv2`` 1x1(16->16)
    -BN-Relu -> head; input [N, 3, 8, 8]."""
    g = _Graph("grouped_conv", seed, opset)
    x = g.conv_bn_act("input", 3, 16, 1, name="conv1")
    x = g.conv_bn_act(x, 16, 16, 3, name="gconv", group=groups)
    x = g.conv_bn_act(x, 16, 16, 1, name="conv2")
    return g.finish(g.head(x, 16), ["N", 3, 8, 8])


def build_conv_transpose(*, seed: int = 0, opset: int = 17) -> onnx.ModelProto:
    """``down`` conv(3->8, stride 2)-BN-Relu (8x8 -> 4x4) -> ``up`` ConvTranspose(8->12, k2 s2; weight
    [Cin, Cout, 2, 2]) + bias -BN ``up.bn``-Relu (-> 8x8) -> ``conv2`` conv(12->16)-BN-Relu -> head; input [N,3,8,8]."""
    g = _Graph("conv_transpose", seed, opset)
    x = g.conv_bn_act("input", 3, 8, name="down", stride=2)
    w = g.const("up.weight", g.he([8, 12, 2, 2], 8 * 4))
    x = g.node("ConvTranspose", [x, w, g.const("up.bias", g.small([12]))], name="up", kernel_shape=[2, 2],
               strides=[2, 2])
    x = g.node("Relu", [g.bn(x, 12, name="up.bn")])
    x = g.conv_bn_act(x, 12, 16, name="conv2")
    return g.finish(g.head(x, 16), ["N", 3, 8, 8])


def build_conv1d(*, seed: int = 0, opset: int = 17) -> onnx.ModelProto:
    """1-d convs on input [N, 4, 32]: ``conv1`` (4->8, k3)-BN-Relu -> ``conv2`` (8->16, k3, stride 2)-BN-Relu
    -> GlobalAveragePool -> Flatten -> fc."""
    g = _Graph("conv1d", seed, opset)
    x = g.conv_bn_act("input", 4, 8, [3], name="conv1")
    x = g.conv_bn_act(x, 8, 16, [3], name="conv2", stride=2)
    return g.finish(g.head(x, 16), ["N", 4, 32])


def build_conv3d(*, seed: int = 0, opset: int = 17) -> onnx.ModelProto:
    """3-d convs on input [N, 2, 4, 8, 8]: ``conv1`` (2->8, 3x3x3)-BN-Relu -> ``conv2`` (8->8)-BN-Relu -> head."""
    g = _Graph("conv3d", seed, opset)
    x = g.conv_bn_act("input", 2, 8, [3, 3, 3], name="conv1")
    x = g.conv_bn_act(x, 8, 8, [3, 3, 3], name="conv2")
    return g.finish(g.head(x, 8), ["N", 2, 4, 8, 8])


def build_batched_matmul(*, seed: int = 0, opset: int = 17) -> onnx.ModelProto:
    """MatMul on 3-d activations [N, 8, 16]: ``fc1`` weight [16, 32] + Add -> Relu -> ``fc2`` weight [1, 32, 16]
    (a batched 3-d operand) + Add -> Relu -> ReduceMean over tokens -> ``classifier`` Gemm(16->10)."""
    g = _Graph("batched_matmul", seed, opset)
    x = g.node("Relu", [g.linear("input", 16, 32, name="fc1")])
    x = g.node("Relu", [g.linear(x, 32, 16, name="fc2", weight_shape=[1, 32, 16])])
    x = g.reduce("ReduceMean", x, [1], keepdims=0, name="pool")
    return g.finish(g.gemm(x, 16, NUM_CLASSES, name="classifier"), ["N", 8, 16])


def build_lstm(*, seed: int = 0, opset: int = 17, hidden: int = 16, cell: str = "lstm") -> onnx.ModelProto:
    """A recurrent op between MatMul layers on tokens [N, 8, 16] (recurrent ops must block their groups only).

    ``proj_in`` MatMul(16->16)+Add -> Relu -> Transpose to [T, N, F] -> ``lstm`` (an LSTM, or a GRU / RNN with
    ``cell="gru"|"rnn"``; hidden ``hidden``) -> Squeeze num_directions -> Transpose back -> ``fc_a`` (hidden->32)
    + Relu -> ``fc_b`` (32->16) + Relu -> ReduceMean over tokens -> ``classifier`` Gemm(16->10).
    ``fc_a``'s 32 hidden units stay prunable; ``proj_in``'s 16 outputs feed the recurrent op's input weights.
    """
    gates = {"lstm": 4, "gru": 3, "rnn": 1}
    if cell not in gates:
        raise ValueError(f"lstm: cell must be one of {sorted(gates)}, got {cell!r}")
    g = _Graph("lstm", seed, opset)
    x = g.node("Relu", [g.linear("input", 16, 16, name="proj_in")])
    x = g.node("Transpose", [x], name="to_time_major", perm=[1, 0, 2])
    k = gates[cell]
    w = g.const("lstm.W", g.he([1, k * hidden, 16], 16))
    r = g.const("lstm.R", g.he([1, k * hidden, hidden], hidden) * 0.5)
    b = g.const("lstm.B", g.small([1, 2 * k * hidden]))
    y = g.node(cell.upper(), [x, w, r, b], name="lstm", hidden_size=hidden)  # Y: [T, 1, N, hidden]
    y = g.node("Squeeze", [y, g.const("squeeze_axes", np.array([1], np.int64))], name="squeeze")
    y = g.node("Transpose", [y], name="to_batch_major", perm=[1, 0, 2])
    y = g.node("Relu", [g.linear(y, hidden, 32, name="fc_a")])
    y = g.node("Relu", [g.linear(y, 32, 16, name="fc_b")])
    y = g.reduce("ReduceMean", y, [1], keepdims=0, name="pool")
    return g.finish(g.gemm(y, 16, NUM_CLASSES, name="classifier"), ["N", 8, 16])


def build_with_if(*, seed: int = 0, opset: int = 17) -> onnx.ModelProto:
    """An If node (control flow) inside a CNN; input [N, 3, 8, 8].

    ``conv1`` (3->8)-BN-Relu = f; ``cond`` = ReduceMax(input) > 0.5 (data dependent); ``branch`` If: then Relu(f),
    else Sigmoid(f), both reading f from the outer scope; ``conv2`` (8->16)-BN-Relu; ``conv3`` (16->16)-BN-Relu;
    head. conv2 -> conv3's group does not touch the If and stays prunable.
    """
    g = _Graph("with_if", seed, opset)
    f = g.conv_bn_act("input", 3, 8, name="conv1")
    cond = g.node("Greater", [g.reduce("ReduceMax", "input", None, keepdims=0, name="cond.max"),
                              g.const("cond.threshold", np.float32(0.5))], name="cond")
    shape = ["N", 8, 8, 8]

    def branch(op: str, tag: str) -> onnx.GraphProto:
        out = f"branch.{tag}_out"
        return helper.make_graph([helper.make_node(op, [f], [out], name=f"branch.{tag}.{op.lower()}")],
                                 f"branch_{tag}", [], [helper.make_tensor_value_info(out, TensorProto.FLOAT, shape)])

    y = g.node("If", [cond], name="branch", then_branch=branch("Relu", "then"), else_branch=branch("Sigmoid", "else"))
    y = g.conv_bn_act(y, 8, 16, name="conv2")
    y = g.conv_bn_act(y, 16, 16, name="conv3")
    return g.finish(g.head(y, 16), ["N", 3, 8, 8])


# --------------------------------------------------------------------------------------------------------------
# Registry and helpers for tests
# --------------------------------------------------------------------------------------------------------------
BUILDERS: dict[str, Callable[..., onnx.ModelProto]] = {
    name[len("build_"):]: fn for name, fn in sorted(globals().items()) if name.startswith("build_") and callable(fn)
}
"""Every zoo model by name (``BUILDERS["vgg"](seed=1)``); tests parametrize over it."""

VARIANTS: dict[str, Callable[[], onnx.ModelProto]] = {
    "mlp[trans_b=False]": lambda: build_mlp(trans_b=False),
    "squeeze_excite[hardsigmoid]": lambda: build_squeeze_excite(gate="hardsigmoid"),
    "squeeze_excite[reducemean]": lambda: build_squeeze_excite(pool="reducemean"),
    "squeeze_excite[reducemean,opset18]": lambda: build_squeeze_excite(pool="reducemean", opset=18),
    "squeeze_excite[gemm]": lambda: build_squeeze_excite(fc="gemm", gate="hardsigmoid"),
    "shufflenet[slice]": lambda: build_shufflenet(split="slice"),
    "lstm[gru]": lambda: build_lstm(cell="gru"),
    "lstm[rnn]": lambda: build_lstm(cell="rnn"),
    "transformer_block[blocks=2,opset18]": lambda: build_transformer_block(blocks=2, opset=18),
    "transformer_block[decomposed,tanh,opset13]": lambda: build_transformer_block(
        layernorm="decomposed", gelu="tanh", opset=13),
    "vit[decomposed,opset18]": lambda: build_vit(layernorm="decomposed", opset=18),
    "text_transformer[tanh]": lambda: build_text_transformer(gelu="tanh"),
    "resnet_bottleneck[blocks=3]": lambda: build_resnet_bottleneck(blocks=3),
    "vgg[opset13]": lambda: build_vgg(opset=13),
    "mobilenetv2[opset21]": lambda: build_mobilenetv2(opset=21),
}
"""Non-default variants worth checking too (opsets at both ends of the supported range, alternative styles)."""


def build(name: str, **kw: Any) -> onnx.ModelProto:
    """Build a zoo model by name.

    Raises:
        KeyError: unknown name (the message lists the known ones).
    """
    try:
        fn = BUILDERS[name]
    except KeyError:
        raise KeyError(f"no zoo model {name!r}; known: {', '.join(BUILDERS)}") from None
    return fn(**kw)


def input_shape(model: onnx.ModelProto, batch: int = 2, dims: Mapping[str, int] | None = None) -> list[int]:
    """Concrete shape of the ``input``: the batch dim ``N`` -> ``batch``, other symbolic dims from ``dims``
    (default 16 for any unnamed one, e.g. ``H``/``W`` of ``symbolic_spatial``)."""
    sizes = {"N": batch, **(dims or {})}
    shape = []
    for d in model.graph.input[0].type.tensor_type.shape.dim:
        shape.append(d.dim_value if d.HasField("dim_value") else sizes.get(d.dim_param, 16))
    return shape


def random_inputs(
    model: onnx.ModelProto, batch: int = 2, seed: int = 0, dims: Mapping[str, int] | None = None
) -> dict[str, np.ndarray]:
    """Standard-normal feeds for the model's ``input`` (the only graph input of every zoo model); token ids in
    [0, VOCAB) for an int64 input (``text_transformer``)."""
    rng = np.random.default_rng(seed)
    shape = input_shape(model, batch, dims)
    if model.graph.input[0].type.tensor_type.elem_type == TensorProto.INT64:
        return {"input": rng.integers(0, VOCAB, shape, dtype=np.int64)}
    return {"input": rng.standard_normal(shape).astype(np.float32)}


def run(model: onnx.ModelProto | bytes | str, feeds: Mapping[str, np.ndarray], threads: int = 1) -> dict[str, Any]:
    """Run on onnxruntime's CPU provider (few threads: tests share two cores) and return outputs by name."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    sess = ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, dict(feeds))))


# --------------------------------------------------------------------------------------------------------------
# Real architectures with stand-in weights (onnx wheel's backend/test/data/light)
# --------------------------------------------------------------------------------------------------------------
def randomize_light_weights(model: onnx.ModelProto, seed: int = 0) -> onnx.ModelProto:
    """Replace the ``ConstantOfShape`` stand-in weights of an onnx ``light_*.onnx`` model by realistic random ones.

    Why: those models fill every weight with the same value (0.02), so all channels tie on any importance score
    and the outputs are constant (ResNet-50's softmax is exactly 1/1000 everywhere) -- fidelity checks would pass
    vacuously. Each constant is drawn by its role: He-normal for Conv/Gemm weights; gamma ~ 1, var ~ U(0.5, 1.5)
    and small beta/mean for BatchNormalization (gamma ~ 0.35 on a BN feeding a residual Add/Sum, so activations
    in deep ResNets do not grow by orders of magnitude); small biases; ~1 for per-channel ``Mul`` scales (seen
    through ``Unsqueeze``); small ``Add`` shifts. Finally the classifier before the Softmax is scaled so the
    logits have std 2 on a random input (probabilities neither uniform nor one-hot). The result keeps the
    model's IR version, opset and IR-3 style (every initializer also listed as a graph input); the ``*__SHAPE``
    helper inputs that become unused are dropped.

    Raises:
        ValueError: if the model has no ConstantOfShape weights to replace.
    """
    model = copy.deepcopy(model)
    graph = model.graph
    rng = np.random.default_rng(seed)
    inits = {t.name: t for t in graph.initializer}
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for n in graph.node:
        for k, i in enumerate(n.input):
            consumers.setdefault(i, []).append((n, k))
    producers = {o for n in graph.node if n.op_type != "ConstantOfShape" for o in n.output}

    def role(name: str) -> tuple[str, int, onnx.NodeProto | None]:
        users = consumers.get(name, [])
        if len(users) == 1 and users[0][0].op_type in ("Unsqueeze", "Reshape"):
            return role(users[0][0].output[0])
        return (users[0][0].op_type, users[0][1], users[0][0]) if users else ("", -1, None)

    def feeds_residual(node: onnx.NodeProto) -> bool:
        users = consumers.get(node.output[0], [])
        return len(users) == 1 and users[0][0].op_type in ("Add", "Sum") and all(
            i in producers for i in users[0][0].input)

    def draw(shape: tuple[int, ...], value: float, op: str, k: int, node: onnx.NodeProto | None) -> np.ndarray:
        normal = rng.standard_normal(shape).astype(np.float32)
        if op in ("Conv", "ConvTranspose") and k == 1 and len(shape) > 1:
            return normal * np.float32(math.sqrt(2.0 / int(np.prod(shape[1:]))))
        if op in ("Gemm", "MatMul") and k == 1 and len(shape) == 2:
            trans_b = any(a.name == "transB" and a.i for a in node.attribute) if node is not None else False
            return normal * np.float32(math.sqrt(2.0 / shape[1 if trans_b else 0]))
        if op == "BatchNormalization" and k == 1 and node is not None and feeds_residual(node):
            return 0.35 * (1.0 + 0.2 * normal)  # small residual branches, as zero-init-residual training leaves them
        if op == "BatchNormalization" and k == 1 or op == "Mul":
            return 1.0 + 0.2 * normal
        if op == "BatchNormalization" and k == 4:
            return (0.5 + rng.random(shape)).astype(np.float32)
        if op in ("BatchNormalization", "Conv", "ConvTranspose", "Gemm", "Add", "Sum"):
            return 0.1 * normal
        return np.full(shape, value, np.float32)  # unknown role: keep the stand-in value

    replaced: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.op_type != "ConstantOfShape" or node.input[0] not in inits:
            continue
        shape = tuple(int(d) for d in numpy_helper.to_array(inits[node.input[0]]))
        fill = next((numpy_helper.to_array(a.t) for a in node.attribute if a.name == "value"), np.zeros(1, np.float32))
        if fill.dtype != np.float32:
            continue
        op, k, user = role(node.output[0])
        array = draw(shape, float(fill.ravel()[0]), op, k, user).astype(np.float32)
        graph.initializer.append(numpy_helper.from_array(array, node.output[0]))
        if model.ir_version < 4:
            graph.input.append(helper.make_tensor_value_info(node.output[0], TensorProto.FLOAT, list(shape)))
        replaced.append(node)
    if not replaced:
        raise ValueError("randomize_light_weights: the model has no float ConstantOfShape weights")
    for node in replaced:
        graph.node.remove(node)
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    for t in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(t)
    for v in [v for v in graph.input if v.name not in used]:
        graph.input.remove(v)
    _scale_logits(model, rng)
    return model


_POSITIVELY_HOMOGENEOUS = ("Relu", "GlobalAveragePool", "AveragePool", "MaxPool", "Flatten", "Reshape", "Dropout",
                           "Identity", "Squeeze")


def _scale_logits(model: onnx.ModelProto, rng: np.random.Generator, target_std: float = 2.0) -> None:
    """Rescale the classifier before a final Softmax so its logits have std ``target_std`` on a random input.

    Random deep nets give logits whose scale depends exponentially on depth: the softmax is either uniform or
    one-hot, and fidelity metrics on it say nothing. Scaling the last Conv/Gemm by s > 0 scales the logits by s
    because everything between it and the Softmax (Relu, pooling, Flatten...) is positively homogeneous.
    """
    graph = model.graph
    producers = {o: n for n in graph.node for o in n.output}
    softmax = producers.get(graph.output[0].name)
    if softmax is None or softmax.op_type != "Softmax":
        return
    node = producers.get(softmax.input[0])
    while node is not None and node.op_type in _POSITIVELY_HOMOGENEOUS:
        node = producers.get(node.input[0])
    inits = {t.name: t for t in graph.initializer}
    if node is None or node.op_type not in ("Gemm", "Conv") or not all(i in inits for i in node.input[1:]):
        return
    feeds = {}
    for v in graph.input:
        if v.name not in inits:
            shape = [d.dim_value or 1 for d in v.type.tensor_type.shape.dim]
            feeds[v.name] = rng.standard_normal(shape).astype(np.float32)
    probe = copy.deepcopy(model)
    del probe.graph.output[:]
    probe.graph.output.append(helper.make_tensor_value_info(softmax.input[0], TensorProto.FLOAT, None))
    logits = next(iter(run(probe, feeds, threads=2).values()))
    std = float(logits.std())
    if not np.isfinite(std) or std == 0.0:
        return
    for name in node.input[1:]:
        t = inits[name]
        t.CopyFrom(numpy_helper.from_array((numpy_helper.to_array(t) * (target_std / std)).astype(np.float32), name))


# --------------------------------------------------------------------------------------------------------------
# zero_channels: for exactness tests
# --------------------------------------------------------------------------------------------------------------
class _Tensors:
    """Finds a weight tensor behind a node input (initializer, Identity on an initializer, or Constant node)."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.graph = model.graph
        self.inits = {t.name: t for t in model.graph.initializer}
        self.producers = {o: n for n in model.graph.node for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in model.graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)

    def proto(self, name: str) -> TensorProto | None:
        if name in self.inits:
            return self.inits[name]
        node = self.producers.get(name)
        if node is not None and node.op_type == "Identity":
            return self.proto(node.input[0])
        if node is not None and node.op_type == "Constant":
            return next((a.t for a in node.attribute if a.name == "value"), None)
        return None

    def edit(self, name: str, fn: Callable[[np.ndarray], None], what: str) -> None:
        t = self.proto(name)
        if t is None:
            raise ValueError(f"zero_channels: {what} {name!r} is not a constant (initializer/Identity/Constant)")
        array = numpy_helper.to_array(t).copy()
        fn(array)
        t.CopyFrom(numpy_helper.from_array(array, t.name))

    def only_consumer(self, tensor: str, op: str) -> onnx.NodeProto | None:
        users = self.consumers.get(tensor, [])
        return users[0] if len(users) == 1 and users[0].op_type == op else None


def zero_channels(model: onnx.ModelProto, node_name: str, channels: Sequence[int] | None = None) -> onnx.ModelProto:
    """Return a copy of ``model`` whose producer ``node_name`` outputs exactly 0 on ``channels`` (None: all).

    Supported producers: Conv (weight rows, bias), ConvTranspose with group 1 (weight columns, bias), Gemm (B rows
    or columns per ``transB``, bias C when per-feature) and MatMul (last weight axis) followed by a bias Add.
    If the producer's only consumer is a BatchNormalization, its ``running_mean`` and ``bias`` (beta) entries are
    zeroed too, so the channel is still exactly 0 after BN (and after any activation with f(0) = 0, like ReLU).
    Pruning such channels must leave the model's outputs unchanged (to float rounding), which is what the
    exactness tests assert; channels coupled by a residual Add must be zeroed in every producer of the group.
    Zeroing *every* channel of a residual branch's last producer (``block1.conv3``, ``block1.project``,
    ``block0.fc2``...) turns the block into ``y = x``: removing that block (depth pruning) must change nothing.

    Raises:
        ValueError: unknown node, unsupported op, a channel out of range, or a weight that is not a constant.

    Example:
        >>> m = zero_channels(build_vgg(), "conv3", [0, 5])
    """
    model = copy.deepcopy(model)
    idx: np.ndarray | slice = (
        slice(None) if channels is None else np.asarray(sorted(set(int(c) for c in channels)), dtype=np.int64)
    )
    tensors = _Tensors(model)
    node = next((n for n in model.graph.node if n.name == node_name), None)
    if node is None:
        raise ValueError(f"zero_channels: no node named {node_name!r}")
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    out = node.output[0]

    def check(size: int) -> None:
        if isinstance(idx, np.ndarray) and idx.size and not (0 <= idx[0] and idx[-1] < size):
            raise ValueError(f"zero_channels: channels {idx.tolist()} out of range for {node_name!r} ({size} channels)")

    def zero_rows(a: np.ndarray) -> None:
        check(a.shape[0])
        a[idx] = 0

    def zero_cols(a: np.ndarray) -> None:
        check(a.shape[-1])
        a[..., idx] = 0

    def zero_axis1(a: np.ndarray) -> None:
        check(a.shape[1])
        a[:, idx] = 0

    if node.op_type == "Conv":
        tensors.edit(node.input[1], zero_rows, "Conv weight")
        if len(node.input) > 2 and node.input[2]:
            tensors.edit(node.input[2], zero_rows, "Conv bias")
    elif node.op_type == "ConvTranspose":
        if attrs.get("group", 1) != 1:
            raise ValueError(f"zero_channels: ConvTranspose {node_name!r} with group > 1 is not supported")
        tensors.edit(node.input[1], zero_axis1, "ConvTranspose weight")
        if len(node.input) > 2 and node.input[2]:
            tensors.edit(node.input[2], zero_rows, "ConvTranspose bias")
    elif node.op_type == "Gemm":
        tensors.edit(node.input[1], zero_rows if attrs.get("transB", 0) else zero_cols, "Gemm weight")
        if len(node.input) > 2 and node.input[2]:
            bias = tensors.proto(node.input[2])
            if bias is not None and bias.dims and bias.dims[-1] > 1:
                tensors.edit(node.input[2], zero_cols, "Gemm bias")
    elif node.op_type == "MatMul":
        tensors.edit(node.input[1], zero_cols, "MatMul weight")
        add = tensors.only_consumer(out, "Add")
        if add is not None:
            other = add.input[1] if add.input[0] == out else add.input[0]
            if tensors.proto(other) is not None:
                tensors.edit(other, zero_cols, "bias of the Add after MatMul")
                out = add.output[0]
    else:
        raise ValueError(f"zero_channels: {node.op_type} node {node_name!r} is not a supported producer")

    bn = tensors.only_consumer(out, "BatchNormalization")
    if bn is not None:
        tensors.edit(bn.input[2], zero_rows, "BatchNormalization bias")
        tensors.edit(bn.input[3], zero_rows, "BatchNormalization mean")
    return model


def zero_head(model: onnx.ModelProto, block: str, head: int, heads: int) -> onnx.ModelProto:
    """Return a copy of a transformer zoo model in which attention head ``head`` of ``block`` contributes nothing.

    Zeroing the head's V projection columns (weights and bias) makes its context exactly 0, so the output
    projection sees nothing from it whatever its attention weights are; removing the head (its Q/K/V columns, its
    output-projection rows, and ``heads`` in the Reshape constants) must then leave the outputs unchanged.

    Example:
        >>> m = zero_head(build_transformer_block(), "block0", head=1, heads=2)
    """
    v = next((n for n in model.graph.node if n.name == f"{block}.v"), None)
    if v is None:
        raise ValueError(f"zero_head: no V projection named {block}.v")
    w = next(t for t in model.graph.initializer if t.name == v.input[1])
    dim = w.dims[-1]
    if dim % heads or not 0 <= head < heads:
        raise ValueError(f"zero_head: head {head} of {heads} does not fit V width {dim}")
    hd = dim // heads
    return zero_channels(model, f"{block}.v", range(head * hd, (head + 1) * hd))
