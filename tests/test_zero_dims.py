"""``--shape`` with a 0-length dim: the empty past of a KV-cache decoder at prefill, end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune.errors import BadInputError
from onnxprune.measure.stats import model_stats
from onnxprune.pipeline import analyze
from onnxprune.runtime.feeds import random_inputs
from onnxprune.runtime.shapes import run_shapes
from onnxprune.spec import PruneSpec, parse_shape_args
from tests.models import run
from tests.test_cli import assert_one_line_error, cli

SHAPES = {"x": [1, 5, 8], "past": [1, 2, 0, 4]}
SHAPE_ARGS = ("--shape", "x=1x5x8", "--shape", "past=1x2x0x4")


def build_toy_decoder(seed: int = 0) -> onnx.ModelProto:
    """One decoder step with a KV cache: an MLP (fc1 → Relu → fc2), then 2-head attention over ``present``.

    Inputs ``x [N, T, 8]`` and ``past [N, 2, P, 4]``; outputs ``y [N, T, 8]`` and ``present = Concat(past, kv,
    axis=2)``, ``[N, 2, P+T, 4]``. The attention MatMuls read ``present``, so their MACs depend on P.
    """
    rng = np.random.default_rng(seed)

    def init(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)

    inits = [init("w1", 8, 16), init("b1", 16), init("w2", 16, 8), init("wkv", 8, 8), init("wq", 8, 8),
             init("wo", 8, 8),
             numpy_helper.from_array(np.array([0, 0, 2, 4], np.int64), "heads_shape"),
             numpy_helper.from_array(np.array([0, 0, 8], np.int64), "merged_shape")]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h0"], name="fc1"),
        helper.make_node("Add", ["h0", "b1"], ["h1"], name="fc1_bias"),
        helper.make_node("Relu", ["h1"], ["h"], name="act"),
        helper.make_node("MatMul", ["h", "w2"], ["m"], name="fc2"),
        helper.make_node("MatMul", ["m", "wkv"], ["kv0"], name="kv_proj"),
        helper.make_node("Reshape", ["kv0", "heads_shape"], ["kv1"], name="kv_heads"),
        helper.make_node("Transpose", ["kv1"], ["kv"], perm=[0, 2, 1, 3], name="kv_transpose"),
        helper.make_node("Concat", ["past", "kv"], ["present"], axis=2, name="cache_concat"),
        helper.make_node("MatMul", ["m", "wq"], ["q0"], name="q_proj"),
        helper.make_node("Reshape", ["q0", "heads_shape"], ["q1"], name="q_heads"),
        helper.make_node("Transpose", ["q1"], ["q"], perm=[0, 2, 1, 3], name="q_transpose"),
        helper.make_node("Transpose", ["present"], ["kt"], perm=[0, 1, 3, 2], name="k_transpose"),
        helper.make_node("MatMul", ["q", "kt"], ["scores"], name="qk"),
        helper.make_node("Softmax", ["scores"], ["probs"], axis=-1, name="softmax"),
        helper.make_node("MatMul", ["probs", "present"], ["ctx0"], name="pv"),
        helper.make_node("Transpose", ["ctx0"], ["ctx1"], perm=[0, 2, 1, 3], name="ctx_transpose"),
        helper.make_node("Reshape", ["ctx1", "merged_shape"], ["ctx"], name="ctx_merge"),
        helper.make_node("MatMul", ["ctx", "wo"], ["y"], name="out_proj"),
    ]
    graph = helper.make_graph(
        nodes, "toy_decoder",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "T", 8]),
         helper.make_tensor_value_info("past", TensorProto.FLOAT, ["N", 2, "P", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "T", 8]),
         helper.make_tensor_value_info("present", TensorProto.FLOAT, ["N", 2, "PT", 4])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


def test_parse_shape_args_accepts_a_zero_dim() -> None:
    assert parse_shape_args(["x=1x5x8", "past_key_values.0.key=1x4x0x16"]) == {
        "x": [1, 5, 8], "past_key_values.0.key": [1, 4, 0, 16]}
    assert PruneSpec(shapes=SHAPES).validate().shapes["past"] == [1, 2, 0, 4]


@pytest.mark.parametrize(("item", "fragment"), [
    ("past=1x2x-1x4", "dimensions must be integers >= 0"),
    ("past=0x0x0", "every dimension is 0"),
    ("past=0", "every dimension is 0"),
    ("past=1x2xx4", "--shape expects NAME=1x3x224x224"),
    ("past=", "--shape expects NAME=1x3x224x224"),
    ("=1x2", "--shape expects NAME=1x3x224x224"),
    ("past=1x2.5", "--shape expects NAME=1x3x224x224"),
])
def test_parse_shape_args_rejects_negative_all_zero_and_malformed(item: str, fragment: str) -> None:
    with pytest.raises(BadInputError, match="--shape") as info:
        parse_shape_args([item])
    assert fragment in str(info.value)
    assert info.value.field == "shapes"


@pytest.mark.parametrize("dims", [[], [1, -2], [0, 0], [1, 2.5], [1, "3"], [1, None], [True, 2]])
def test_spec_validate_rejects_bad_dims(dims: list[int]) -> None:
    """The Python API and the service build ``PruneSpec`` directly, without the CLI parser."""
    with pytest.raises(BadInputError, match="--shape past"):
        PruneSpec(shapes={"past": dims}).validate()


def test_random_inputs_and_run_shapes_with_an_empty_past() -> None:
    model = build_toy_decoder()
    feeds = random_inputs(model, SHAPES)
    assert feeds["past"].shape == (1, 2, 0, 4) and feeds["x"].shape == (1, 5, 8)
    shapes = run_shapes(model, SHAPES, ["present", "scores", "y"])
    assert shapes["past"] == [1, 2, 0, 4]
    assert shapes["present"] == [1, 2, 5, 4]
    assert shapes["scores"] == [1, 2, 5, 5]
    assert shapes["y"] == [1, 5, 8]


def test_macs_are_known_with_an_empty_past() -> None:
    model = build_toy_decoder()
    stats = model_stats(model, SHAPES)
    assert stats.macs_unknown_reason is None
    # fc1, fc2, kv_proj, q_proj, out_proj: 5 tokens each; qk and pv: 2 heads x 5 x 5 x 4 with P + T = 5
    dense = 5 * (8 * 16 + 16 * 8 + 8 * 8 + 8 * 8 + 8 * 8)
    attention = 2 * (2 * 5 * 5 * 4)
    assert stats.macs == dense + attention
    with_past = model_stats(model, {"x": [1, 5, 8], "past": [1, 2, 3, 4]})
    assert with_past.macs == dense + 2 * (2 * 5 * 8 * 4)  # P + T = 8


def test_macs_of_a_layer_reading_the_empty_tensor_are_zero_not_unknown() -> None:
    node = helper.make_node("MatMul", ["past", "w"], ["y"], name="mm")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("past", TensorProto.FLOAT, ["N", 2, "P", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, "P", 4])],
                              [numpy_helper.from_array(np.ones((4, 4), np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    empty = model_stats(model, {"past": [1, 2, 0, 4]})
    assert (empty.macs, empty.macs_unknown_reason) == (0, None)
    assert model_stats(model, {"past": [1, 2, 3, 4]}).macs == 2 * 3 * 4 * 4


def test_analyze_with_an_empty_past(tmp_path: Path) -> None:
    path = tmp_path / "decoder.onnx"
    onnx.save(build_toy_decoder(), path)
    result = analyze(path, SHAPES)
    prunable = [g for g in result["groups"] if g["prunable"]]
    # the MLP width, m read by q and kv, and the 2 heads (k/v share ``present``, so a head goes with its cache slice)
    assert [g["producers"] for g in prunable] == [["fc1"], ["fc2"], ["kv_proj", "q_proj"]]
    proc = cli("analyze", str(path), *SHAPE_ARGS)
    assert proc.returncode == 0, proc.stderr
    assert "3 prunable groups" in proc.stdout


def test_prune_with_an_empty_past_end_to_end(tmp_path: Path) -> None:
    path, out, report_path = tmp_path / "decoder.onnx", tmp_path / "small.onnx", tmp_path / "r.json"
    model = build_toy_decoder()
    onnx.save(model, path)
    proc = cli("prune", str(path), "-o", str(out), "--ratio", "0.3", *SHAPE_ARGS, "--report", str(report_path))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(report_path.read_text())
    assert report["spec"]["shapes"] == SHAPES
    assert isinstance(report["original"]["macs"], int) and isinstance(report["pruned"]["macs"], int)
    assert report["pruned"]["macs"] < report["original"]["macs"] == model_stats(model, SHAPES).macs
    assert report["pruned"]["params"] < report["original"]["params"]
    assert report["fidelity"]["samples"] > 0  # verification ran both models on the empty past
    assert report["fidelity_data"].startswith("random inputs")

    pruned = onnx.load(out)
    onnx.checker.check_model(pruned, full_check=True)
    fc1 = next(t for t in pruned.graph.initializer if t.name == "w1")
    assert fc1.dims[0] == 8 and fc1.dims[1] < 16  # the MLP lost width
    rng = np.random.default_rng(1)
    for past_len in (0, 3):  # prefill, then a step with a filled cache
        feeds = {"x": rng.standard_normal((2, 5, 8)).astype(np.float32),
                 "past": rng.standard_normal((2, 2, past_len, 4)).astype(np.float32)}
        before, after = run(model, feeds), run(pruned, feeds)
        assert after["present"].shape == before["present"].shape == (2, 2, past_len + 5, 4)
        assert after["y"].shape == before["y"].shape == (2, 5, 8)
        # the cache keeps the past it was given, in front of the new keys and values
        np.testing.assert_array_equal(after["present"][:, :, :past_len], feeds["past"])


@pytest.mark.parametrize(("shape", "fragment"), [
    ("past=1x2x-1x4", "dimensions must be integers >= 0"),
    ("past=0x0x0x0", "every dimension is 0"),
])
def test_cli_rejects_negative_and_all_zero_shapes(shape: str, fragment: str, tmp_path: Path) -> None:
    path = tmp_path / "decoder.onnx"
    onnx.save(build_toy_decoder(), path)
    assert_one_line_error(cli("prune", str(path), "-o", str(tmp_path / "o.onnx"), "--shape", shape), fragment)
