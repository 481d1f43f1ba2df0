"""``--quantize``: INT8 static/dynamic and FP16 as the last pipeline stage, the accuracy guard, the report, the
refusals (no calibration data, fine-tuning a quantized model) and the service path.

The guard's case is a two-layer MLP whose input has one outlier feature (±1000) that the first layer ignores
(zero weights): per-tensor 8-bit activation ranges then round every other feature to zero, so quantizing the first
MatMul destroys the model, and only leaving it in float brings the accuracy back.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune import cli
from onnxprune._proto.convert import spec_from_proto, spec_to_proto
from onnxprune.errors import BadInputError
from onnxprune.pipeline import prune
from onnxprune.quantize import quantized_nodes
from onnxprune.quantize.convert import QuantizeOptions
from onnxprune.quantize.stage import Judge, quantize
from onnxprune.report import render_table
from onnxprune.spec import PruneSpec
from tests.data import held_out_accuracy, write_npz
from tests.test_service import start_server  # noqa: F401 - the fixture

QUANT_OPS = {"QuantizeLinear", "DequantizeLinear"}


@pytest.fixture(scope="module")
def digits_train(digits, tmp_path_factory: pytest.TempPathFactory) -> Path:
    x_train, y_train, _, _ = digits
    return write_npz(tmp_path_factory.mktemp("train") / "digits_train.npz", x_train, y_train)


def outlier_mlp(seed: int = 0) -> onnx.ModelProto:
    """x[N, 16] → MatMul fc1 → Relu → MatMul fc2 → y[N, 10]; fc1 ignores input feature 15 (zero weights)."""
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((16, 32)).astype(np.float32)
    w1[15] = 0.0
    w2 = rng.standard_normal((32, 10)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
         helper.make_node("Relu", ["h"], ["r"], name="relu"),
         helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")], "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def outlier_inputs(n: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 16)).astype(np.float32)
    x[:, 15] = 1000.0 * np.sign(rng.standard_normal(n))
    return x


def run(model: onnx.ModelProto | Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


@pytest.fixture(scope="module")
def outlier_case(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The MLP and a DATA file of its inputs labelled by its own float predictions (FP32 accuracy is 1.0)."""
    directory = tmp_path_factory.mktemp("outlier")
    model = outlier_mlp()
    path = directory / "mlp.onnx"
    onnx.save(model, path)
    x = outlier_inputs(256)
    data = write_npz(directory / "data.npz", x, run(model, {"x": x}).argmax(axis=1), input_name="x")
    return path, data


# -- each mode through the pipeline ---------------------------------------------------------------------------------

def test_int8_after_finetune_stays_within_half_a_point_and_reports_every_stage(
        digits_model_path: Path, digits_train: Path, digits_eval: Path, digits, tmp_path: Path) -> None:
    out = tmp_path / "digits_int8.onnx"
    spec = PruneSpec(ratio=0.5, calib=str(digits_train), calib_samples=256, finetune_steps=150,
                     train_data=str(digits_train), lr=3e-3, batch_size=64, eval_data=str(digits_eval),
                     quantize="int8", device="cpu")
    report = prune(digits_model_path, out, spec).report
    q = report["quantize"]
    written = onnx.load(out)
    assert QUANT_OPS <= {n.op_type for n in written.graph.node}
    assert q["mode"] == "int8" and q["calibration"] == "minmax" and "digits_train.npz" in q["calibration_data"]
    assert q["nodes_kept_float"] == [] and q["guard"] is None
    assert [s["stage"] for s in q["stages"]] == ["original", "pruned", "quantized"]
    original, pruned, quantized = q["stages"]
    assert quantized["bytes"] < 0.5 * pruned["bytes"] < 0.5 * original["bytes"]
    assert q["bytes_after"] == report["pruned"]["bytes"] == pytest.approx(len(out.read_bytes()), rel=0.01)
    # the metric the report gives is what onnxruntime measures on the written file
    assert quantized["metric"] == pytest.approx(held_out_accuracy(out, digits))
    assert original["metric"] == pytest.approx(held_out_accuracy(digits_model_path, digits))
    assert q["metric"]["drop_points"] == pytest.approx(100 * (pruned["metric"] - quantized["metric"]))
    assert q["metric"]["drop_points"] <= 0.5  # issue 14: INT8 within half a point of the pruned FP32 model
    assert [s["stage"] for s in report["metric"]["stages"]][-2:] == ["finetune", "quantize"]
    # the table shows the stages; params/MACs stay those of the FP32 graph (the layers keep their names)
    assert report["pruned"]["params"] < report["original"]["params"]
    assert "Dequantize" not in " ".join(r["op"] for r in report["layers"])
    table = render_table(report)
    assert "quantize int8, minmax calibration" in table and "quantized" in table


