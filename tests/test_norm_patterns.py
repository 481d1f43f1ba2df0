"""Graph patterns of issue 11 item 5 that used to block pruning, each on a graph built in code.

GroupNorm exported as InstanceNormalization (PoolFormer), GRN (ConvNeXt-V2), Einsum dense layers and a
decomposed channels-last LayerNorm (tf2onnx/Keras), and which residual Adds are depth blocks. Every test
checks what the analysis says and what the cut does: exact when the removed channels were zeroed, or
close where the cut is stated to be approximate.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

from onnxprune.commands._output import render_analysis
from onnxprune.io.shapes import static_shapes
from onnxprune.pipeline import analyze, prune
from onnxprune.report import render_table
from onnxprune.spec import PruneSpec
from onnxprune.transform.depth import find_residual_blocks
from tests.models import _Graph, random_inputs, run
from tests.test_groups import _analysis, _group_of, _save, zero_channels_everywhere

C, G = 8, 4


def _prune_zeroed(model: onnx.ModelProto, tmp_path: Path) -> tuple[onnx.ModelProto, onnx.ModelProto, dict, int]:
    """Zero half of every prunable group's channels, prune at 0.5 by l2 (which picks exactly those)."""
    zeroed, n = zero_channels_everywhere(model, 0.5, seed=1)
    result = prune(_save(zeroed, tmp_path), tmp_path / "out.onnx", PruneSpec(ratio=0.5, criterion="l2", device="cpu"))
    return zeroed, onnx.load(result.output_path), result.report, n


def _assert_same(a: onnx.ModelProto, b: onnx.ModelProto, batch: int = 2) -> None:
    feeds = random_inputs(a, batch=batch, seed=3)
    np.testing.assert_allclose(run(b, feeds)["output"], run(a, feeds)["output"], atol=1e-4, rtol=1e-4)


# --- 1. GroupNorm as InstanceNormalization --------------------------------------------------------------------


def build_group_norm() -> onnx.ModelProto:
    """conv1(3->8) → GroupNorm(4, 8) as torch exports it → Relu → conv2(8->8) → head. Input [2, 3, 8, 8].

    GroupNorm: Reshape [0, G, -1] → InstanceNormalization(ones(G), zeros(G)) → Reshape(Shape(x)) → Mul γ → Add β.
    """
    g = _Graph("group_norm", 0, 17)
    x = g.conv("input", 3, C, name="conv1")
    r = g.node("Reshape", [x, g.const("gn.shape", np.array([0, G, -1], np.int64))], name="gn.reshape")
    inorm = g.node("InstanceNormalization", [r, g.const("gn.ones", np.ones(G, np.float32)),
                                             g.const("gn.zeros", np.zeros(G, np.float32))], name="gn.norm", epsilon=1e-5)
    back = g.node("Reshape", [inorm, g.node("Shape", [x], name="gn.shape_of")], name="gn.back")
    y = g.node("Mul", [back, g.const("gn.gamma", 1 + g.small([C, 1, 1]))], name="gn.mul")
    y = g.node("Relu", [g.node("Add", [y, g.const("gn.beta", g.small([C, 1, 1]))], name="gn.add")])
    y = g.node("Relu", [g.conv(y, C, C, name="conv2")])
    return g.finish(g.head(y, C), [2, 3, 8, 8])


