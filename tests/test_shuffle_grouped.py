"""Channel shuffle (ShuffleNet V1/V2), grouped convolution and grouped ConvTranspose.

A grouped conv stays valid only if every group loses the same number of channels, so the analysis
couples channel ``j`` of every group (one class = one channel per group) and the group count stays.
A shuffle (Reshape [N, g, C/g, ..] → Transpose → Reshape) puts the ids on the C/g axis, coupling what it
interleaves; the Reshape targets get the kept count. Exactness: zeroed channels removed → same outputs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxprune.pipeline import prune
from onnxprune.spec import PruneSpec
from tests.models import _Graph, build_grouped_conv, build_shufflenet, random_inputs, run
from tests.test_groups import _analysis, _group_of, _params, _save, zero_channels_everywhere


def build_shufflenet_v1(*, seed: int = 0, groups: int = 4, units: int = 2) -> onnx.ModelProto:
    """ShuffleNet V1 units on [N, 3, 8, 8]: grouped 1x1 (32->32, g) - shuffle - depthwise 3x3 - grouped 1x1
    (32->32, g) + identity Add; ``stem`` conv(3->32); head GAP -> fc."""
    g = _Graph("shufflenet_v1", seed, 17)
    c = 32
    x = g.conv_bn_act("input", 3, c, 3, name="stem")
    for i in range(1, units + 1):
        p = f"unit{i}"
        y = g.conv_bn_act(x, c, c, 1, name=f"{p}.gconv1", group=groups)
        y = g.node("Reshape", [y, g.const("shuffle1", np.array([0, groups, c // groups, 8, 8], np.int64))])
        y = g.node("Transpose", [y], perm=[0, 2, 1, 3, 4])
        y = g.node("Reshape", [y, g.const("shuffle2", np.array([0, c, 8, 8], np.int64))])
        y = g.conv_bn_act(y, c, c, 3, name=f"{p}.dw", group=c, act=None)
        y = g.conv_bn_act(y, c, c, 1, name=f"{p}.gconv2", group=groups, act=None)
        x = g.node("Relu", [g.node("Add", [x, y], name=f"{p}.add")])
    return g.finish(g.head(x, c), ["N", 3, 8, 8])


def build_grouped_conv_transpose(*, seed: int = 0, groups: int = 2) -> onnx.ModelProto:
    """conv(3->8, s2) - ConvTranspose(8->12, group=``groups``, k2 s2) + bias - BN - Relu - conv(12->16) - head."""
    g = _Graph("grouped_conv_transpose", seed, 17)
    x = g.conv_bn_act("input", 3, 8, name="down", stride=2)
    w = g.const("up.weight", g.he([8, 12 // groups, 2, 2], 8))
    x = g.node("ConvTranspose", [x, w, g.const("up.bias", g.small([12]))], name="up", kernel_shape=[2, 2],
               strides=[2, 2], group=groups)
    x = g.node("Relu", [g.bn(x, 12, name="up.bn")])
    x = g.conv_bn_act(x, 12, 16, name="conv2")
    return g.finish(g.head(x, 16), ["N", 3, 8, 8])


MODELS = {
    "shufflenet": build_shufflenet,
    "shufflenet[slice]": lambda: build_shufflenet(split="slice"),
    "shufflenet_v1": build_shufflenet_v1,
    "shufflenet_v1[g2]": lambda: build_shufflenet_v1(groups=2),
    "grouped_conv": build_grouped_conv,
    "grouped_conv[g2]": lambda: build_grouped_conv(groups=2),
    "grouped_conv_transpose": build_grouped_conv_transpose,
}


def _attr(node: onnx.NodeProto, name: str) -> object:
    return next(onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name)


def _init(model: onnx.ModelProto, name: str) -> np.ndarray:
    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_prunes_to_valid_smaller_model(name: str, tmp_path: Path) -> None:
    model = MODELS[name]()
    result = prune(_save(model, tmp_path), tmp_path / "out.onnx", PruneSpec(ratio=0.5, device="cpu"))
    pruned = onnx.load(result.output_path)
    onnx.checker.check_model(onnx.shape_inference.infer_shapes(pruned), full_check=True)
    feeds = random_inputs(model, batch=3)
    assert run(pruned, feeds)["output"].shape == run(model, feeds)["output"].shape
    assert _params(pruned) < 0.75 * _params(model)
    assert result.report["pruned"]["macs"] < result.report["original"]["macs"]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_exactness_zeroed_channels_removed_without_output_change(name: str, tmp_path: Path) -> None:
    zeroed, n = zero_channels_everywhere(MODELS[name](), 0.5, seed=1)
    assert n > 0
    result = prune(_save(zeroed, tmp_path), tmp_path / "out.onnx", PruneSpec(ratio=0.5, device="cpu"))
    assert sum(g["channels"] - g["kept"] for g in result.report["groups"]) == n
    feeds = random_inputs(zeroed, batch=4, seed=3)
    before, after = run(zeroed, feeds), run(onnx.load(result.output_path), feeds)
    np.testing.assert_allclose(after["output"], before["output"], atol=1e-4, rtol=1e-4)


def test_grouped_conv_keeps_its_groups_and_loses_the_same_count_in_each(tmp_path: Path) -> None:
    model = build_grouped_conv(groups=4)
    _, a = _analysis(model)
    assert _group_of(a, "gconv").size == 4  # 16 outputs = 4 per group, coupled across the groups
    assert _group_of(a, "conv1").size == 4  # its input: channel j of every group together
    result = prune(_save(model, tmp_path), tmp_path / "out.onnx", PruneSpec(ratio=0.5, device="cpu"))
    pruned = onnx.load(result.output_path)
    gconv = next(n for n in pruned.graph.node if n.name == "gconv")
    assert _attr(gconv, "group") == 4
    assert list(_init(pruned, "gconv.weight").shape[:2]) == [8, 2]  # 2 outputs and 2 inputs per group


def test_shuffle_v2_couples_the_passthrough_half_with_the_branch() -> None:
    _, a = _analysis(build_shufflenet())
    g = _group_of(a, "stem")
    assert {"unit1.pw2", "unit2.pw2"} <= set(g.producers)
    # the Split half feeding pw1 holds only part of the group: one of its channels is kept so it never empties
    assert g.size - 3 <= g.prunable < g.size and any("never emptied" in r for r in g.reasons)
    assert not [grp for grp in a.groups if grp.prunable == 0 and "graph output" not in (grp.blocked_reason or "")]


def test_shuffle_v1_reshape_targets_follow_the_kept_count(tmp_path: Path) -> None:
    model = build_shufflenet_v1(groups=4)
    result = prune(_save(model, tmp_path), tmp_path / "out.onnx", PruneSpec(ratio=0.5, device="cpu"))
    pruned = onnx.load(result.output_path)
    conv = next(n for n in pruned.graph.node if n.name == "unit1.gconv1")
    kept = int(_init(pruned, conv.input[1]).shape[0])
    assert kept < 32 and kept % 4 == 0
    reshapes = [n for n in pruned.graph.node if n.op_type == "Reshape"][:2]
    targets = [list(_init(pruned, n.input[1])) for n in reshapes]
    assert targets[0][1:3] == [4, kept // 4] and targets[1][1] == kept


def test_depthwise_stays_coupled_with_its_input() -> None:
    _, a = _analysis(build_shufflenet_v1())
    g = _group_of(a, "unit1.gconv1")
    assert "unit1.dw" in g.members and all("unit1.dw" not in grp.producers for grp in a.groups)


def test_every_plan_leaves_each_split_half_a_channel(tmp_path: Path) -> None:
    """Even when the lowest-scoring channels are all in one Split half, the half's conv keeps one."""
    model = build_shufflenet()
    _, a = _analysis(model)
    g = _group_of(a, "stem")
    half = [t for t in a.sites if t.node == "unit1.pw1" and t.role == "in"][0]
    doomed = set(a.classes_of(half.ids).tolist())
    zeroed = onnx.ModelProto()
    zeroed.CopyFrom(model)
    stem = next(t for t in zeroed.graph.initializer if t.name == "stem.bn.weight")
    gamma = numpy_helper.to_array(stem).copy()
    gamma[8:] = 1e-6  # the second half (unit1's branch input) is the least important by far
    stem.CopyFrom(numpy_helper.from_array(gamma, stem.name))
    assert doomed <= set(g.classes.tolist())
    result = prune(_save(zeroed, tmp_path), tmp_path / "out.onnx", PruneSpec(ratio=0.9, criterion="l1", device="cpu"))
    pruned = onnx.load(result.output_path)
    assert _init(pruned, "unit1.pw1.weight").shape[1] >= 1
    feeds = random_inputs(model, batch=2)
    assert np.all(np.isfinite(run(pruned, feeds)["output"]))


