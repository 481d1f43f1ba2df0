"""Shapes from one onnxruntime run give MACs where onnx shape inference leaves dims unknown (issue 10, item 4)."""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune.errors import BadInputError
from onnxprune.measure.stats import (
    default_macs_registry,
    infer_dims,
    macs_tensors,
    model_stats,
)
from onnxprune.report import build_report
from onnxprune.runtime.shapes import run_shapes
from tests.data import rapidocr_model_dir


def _i64(name: str, values: list[int]) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(values, np.int64), name)


def _runtime_reshape_model() -> onnx.ModelProto:
    """x[N,T,8] → MatMul w1[8,16] → h[N,T,16] → Reshape to [N, T*4/2, 8] → MatMul w2[8,4] → y[N,2T,4].

    The target comes from Shape → Gather → Mul → Div → Concat; onnx's data propagation has no Div, so
    shape inference cannot know the Reshape's output even with every input dim fixed.
    """
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
        helper.make_node("Shape", ["h"], ["shp"], name="shape"),
        helper.make_node("Gather", ["shp", "zero"], ["b"], name="batch", axis=0),
        helper.make_node("Gather", ["shp", "one"], ["t"], name="time", axis=0),
        helper.make_node("Mul", ["t", "four"], ["t4"], name="times4"),
        helper.make_node("Div", ["t4", "two"], ["t2"], name="half"),
        helper.make_node("Concat", ["b", "t2", "eight"], ["target"], name="target", axis=0),
        helper.make_node("Reshape", ["h", "target"], ["r"], name="reshape"),
        helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2"),
    ]
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((8, 16)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "w2"),
        _i64("zero", [0]), _i64("one", [1]), _i64("two", [2]), _i64("four", [4]), _i64("eight", [8]),
    ]  # fmt: skip
    graph = helper.make_graph(
        nodes, "runtime_reshape", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "T", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits,
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_onnx_shape_inference_cannot_know_the_runtime_reshape() -> None:
    model = _runtime_reshape_model()
    dims, _ = infer_dims(model, {"x": [1, 5, 8]})
    assert dims.dims["h"] == [1, 5, 16]
    assert not all(isinstance(d, int) for d in dims.dims["r"])  # the premise of the tests below
    assert macs_tensors(model, dims, default_macs_registry()) == ["r", "y"]


def test_run_shapes_give_macs_by_hand() -> None:
    stats = model_stats(_runtime_reshape_model(), {"x": [1, 5, 8]})
    # mm1: [1,5,8] @ [8,16] → 5*16*8 = 640; reshape → [1,10,8]; mm2: [1,10,8] @ [8,4] → 10*4*8 = 320
    assert {layer.node: layer.macs for layer in stats.layers} == {"mm1": 640, "mm2": 320}
    assert (stats.macs, stats.macs_unknown_reason) == (960, None)


def test_run_shapes_api() -> None:
    model = _runtime_reshape_model()
    found = run_shapes(model, {"x": [1, 5, 8]}, ["r", "y"])
    assert (found["r"], found["y"], found["x"], found["w1"]) == ([1, 10, 8], [1, 10, 4], [1, 5, 8], [8, 16])
    every = run_shapes(model, {"x": [1, 3, 8]})  # every node output of the main graph
    assert (every["target"], every["t2"], every["r"]) == ([3], [1], [1, 6, 8])
    with pytest.raises(BadInputError, match="not tensors of the model"):
        run_shapes(model, {"x": [1, 5, 8]}, ["nope"])
    with pytest.raises(BadInputError, match="--shape x=1xNx8"):
        run_shapes(model)


def test_symbolic_input_without_shape_keeps_a_clear_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxprune.measure.stats as stats_module

    def no_run(*args: object, **kwargs: object) -> None:
        raise AssertionError("no run is possible without --shape")

    monkeypatch.setattr(stats_module, "complete_shapes", no_run)
    stats = model_stats(_runtime_reshape_model())
    assert stats.macs is None
    assert "--shape x=1xTx8" in stats.macs_unknown_reason


def test_failed_run_says_why() -> None:
    model = _runtime_reshape_model()
    four = next(t for t in model.graph.initializer if t.name == "four")
    four.CopyFrom(_i64("four", [3]))  # T*3/2: the Reshape cannot make [1, 7, 8] from 80 elements
    stats = model_stats(model, {"x": [1, 5, 8]})
    assert stats.macs is None
    assert "onnxruntime run to measure them failed" in stats.macs_unknown_reason
    assert {layer.node: layer.macs for layer in stats.layers}["mm1"] == 640


def test_weights_not_loaded_are_fed_zeros(tmp_path: Path) -> None:
    model = _runtime_reshape_model()
    path = tmp_path / "m.onnx"
    onnx.save(model, path, save_as_external_data=True, location="w.bin", size_threshold=100)
    lazy = onnx.load(path, load_external_data=False)
    assert {t.name for t in lazy.graph.initializer if t.data_location == TensorProto.EXTERNAL} == {"w1", "w2"}
    assert model_stats(lazy, {"x": [1, 5, 8]}).macs == 960
    onnx.save(model, path, save_as_external_data=True, location="w.bin", size_threshold=0)
    ints_not_loaded = onnx.load(path, load_external_data=False)  # the Reshape target's parts are missing too
    with pytest.raises(BadInputError, match="'zero'.*not loaded"):
        run_shapes(ints_not_loaded, {"x": [1, 5, 8]}, ["r"])


def test_torchscript_attention_export_with_runtime_view_shapes() -> None:
    torch = pytest.importorskip("torch")

    class Block(torch.nn.Module):
        """GPT-2-style attention and MLP: ``view(B, T, H, C // H)`` becomes a Reshape computed at run time."""

        def __init__(self, d: int = 32, heads: int = 4) -> None:
            super().__init__()
            self.heads = heads
            self.qkv, self.proj = torch.nn.Linear(d, 3 * d), torch.nn.Linear(d, d)
            self.fc, self.fc2 = torch.nn.Linear(d, 4 * d), torch.nn.Linear(4 * d, d)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, t, c = x.shape
            q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in self.qkv(x).split(c, 2))
            a = ((q @ k.transpose(-2, -1)).softmax(-1) @ v).transpose(1, 2).reshape(b, t, c)
            x = x + self.proj(a)
            return x + self.fc2(torch.relu(self.fc(x)))

    buf = io.BytesIO()
    torch.onnx.export(Block().eval(), (torch.randn(2, 6, 32),), buf, dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "N", 1: "T"}})
    model = onnx.load_from_string(buf.getvalue())
    t, d, h = 10, 32, 4
    # qkv T*d*3d, scores and weighted sum 2 * H*T*T*(d/H), proj T*d*d, MLP 2 * T*d*4d
    expected = t * d * 3 * d + 2 * h * t * t * (d // h) + t * d * d + 2 * t * d * 4 * d
    assert model_stats(model, {"x": [1, t, d]}).macs == expected
    assert "--shape x=1xTx32" in model_stats(model).macs_unknown_reason


def _ppocr(name: str) -> onnx.ModelProto:
    return onnx.load(str(rapidocr_model_dir() / name))


@pytest.mark.parametrize(
    ("name", "shape"),
    [("ch_PP-OCRv4_rec_infer.onnx", [1, 3, 48, 320]), ("ch_ppocr_mobile_v2.0_cls_infer.onnx", [1, 3, 48, 192])],
)
def test_paddle_ocr_macs_with_shape(name: str, shape: list[int]) -> None:
    model = _ppocr(name)
    started = time.perf_counter()
    stats = model_stats(model, {"x": shape})
    assert time.perf_counter() - started < 30
    assert stats.macs is not None and stats.macs > 0, stats.macs_unknown_reason
    assert all(layer.macs is not None for layer in stats.layers)
    report = build_report(stats, stats, [], None, "l2", "cpu")
    assert "macs_unknown_reason" not in report["original"] and report["original"]["macs"] == stats.macs


def test_paddle_ocr_rec_without_shape_names_the_input() -> None:
    stats = model_stats(_ppocr("ch_PP-OCRv4_rec_infer.onnx"))
    assert stats.macs is None and "--shape x=1x3x" in stats.macs_unknown_reason


def test_complete_shapes_fills_what_static_shapes_leaves_unknown() -> None:
    from onnxprune.io.shapes import static_shapes
    from onnxprune.runtime.shapes import complete_shapes

    model = _runtime_reshape_model()
    known = static_shapes(model, {"x": [1, 5, 8]})
    assert not all(isinstance(d, int) for d in known["r"])
    done, why = complete_shapes(model, {"x": [1, 5, 8]}, known)
    assert why is None and (done["r"], done["y"], done["h"]) == ([1, 10, 8], [1, 10, 4], [1, 5, 16])
    same, why = complete_shapes(model, None, static_shapes(model, None))  # T is symbolic: no run possible
    assert "--shape x=1xNx8" in why and not all(isinstance(d, int) for d in same["r"])


def test_paddle_ocr_rec_every_shape_from_the_run_agrees_with_inference() -> None:
    from onnxprune.io.shapes import static_shapes
    from onnxprune.runtime.shapes import complete_shapes

    model = _ppocr("ch_PP-OCRv4_rec_infer.onnx")
    known = static_shapes(model, {"x": [1, 3, 48, 320]})
    measured = run_shapes(model, {"x": [1, 3, 48, 320]})
    inferred = {k: v for k, v in known.items() if all(isinstance(d, int) for d in v)}
    assert {k: v for k, v in inferred.items() if k in measured and measured[k] != v} == {}
    done, why = complete_shapes(model, {"x": [1, 3, 48, 320]}, known)
    outputs = [o for n in model.graph.node for o in n.output if o]
    assert why is None and all(all(isinstance(d, int) for d in done[o]) for o in outputs)


def test_probes_follow_their_producers_and_big_weights_stay_out_of_the_copy() -> None:
    from onnxprune.runtime.shapes import _probe_model

    model = _runtime_reshape_model()
    big = np.zeros((16, 16384), np.float32)  # 1 MiB, in a Paddle-style Constant node
    model.graph.node.insert(0, helper.make_node("Constant", [], ["wc"], value=numpy_helper.from_array(big, "wc")))
    model.graph.node.append(helper.make_node("MatMul", ["h", "wc"], ["z"], name="mm3"))
    model.graph.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, None))
    copy, probes = _probe_model(model, ["h", "r"])
    order = [n.output[0] for n in copy.graph.node]
    assert order[order.index("h") + 1] == probes["h"] and order[order.index("r") + 1] == probes["r"]
    assert "wc" in {vi.name for vi in copy.graph.input} and len(copy.SerializeToString()) < 10_000
    found = run_shapes(model, {"x": [1, 5, 8]}, ["z", "r"])
    assert (found["z"], found["r"]) == ([1, 5, 16384], [1, 10, 8])
    assert model_stats(model, {"x": [1, 5, 8]}).macs == 960 + 5 * 16384 * 16
