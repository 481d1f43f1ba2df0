"""Depth pruning: residual blocks y = x + f(x) found, ranked and bypassed, alone and with width pruning."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

from onnxprune.io.shapes import static_shapes
from onnxprune.transform.depth import find_residual_blocks, prune_depth, remove_blocks
from onnxprune.errors import PlanError
from onnxprune.pipeline import analyze, prune
from onnxprune.spec import PruneSpec
from tests.models import build_mobilenetv2, build_resnet_basic, build_resnet_bottleneck, build_shufflenet, \
    build_transformer_block, random_inputs, run
from tests.test_groups import _params, _save
from tests.test_shuffle_grouped import build_shufflenet_v1


def _blocks(model: onnx.ModelProto):
    return find_residual_blocks(gs.import_onnx(model), static_shapes(model, None))


def _zero_branch(model: onnx.ModelProto, bn: str) -> onnx.ModelProto:
    """f(x) = 0: the branch's last BatchNormalization gets γ = β = 0."""
    zeroed = onnx.ModelProto()
    zeroed.CopyFrom(model)
    for t in zeroed.graph.initializer:
        if t.name in (f"{bn}.weight", f"{bn}.bias"):
            t.CopyFrom(onnx.numpy_helper.from_array(np.zeros(t.dims, np.float32), t.name))
    return zeroed


@pytest.mark.parametrize(("builder", "adds", "kinds"), [
    (build_resnet_basic, ["block1.add"], ["conv"]),  # block2 has a downsample shortcut: shapes differ
    (lambda: build_resnet_bottleneck(blocks=3), ["block1.add", "block2.add", "block3.add"], ["conv"] * 3),
    (build_mobilenetv2, ["block1.add", "block2.add"], ["conv"] * 2),
    (build_shufflenet_v1, ["unit1.add", "unit2.add"], ["conv"] * 2),
    (lambda: build_transformer_block(blocks=2), ["block0.attn.add", "block0.mlp.add", "block1.attn.add",
                                                 "block1.mlp.add"], ["attention", "mlp"] * 2),
    (build_shufflenet, [], []),  # concatenation, not addition
])
def test_finds_residual_blocks(builder, adds: list[str], kinds: list[str]) -> None:
    blocks = _blocks(builder())
    assert [b.add for b in blocks] == adds
    assert [b.kind for b in blocks] == kinds
    assert all(b.params > 0 and b.nodes for b in blocks)


def test_depth_2_on_resnet_removes_two_blocks(tmp_path: Path) -> None:
    model = build_resnet_bottleneck(blocks=3)
    result = prune(_save(model, tmp_path), tmp_path / "out.onnx", PruneSpec(ratio=0.0, depth=2, device="cpu"))
    pruned = onnx.load(result.output_path)
    onnx.checker.check_model(onnx.shape_inference.infer_shapes(pruned), full_check=True)
    removed = result.report["depth"]["removed"]
    assert len(removed) == 2
    assert len(pruned.graph.node) == len(model.graph.node) - sum(b["nodes"] + 1 for b in removed)
    assert result.report["pruned"]["macs"] < result.report["original"]["macs"]
    assert result.report["original"]["params"] - result.report["pruned"]["params"] == sum(b["params"] for b in removed)
    feeds = random_inputs(model, batch=2)
    out = run(pruned, feeds)["output"]
    assert out.shape == run(model, feeds)["output"].shape and np.all(np.isfinite(out))


@pytest.mark.parametrize("method", ["ratio", "fidelity"])
def test_a_block_with_zero_branch_is_removed_first_without_output_change(method: str) -> None:
    model = _zero_branch(build_resnet_bottleneck(blocks=3), "block2.conv3.bn")
    result = prune_depth(model, 1, static_shapes(model, None), method=method)
    assert [b.add for b in result.removed] == ["block2.add"]
    assert min(b.importance for b in result.candidates) == pytest.approx(0.0, abs=1e-9)
    feeds = random_inputs(model, batch=3, seed=5)
    np.testing.assert_allclose(run(result.model, feeds)["output"], run(model, feeds)["output"], atol=1e-5)


def test_zeroed_block_through_the_pipeline(tmp_path: Path) -> None:
    model = _zero_branch(build_mobilenetv2(), "block1.project.bn")
    result = prune(_save(model, tmp_path), tmp_path / "out.onnx", PruneSpec(ratio=0.0, depth=1, device="cpu"))
    assert [b["add"] for b in result.report["depth"]["removed"]] == ["block1.add"]
    assert result.report["fidelity"]["max_abs_err"] < 1e-4


def test_depth_and_width_in_one_call(tmp_path: Path) -> None:
    model = build_transformer_block(blocks=2, heads=4)
    src = _save(model, tmp_path)
    depth_only = prune(src, tmp_path / "d.onnx", PruneSpec(ratio=0.0, depth=1, device="cpu"))
    both = prune(src, tmp_path / "b.onnx", PruneSpec(ratio=0.5, depth=1, device="cpu"))
    assert both.report["pruned"]["params"] < depth_only.report["pruned"]["params"] < _params(model)
    assert len(both.report["depth"]["removed"]) == 1
    pruned = onnx.load(both.output_path)
    onnx.checker.check_model(onnx.shape_inference.infer_shapes(pruned), full_check=True)
    feeds = random_inputs(model, batch=2)
    assert run(pruned, feeds)["output"].shape == (2, 10)


