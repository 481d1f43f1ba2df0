"""Model statistics checked against hand-computed numbers, fidelity, and the report JSON/table."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune import __version__
from onnxprune.errors import BadInputError, InvariantError
from onnxprune.measure.fidelity import Fidelity, fidelity
from onnxprune.measure.stats import MacsRegistry, ModelStats, conv_macs, default_macs_registry, model_bytes, model_stats
from onnxprune.report import build_report, render_table

RNG = np.random.default_rng(0)


def _init(name: str, *shape: int) -> onnx.TensorProto:
    return numpy_helper.from_array(RNG.standard_normal(shape).astype(np.float32), name)


def _model(nodes: list[onnx.NodeProto], inputs: list, outputs: list, inits: list) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "m", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _vi(name: str, shape: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _cnn(spatial: tuple = (10, 10), c1: int = 8) -> onnx.ModelProto:
    """x[N,4,10,10] → Conv 3x3 s2 p1 (+bias) → BN → Relu → grouped Conv (groups 2) → depthwise Conv p1
    → GlobalAveragePool → Flatten → Gemm(transB) with bias."""
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "g", "be", "mu", "var"], ["bn"], name="bn1"),
        helper.make_node("Relu", ["bn"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", group=2),
        helper.make_node("Conv", ["c2", "w3"], ["c3"], name="dw3", group=8, pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["c3"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "wf", "bf"], ["y"], name="fc", transB=1),
    ]
    inits = [
        _init("w1", c1, 4, 3, 3), _init("b1", c1),
        _init("g", c1), _init("be", c1), _init("mu", c1),
        numpy_helper.from_array(np.ones(c1, np.float32), "var"),
        _init("w2", 8, c1 // 2, 3, 3), _init("w3", 8, 1, 3, 3),
        _init("wf", 5, 8), _init("bf", 5),
    ]  # fmt: skip
    return _model(nodes, [_vi("x", ["N", 4, *spatial])], [_vi("y", ["N", 5])], inits)


def test_cnn_params_and_macs_by_hand() -> None:
    stats = model_stats(_cnn())
    # conv1: out [1,8,5,5] since (10 + 2*1 - 3)//2 + 1 = 5; MACs = 8*5*5 * (4*3*3) = 200 * 36 = 7200
    #        params = 8*4*3*3 + 8 = 296
    # bn1:   params = 4 * 8 = 32 (scale, bias, mean, var), 0 MACs
    # conv2: groups 2, Cin/groups = 4, out [1,8,3,3] (5 - 3 + 1); MACs = 8*3*3 * (4*3*3) = 72 * 36 = 2592
    #        params = 8*4*3*3 = 288
    # dw3:   depthwise, Cin/groups = 1, pad 1 keeps 3x3; MACs = 8*3*3 * (1*3*3) = 648; params = 72
    # fc:    M=1, N=5, K=8; MACs = 40; params = 5*8 + 5 = 45
    rows = {layer.node: (layer.op, layer.params, layer.macs) for layer in stats.layers}
    assert rows == {
        "conv1": ("Conv", 296, 7200),
        "bn1": ("BatchNormalization", 32, 0),
        "conv2": ("Conv", 288, 2592),
        "dw3": ("Conv", 72, 648),
        "fc": ("Gemm", 45, 40),
    }
    assert stats.params == 296 + 32 + 288 + 72 + 45 == 733
    assert stats.macs == 7200 + 2592 + 648 + 40 == 10480
    assert stats.macs_unknown_reason is None


def test_mlp_and_matmul_macs_by_hand() -> None:
    # x[N,16] → Gemm(W1 [16,32] + b1) → Relu → Gemm(W2 [10,32], transB) + b2
    # MACs = 1*32*16 + 1*10*32 = 512 + 320 = 832; params = 16*32 + 32 + 10*32 + 10 = 874
    mlp = _model(
        [
            helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1"),
            helper.make_node("Relu", ["h"], ["r"], name="relu"),
            helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], name="fc2", transB=1),
        ],
        [_vi("x", ["N", 16])],
        [_vi("y", ["N", 10])],
        [_init("w1", 16, 32), _init("b1", 32), _init("w2", 10, 32), _init("b2", 10)],
    )
    stats = model_stats(mlp)
    assert (stats.params, stats.macs) == (874, 832)
    assert [(l.node, l.macs) for l in stats.layers] == [("fc1", 512), ("fc2", 320)]

    # Batched MatMul: a[N,4,6,8] @ w[8,5] → [1,4,6,5]: MACs = 4*6*5*8 = 960
    # Both sides activations: a[2,3,4] @ b[2,4,5] → [2,3,5]: MACs = 2*3*5*4 = 120 (fixed batch 2 kept)
    mm = _model(
        [
            helper.make_node("MatMul", ["a", "w"], ["y"], name="mm1"),
            helper.make_node("MatMul", ["p", "q"], ["z"], name="mm2"),
        ],
        [_vi("a", ["N", 4, 6, 8]), _vi("p", [2, 3, 4]), _vi("q", [2, 4, 5])],
        [_vi("y", ["N", 4, 6, 5]), _vi("z", [2, 3, 5])],
        [_init("w", 8, 5)],
    )
    stats = model_stats(mm)
    assert {l.node: l.macs for l in stats.layers} == {"mm1": 960, "mm2": 120}
    assert stats.params == 40


def test_conv_transpose_and_conv1d_macs_by_hand() -> None:
    # ConvTranspose: x[1,2,4,4], w[2,3,2,2] stride 2 → [1,3,8,8]; MACs = input elems 32 * Cout 3 * 4 = 384
    # Conv1d: u[1,2,10], v[4,2,3] → [1,4,8]; MACs = 32 output elems * 2*3 = 192
    model = _model(
        [
            helper.make_node("ConvTranspose", ["x", "w"], ["y"], name="up", strides=[2, 2]),
            helper.make_node("Conv", ["u", "v"], ["z"], name="conv1d"),
        ],
        [_vi("x", [1, 2, 4, 4]), _vi("u", [1, 2, 10])],
        [_vi("y", [1, 3, 8, 8]), _vi("z", [1, 4, 8])],
        [_init("w", 2, 3, 2, 2), _init("v", 4, 2, 3)],
    )
    stats = model_stats(model)
    assert {l.node: l.macs for l in stats.layers} == {"up": 384, "conv1d": 192}
    assert stats.params == 24 + 24


def test_symbolic_spatial_dims_give_null_macs_with_reason() -> None:
    model = _cnn(spatial=("H", "W"))
    stats = model_stats(model)
    assert stats.macs is None
    assert "x [1, 4, 'H', 'W']" in stats.macs_unknown_reason
    assert "--shape x=1x4xHxW" in stats.macs_unknown_reason
    assert {l.node: l.macs for l in stats.layers}["conv1"] is None
    assert stats.params == 733  # params do not depend on shapes
    fixed = model_stats(model, {"x": [1, 4, 10, 10]})
    assert fixed.macs == 10480
    with pytest.raises(BadInputError, match="unknown input"):
        model_stats(model, {"y": [1, 4, 10, 10]})
    with pytest.raises(BadInputError, match="4 dims"):
        model_stats(model, {"x": [1, 4, 10]})


def test_paddle_style_minus_one_dims_are_dynamic() -> None:
    model = _cnn(spatial=(-1, -1))
    model.graph.input[0].type.tensor_type.shape.dim[0].Clear()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = -1
    stats = model_stats(model)
    assert stats.macs is None and "--shape x=1x4x?x?" in stats.macs_unknown_reason
    assert model_stats(model, {"x": [1, 4, 10, 10]}).macs == 10480


def test_constant_node_weights_count_as_params() -> None:
    w = RNG.standard_normal((3, 4)).astype(np.float32)
    model = _model(
        [
            helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(w, "w")),
            helper.make_node("Constant", [], ["shape"], value=numpy_helper.from_array(np.array([-1, 3]), "s")),
            helper.make_node("MatMul", ["x", "w"], ["m"], name="mm"),
            helper.make_node("Reshape", ["m", "shape"], ["y"], name="reshape"),
        ],
        [_vi("x", ["N", 3])],
        [_vi("y", ["N", 4])],
        [],
    )
    stats = model_stats(model)
    assert stats.params == 12  # the int64 shape constant is not a parameter
    assert [(l.node, l.params, l.macs) for l in stats.layers] == [("mm", 12, 12)]


def test_big_constant_weights_and_sparse_initializers() -> None:
    # A Constant-node weight above the inference threshold: [5000, 2] = 10000 elements.
    w = RNG.standard_normal((5000, 2)).astype(np.float32)
    big = _model(
        [
            helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(w, "w")),
            helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"),
        ],
        [_vi("x", ["N", 5000])],
        [_vi("y", ["N", 2])],
        [],
    )
    stats = model_stats(big)
    assert (stats.params, stats.macs) == (10000, 1 * 2 * 5000)
    # A sparse initializer [4, 3] with 2 stored values: params count the stored values; MACs use the dense shape.
    values = numpy_helper.from_array(np.array([1.0, 2.0], np.float32), "s")
    indices = numpy_helper.from_array(np.array([0, 7], np.int64), "s_idx")
    mm = helper.make_node("MatMul", ["x", "s"], ["y"], name="mm")
    sparse = _model([mm], [_vi("x", ["N", 4])], [_vi("y", ["N", 3])], [])
    sparse.graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, [4, 3]))
    stats = model_stats(sparse)
    assert (stats.params, stats.macs) == (2, 12)


def test_bytes_match_serialized_size(tmp_path: Path) -> None:
    model = _cnn()
    exact = len(model.SerializeToString())
    assert abs(model_bytes(model) - exact) <= 0.05 * exact
    path = tmp_path / "m.onnx"
    onnx.save(model, path, save_as_external_data=True, all_tensors_to_one_file=True, location="w.bin", size_threshold=0)
    on_disk = path.stat().st_size + (tmp_path / "w.bin").stat().st_size
    lazy = onnx.load(path, load_external_data=False)  # weights not loaded: sizes come from the references
    assert abs(model_bytes(lazy) - on_disk) <= 0.05 * on_disk
    assert model_stats(lazy).params == 733


def test_big_weights_are_not_copied_for_shape_inference() -> None:
    from onnxprune.io.weightless import WEIGHTLESS_MIN_BYTES
    from onnxprune.measure.stats import _inference_copy

    # Weights of 1 MiB and more, as an initializer and as a Paddle-style Constant node, become typed inputs.
    big = RNG.standard_normal((512, 512)).astype(np.float32)
    assert big.nbytes >= WEIGHTLESS_MIN_BYTES
    model = _model(
        [
            helper.make_node("Constant", [], ["wc"], value=numpy_helper.from_array(big, "wc")),
            helper.make_node("MatMul", ["x", "wi"], ["h"], name="mm1"),
            helper.make_node("MatMul", ["h", "wc"], ["h2"], name="mm2"),
            helper.make_node("Add", ["h2", "b"], ["y"], name="add"),
        ],
        [_vi("x", ["N", 512])],
        [_vi("y", ["N", 512])],
        [numpy_helper.from_array(big, "wi"), _init("b", 512)],
    )
    light = _inference_copy(model, {})
    assert [t.name for t in light.graph.initializer] == ["b"]  # small weights stay
    assert [n.op_type for n in light.graph.node] == ["MatMul", "MatMul", "Add"]
    inputs = {vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim] for vi in light.graph.input}
    assert inputs == {"x": [1, 512], "wi": [512, 512], "wc": [512, 512]}
    assert len(light.SerializeToString()) < 10_000
    stats = model_stats(model)
    assert {l.node: l.macs for l in stats.layers} == {"mm1": 512 * 512, "mm2": 512 * 512, "add": 0}
    assert stats.params == 2 * 512 * 512 + 512


def test_bytes_of_big_tensors_are_estimated_closely() -> None:
    # Above 1M elements the size comes from dtype x count (protobuf's ByteSize would walk the data).
    from onnxprune.measure.stats import _tensor_bytes

    t = numpy_helper.from_array(np.zeros((1100, 1000), np.float16), "big_weight")
    assert abs(_tensor_bytes(t) - t.ByteSize()) <= 16


def test_registry_is_an_object_with_duplicate_check() -> None:
    reg = MacsRegistry()
    reg.register("Conv", conv_macs)
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("Conv", conv_macs)
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("Conv", conv_macs, domain="ai.onnx")
    assert "Conv" in reg and "Gemm" not in reg
    stats = model_stats(_cnn(), registry=reg)  # Gemm has no handler here: 0 MACs
    assert stats.macs == 7200 + 2592 + 648
    assert "Gemm" in default_macs_registry() and "Gemm" not in reg  # each call builds a fresh one


# -- fidelity -------------------------------------------------------------------------------------


def test_fidelity_identical() -> None:
    logits = [RNG.standard_normal((4, 10)), RNG.standard_normal((3, 10))]
    f = fidelity(logits, [x.copy() for x in logits])
    assert f.samples == 7
    assert f.cosine == pytest.approx(1.0)
    assert f.max_abs_err == 0.0
    assert f.top1_agreement == 1.0
    assert f.kl == pytest.approx(0.0, abs=1e-12)


def test_fidelity_perturbed() -> None:
    ref = np.array([[1.0, 0.0], [0.0, 1.0], [3.0, 4.0], [1.0, 1.0]])
    cand = np.array([[0.0, 1.0], [0.0, 1.0], [3.0, 4.5], [-1.0, -1.0]])
    f = fidelity([ref], [cand])
    # per-row cosine: 0, 1, (9+18)/(5*sqrt(29.25)), -1
    expected_cos = (0 + 1 + 27 / (5 * np.sqrt(29.25)) - 1) / 4
    assert f.cosine == pytest.approx(expected_cos)
    assert f.max_abs_err == pytest.approx(2.0)
    assert f.top1_agreement == pytest.approx(0.75)  # rows 2, 3 and 4 agree (row 4 ties → index 0)
    assert f.kl > 0


def test_fidelity_probabilities_and_non_class_outputs() -> None:
    p = np.array([[0.5, 0.5]])
    q = np.array([[0.25, 0.75]])
    kl = 0.5 * np.log(0.5 / 0.25) + 0.5 * np.log(0.5 / 0.75)
    assert fidelity([p], [q]).kl == pytest.approx(kl)
    maps = RNG.standard_normal((2, 3, 4, 4))
    f = fidelity([maps], [maps * 2])
    assert f.top1_agreement is None and f.kl is None
    assert f.cosine == pytest.approx(1.0)
    assert f.samples == 2
    assert fidelity([maps], [maps * 2], class_axis=1).top1_agreement == pytest.approx(1.0)  # per pixel over C


def test_fidelity_agrees_per_position_on_sequence_outputs() -> None:
    # [N, T, C] recogniser-style scores: agreement and KL are over C at every (n, t), not over T.
    ref = RNG.standard_normal((2, 5, 4))
    cand = ref.copy()
    cand[0, 1] = -cand[0, 1]  # one position's argmax moves
    f = fidelity([ref], [cand])
    assert f.top1_agreement == pytest.approx(9 / 10)
    assert f.kl > 0
    same = fidelity([ref], [ref])
    assert same.top1_agreement == 1.0 and same.kl == pytest.approx(0.0, abs=1e-12)


def test_fidelity_one_score_per_sample() -> None:
    ref = np.array([1.0, 2.0, 3.0])
    f = fidelity([ref], [2 * ref])  # compared as one vector: same direction
    assert (f.samples, f.cosine, f.top1_agreement) == (3, pytest.approx(1.0), None)
    assert f.max_abs_err == pytest.approx(3.0)


def test_fidelity_errors() -> None:
    with pytest.raises(BadInputError):
        fidelity([], [])
    with pytest.raises(InvariantError, match="shape changed"):
        fidelity([np.zeros((2, 3))], [np.zeros((2, 4))])
    with pytest.raises(InvariantError, match="batches"):
        fidelity([np.zeros((2, 3))], [])


# -- report ---------------------------------------------------------------------------------------


def _pruned_cnn() -> onnx.ModelProto:
    """conv1 cut from 8 to 4 channels, and the depthwise conv removed (fc reads the grouped conv)."""
    model = _cnn(c1=4)
    nodes = [n for n in model.graph.node if n.name != "dw3"]
    inits = [t for t in model.graph.initializer if t.name != "w3"]
    del model.graph.initializer[:]
    model.graph.initializer.extend(inits)
    for n in nodes:
        if n.name == "gap":
            n.input[0] = "c2"
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def test_report_json_and_layers_matched_by_name() -> None:
    before, after = model_stats(_cnn()), model_stats(_pruned_cnn())
    # conv1: 4*4*9 + 4 = 148 params; MACs = 4*5*5*36 = 3600. conv2: w [8,2,3,3]: 144 params, 8*9*18 = 1296 MACs
    groups = [{"id": 0, "channels": 8, "kept": 4, "members": ["conv1", "bn1", "conv2"], "blocked": None}]
    fid = Fidelity(samples=8, cosine=0.99, max_abs_err=0.1, top1_agreement=1.0, kl=0.001)
    latency = {"original": {"p50": 2.0, "p90": 2.5}, "pruned": {"p50": 1.0, "p90": 1.2}}
    report = build_report(before, after, groups, fid, "l2", "cpu", latency=latency, extra={"plan": {"ratio": 0.5}})
    assert set(report) == {
        "original", "pruned", "groups", "layers", "fidelity", "criterion", "device", "onnxprune_version", "plan"
    }  # fmt: skip
    assert report["original"] == {
        "params": 733, "macs": 10480, "bytes": before.bytes, "latency_ms": latency["original"]
    }  # fmt: skip
    assert report["pruned"]["params"] == 148 + 16 + 144 + 45
    assert report["pruned"]["macs"] == 3600 + 1296 + 40
    assert report["groups"] == groups
    assert report["fidelity"] == {"samples": 8, "cosine": 0.99, "max_abs_err": 0.1, "top1_agreement": 1.0, "kl": 0.001}
    assert (report["criterion"], report["device"], report["onnxprune_version"]) == ("l2", "cpu", __version__)
    rows = {r["node"]: r for r in report["layers"]}
    assert rows["conv1"] == {
        "node": "conv1", "op": "Conv",
        "params_before": 296, "params_after": 148, "macs_before": 7200, "macs_after": 3600,
    }  # fmt: skip
    assert rows["dw3"]["params_after"] == 0 and rows["dw3"]["macs_after"] == 0  # removed node
    assert rows["fc"]["params_before"] == rows["fc"]["params_after"] == 45
    json.dumps(report)  # JSON-serializable
    with pytest.raises(BadInputError, match="overwrite"):
        build_report(before, after, [], None, "l2", "cpu", extra={"device": "x"})


def test_report_without_latency_or_fidelity_and_unknown_macs() -> None:
    stats = model_stats(_cnn(spatial=("H", "W")))
    report = build_report(stats, stats, [], None, "random", "cuda")
    assert "latency_ms" not in report["original"]
    assert report["fidelity"] is None
    assert report["original"]["macs"] is None and "--shape" in report["original"]["macs_unknown_reason"]
    text = render_table(report)
    assert "MACs unknown" in text and "layers changed: none" in text


def test_render_table() -> None:
    before, after = model_stats(_cnn()), model_stats(_pruned_cnn())
    fid = Fidelity(samples=8, cosine=0.99, max_abs_err=0.1, top1_agreement=0.875, kl=0.001)
    report = build_report(before, after, [{"id": 0}], fid, "l2", "cpu", latency={"original": 2.0, "pruned": 1.0})
    text = render_table(report)
    assert "criterion l2" in text
    assert "params" in text and "733" in text and "353" in text
    assert "-51.8%" in text  # params: 733 → 353
    assert "2.00x faster" in text  # latency halved
    assert "top-1 agreement 87.5%" in text
    assert "conv1" in text and "dw3" in text and "fc " not in text  # only changed layers are listed
    assert isinstance(before, ModelStats)