def test_int8_dynamic_needs_no_calibration(digits_model_path: Path, digits, tmp_path: Path) -> None:
    out = tmp_path / "dyn.onnx"
    report = prune(digits_model_path, out, PruneSpec(ratio=0.25, quantize="int8-dynamic", device="cpu",
                                                     bench=True)).report
    ops = {n.op_type for n in onnx.load(out).graph.node}
    assert {"ConvInteger", "MatMulInteger"} & ops and "DynamicQuantizeLinear" in ops
    q = report["quantize"]
    assert q["mode"] == "int8-dynamic" and q["calibration"] is None and q["metric"] is None
    assert q["bytes_after"] < 0.5 * q["bytes_before"]
    assert held_out_accuracy(out, digits) > 0.5  # a working classifier, not garbage
    latency = q["latency"]  # --bench: the FP32 input against the quantized model, interleaved
    assert latency["provider"] == "CPUExecutionProvider" and latency["batch"] == 1
    assert latency["fp32_p50_ms"] > 0 and latency["quantized_p50_ms"] > 0 and latency["speedup"] > 0
    assert [s["latency_p50_ms"] for s in q["stages"]] == [report["original"]["latency_ms"]["p50"],
                                                        latency["fp32_p50_ms"], latency["quantized_p50_ms"]]
    assert "latency batch 1 on CPUExecutionProvider" in render_table(report)


@pytest.mark.parametrize("keep_io", [True, False])
def test_fp16_keeps_float32_io_unless_asked(digits_model_path: Path, digits_eval: Path, tmp_path: Path,
                                            keep_io: bool) -> None:
    out = tmp_path / "fp16.onnx"
    report = prune(digits_model_path, out, PruneSpec(ratio=0.0, quantize="fp16", keep_io_types=keep_io,
                                                     eval_data=str(digits_eval), device="cpu")).report
    model = onnx.load(out)
    io_type = TensorProto.FLOAT if keep_io else TensorProto.FLOAT16
    assert [v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]] == [io_type, io_type]
    assert {t.data_type for t in model.graph.initializer if len(t.dims) > 1} == {TensorProto.FLOAT16}
    q = report["quantize"]
    assert q["bytes_after"] < 0.6 * q["bytes_before"]
    assert q["metric"]["drop_points"] <= 0.5


def test_quant_exclude_leaves_matching_layers_float_and_says_why(digits_model_path: Path, digits_train: Path,
                                                                 tmp_path: Path) -> None:
    for mode in ("int8", "int8-dynamic"):
        report = prune(digits_model_path, tmp_path / f"{mode}.onnx",
                       PruneSpec(ratio=0.5, calib=str(digits_train), quantize=mode, quant_exclude=["/fc/*"],
                                 device="cpu")).report
        assert report["quantize"]["nodes_kept_float"] == [
            {"node": "/fc/Gemm", "op": "Gemm" if mode == "int8" else "MatMul", "reason": "--quant-exclude /fc/*"}]
        fc = [n for n in onnx.load(tmp_path / f"{mode}.onnx").graph.node if n.name.startswith("/fc/Gemm")]
        assert fc and all(n.op_type in ("Gemm", "MatMul", "Add") for n in fc)


# -- the accuracy guard ---------------------------------------------------------------------------------------------

def test_guard_keeps_the_sensitive_layer_float_until_within_the_drop(outlier_case: tuple[Path, Path],
                                                                     tmp_path: Path) -> None:
    model, data = outlier_case
    base = PruneSpec(ratio=0.0, calib=str(data), calib_samples=128, eval_data=str(data), quantize="int8",
                     device="cpu")
    unguarded = prune(model, tmp_path / "plain.onnx", base).report["quantize"]
    assert unguarded["metric"]["drop_points"] > 10  # the case really needs the guard
    guarded = prune(model, tmp_path / "guarded.onnx", PruneSpec(**{**base.to_dict(), "quant_max_drop": 1.0})).report
    q = guarded["quantize"]
    assert q["max_drop_points"] == 1.0 and q["metric"]["drop_points"] <= 1.0
    assert [f["node"] for f in q["nodes_kept_float"]] == ["fc1"]
    assert q["nodes_kept_float"][0]["reason"].startswith("accuracy guard: sensitivity rank 1 of 3")
    guard = q["guard"]
    assert guard["all_quantized"] == pytest.approx(unguarded["metric"]["after"])
    assert [r["node"] for r in guard["ranking"]] == ["fc1", "fc2", "every Relu (1 nodes)"]
    assert guard["kept_float"] == ["fc1"]
    assert not guard["fell_back"]
    written = onnx.load(tmp_path / "guarded.onnx")
    fc1 = next(n for n in written.graph.node if n.name == "fc1")
    assert fc1.input[1] == "w1"  # its weight is the float initializer; fc2's goes through DequantizeLinear
    assert any(n.op_type == "DequantizeLinear" for n in written.graph.node)
    assert "accuracy guard" in render_table(guarded)