def test_consecutive_blocks_removed_together_stay_wired() -> None:
    model = build_transformer_block(blocks=1)
    graph = gs.import_onnx(model)
    blocks = find_residual_blocks(graph, static_shapes(model, None))
    remove_blocks(graph, blocks)  # the MLP block's skip is the attention block's output
    out = gs.export_onnx(graph)
    feeds = random_inputs(model, batch=2)
    assert run(out, feeds)["output"].shape == (2, 10)
    assert not [n for n in out.graph.node if n.op_type in ("MatMul", "Softmax")]


def test_calibration_data_from_npz(tmp_path: Path) -> None:
    model = build_resnet_bottleneck(blocks=2)
    data = tmp_path / "calib.npz"
    np.savez(data, input=np.random.default_rng(0).standard_normal((6, 3, 8, 8)).astype(np.float32))
    result = prune_depth(model, 1, static_shapes(model, None), calib=str(data), samples=6)
    assert len(result.removed) == 1 and all(b.importance is not None for b in result.candidates)


def test_more_blocks_than_the_model_has_is_a_plan_error(tmp_path: Path) -> None:
    with pytest.raises(PlanError, match="only 1 removable"):
        prune(_save(build_resnet_basic(), tmp_path), tmp_path / "out.onnx", PruneSpec(ratio=0.0, depth=2, device="cpu"))


def test_analyze_lists_removable_blocks(tmp_path: Path) -> None:
    result = analyze(_save(build_mobilenetv2(), tmp_path))
    assert [b["add"] for b in result["removable_blocks"]] == ["block1.add", "block2.add"]
    assert all(b["kind"] == "conv" and b["params"] > 0 for b in result["removable_blocks"])


def build_convnext(*, seed: int = 0, blocks: int = 2, dim: int = 16) -> onnx.ModelProto:
    """ConvNeXt blocks on [N, 3, 8, 8]: depthwise 7x7 → channels-last → LayerNorm → MatMul(4x) → GELU →
    MatMul → layer-scale Mul → channels-first → Add."""
    from tests.models import _Graph

    g = _Graph("convnext", seed, 17)
    x = g.conv("input", 3, dim, 2, name="stem", stride=2, pad=0)  # [N, 16, 4, 4]
    for i in range(blocks):
        p = f"block{i}"
        y = g.conv(x, dim, dim, 7, name=f"{p}.dw", group=dim, pad=3)
        y = g.node("Transpose", [y], perm=[0, 2, 3, 1])
        y = g.node("LayerNormalization", [y, g.const(f"{p}.ln.weight", np.ones(dim, np.float32)),
                                          g.const(f"{p}.ln.bias", g.small([dim]))], name=f"{p}.ln", axis=-1)
        y = g.gelu(g.linear(y, dim, 4 * dim, name=f"{p}.pw1"))
        y = g.node("Mul", [g.linear(y, 4 * dim, dim, name=f"{p}.pw2"), g.const(f"{p}.gamma", g.small([dim], 0.5))])
        y = g.node("Transpose", [y], perm=[0, 3, 1, 2])
        x = g.node("Add", [x, y], name=f"{p}.add")
    return g.finish(g.head(x, dim), ["N", 3, 8, 8])


def test_convnext_blocks_are_found_and_removed(tmp_path: Path) -> None:
    model = build_convnext()
    assert [b.add for b in _blocks(model)] == ["block0.add", "block1.add"]
    result = prune(_save(model, tmp_path), tmp_path / "out.onnx", PruneSpec(ratio=0.5, depth=1, device="cpu"))
    assert len(result.report["depth"]["removed"]) == 1
    groups = {tuple(g["producers"]): g for g in result.report["groups"]}
    stream = next(g for p, g in groups.items() if "stem" in p)
    assert stream["kept"] < stream["channels"]  # the residual stream through depthwise, LayerNorm and layer scale
    pruned = onnx.load(result.output_path)
    onnx.checker.check_model(onnx.shape_inference.infer_shapes(pruned), full_check=True)
    feeds = random_inputs(model, batch=2)
    assert run(pruned, feeds)["output"].shape == (2, 10)


def test_depth_with_calibrated_width_and_reconstruct(tmp_path) -> None:
    """Calibration and reconstruction read the depth-pruned model, the one the width stages cut."""
    import onnx

    from onnxprune.pipeline import prune
    from onnxprune.spec import PruneSpec
    from tests.models import build_resnet_bottleneck, random_inputs, run

    model = build_resnet_bottleneck(blocks=3)
    onnx.save(model, tmp_path / "m.onnx")
    result = prune(tmp_path / "m.onnx", tmp_path / "o.onnx",
                   PruneSpec(depth=1, ratio=0.5, criterion="apoz", reconstruct=True, device="cpu"))
    assert len(result.report["depth"]["removed"]) == 1
    assert result.report["reconstruct"]
    feeds = random_inputs(model)
    assert run(str(tmp_path / "o.onnx"), feeds)["output"].shape == run(model, feeds)["output"].shape