def test_group_norm_prunes_whole_groups_exactly(tmp_path: Path) -> None:
    model = build_group_norm()
    _, a = _analysis(model)
    g = _group_of(a, "conv1")
    assert g.size == G and g.prunable == G and not g.approximate  # a class per GroupNorm group
    members = {s.node for s in a.sites if s.tensor.startswith("gn.")}
    assert {"gn.norm", "gn.mul", "gn.add"} <= members
    zeroed, pruned, report, n = _prune_zeroed(model, tmp_path)
    assert n > 0 and sum(x["channels"] - x["kept"] for x in report["groups"]) == n
    weights = {t.name: list(t.dims) for t in pruned.graph.initializer}
    assert weights["conv1.weight"][0] == C // 2 and weights["gn.ones"] == [G // 2]
    reshape = next(nd for nd in pruned.graph.node if nd.name == "gn.reshape")
    target = next(t for t in pruned.graph.initializer if t.name == reshape.input[1])
    assert onnx.numpy_helper.to_array(target).tolist() == [0, G // 2, -1]
    _assert_same(zeroed, pruned)


def _group_norm_1(g: _Graph, x: str, c: int, *, name: str) -> str:
    """timm's GroupNorm1 (PoolFormer) as torch exports it: Reshape [0, 1, -1] → InstanceNormalization → back."""
    r = g.node("Reshape", [x, g.const("gn1.shape", np.array([0, 1, -1], np.int64))], name=f"{name}.reshape")
    inorm = g.node("InstanceNormalization", [r, g.const("gn1.one", np.ones(1, np.float32)),
                                             g.const("gn1.zero", np.zeros(1, np.float32))], name=name, epsilon=1e-5)
    back = g.node("Reshape", [inorm, g.node("Shape", [x])], name=f"{name}.back")
    y = g.node("Mul", [back, g.const(f"{name}.gamma", 1 + g.small([c, 1, 1]))])
    return g.node("Add", [y, g.const(f"{name}.beta", g.small([c, 1, 1]))])


def build_poolformer(layer_scale: float = 0.1, batch: int = 2) -> onnx.ModelProto:
    """stem(3->8) → x + ls·(AvgPool(GN1(x)) − GN1(x)) → x + ls·fc2(GELU(fc1(GN1(x)))) → head; input [batch, 3, 8, 8]."""
    g = _Graph("poolformer", 0, 17)
    x = g.conv("input", 3, C, name="stem")
    y = _group_norm_1(g, x, C, name="norm1")
    pooled = g.node("AveragePool", [y], kernel_shape=[3, 3], pads=[1, 1, 1, 1], count_include_pad=0)
    mixed = g.node("Mul", [g.node("Sub", [pooled, y]), g.const("ls1", np.full([C, 1, 1], layer_scale, np.float32))])
    x = g.node("Add", [x, mixed], name="block.add1")
    y = g.gelu(g.conv(_group_norm_1(g, x, C, name="norm2"), C, 2 * C, 1, name="fc1"))
    y = g.node("Mul", [g.conv(y, 2 * C, C, 1, name="fc2"), g.const("ls2", np.full([C, 1, 1], layer_scale, np.float32))])
    x = g.node("Add", [x, y], name="block.add2")
    return g.finish(g.head(x, C), [batch, 3, 8, 8])


@pytest.mark.parametrize("batch", [1, 2])
def test_group_norm_with_one_group_is_an_approximate_cut(batch: int, tmp_path: Path) -> None:
    """GroupNorm(1, C) (PoolFormer) normalises over every channel: the stream is prunable, approximately."""
    model = build_poolformer(batch=batch)
    _, a = _analysis(model)
    stream, hidden = _group_of(a, "stem"), _group_of(a, "fc1")
    assert "fc2" in stream.producers and stream.prunable == C
    assert any("norm1" in r and "InstanceNormalization" in r for r in stream.approximate)
    assert hidden.prunable == 2 * C and not hidden.approximate
    zeroed, pruned, report, n = _prune_zeroed(model, tmp_path)
    assert n == C // 2 + C and {x["kept"] for x in report["groups"] if x["prunable"]} == {C // 2, C}
    feeds = random_inputs(model, batch=batch, seed=3)
    before, after = run(zeroed, feeds)["output"], run(pruned, feeds)["output"]
    err = np.linalg.norm(after - before) / np.linalg.norm(before)
    assert 1e-6 < err < 0.1


# --- 2. GRN: a normalisation over the channel axis, cut approximately --------------------------------------------


def build_grn(gamma_scale: float = 0.05) -> onnx.ModelProto:
    """ConvNeXt-V2 MLP, channels last: up(8->16) → Relu → GRN → down(16->8); input [N, 4, 4, 8].

    GRN: Gx = ReduceL2(x, [1, 2]); Nx = Gx / (ReduceMean(Gx, -1) + eps); out = γ·(x·Nx) + β + x.
    """
    g = _Graph("grn", 0, 17)
    x = g.node("Relu", [g.linear("input", 8, 16, name="up")])
    gx = g.reduce("ReduceL2", x, [1, 2], keepdims=1, name="grn.l2")
    mean = g.reduce("ReduceMean", gx, [-1], keepdims=1, name="grn.mean")
    nx = g.node("Div", [gx, g.node("Add", [mean, g.const("grn.eps", np.float32(1e-6))])], name="grn.div")
    y = g.node("Mul", [g.node("Mul", [x, nx]), g.const("grn.gamma", g.small([1, 1, 1, 16], gamma_scale))])
    y = g.node("Add", [g.node("Add", [y, g.const("grn.beta", g.small([1, 1, 1, 16], gamma_scale))]), x], name="grn")
    return g.finish(g.linear(y, 16, 8, name="down"), ["N", 4, 4, 8])


def test_grn_is_an_approximate_cut_stated_in_the_report(tmp_path: Path) -> None:
    model = build_grn()
    _, a = _analysis(model)
    g = _group_of(a, "up")
    assert g.prunable == 16 and any("grn.mean" in r and "channel axis" in r for r in g.approximate)
    assert _group_of(a, "down").prunable == 0  # reaches the graph output
    listed = analyze(_save(model, tmp_path))
    assert next(x for x in listed["groups"] if "up" in x["producers"])["approximate"]
    assert "approximate: ReduceMean grn.mean" in render_analysis({**listed, "model": "grn.onnx"})
    zeroed, pruned, report, n = _prune_zeroed(model, tmp_path)
    cut = next(x for x in report["groups"] if "up" in x["producers"])
    assert cut["kept"] == 8 and cut["approximate"]
    assert "approximate cut: group" in render_table(report)
    feeds = random_inputs(model, batch=3, seed=3)
    before, after = run(zeroed, feeds)["output"], run(pruned, feeds)["output"]
    err = np.linalg.norm(after - before) / np.linalg.norm(before)
    assert 1e-6 < err < 0.05  # the channel mean changed (not exact), by little (small γ, as GRN trains it)


def test_cbam_style_channel_mean_into_a_conv_still_blocks() -> None:
    """A mean over the channels that feeds a Conv (not a normalisation of its source) is not approximated."""
    g = _Graph("cbam", 0, 17)
    x = g.node("Relu", [g.conv("input", 3, C, name="conv1")])
    att = g.node("Sigmoid", [g.conv(g.reduce("ReduceMean", x, [1], keepdims=1, name="cmean"), 1, 1, name="sconv")])
    y = g.node("Mul", [x, att])
    _, a = _analysis(g.finish(g.head(y, C), ["N", 3, 8, 8]))
    g1 = _group_of(a, "conv1")
    assert g1.prunable == 0 and "cmean" in g1.blocked_reason


# --- 3./4. Einsum dense layers and a decomposed channels-last LayerNorm (tf2onnx) ------------------------------


def _einsum_dense(g: _Graph, x: str, fin: int, fout: int, *, name: str, equation: str = "...i,ij->...j") -> str:
    w = g.const(f"{name}.kernel", g.he([fin, fout], fin))
    y = g.node("Einsum", [x, w], name=name, equation=equation)
    return g.node("Add", [y, g.const(f"{name}.bias", g.small([fout]))], name=f"{name}.bias_add")


def _layer_norm(g: _Graph, x: str, d: int, *, style: str) -> str:
    """LayerNorm over the last axis, decomposed as exporters write it.

    ``mean``: ReduceMean, Pow, Div. ``sum``: ReduceSum · 1/n, the difference times itself, Reciprocal · Mul.
    ``flax`` (jax2tf): var = mean(x²) − mean(x)². ``keras``: γ folded into the inverse std,
    ``x·inv + (β − mean·inv)``.
    """
    def mean(t: str, name: str) -> str:
        if style == "mean":
            return g.reduce("ReduceMean", t, [-1], keepdims=1, name=name)
        total = g.node("ReduceSum", [t, g.const("last", np.array([-1], np.int64))], name=name, keepdims=1)
        return g.node("Mul", [total, g.const("inv_n", np.float32(1.0 / d))])

    def inv_std(var: str) -> str:
        return g.node("Reciprocal", [g.node("Sqrt", [g.node("Add", [var, g.const("ln.eps", np.float32(1e-5))])])])

    gamma, beta = g.const("ln.gamma", 1 + g.small([d])), g.const("ln.beta", g.small([d]))
    mu = mean(x, "ln.mean")
    diff = g.node("Sub", [x, mu])
    if style == "mean":
        var = mean(g.node("Pow", [diff, g.const("two", np.float32(2.0))]), "ln.var")
        std = g.node("Sqrt", [g.node("Add", [var, g.const("ln.eps", np.float32(1e-5))])])
        return g.node("Add", [g.node("Mul", [g.node("Div", [diff, std]), gamma]), beta])
    if style == "flax":
        var = g.node("Sub", [mean(g.node("Mul", [x, x]), "ln.var"), g.node("Mul", [mu, mu])])
        var = g.node("Max", [var, g.const("zero_f", np.float32(0.0))])
    else:
        var = mean(g.node("Mul", [diff, diff]), "ln.var")
    if style == "keras":
        scale = g.node("Mul", [inv_std(var), gamma])
        return g.node("Add", [g.node("Mul", [x, scale]), g.node("Sub", [beta, g.node("Mul", [mu, scale])])])
    return g.node("Add", [g.node("Mul", [g.node("Mul", [diff, inv_std(var)]), gamma]), beta])


def _tanh_gelu(g: _Graph, x: str) -> str:
    """0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))): tf2onnx's form of Keras' approximate GELU."""
    cube = g.node("Pow", [x, g.const("three", np.float32(3.0))])
    inner = g.node("Add", [x, g.node("Mul", [cube, g.const("c", np.float32(0.044715))])], name="gelu.inner_add")
    t = g.node("Tanh", [g.node("Mul", [inner, g.const("k", np.float32(math.sqrt(2 / math.pi)))])])
    one_plus = g.node("Add", [t, g.const("one", np.float32(1.0))])
    return g.node("Mul", [g.node("Mul", [x, one_plus]), g.const("half", np.float32(0.5))])


def build_tf2onnx_block(style: str = "mean", equation: str = "...i,ij->...j") -> onnx.ModelProto:
    """x → LN(decomposed) → Einsum dense up(8->32) → tanh-GELU → Einsum dense down(32->8) → Add x; input [N, 5, 8]."""
    g = _Graph("tf2onnx_block", 0, 17)
    h = _layer_norm(g, "input", 8, style=style)
    h = _tanh_gelu(g, _einsum_dense(g, h, 8, 32, name="dense_up", equation=equation))
    h = _einsum_dense(g, h, 32, 8, name="dense_down", equation=equation)
    return g.finish(g.node("Add", [h, "input"], name="residual"), ["N", 5, 8])


@pytest.mark.parametrize(("style", "equation"), [
    ("mean", "...i,ij->...j"), ("sum", "abc,cd->abd"), ("flax", "...i,ij->...j"), ("keras", "abc,cd->abd")])
def test_tf2onnx_block_prunes_its_mlp_width_exactly(style: str, equation: str, tmp_path: Path) -> None:
    model = build_tf2onnx_block(style, equation)
    _, a = _analysis(model)
    up = _group_of(a, "dense_up")
    assert up.size == 32 and up.prunable == 32 and not up.approximate
    assert "dense_down" in up.members and "dense_up" not in _group_of(a, "dense_down").producers
    zeroed, pruned, report, n = _prune_zeroed(model, tmp_path)
    assert n == 16 and sum(x["channels"] - x["kept"] for x in report["groups"]) == n
    kernels = {t.name: list(t.dims) for t in pruned.graph.initializer if t.name.endswith("kernel")}
    assert kernels == {"dense_up.kernel": [8, 16], "dense_down.kernel": [16, 8]}
    _assert_same(zeroed, pruned, batch=3)
    assert (report["original"]["macs"], report["pruned"]["macs"]) == (5 * (8 * 32 + 32 * 8), 5 * (8 * 16 + 16 * 8))


@pytest.mark.parametrize("style", ["mean", "sum", "flax", "keras"])
def test_decomposed_layer_norm_on_a_prunable_width_is_approximate(style: str) -> None:
    """A decomposed LayerNorm over channels that are prunable (not the graph's input) marks them approximate."""
    g = _Graph("ln_width", 0, 17)
    h = _layer_norm(g, _einsum_dense(g, "input", 8, 16, name="dense1"), 16, style=style)
    model = g.finish(_einsum_dense(g, h, 16, 4, name="dense2"), ["N", 8])
    _, a = _analysis(model)
    grp = _group_of(a, "dense1")
    assert grp.prunable == 16 and any("ln.mean" in r for r in grp.approximate)


@pytest.mark.parametrize(("equation", "ranks", "weight", "expected"), [
    ("...i,ij->...j", (3, 2, 3), 1, (0, 2, 0, 1, 2)), ("abc,cd->abd", (3, 2, 3), 1, (0, 2, 0, 1, 2)),
    ("ji,...i->...j", (2, 2, 2), 0, (1, 1, 1, 0, 1)), ("bij,jk->bik", (3, 2, 3), 1, (0, 2, 0, 1, 2)),
    ("abc,dc->abd", (3, 2, 3), 1, (0, 2, 1, 0, 2)), ("abc,cde->abde", (3, 3, 4), 1, None),
    ("abc,cd->ad", (3, 2, 2), 1, None), ("ab,bc,cd->ad", (2, 2, 2), 1, None), ("aa,ab->b", (2, 2, 1), 1, None),
])
def test_dense_einsum_reads_the_axes(equation: str, ranks: tuple[int, int, int], weight: int,
                                     expected: tuple[int, ...] | None) -> None:
    """(data input, its contracted axis, weight rows axis, weight columns axis, output axis), or not a dense layer."""
    from dataclasses import astuple

    from onnxprune.analysis.rules.einsum import dense_einsum

    found = dense_einsum(equation, ranks[:2], weight, ranks[2])
    assert (astuple(found) if found else None) == expected


@pytest.mark.parametrize("equation", ["abc,cde->abde", "ab,bc,cd->ad", "abc,abd->acd", "bij,bjk->bik"])
def test_einsum_that_is_not_a_dense_layer_blocks_naming_the_equation(equation: str) -> None:
    g = _Graph("einsum_other", 0, 17)
    x = _einsum_dense(g, "input", 8, 6, name="dense1")
    lhs = equation.split("->")[0].split(",")
    if len(lhs) == 3:
        out = g.node("Einsum", [x, g.const("w1", g.small([6, 6])), g.const("w2", g.small([6, 3]))], equation=equation)
    elif equation == "abc,cde->abde":
        out = g.node("Einsum", [x, g.const("w", g.small([6, 2, 3]))], equation=equation)
    elif equation == "abc,abd->acd":
        out = g.node("Einsum", [x, x], equation=equation)
    else:
        out = g.node("Einsum", [x, g.node("Transpose", [x], perm=[0, 2, 1])], equation=equation)
    _, a = _analysis(g.finish(out, [2, 5, 8] if len(lhs) != 3 else [2, 8]))
    blocked = _group_of(a, "dense1")
    assert blocked.prunable == 0 and equation in blocked.blocked_reason


# --- 5. a depth block holds a weighted layer ------------------------------------------------------------------


def test_weightless_residual_add_is_not_a_depth_block(tmp_path: Path) -> None:
    model = build_tf2onnx_block()
    blocks = find_residual_blocks(gs.import_onnx(model), static_shapes(model, None))
    assert [b.add for b in blocks] == ["residual"] and blocks[0].kind == "mlp"
    listed = analyze(_save(model, tmp_path))["removable_blocks"]
    assert [b["add"] for b in listed] == ["residual"]  # not gelu.inner_add (x + 0.044715·x³)


# --- 6. Pad with runtime pads (Swin window padding) ------------------------------------------------------------


def build_window_pad(pad_channels: bool = False, window: int = 4) -> onnx.ModelProto:
    """Channels last: dense(8->16) → Relu → pad H, W up to a multiple of ``window`` with pads computed from Shape,
    in torch's order and through its reversal chain (Reshape [-1, 2], reversed Slice, Transpose, Reshape [-1])
    → mean over H, W → dense(16->10). Input [N, 7, 7, 8]. ``pad_channels`` pads the channel axis by pad_h too."""
    g = _Graph("window_pad", 0, 17)
    x = g.node("Relu", [g.linear("input", 8, 16, name="dense1")])
    shape = g.node("Shape", [x])

    def pad_of(axis: int) -> str:
        dim = g.node("Gather", [shape, g.const("axis", np.array(axis, np.int64))], axis=0)
        w = g.const("window", np.array(window, np.int64))
        amount = g.node("Mod", [g.node("Sub", [w, g.node("Mod", [dim, w])]), w])
        return g.node("Unsqueeze", [amount, g.const("zero_axis", np.array([0], np.int64))])

    zero = g.const("zero", np.array([0], np.int64))
    pad_h, pad_w = pad_of(1), pad_of(2)
    torch_order = g.node("Concat", [zero, pad_h if pad_channels else zero, zero, pad_w, zero, pad_h], axis=0)
    full = g.node("Concat", [torch_order, g.const("batch_pads", np.zeros(2, np.int64))], axis=0)
    pairs = g.node("Reshape", [full, g.const("pairs", np.array([-1, 2], np.int64))])
    reverse = g.node("Slice", [pairs, g.const("s", np.array([-1], np.int64)), g.const("e", np.array([-9999], np.int64)),
                               g.const("a", np.array([0], np.int64)), g.const("st", np.array([-1], np.int64))])
    pads = g.node("Reshape", [g.node("Transpose", [reverse], perm=[1, 0]), g.const("flat", np.array([-1], np.int64))])
    padded = g.node("Pad", [x, pads], name="window_pad")
    pooled = g.reduce("ReduceMean", padded, [1, 2], keepdims=0)
    return g.finish(g.linear(pooled, 16, 10, name="dense2"), ["N", 7, 7, 8])


def test_runtime_window_padding_of_spatial_dims_does_not_block(tmp_path: Path) -> None:
    model = build_window_pad()
    _, a = _analysis(model)
    assert _group_of(a, "dense1").prunable == 16
    zeroed, pruned, report, n = _prune_zeroed(model, tmp_path)
    assert n == 8 and sum(x["channels"] - x["kept"] for x in report["groups"]) == n
    _assert_same(zeroed, pruned, batch=3)


def test_runtime_padding_of_the_channel_axis_blocks() -> None:
    _, a = _analysis(build_window_pad(pad_channels=True))
    blocked = _group_of(a, "dense1")
    assert blocked.prunable == 0 and "window_pad pads the channel axis" in blocked.blocked_reason


# --- the same patterns as torch.onnx writes them -----------------------------------------------------------------


def _torch_pattern(torch, name: str):  # noqa: ANN001, ANN202
    """A GroupNorm(4)/GroupNorm(1) conv net or a ConvNeXt-V2 MLP with GRN, and its example input."""
    nn = torch.nn

    class ConvGN(nn.Module):
        def __init__(self, groups: int) -> None:
            super().__init__()
            self.c1, self.gn = nn.Conv2d(3, C, 3, padding=1), nn.GroupNorm(groups, C)
            self.c2, self.fc = nn.Conv2d(C, C, 3, padding=1), nn.Linear(C, 10)

        def forward(self, x):  # noqa: ANN001, ANN202
            return self.fc(self.c2(torch.relu(self.gn(self.c1(x)))).mean((2, 3)))

    class GrnMlp(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up, self.down = nn.Linear(8, 16), nn.Linear(16, 8)
            self.gamma, self.beta = nn.Parameter(0.05 * torch.randn(16)), nn.Parameter(0.05 * torch.randn(16))

        def forward(self, x):  # noqa: ANN001, ANN202
            x = torch.nn.functional.gelu(self.up(x))
            gx = torch.norm(x, p=2, dim=(1, 2), keepdim=True)
            return self.down(self.gamma * (x * (gx / (gx.mean(dim=-1, keepdim=True) + 1e-6))) + self.beta + x)

    torch.manual_seed(0)
    if name == "grn":
        return GrnMlp().eval(), torch.randn(2, 4, 4, 8)
    return ConvGN(G if name == "gn4" else 1).eval(), torch.randn(2, 3, 8, 8)


@pytest.mark.parametrize("dynamo", [False, pytest.param(True, marks=pytest.mark.slow)])
@pytest.mark.parametrize(("name", "classes", "approximate"), [("gn4", G, False), ("gn1", C, True), ("grn", 16, True)])
def test_torch_exports_of_the_norm_patterns(name: str, classes: int, approximate: bool, dynamo: bool,
                                             tmp_path: Path) -> None:
    """GroupNorm and GRN as both torch exporters write them, batch symbolic and no --shape: prunable as built above."""
    torch = pytest.importorskip("torch")
    module, x = _torch_pattern(torch, name)
    path = tmp_path / f"{name}.onnx"
    torch.onnx.export(module, (x,), str(path), input_names=["input"], output_names=["output"], opset_version=18,
                      dynamo=dynamo, dynamic_axes=None if dynamo else {"input": {0: "N"}},
                      dynamic_shapes=({0: torch.export.Dim("N")},) if dynamo else None)
    first = next(n.name for n in onnx.load(path).graph.node if n.op_type in ("Conv", "MatMul"))
    group = next(g for g in analyze(path)["groups"] if first in g["producers"])
    assert group["channels"] == group["prunable"] == classes and bool(group["approximate"]) == approximate