def test_guard_on_calibration_agreement_without_eval_data(outlier_case: tuple[Path, Path]) -> None:
    """No --eval-data: the judge is top-1 agreement with the FP32 model on the calibration batches."""
    model = onnx.load(outlier_case[0])
    x = outlier_inputs(64, seed=3)
    reference = run(model, {"x": x}).argmax(axis=1)
    judge = Judge(lambda m: float(np.mean(run(m, {"x": x}).argmax(axis=1) == reference)), "top1_agreement", "x", 1.0)
    result = quantize(model, QuantizeOptions("int8"), batches=lambda: [{"x": x[:32]}, {"x": x[32:]}], judge=judge,
                      limit_points=2.0)
    assert result.metric is not None and result.metric.drop_points <= 2.0
    assert [f.node for f in result.kept_float] == ["fc1"]


def test_guard_falls_back_to_float_when_no_quantized_model_is_within(outlier_case: tuple[Path, Path]) -> None:
    model = onnx.load(outlier_case[0])
    x = outlier_inputs(64, seed=3)
    judged: list[onnx.ModelProto] = []
    judge = Judge(lambda m: judged.append(m) or 0.0, "score", "x", 1.0)  # every converted model fails
    result = quantize(model, QuantizeOptions("int8"), batches=lambda: [{"x": x}], judge=judge, limit_points=0.5)
    assert result.guard is not None and result.guard.fell_back
    assert quantized_nodes(result.model) == [] and result.metric is not None and result.metric.after == 1.0
    assert {f.node for f in result.kept_float} == {"fc1", "fc2"}
    assert any("FP32 model is kept" in n for n in result.notes)
    assert len(judged) == 1 + 3 + 1  # all quantized, one per candidate (fc1, fc2, the Relu) float, all float


# -- refusals ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("calib", [None, "random"])
def test_int8_without_real_calibration_data_is_refused(calib: str | None) -> None:
    with pytest.raises(BadInputError, match="--quantize int8 is calibrated on real samples") as info:
        PruneSpec(quantize="int8", calib=calib).validate()
    assert info.value.field == "quantize"


