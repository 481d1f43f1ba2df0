"""Every zoo builder yields a valid, runnable, deterministic model (the contract the pruning tests rely on)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest

from tests.models import BUILDERS, VARIANTS, build, build_flatten_gemm, build_vgg, random_inputs, run, zero_channels

ALL = {name: (lambda fn=fn: fn()) for name, fn in BUILDERS.items()} | VARIANTS


@pytest.mark.parametrize("name", sorted(ALL))
def test_builds_checks_and_runs(name: str) -> None:
    model = ALL[name]()
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version <= 10
    assert [i.name for i in model.graph.input] == ["input"]
    assert [o.name for o in model.graph.output] == ["output"]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    assert model.graph.input[0].type.tensor_type.elem_type == (
        onnx.TensorProto.INT64 if name.startswith("text_transformer") else onnx.TensorProto.FLOAT)
    assert all(n.name for n in model.graph.node), "every node is named"
    assert len({n.name for n in model.graph.node}) == len(model.graph.node), "node names are unique"
    assert {t.data_type for t in model.graph.initializer} <= {onnx.TensorProto.FLOAT, onnx.TensorProto.INT64}

    out = run(model, random_inputs(model, batch=2))["output"]
    assert out.shape[0] == 2
    assert np.isfinite(out).all()
    assert out.std() > 1e-3, "outputs vary across the batch / features (weights are not degenerate)"


MIN_OPSET = {"activations": 14, "transformer_block": 17, "vit": 17, "text_transformer": 17}


@pytest.mark.parametrize("opset", [13, 18, 21])
@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_every_builder_honours_opset(name: str, opset: int) -> None:
    """Opset-dependent forms (ReduceMean axes as input from 18, IR 10 for 21) are right at both ends of the range."""
    if opset < MIN_OPSET.get(name, 13):
        with pytest.raises(ValueError, match="opset"):
            build(name, opset=opset)
        return
    model = build(name, opset=opset)
    assert model.opset_import[0].version == opset
    assert run(model, random_inputs(model, batch=1))["output"].shape[0] == 1


@pytest.mark.parametrize("name", ["vgg", "transformer_block", "paddle_constants"])
def test_deterministic_and_seeded(name: str) -> None:
    a, b, c = build(name), build(name), build(name, seed=1)
    assert a.SerializeToString() == b.SerializeToString()
    assert a.SerializeToString() != c.SerializeToString()


def test_symbolic_spatial_runs_at_two_sizes() -> None:
    model = build("symbolic_spatial")
    dims = [d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["N", "", "H", "W"]
    for size in (16, 32):
        out = run(model, random_inputs(model, batch=1, dims={"H": size, "W": size}))["output"]
        assert out.shape == (1, 1, size, size)


def test_batch_dim_is_really_dynamic() -> None:
    model = build_vgg()
    one = run(model, random_inputs(model, batch=1))["output"]
    three = run(model, random_inputs(model, batch=3))["output"]
    assert one.shape == (1, 10) and three.shape == (3, 10)


def test_unknown_builder_names_known_ones() -> None:
    with pytest.raises(KeyError, match="vgg"):
        build("nope")


@pytest.mark.parametrize(
    ("name", "node", "probe"),
    [
        ("vgg", "conv3", "conv3.bn_out"),  # Conv + BN: zero after BN
        ("mlp", "fc2", "fc2_out"),  # Gemm transB=1: zero rows
        ("mlp_matmul", "fc2", "fc2.add_out"),  # MatMul + bias Add
        ("conv_transpose", "up", "up.bn_out"),  # ConvTranspose weight columns
        ("paddle_constants", "conv1", "bn1_out"),  # weights in Constant nodes
        ("paddle_constants", "conv2", "conv2_out"),  # weight behind Identity
    ],
)
def test_zero_channels_gives_exact_zeros(name: str, node: str, probe: str) -> None:
    model = zero_channels(build(name), node, [0, 3])
    value = onnx.helper.make_tensor_value_info(probe, onnx.TensorProto.FLOAT, None)
    model.graph.output.append(value)
    out = run(model, random_inputs(model, batch=2))[probe]  # [N, C, ...] or [N, F]: channels on axis 1
    assert np.all(out[:, [0, 3]] == 0)
    assert np.abs(out[:, [1, 2]]).max() > 0


def test_zero_channels_does_not_mutate_input_and_rejects_unknown() -> None:
    model = build_vgg()
    before = model.SerializeToString()
    zero_channels(model, "conv3", [1])
    assert model.SerializeToString() == before
    with pytest.raises(ValueError, match="no node named"):
        zero_channels(model, "nope", [0])
    with pytest.raises(ValueError, match="not a supported producer"):
        zero_channels(model, "pool", [0])
    with pytest.raises(ValueError, match="out of range"):
        zero_channels(model, "conv3", [16])


def test_zeroed_flatten_gemm_channels_are_removable_exactly() -> None:
    """The premise of the exactness tests, proved by hand on Flatten->Gemm: channel c owns columns c*16..c*16+15."""
    from onnx import numpy_helper

    drop, keep = [1, 6], [c for c in range(8) if c not in (1, 6)]
    zeroed = zero_channels(build_flatten_gemm(), "conv1", drop)
    pruned = onnx.ModelProto()
    pruned.CopyFrom(zeroed)
    cols = np.concatenate([np.arange(c * 16, c * 16 + 16) for c in keep])
    for t in pruned.graph.initializer:
        a = numpy_helper.to_array(t)
        if t.name.startswith("conv1") and a.shape[0] == 8:
            a = a[keep]
        elif t.name == "fc.weight":
            a = a[:, cols]
        else:
            continue
        t.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(a), t.name))
    del pruned.graph.output[0].type.tensor_type.shape.dim[:]  # let onnxruntime infer; output shape is unchanged
    feeds = random_inputs(zeroed, batch=4)
    np.testing.assert_allclose(run(pruned, feeds)["output"], run(zeroed, feeds)["output"], atol=1e-5)


def test_light_models_are_listed_and_found(light_model: Callable[[str], Path]) -> None:
    from tests.data import light_model_names

    names = light_model_names()
    assert {"resnet50", "densenet121", "squeezenet", "vgg19", "inception_v1", "shufflenet"} <= set(names)
    assert light_model("squeezenet").stat().st_size > 0


def test_light_model_random_has_distinct_weights(light_model_random: Callable[[str], Path]) -> None:
    model = onnx.load(str(light_model_random("squeezenet")))
    onnx.checker.check_model(model, full_check=True)
    assert not any(n.op_type == "ConstantOfShape" for n in model.graph.node)
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    w = next(onnx.numpy_helper.to_array(t) for t in model.graph.initializer if t.name == conv.input[1])
    assert w.std() > 0.01
    inits = {t.name for t in model.graph.initializer}
    data = next(i.name for i in model.graph.input if i.name not in inits)
    out = run(model, {data: np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)}, threads=2)
    probs = next(iter(out.values())).ravel()
    assert 0.01 < probs.max() < 0.99, "softmax neither uniform nor one-hot"


@pytest.mark.parametrize("name", ["ch_ppocr_mobile_v2.0_cls_infer", "ch_PP-OCRv4_det_infer", "ch_PP-OCRv4_rec_infer"])
def test_rapidocr_models_are_found_without_importing_the_package(
    rapidocr_model: Callable[[str], Path], name: str
) -> None:
    import sys

    path = rapidocr_model(name)
    assert path.suffix == ".onnx" and path.stat().st_size > 100_000
    assert "rapidocr_onnxruntime" not in sys.modules, "importing it would import cv2 (not installed)"


def test_zeroed_head_is_removable_exactly() -> None:
    """Premise of the head-pruning exactness test: removing a head whose V is zeroed changes nothing."""
    from onnx import numpy_helper

    from tests.models import build_transformer_block, zero_head

    zeroed = zero_head(build_transformer_block(heads=2, dim=16), "block0", head=0, heads=2)
    keep = np.arange(8, 16)  # head 1's dims
    pruned = onnx.ModelProto()
    pruned.CopyFrom(zeroed)
    for t in pruned.graph.initializer:
        a = numpy_helper.to_array(t)
        if t.name in ("block0.q.weight", "block0.k.weight", "block0.v.weight"):
            a = a[:, keep]
        elif t.name in ("block0.q.bias", "block0.k.bias", "block0.v.bias"):
            a = a[keep]
        elif t.name == "block0.o.weight":
            a = a[keep, :]
        elif t.name == "heads_shape":
            a = np.array([0, 0, 1, 8], np.int64)
        elif t.name == "merge_shape":
            a = np.array([0, 0, 8], np.int64)
        else:
            continue
        t.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(a), t.name))
    onnx.checker.check_model(pruned, full_check=True)
    feeds = random_inputs(zeroed, batch=3)
    np.testing.assert_allclose(run(pruned, feeds)["output"], run(zeroed, feeds)["output"], atol=1e-5)
    assert np.abs(run(zeroed, feeds)["output"] - run(build_transformer_block(), feeds)["output"]).max() > 1e-3


@pytest.mark.parametrize(
    ("name", "last", "add", "skip"),
    [
        ("resnet_bottleneck", "block2.conv3", "block2.add_out", "relu_3_out"),
        ("mobilenetv2", "block2.project", "block2.add_out", "block1.add_out"),
        ("transformer_block", "block0.fc2", "block0.mlp.add_out", "block0.attn.add_out"),
    ],
)
def test_zeroed_residual_branch_makes_block_identity(name: str, last: str, add: str, skip: str) -> None:
    """Premise of the depth-pruning exactness test: with its branch zeroed, a block's Add output equals its input."""
    model = zero_channels(build(name), last)  # all channels
    for probe in (add, skip):
        model.graph.output.append(onnx.helper.make_tensor_value_info(probe, onnx.TensorProto.FLOAT, None))
    out = run(model, random_inputs(model, batch=2))
    np.testing.assert_array_equal(out[add], out[skip])
