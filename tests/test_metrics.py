"""Task metrics (``--eval-data``/``--metric``): the numbers on hand-made outputs, the class axis at any rank,
user metrics through the CLI, and what the report says (metric per stage, fidelity from random inputs)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune import cli
from onnxprune.errors import BadInputError
from onnxprune.measure import metrics
from onnxprune.measure.metrics import TaskMetric
from onnxprune.pipeline import prune
from onnxprune.report import render_table
from onnxprune.spec import PruneSpec, parse_metric
from tests.data import held_out_accuracy

# -- the numbers ----------------------------------------------------------------------------------------------

def test_top1_counts_hits_and_skips_padding() -> None:
    out = np.array([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5], [0.0, 0.0, 1.0]])
    assert metrics.top1(out, np.array([1, 0, 0, 2]), axis=1) == 0.75
    seq = np.zeros((2, 3, 4))  # [N, T, C]: argmax per position
    seq[0, :, 1] = 1
    seq[1, :, 3] = 1
    labels = np.array([[1, 1, -1], [3, 0, -1]])  # -1: padding, not counted
    assert metrics.top1_hits(seq, labels, axis=2) == (3, 4)
    with pytest.raises(BadInputError, match=r"needs \[2, 3\]"):
        metrics.top1(seq, np.array([1, 3]), axis=2)


def test_agreement_over_the_class_axis_of_any_rank() -> None:
    ref = np.zeros((2, 3, 4))  # [N, T, C]
    ref[..., 0] = 1.0
    cand = ref.copy()
    cand[0, 1] = [0, 0, 5, 0]  # one position of six changes its argmax
    assert metrics.agreement(ref, cand, axis=2) == pytest.approx(5 / 6)
    assert metrics.agreement(ref, ref, axis=2) == 1.0
    dense = np.zeros((1, 3, 2, 2))  # [N, C, H, W]: argmax over axis 1 per pixel
    dense[0, 2] = 1.0
    moved = dense.copy()
    moved[0, :, 0, 0] = [0, 1, 0]
    assert metrics.agreement(dense, moved, axis=1) == 0.75


def test_kl_is_reported_negative_and_cosine_per_sample() -> None:
    p = np.array([[0.5, 0.5]])
    q = np.array([[0.9, 0.1]])
    expected = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    assert metrics.negative_kl(p, q, axis=1, form=metrics.PROBABILITIES) == pytest.approx(-expected)
    assert metrics.negative_kl(p, p, axis=1, form=metrics.PROBABILITIES) == pytest.approx(0.0)
    logits = np.log(q)  # the same distribution as logits: softmax recovers q
    assert metrics.negative_kl(np.log(p), logits, axis=1) == pytest.approx(-expected)
    a = np.array([[1.0, 0.0], [1.0, 1.0]])
    b = np.array([[0.0, 1.0], [2.0, 2.0]])
    assert metrics.cosine(a, b) == pytest.approx(0.5)


def test_ctc_reads_greedily_and_counts_edit_errors() -> None:
    def scores(paths: list[list[int]], classes: int = 5) -> np.ndarray:
        out = np.zeros((len(paths), len(paths[0]), classes))
        for n, path in enumerate(paths):
            out[n, np.arange(len(path)), path] = 1.0
        return out

    # blank 0 dropped, repeats collapsed unless a blank separates them: [3, 3, 0, 3, 1, 1] reads 3 3 1
    out = scores([[3, 3, 0, 3, 1, 1], [2, 0, 0, 0, 0, 4]])
    assert [r.tolist() for r in metrics.ctc_greedy(out, axis=2)] == [[3, 3, 1], [2, 4]]
    labels = np.array([[3, 3, 1, -1], [2, 2, 4, -1]])  # the second line misses one 2: one error in 6 characters
    assert metrics.ctc_hits(out, labels, axis=2) == (5, 6)
    assert metrics.edit_distance(np.array([1, 2, 3]), np.array([2, 3, 4, 5])) == 3
    with pytest.raises(BadInputError, match=r"labels \[N, L\]"):
        metrics.ctc_hits(out, np.array([3, 2]), axis=2)
    with pytest.raises(BadInputError, match=r"\[N, T, C\]"):
        metrics.ctc_hits(np.zeros((2, 5)), labels, axis=1)


def test_metric_names_parse_once() -> None:
    assert parse_metric("python:pkg.mod:fn").module == "pkg.mod"
    for bad in ("accuracy", "python:mod", "python:1mod:fn", "python:mod:fn-x"):
        with pytest.raises(BadInputError) as info:
            parse_metric(bad)
        assert info.value.field == "metric"


def test_spec_checks_metric_options() -> None:
    with pytest.raises(BadInputError, match="--max-drop needs --eval-data"):
        PruneSpec(max_drop=1.0).validate()
    with pytest.raises(BadInputError, match="--metric needs --eval-data"):
        PruneSpec(metric="agreement", calib="random").validate()
    with pytest.raises(BadInputError, match="leave out --target-macs"):
        PruneSpec(max_drop=1.0, eval_data="x.npz", target_macs=0.5).validate()
    with pytest.raises(BadInputError, match="max-drop"):
        PruneSpec(max_drop=-1.0, eval_data="x.npz").validate()
    PruneSpec(metric="kl", calib="c.npz").validate()  # the calibration data can carry a metric


# -- models built in code: the class axis comes from the graph ---------------------------------------------------

def _sequence_model(path: Path, softmax_axis: int | None, shape: list[int], seed: int = 0, noise: float = 0.0) -> Path:
    """x [N, 6] -> MatMul -> Reshape to ``shape`` (-1 batch) -> optional Softmax over ``softmax_axis``."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, int(np.prod(shape[1:])))).astype(np.float32)
    w += noise * np.random.default_rng(seed).standard_normal(w.shape).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Reshape", ["h", "shape"], ["s"])]
    out = "s"
    if softmax_axis is not None:
        nodes.append(helper.make_node("Softmax", ["s"], ["y"], axis=softmax_axis))
        out = "y"
    graph = helper.make_graph(
        nodes, "seq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array([-1, *shape[1:]], np.int64), "shape")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), path)
    return path


def _batches(n: int = 32, labels: np.ndarray | None = None) -> list[dict[str, np.ndarray]]:
    x = np.random.default_rng(1).standard_normal((n, 6)).astype(np.float32)
    return [{"x": x[:16], **({"labels": labels[:16]} if labels is not None else {})},
            {"x": x[16:], **({"labels": labels[16:]} if labels is not None else {})}]


def test_agreement_on_a_sequence_model_reads_the_softmax_axis(tmp_path: Path) -> None:
    original = _sequence_model(tmp_path / "a.onnx", -1, [1, 5, 7])  # [N, T=5, C=7], Softmax over C
    changed = _sequence_model(tmp_path / "b.onnx", -1, [1, 5, 7], seed=3, noise=0.5)
    batches = _batches()
    task = TaskMetric.create(str(original), lambda: iter(batches), parse_metric("agreement"), has_labels=False,
                             device="cpu")
    assert task.layout is not None and task.layout.class_axis == 2 and task.layout.form == metrics.PROBABILITIES
    assert task.baseline.value == 1.0 and task.baseline.compared == 32 * 5  # every position counts
    value = task(str(changed)).value
    assert 0.0 < value < 1.0
    # the same number by hand
    import onnxruntime as ort

    run = lambda p: np.concatenate([ort.InferenceSession(str(p)).run(None, b)[0] for b in batches])  # noqa: E731
    assert value == pytest.approx(metrics.agreement(run(original), run(changed), axis=2))
    kl = TaskMetric.create(str(original), lambda: iter(batches), parse_metric("kl"), has_labels=False, device="cpu")
    assert kl.baseline.value == pytest.approx(0.0, abs=1e-6) and kl(str(changed)).value < 0.0


def test_channels_first_softmax_beats_the_rank_rule(tmp_path: Path) -> None:
    """[N, C, T] with Softmax over axis 1: the graph says C is axis 1, although rank 3 alone would say the last."""
    model = _sequence_model(tmp_path / "m.onnx", 1, [1, 7, 5])
    labels = np.random.default_rng(2).integers(0, 7, size=(32, 5))
    batches = _batches(labels=labels)
    task = TaskMetric.create(str(model), lambda: iter(batches), None, has_labels=True, device="cpu")
    assert task.choice.name == "top1" and task.layout is not None and task.layout.class_axis == 1
    assert task.baseline.compared == 32 * 5


def test_top1_needs_labels_and_user_metrics_fail_clearly(tmp_path: Path) -> None:
    model = str(_sequence_model(tmp_path / "m.onnx", None, [1, 4]))
    batches = _batches()
    with pytest.raises(BadInputError, match="needs labels"):
        TaskMetric.create(model, lambda: iter(batches), parse_metric("top1"), has_labels=False, device="cpu")
    for name, message in (("python:tests.metric_fns:broken", "RuntimeError: metric exploded"),
                          ("python:tests.metric_fns:not_a_number", "finite float"),
                          ("python:tests.metric_fns:missing", "no function"),
                          ("python:no_such_module_here:f", "cannot import")):
        with pytest.raises(BadInputError, match=message):
            TaskMetric.create(model, lambda: iter(batches), parse_metric(name), has_labels=False, device="cpu")


def test_a_class_metric_on_an_output_without_classes_is_refused(tmp_path: Path) -> None:
    w = numpy_helper.from_array(np.ones((6,), np.float32), "w")
    graph = helper.make_graph([helper.make_node("ReduceSum", ["x"], ["y"], keepdims=0, axes=[1])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N"])], [w])
    path = tmp_path / "sum.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)], ir_version=7), path)
    batches = _batches()
    with pytest.raises(BadInputError, match="no class axis"):
        TaskMetric.create(str(path), lambda: iter(batches), parse_metric("agreement"), has_labels=False, device="cpu")
    auto = TaskMetric.create(str(path), lambda: iter(batches), None, has_labels=False, device="cpu")
    assert auto.choice.name == "cosine" and any("no class axis" in n for n in auto.notes)


# -- through the pipeline and the CLI ------------------------------------------------------------------------------





def test_report_gives_the_metric_of_the_original_each_stage_and_the_result(
    digits_model_path: Path, digits_eval: Path, digits, tmp_path: Path
) -> None:
    out = tmp_path / "p.onnx"
    report = prune(digits_model_path, out, PruneSpec(ratio=0.25, eval_data=str(digits_eval), device="cpu")).report
    metric = report["metric"]
    assert metric["name"] == "top1" and metric["label"] == "accuracy" and metric["higher_is_better"]
    assert metric["original"] == pytest.approx(held_out_accuracy(digits_model_path, digits))
    assert metric["pruned"] == pytest.approx(held_out_accuracy(out, digits))
    assert [s["stage"] for s in metric["stages"]] == ["cut"]
    assert metric["drop_points"] == pytest.approx((metric["original"] - metric["pruned"]) * 100, abs=1e-6)
    assert "450 samples, with labels" in metric["data"]
    table = render_table(report)
    assert f"metric accuracy on {digits_eval}" in table and f"original {metric['original']:.4f}" in table
    assert not report["fidelity_from_random"] and "evaluation data" in report["fidelity_data"]


def test_fidelity_on_random_inputs_says_so(digits_model_path: Path, tmp_path: Path) -> None:
    report = prune(digits_model_path, tmp_path / "p.onnx", PruneSpec(ratio=0.25, device="cpu")).report
    assert report["fidelity_from_random"] is True and report["fidelity_data"].startswith("random inputs")
    assert report["metric"] is None
    table = render_table(report)
    assert "fidelity on random inputs" in table and "says nothing about accuracy" in table


def test_python_metric_through_the_cli(digits_model_path: Path, digits_eval: Path, digits, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    out, rep = tmp_path / "p.onnx", tmp_path / "r.json"
    code = cli.main(["prune", str(digits_model_path), "-o", str(out), "--ratio", "0.25", "--device", "cpu",
                     "--eval-data", str(digits_eval), "--metric", "python:tests.metric_fns:accuracy",
                     "--report", str(rep)])
    assert code == 0, capsys.readouterr().err
    metric = json.loads(rep.read_text())["metric"]
    assert metric["name"] == metric["label"] == "python:tests.metric_fns:accuracy"
    assert metric["original"] == pytest.approx(held_out_accuracy(digits_model_path, digits))
    assert metric["pruned"] == pytest.approx(held_out_accuracy(out, digits))
    assert "metric python:tests.metric_fns:accuracy on" in capsys.readouterr().out
    # a broken one is the user's error: exit 2, one line
    code = cli.main(["prune", str(digits_model_path), "-o", str(out), "--eval-data", str(digits_eval),
                     "--metric", "python:tests.metric_fns:broken", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "metric exploded" in err


def test_cli_refuses_max_drop_without_eval_data(digits_model_path: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["prune", str(digits_model_path), "-o", str(tmp_path / "p.onnx"), "--max-drop", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "--max-drop needs --eval-data" in err and err.count("\n") == 1