def test_torchscript_shufflenet_v2_chunk_and_shuffle_from_shapes(tmp_path: Path) -> None:
    """torchvision-style units exported by TorchScript: ``chunk`` becomes Slices with bounds computed from
    Shape, ``channel_shuffle`` reshapes with ``c // groups`` read from Shape. Both follow the cut."""
    torch = pytest.importorskip("torch")
    nn = torch.nn

    def shuffle(x, groups: int):  # noqa: ANN001, ANN202
        b, c, h, w = x.size()
        return torch.transpose(x.view(b, groups, c // groups, h, w), 1, 2).contiguous().view(b, -1, h, w)

    class Unit(nn.Module):
        def __init__(self, c: int = 16) -> None:
            super().__init__()
            bc = c // 2
            self.branch = nn.Sequential(
                nn.Conv2d(bc, bc, 1, bias=False), nn.BatchNorm2d(bc), nn.ReLU(),
                nn.Conv2d(bc, bc, 3, 1, 1, groups=bc, bias=False), nn.BatchNorm2d(bc),
                nn.Conv2d(bc, bc, 1, bias=False), nn.BatchNorm2d(bc), nn.ReLU())

        def forward(self, x):  # noqa: ANN001, ANN202
            x1, x2 = x.chunk(2, dim=1)
            return shuffle(torch.cat((x1, self.branch(x2)), dim=1), 2)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1), nn.BatchNorm2d(16), nn.ReLU())
            self.units = nn.Sequential(Unit(), Unit())
            self.grouped = nn.Sequential(nn.Conv2d(16, 24, 1, groups=4), nn.BatchNorm2d(24), nn.ReLU())
            self.fc = nn.Linear(24, 10)

        def forward(self, x):  # noqa: ANN001, ANN202
            return self.fc(self.grouped(self.units(self.stem(x))).mean([2, 3]))

    torch.manual_seed(0)
    net = Net().eval()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 1.5)
            m.running_mean.uniform_(-0.2, 0.2)
    path = tmp_path / "shufflenet_ts.onnx"
    torch.onnx.export(net, (torch.randn(2, 3, 8, 8),), str(path), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["output"], dynamic_axes={"input": {0: "N"}})
    model = onnx.load(str(path))
    _, a = _analysis(model)
    assert sum(1 for g in a.groups if g.prunable) == len(a.groups) - 1, [g.reasons for g in a.groups]
    zeroed, n = zero_channels_everywhere(model, 0.5, seed=2)
    result = prune(_save(zeroed, tmp_path), tmp_path / "out.onnx", PruneSpec(ratio=0.5, device="cpu"))
    assert sum(g["channels"] - g["kept"] for g in result.report["groups"]) == n > 0
    feeds = random_inputs(model, batch=3)
    before, after = run(zeroed, feeds), run(onnx.load(result.output_path), feeds)
    np.testing.assert_allclose(after["output"], before["output"], atol=1e-4, rtol=1e-4)
    assert result.report["pruned"]["params"] < 0.7 * result.report["original"]["params"]
