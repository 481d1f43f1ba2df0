"""onnxruntime sessions: device choice (all branches via fake probes), sessions, inputs, capture."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune.io.limits import MAX_IR_VERSION
from onnxprune.runtime.session import Session, _file_ir_version, build_session
from onnxprune.errors import BadInputError
from onnxprune.runtime.device import CPU, CUDA, DeviceChoice, DeviceInfo, probe_cuda, resolve_providers, select_device
from onnxprune.runtime.capture import capture, iter_capture
from onnxprune.runtime.session import make_session
from onnxprune.runtime import capture as capture_module
from onnxprune.runtime import session as session_module
from onnxprune.runtime.feeds import random_inputs


def _affine_model(batch: str | int = "N", ir_version: int | None = None) -> onnx.ModelProto:
    """y = (x * 2) + b with b = [0, 1, 2]; intermediate ``t`` = x * 2; also ``s`` = Shape(t) (int64)."""
    two = numpy_helper.from_array(np.array(2.0, np.float32), "two")
    b = numpy_helper.from_array(np.arange(3, dtype=np.float32), "b")
    nodes = [
        helper.make_node("Mul", ["x", "two"], ["t"], name="mul"),
        helper.make_node("Add", ["t", "b"], ["y"], name="add"),
        helper.make_node("Shape", ["t"], ["s"], name="shape"),
    ]
    graph = helper.make_graph(
        nodes,
        "affine",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 3])],
        [two, b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])  # onnx 1.23 writes IR 14
    if ir_version is not None:
        model.ir_version = ir_version
    return model


def _usable() -> DeviceInfo:
    return DeviceInfo(True)


def _unusable() -> DeviceInfo:
    return DeviceInfo(False, "no libcublas here")


def _must_not_probe() -> DeviceInfo:
    raise AssertionError("cpu must not probe CUDA")


# -- device choice ---------------------------------------------------------------------------


def test_cpu_never_probes() -> None:
    choice = select_device("cpu", probe=_must_not_probe)
    assert choice.providers == (CPU,)
    assert choice.name == "cpu"


def test_auto_uses_cuda_when_usable() -> None:
    choice = select_device("auto", probe=_usable)
    assert choice.providers == (CUDA, CPU)
    assert choice.name == "cuda"
    assert choice.note is None


def test_auto_falls_back_with_one_log_line(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="onnxprune.runtime"):
        choice = select_device("auto", probe=_unusable)
    assert choice.providers == (CPU,)
    assert choice.note == "no libcublas here"
    lines = [r.getMessage() for r in caplog.records if "CUDA" in r.getMessage()]
    assert lines == ["CUDA provider not usable (no libcublas here); running on CPU"]


def test_cuda_requested_and_usable() -> None:
    assert resolve_providers("cuda", probe=_usable) == [CUDA, CPU]


def test_cuda_requested_but_unusable_is_a_clear_error() -> None:
    with pytest.raises(BadInputError, match="CUDA provider is not usable.*no libcublas here") as err:
        select_device("cuda", probe=_unusable)
    assert err.value.field == "device"


def test_unknown_device() -> None:
    with pytest.raises(BadInputError, match="auto, cuda, cpu") as err:
        resolve_providers("tpu")
    assert err.value.field == "device"


def test_real_probe_is_consistent_with_choice() -> None:
    info = probe_cuda()
    assert isinstance(info, DeviceInfo)
    if info.cuda_usable:  # only on a GPU machine
        assert resolve_providers("cuda", probe=lambda: info)[0] == CUDA
    else:
        assert info.reason
        assert resolve_providers("auto", probe=lambda: info) == [CPU]


def test_session_on_a_cuda_choice_reports_the_provider_that_ran() -> None:
    # With a fake "usable" probe the session asks for CUDA; `provider` says what onnxruntime really used.
    with make_session(_affine_model(), DeviceChoice("auto", (CUDA, CPU)), threads=1) as sess:
        assert sess.provider in (CUDA, CPU)
        out = sess.run({"x": np.ones((1, 3), np.float32)})["y"]
    np.testing.assert_allclose(out, [[2, 3, 4]])


# -- sessions ---------------------------------------------------------------------------------


def test_session_from_proto_caps_ir_and_describes_io() -> None:
    model = _affine_model()
    assert model.ir_version > MAX_IR_VERSION
    with make_session(model, "cpu", threads=1) as sess:
        assert sess.provider == CPU
        assert sess.output_names == ["y"]
        (spec,) = sess.input_specs
        assert (spec.name, spec.shape, spec.dtype) == ("x", ("N", 3), np.dtype(np.float32))
        out = sess.run({"x": np.full((2, 3), 1.5, np.float32)})
    np.testing.assert_allclose(out["y"], [[3, 4, 5], [3, 4, 5]])
    assert model.ir_version > MAX_IR_VERSION  # the caller's proto is untouched


def test_session_from_path(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(_affine_model(ir_version=9), path)
    with make_session(path, "cpu") as sess:
        np.testing.assert_allclose(sess.run({"x": np.zeros((1, 3), np.float32)})["y"], [[0, 1, 2]])
    path14 = tmp_path / "m14.onnx"
    onnx.save(_affine_model(), path14)
    with make_session(str(path14), "cpu") as sess:
        assert sess.output_names == ["y"]


def test_session_from_path_with_external_data(tmp_path: Path) -> None:
    model = _big_weight_model()
    path = tmp_path / "ext.onnx"
    onnx.save(model, path, save_as_external_data=True, all_tensors_to_one_file=True, location="w.bin", size_threshold=0)
    x = np.ones((1, 64), np.float32)
    with make_session(path, "cpu") as sess:
        np.testing.assert_allclose(sess.run({"x": x})["y"], x @ _W, rtol=1e-5)
    lazy = onnx.load(path, load_external_data=False)
    with pytest.raises(BadInputError, match="external data that was not loaded"):
        make_session(lazy, "cpu")


_W = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)


def _big_weight_model() -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        "mm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 32])],
        [numpy_helper.from_array(_W, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_models_over_the_proto_limit_go_through_external_data(monkeypatch: pytest.MonkeyPatch) -> None:
    # Pretend 1 KB is the 2 GB limit: the session is built from a temp dir with external data.
    monkeypatch.setattr(session_module, "_PROTO_LIMIT", 1024)
    model = _big_weight_model()
    sess = make_session(model, "cpu", threads=1)
    tmp = Path(sess._tmpdir.name)  # noqa: SLF001 - checking the temp dir is cleaned up
    assert (tmp / "weights.bin").stat().st_size == _W.nbytes
    x = np.random.default_rng(1).standard_normal((2, 64)).astype(np.float32)
    np.testing.assert_allclose(sess.run({"x": x})["y"], x @ _W, rtol=1e-4, atol=1e-4)
    sess.close()
    assert not tmp.exists()
    assert len(model.graph.initializer[0].raw_data) == _W.nbytes  # caller's weights untouched


def test_session_errors(tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match="not found"):
        make_session(tmp_path / "missing.onnx", "cpu")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07" + b"garbage" * 10)
    with pytest.raises(BadInputError):
        make_session(bad, "cpu")
    with pytest.raises(BadInputError, match="threads"):
        make_session(_affine_model(), "cpu", threads=0)
    with make_session(_affine_model(), "cpu") as sess:
        with pytest.raises(BadInputError, match="missing \\['x'\\]"):
            sess.run({"z": np.zeros((1, 3), np.float32)})
        with pytest.raises(BadInputError, match="rejects inputs with shapes \\{'x': \\[1, 4\\]\\}"):
            sess.run({"x": np.zeros((1, 4), np.float32)})


def test_ir_version_read_from_file_head(tmp_path: Path) -> None:
    for ir in (3, 9, 14):
        path = tmp_path / f"m{ir}.onnx"
        onnx.save(_affine_model(ir_version=ir), path)
        assert _file_ir_version(path) == ir  # noqa: SLF001


# -- random inputs ----------------------------------------------------------------------------


def _multi_input_model() -> onnx.ModelProto:
    """Inputs: image [N, 3, H, W] float, ids [N, 5] int64, mask [N, 5] bool; output: ids cast to float."""
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["ids"], ["y"], to=TensorProto.FLOAT),
            helper.make_node("Identity", ["image"], ["img"]),
            helper.make_node("Not", ["mask"], ["m"]),
        ],
        "multi",
        [
            helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, "H", "W"]),
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 5]),
            helper.make_tensor_value_info("mask", TensorProto.BOOL, ["N", 5]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5]),
            helper.make_tensor_value_info("img", TensorProto.FLOAT, ["N", 3, "H", "W"]),
            helper.make_tensor_value_info("m", TensorProto.BOOL, ["N", 5]),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_random_inputs_resolve_batch_and_shapes() -> None:
    model = _multi_input_model()
    feeds = random_inputs(model, {"image": [1, 3, 16, 12]}, batch=4, seed=3)
    assert feeds["image"].shape == (4, 3, 16, 12) and feeds["image"].dtype == np.float32  # batch wins
    assert random_inputs(model, {"image": [2, 3, 16, 12]})["image"].shape == (2, 3, 16, 12)
    assert random_inputs(model, {"image": [2, 3, 16, 12]})["ids"].shape == (1, 5)
    assert feeds["ids"].shape == (4, 5) and feeds["ids"].dtype == np.int64
    assert set(np.unique(feeds["ids"])) <= {0, 1}
    assert feeds["mask"].dtype == np.bool_
    again = random_inputs(model, {"image": [1, 3, 16, 12]}, batch=4, seed=3)
    np.testing.assert_array_equal(feeds["image"], again["image"])
    with make_session(model, "cpu") as sess:
        from_session = random_inputs(sess, {"image": [1, 3, 16, 12]}, batch=4, seed=3)
        out = sess.run(from_session)
    np.testing.assert_array_equal(from_session["ids"], feeds["ids"])
    assert out["img"].shape == (4, 3, 16, 12)


def test_random_inputs_unresolved_symbolic_dim_names_the_fix() -> None:
    with pytest.raises(BadInputError, match=r"symbolic dim 'H'.*--shape image=1x3xNxN") as err:
        random_inputs(_multi_input_model(), batch=1)
    assert err.value.field == "shapes"


def test_random_inputs_reject_contradicting_shapes() -> None:
    model = _multi_input_model()
    with pytest.raises(BadInputError, match="4 dims"):
        random_inputs(model, {"image": [1, 3, 16]})
    with pytest.raises(BadInputError, match="axis 1 is fixed to 3"):
        random_inputs(model, {"image": [1, 4, 16, 16]})
    with pytest.raises(BadInputError, match="unknown input"):
        random_inputs(model, {"images": [1, 3, 16, 16]})
    with pytest.raises(BadInputError, match="batch"):
        random_inputs(_affine_model(), batch=0)


def test_minus_one_dims_are_dynamic() -> None:
    model = _multi_input_model()
    dims = model.graph.input[0].type.tensor_type.shape.dim  # image: [-1, 3, -1, -1] as Paddle writes it
    for i in (0, 2, 3):
        dims[i].Clear()
        dims[i].dim_value = -1
    with pytest.raises(BadInputError, match="--shape image="):
        random_inputs(model, batch=2)
    assert random_inputs(model, {"image": [1, 3, 8, 8]}, batch=2)["image"].shape == (2, 3, 8, 8)


def test_random_inputs_skip_initializers_listed_as_inputs() -> None:
    model = _affine_model(ir_version=3)
    model.graph.input.append(helper.make_tensor_value_info("b", TensorProto.FLOAT, [3]))  # IR 3 style
    assert list(random_inputs(model)) == ["x"]


# -- capture ----------------------------------------------------------------------------------


def test_capture_intermediate_input_and_initializer() -> None:
    model = _affine_model()
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    got = capture(model, ["t", "s", "x", "b", "y"], {"x": x}, "cpu")
    np.testing.assert_allclose(got["t"], 2 * x)
    assert got["s"].dtype == np.int64  # type found by shape inference (no value_info in the model)
    np.testing.assert_array_equal(got["s"], [2, 3])
    np.testing.assert_array_equal(got["x"], x)
    np.testing.assert_array_equal(got["b"], [0, 1, 2])
    np.testing.assert_allclose(got["y"], 2 * x + [0, 1, 2])
    assert [o.name for o in model.graph.output] == ["y"]  # the caller's model is not changed


def test_capture_from_path_with_external_data(tmp_path: Path) -> None:
    model = _big_weight_model()
    model.graph.node.append(helper.make_node("Relu", ["y"], ["r"], name="relu"))
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info("r", TensorProto.FLOAT, ["N", 32]))
    path = tmp_path / "ext.onnx"
    onnx.save(model, path, save_as_external_data=True, location="w.bin", size_threshold=0)
    x = np.ones((2, 64), np.float32)
    got = capture(path, ["y"], {"x": x}, "cpu")
    np.testing.assert_allclose(got["y"], x @ _W, rtol=1e-4, atol=1e-4)


def test_capture_unknown_tensor() -> None:
    with pytest.raises(BadInputError, match="'nope' is not produced"):
        capture(_affine_model(), ["nope"], {"x": np.zeros((1, 3), np.float32)}, "cpu")


def test_iter_capture_builds_one_session(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = build_session  # noqa: SLF001

    def counting(*args: object, **kwargs: object) -> Session:
        calls.append(1)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(capture_module, "build_session", counting)
    batches = [{"x": np.full((n, 3), n, np.float32)} for n in (1, 2, 3)]
    results = list(iter_capture(_affine_model(), ["t"], batches, "cpu", threads=1))
    assert len(calls) == 1
    assert [r["t"].shape for r in results] == [(1, 3), (2, 3), (3, 3)]
    np.testing.assert_allclose(results[2]["t"], np.full((3, 3), 6.0))


def test_capture_over_the_proto_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(session_module, "_PROTO_LIMIT", 1024)
    model = _big_weight_model()
    graph = model.graph
    graph.node.append(helper.make_node("Relu", ["y"], ["r"], name="relu"))
    graph.output[0].CopyFrom(helper.make_tensor_value_info("r", TensorProto.FLOAT, ["N", 32]))
    x = np.ones((1, 64), np.float32)
    got = capture(model, ["y"], {"x": x}, "cpu")
    np.testing.assert_allclose(got["y"], x @ _W, rtol=1e-4, atol=1e-4)


def test_spinning_can_be_turned_off_for_interleaved_sessions() -> None:
    """Benchmarks alternate two sessions on the same cores; idle busy-waiting threads would skew them."""
    key = "session.intra_op.allow_spinning"
    with make_session(_affine_model(), "cpu", threads=2, spinning=False) as quiet:
        assert quiet._sess.get_session_options().get_session_config_entry(key) == "0"
        np.testing.assert_allclose(quiet.run({"x": np.ones((2, 3), np.float32)})["y"], [[2, 3, 4], [2, 3, 4]])
    with make_session(_affine_model(), "cpu", threads=2) as default:
        with pytest.raises(RuntimeError, match="does not have configuration"):  # onnxruntime's default: spin
            default._sess.get_session_options().get_session_config_entry(key)


def test_random_masks_are_all_ones() -> None:
    graph = helper.make_graph(
        [helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
         helper.make_node("Cast", ["input_ids"], ["i"], to=TensorProto.FLOAT),
         helper.make_node("Add", ["m", "i"], ["y"])],
        "masks", [helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [2, 64]),
                  helper.make_tensor_value_info("input_ids", TensorProto.INT64, [2, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 64])])
    feeds = random_inputs(helper.make_model(graph))
    assert (feeds["attention_mask"] == 1).all()
    assert set(np.unique(feeds["input_ids"])) == {0, 1}  # other integer inputs stay random