def test_cli_refuses_int8_without_calib_with_exit_code_2(digits_model_path: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    rc = cli.main(["prune", str(digits_model_path), "-o", str(tmp_path / "o.onnx"), "--quantize", "int8"])
    assert rc == 2
    assert "--calib DATA" in capsys.readouterr().err


@pytest.mark.parametrize("bad", [{"quantize": "int4"}, {"quant_calibration": "mse"}, {"quant_max_drop": -1.0},
                                 {"quantize": "fp16", "quant_max_drop": 1.0},
                                 {"quantize": "fp16", "iterations": 2}])
def test_bad_quantize_options_name_the_field(bad: dict) -> None:
    with pytest.raises(BadInputError) as info:
        PruneSpec(**bad).validate()
    assert info.value.field in bad


def test_finetuning_a_quantized_model_is_refused(digits_model_path: Path, digits_train: Path,
                                                 tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    qdq = tmp_path / "qdq.onnx"
    prune(digits_model_path, qdq, PruneSpec(ratio=0.0, calib=str(digits_train), quantize="int8", device="cpu"))
    rc = cli.main(["finetune", str(qdq), "--train-data", str(digits_train), "-o", str(tmp_path / "t.onnx"),
                   "--steps", "2", "--device", "cpu"])
    assert rc == 2
    assert "the model is quantized" in capsys.readouterr().err
    with pytest.raises(BadInputError, match="already quantized"):
        prune(qdq, tmp_path / "again.onnx", PruneSpec(ratio=0.0, calib=str(digits_train), quantize="int8"))
    fp16 = tmp_path / "fp16.onnx"
    prune(digits_model_path, fp16, PruneSpec(ratio=0.0, quantize="fp16", device="cpu"))
    with pytest.raises(BadInputError, match="float16 weights"):
        from onnxprune.training import FinetuneConfig, TrainData, finetune

        finetune(onnx.load(fp16), TrainData.load(str(digits_train)), FinetuneConfig(steps=2), device="cpu")


# -- front doors ----------------------------------------------------------------------------------------------------

def test_cli_options_reach_the_spec_and_the_report(digits_model_path: Path, digits_train: Path,
                                                   tmp_path: Path) -> None:
    report_path = tmp_path / "r.json"
    rc = cli.main(["prune", str(digits_model_path), "-o", str(tmp_path / "o.onnx"), "--ratio", "0.5", "--calib",
                   str(digits_train), "--quantize", "int8", "--quant-calibration", "percentile", "--quant-exclude",
                   "/fc/*", "/block/conv1/*", "--quant-max-drop", "2", "--keep-io-types", "false", "--device", "cpu",
                   "--report", str(report_path)])
    assert rc == 0
    report = json.loads(report_path.read_text())
    spec = report["spec"]
    assert (spec["quantize"], spec["quant_calibration"], spec["quant_exclude"], spec["keep_io_types"],
            spec["quant_max_drop"]) == ("int8", "percentile", ["/fc/*", "/block/conv1/*"], False, 2.0)
    q = report["quantize"]
    assert q["calibration"] == "percentile" and q["metric"]["label"] == "top1_agreement"
    assert "calibration data" in q["metric"]["data"] and q["metric"]["drop_points"] <= 2.0
    assert {f["node"] for f in q["nodes_kept_float"]} >= {"/fc/Gemm", "/block/conv1/Conv"}
    assert any(n.startswith("percentile calibration holds every activation") for n in q["notes"])


def test_histogram_calibration_is_bounded_by_activation_memory(digits_model_path: Path) -> None:
    """Entropy/percentile calibration keeps every activation in memory: samples are capped to a byte budget."""
    from onnxprune.quantize import convert

    model = onnx.load(digits_model_path)
    x = np.zeros((8, 1, 8, 8), np.float32)
    limit, per_sample = convert.histogram_samples(model, lambda: [{"input": x}])
    assert 4 * 16 * 8 * 8 < per_sample < 4 * 200 * 8 * 8 * 4  # the stem's activations, not the weights
    assert limit == convert.HISTOGRAM_BUDGET // per_sample
    reader = convert._Reader(lambda: [{"input": x}, {"input": x}], ["input"], limit=11)
    assert [len(b["input"]) for b in iter(reader.get_next, None)] == [8, 3]
    reader.rewind()
    assert reader.get_next()["input"].shape == (8, 1, 8, 8)


def test_quantize_options_cross_the_wire() -> None:
    spec = PruneSpec(calib="c.npz", quantize="int8", quant_calibration="entropy", quant_exclude=["a*", "b"],
                     keep_io_types=False, quant_max_drop=0.5).validate()
    assert spec_from_proto(spec_to_proto(spec)) == spec
    assert spec_from_proto(spec_to_proto(PruneSpec())).quantize == "none"


def test_service_runs_quantize_jobs(start_server, digits_model_path: Path, digits_train: Path,  # noqa: F811
                                    tmp_path: Path) -> None:
    from onnxprune.client import Client
    from onnxprune.service.tasks import run_task

    _, target = start_server(task=run_task)
    spec = PruneSpec(ratio=0.5, calib=str(digits_train), quantize="int8", quant_exclude=["/fc/*"], device="cpu")
    embedded = prune(digits_model_path, tmp_path / "embedded" / "q.onnx", spec)
    with Client(target) as client:
        remote = client.prune(digits_model_path, tmp_path / "remote" / "q.onnx", spec)
        with pytest.raises(BadInputError, match="--calib DATA"):
            client.prune(digits_model_path, tmp_path / "remote" / "bad.onnx", PruneSpec(quantize="int8"))
    assert remote.report["quantize"]["nodes_kept_float"] == embedded.report["quantize"]["nodes_kept_float"]
    assert remote.report["quantize"]["bytes_after"] == embedded.report["quantize"]["bytes_after"]
    assert QUANT_OPS <= {n.op_type for n in onnx.load(tmp_path / "remote" / "q.onnx").graph.node}


def test_max_drop_budget_covers_pruning_and_quantization(digits_model_path: Path, digits_train: Path,
                                                          digits_eval: Path, tmp_path: Path) -> None:
    """With --max-drop the guard gets what pruning left of the budget, so the result stays within it."""
    report = prune(digits_model_path, tmp_path / "q.onnx",
                   PruneSpec(eval_data=str(digits_eval), max_drop=1.0, calib=str(digits_train), calib_samples=256,
                             quantize="int8", device="cpu")).report
    metric, q = report["metric"], report["quantize"]
    pruned_drop = 100 * (metric["original"] - q["metric"]["before"])
    assert q["max_drop_points"] == pytest.approx(max(0.0, 1.0 - pruned_drop))
    assert metric["drop_points"] <= 1.0 + 1e-9
    assert metric["pruned"] == pytest.approx(q["metric"]["after"])
    assert metric["stages"][-1]["stage"] == "quantize"


def test_guard_bisects_the_ranking_then_requantizes_passengers() -> None:
    """A synthetic metric whose single-layer gains mislead: C ranks above B alone, but B is the one needed."""
    from onnxprune.quantize.convert import Candidate
    from onnxprune.quantize.guard import keep_sensitive_float

    def value(floats: frozenset[str]) -> float:
        a, b, c = ("A" not in floats), ("B" not in floats), ("C" not in floats)  # quantized?
        return 1.0 - 0.012 * a - 0.008 * b - 0.001 * c - 0.012 * (a and c)

    candidates = [Candidate(x, "Conv", (f"{x}_node",)) for x in "ABCD"]
    quantize = lambda names: frozenset(n.removesuffix("_node") for n in names)  # noqa: E731 - the "model"
    result, model = keep_sensitive_float(candidates, quantize, value, 1.0, value(frozenset()), limit=0.5)
    assert [r.node for r in result.ranking] == ["A", "C", "B", "D"]
    assert result.kept_float == ["A", "B"] and model == frozenset({"A", "B"})
    assert result.final == pytest.approx(0.999) and not result.fell_back
    # bisection: all four, then two (fails), three (passes); the pass back drops C but needs B and A
    assert [(s.float_layers, s.passed, s.requantized) for s in result.steps] == [
        (4, True, None), (2, False, None), (3, True, None), (2, False, "B"), (2, True, "C"), (1, False, "A")]


@pytest.mark.slow
def test_ppocr_rec_int8_with_the_guard_stays_within_a_point(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """PP-OCRv4 rec loses points of character accuracy with every op INT8; the guard brings it within 1 point of its
    FP32 model on the rendered lines it measures on and says what stayed float. Other held-out lines are checked
    loosely: 32 validation lines decide, and a choice fitted to them carries their noise (a few points)."""
    from tests.tasks import ocr

    calib_images, _ = ocr.make_rec_dataset(32, seed=11)
    calib = ocr.save_npz(tmp_path / "calib.npz", ocr.INPUT_NAME, calib_images)
    val_images, val_texts = ocr.make_rec_dataset(32, seed=12)
    val = ocr.save_npz(tmp_path / "val.npz", ocr.INPUT_NAME, val_images,
                       ocr.text_labels(val_texts, ocr.load_charset()))
    held, texts = ocr.make_rec_dataset(64, seed=13)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # onnxruntime's tools like to drop temporary files into the working directory
    model, out = ocr.rec_model_path(), tmp_path / "rec_int8.onnx"
    report = prune(model, out, PruneSpec(ratio=0.0, calib=str(calib), calib_samples=32, eval_data=str(val),
                                         metric="ctc", quantize="int8", quant_max_drop=1.0, device="cpu",
                                         shapes={ocr.INPUT_NAME: [1, 3, ocr.REC_HEIGHT, ocr.REC_WIDTH]})).report
    q = report["quantize"]
    assert list(cwd.iterdir()) == []
    assert q["guard"] is not None and q["guard"]["all_quantized"] < q["metric"]["before"] - 0.01  # needed the guard
    assert q["metric"]["drop_points"] <= 1.0
    assert q["nodes_kept_float"] and all(f["reason"].startswith("accuracy guard") for f in q["nodes_kept_float"])
    fp32, int8 = ocr.evaluate_rec(model, held, texts), ocr.evaluate_rec(out, held, texts)
    if not q["guard"]["fell_back"]:
        assert quantized_nodes(onnx.load(out)) and q["bytes_after"] < q["bytes_before"]
    assert fp32["char_acc"] - int8["char_acc"] <= 0.05
