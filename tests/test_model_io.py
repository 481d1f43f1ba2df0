"""Loading and saving: opsets 9–23, Constant-node weights, external data, unsafe paths, >2 GB models."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper, version_converter

from onnxprune.io.limits import MAX_IR_VERSION, default_opset
from onnxprune.io.load import LoadedModel, load_model, normalize
from onnxprune.io.save import initializer_bytes, save_model
from onnxprune.errors import BadInputError
from onnxprune.pipeline import prune
from onnxprune.spec import PruneSpec
from tests.models import build_resnet_basic, build_vgg, random_inputs, run


def _old_opset_model(opset: int) -> onnx.ModelProto:
    """Conv-BN-Clip → Split (attr) → Concat → Flatten → Gemm, written the way opset 9–11 exporters did."""
    rng = np.random.default_rng(0)

    def init(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)

    inits = [init("w1", 8, 3, 3, 3), init("b1", 8), init("w2", 8, 8, 3, 3),
             numpy_helper.from_array(np.abs(rng.standard_normal(8)).astype(np.float32) + 0.5, "g"),
             init("beta", 8), init("mean", 8), numpy_helper.from_array(np.ones(8, np.float32), "var"),
             init("fc", 10, 8 * 4 * 4), init("fcb", 10)]
    clip = (helper.make_node("Clip", ["bn"], ["act"], min=0.0, max=6.0) if opset < 11
            else helper.make_node("Clip", ["bn", "lo", "hi"], ["act"]))
    if opset >= 11:
        inits += [numpy_helper.from_array(np.array(0.0, np.float32), "lo"),
                  numpy_helper.from_array(np.array(6.0, np.float32), "hi")]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Split", ["r1"], ["s1", "s2"], axis=1, split=[3, 5], name="split"),
        helper.make_node("Concat", ["s2", "s1"], ["cat"], axis=1, name="concat"),
        helper.make_node("Conv", ["cat", "w2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("BatchNormalization", ["c2", "g", "beta", "mean", "var"], ["bn"], name="bn"),
        clip,
        helper.make_node("MaxPool", ["act"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "fc", "fcb"], ["y"], transB=1, name="fc"),
    ]
    graph = helper.make_graph(nodes, "old", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=4 if opset < 11 else 6)


@pytest.mark.parametrize("opset", [9, 10, 11, 12])
def test_old_opsets_are_converted_and_pruned(opset: int, tmp_path: Path) -> None:
    model = _old_opset_model(opset)
    onnx.checker.check_model(model)
    src = tmp_path / "old.onnx"
    onnx.save(model, src)
    result = prune(src, tmp_path / "out.onnx", PruneSpec(ratio=0.5, device="cpu"))
    assert f"converted opset {opset} to 13" in result.report["notes"]
    pruned = onnx.load(result.output_path)
    feeds = {"x": np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)}
    assert run(pruned, feeds)["y"].shape == (2, 10)
    assert result.report["pruned"]["params"] < result.report["original"]["params"]


@pytest.mark.parametrize("opset", [13, 17, 21, 23])
def test_recent_opsets_keep_their_opset(opset: int, tmp_path: Path) -> None:
    model = build_vgg(opset=min(opset, 21))
    if opset > 21:
        model = version_converter.convert_version(model, opset)
        model.ir_version = 11
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    result = prune(src, tmp_path / "out.onnx", PruneSpec(ratio=0.5, device="cpu"))
    pruned = onnx.load(result.output_path)
    assert default_opset(pruned) == opset
    assert pruned.ir_version <= 11
    assert run(pruned, random_inputs(model))["output"].shape == (2, 10)


def test_saved_ir_version_is_readable_by_onnxruntime(tmp_path: Path) -> None:
    model = build_vgg()
    model.ir_version = 14
    out = tmp_path / "m.onnx"
    save_model(model, out)
    assert onnx.load(out).ir_version == MAX_IR_VERSION
    assert run(str(out), random_inputs(model))["output"].shape == (2, 10)


def test_external_data_is_loaded_and_pruned(tmp_path: Path) -> None:
    model = build_resnet_basic()
    src = tmp_path / "ext" / "m.onnx"
    src.parent.mkdir()
    onnx.save(model, src, save_as_external_data=True, all_tensors_to_one_file=True, location="m.data", size_threshold=0)
    assert (src.parent / "m.data").is_file()
    cwd = os.getcwd()
    os.chdir(tmp_path)  # external data must resolve from the model's folder, not the working directory
    try:
        result = prune(Path("ext/m.onnx"), tmp_path / "out.onnx", PruneSpec(ratio=0.5, device="cpu"))
    finally:
        os.chdir(cwd)
    reference = build_resnet_basic()  # onnx.save turned `model`'s tensors into external references
    feeds = random_inputs(reference)
    assert run(result.output_path, feeds)["output"].shape == run(reference, feeds)["output"].shape


@pytest.mark.parametrize("location", ["../../etc/passwd", "/etc/passwd", "sub/../../x.data"])
def test_external_data_escaping_the_folder_is_refused(location: str, tmp_path: Path) -> None:
    model = build_vgg()
    tensor = model.graph.initializer[0]
    tensor.ClearField("raw_data")
    del tensor.float_data[:]
    tensor.data_location = TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value=location)
    path = tmp_path / "evil.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(BadInputError, match="outside the model's folder"):
        load_model(path)


def test_constant_of_shape_weights_become_initializers() -> None:
    graph = helper.make_graph(
        [helper.make_node("ConstantOfShape", ["shape"], ["w"], value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.5])),
         helper.make_node("Conv", ["x", "w"], ["y"], name="conv")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 4, 4])],
        [numpy_helper.from_array(np.array([3, 2, 1, 1], np.int64), "shape")],
    )
    loaded = LoadedModel(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), "", 13, 0)
    normalize(loaded)
    assert [n.op_type for n in loaded.model.graph.node] == ["Conv"]
    assert {t.name for t in loaded.model.graph.initializer} >= {"w"}


def _big_mlp(width: int, hidden: int) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w1 = (rng.standard_normal((width, hidden), dtype=np.float32) * 0.01)
    w2 = (rng.standard_normal((hidden, width), dtype=np.float32) * 0.01)
    w3 = (rng.standard_normal((width, 10), dtype=np.float32) * 0.01)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h1"], name="fc1"), helper.make_node("Relu", ["h1"], ["a1"]),
             helper.make_node("MatMul", ["a1", "w2"], ["h2"], name="fc2"), helper.make_node("Relu", ["h2"], ["a2"]),
             helper.make_node("MatMul", ["a2", "w3"], ["y"], name="fc3")]
    graph = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
                              [numpy_helper.from_array(w, n) for w, n in ((w1, "w1"), (w2, "w2"), (w3, "w3"))])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.slow
def test_model_over_2gb_round_trips_with_external_data(tmp_path: Path) -> None:
    model = _big_mlp(width=24576, hidden=12288)  # 2 × 24576 × 12288 × 4 B ≈ 2.25 GiB
    assert initializer_bytes(model) > 2**31
    src = tmp_path / "big.onnx"
    onnx.save(model, src, save_as_external_data=True, all_tensors_to_one_file=True, location="big.data")
    del model
    out = tmp_path / "out" / "small.onnx"
    result = prune(src, out, PruneSpec(ratio=0.5, device="cpu", fidelity_samples=2))
    assert result.report["pruned"]["params"] < 0.6 * result.report["original"]["params"]
    assert result.report["fidelity"]["samples"] == 2
    small = onnx.load(out)
    assert sum(int(np.prod(t.dims)) for t in small.graph.initializer) == result.report["pruned"]["params"]
