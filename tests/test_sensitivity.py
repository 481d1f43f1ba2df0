"""Sensitivity analysis on the digits CNN: JSON, PNG with one curve per group, and allocation from the curves."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx_graphsurgeon as gs
import pytest

from onnxprune.io.load import load_model
from onnxprune.io.shapes import static_shapes
from onnxprune.planning.budget import fit_budget, sensitivity_order, uniform_order
from onnxprune.planning.cost import CostModel
from onnxprune.measure.stats import model_stats
from onnxprune.planning import sensitivity
from onnxprune.errors import BadInputError
from onnxprune.analysis.driver import analyze_graph
from onnxprune.importance.base import ScoringContext
from onnxprune.importance import score_groups
from tests.data import write_npz

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def digits_setup(digits_model_path: Path) -> tuple:
    model = load_model(digits_model_path).model
    graph = gs.import_onnx(model)
    analysis = analyze_graph(graph, static_shapes(model, {}))
    scores = score_groups(ScoringContext(graph, analysis), "l2")
    cost = CostModel(graph, analysis, model_stats(model))
    return model, analysis, scores, cost


def test_cli_writes_json_and_png(digits_model_path: Path, tmp_path: Path, digits) -> None:
    x_train, y_train, _, _ = digits
    calib = write_npz(tmp_path / "calib.npz", x_train[:256], y_train[:256])
    out, png = tmp_path / "sens.json", tmp_path / "sens.png"
    proc = subprocess.run(
        [sys.executable, "-m", "onnxprune.cli", "sensitivity", str(digits_model_path), "--calib", str(calib),
         "--calib-samples", "256", "-o", str(out), "--plot", str(png), "--device", "cpu"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    prunable = 5  # `onnxprune analyze examples/digits_cnn.onnx`: 5 prunable groups, the classifier's is blocked
    assert data["curves"] == prunable == len(data["groups"])
    assert data["metric"] == "accuracy" and data["baseline"] > 0.98 and data["samples"] == 256
    for group in data["groups"]:
        assert [p["ratio"] for p in group["points"]] == pytest.approx(list(sensitivity.DEFAULT_RATIOS))
        assert all(0.0 <= p["metric"] <= 1.0 and p["loss"] >= 0.0 and 0 < p["macs"] <= 1.0 for p in group["points"])
    head = png.read_bytes()[:24]
    assert head[:8] == PNG_MAGIC and head[12:16] == b"IHDR"
    width, height = struct.unpack(">II", head[16:24])
    assert width >= 400 and height >= 300
    assert "accuracy per share" in proc.stdout
    assert sensitivity.SensitivityResult.load(out).curves == prunable


def test_scan_without_labels_uses_agreement(digits_setup: tuple, digits) -> None:
    model, analysis, scores, cost = digits_setup
    x_train = digits[0]
    evaluate = sensitivity.Evaluator.from_data(model, [{"input": x_train[:128]}], None, "cpu")
    result = sensitivity.scan(model, analysis, scores, evaluate, ratios=(0.25, 0.75), cost=cost)
    assert result.metric == "top1_agreement" and result.loss == "top1_agreement_drop+kl" and result.baseline == 1.0
    assert result.curves == len(result.groups) == 5
    for curve in result.groups:
        first, last = curve.points
        assert first.removed < last.removed and last.macs < 1.0
        assert last.loss >= 0.0
    again = sensitivity.SensitivityResult.from_dict(json.loads(json.dumps(result.to_dict())))
    assert again.to_dict() == result.to_dict()
    with pytest.raises(BadInputError):
        sensitivity.scan(model, analysis, scores, evaluate, ratios=(0.0, 1.0))


def test_plot_draws_one_curve_per_group(digits_setup: tuple, digits, tmp_path: Path) -> None:
    model, analysis, scores, _ = digits_setup
    evaluate = sensitivity.Evaluator.from_data(model, [{"input": digits[0][:64]}], None, "cpu")
    keep = dict(list(scores.items())[:3])
    result = sensitivity.scan(model, analysis, keep, evaluate, ratios=(0.5,))
    assert sensitivity.plot(result, tmp_path / "p.png") == 3
    assert (tmp_path / "p.png").read_bytes()[:8] == PNG_MAGIC


def test_one_shot_curves_beat_uniform_on_held_out_digits(digits_setup: tuple, digits) -> None:
    """The cheap allocation (one scan, no search) already beats a uniform share at 70 % of the MACs."""
    model, analysis, scores, cost = digits_setup
    x_train, y_train, x_test, y_test = digits
    calib = sensitivity.Evaluator.from_data(model, [{"input": x_train[:512]}], y_train[:512], "cpu")
    result = sensitivity.scan(model, analysis, scores, calib, cost=cost)
    test = sensitivity.Evaluator.from_data(model, [{"input": x_test}], y_test, "cpu")
    accuracy = {}
    for order in (uniform_order(analysis, scores),
                  sensitivity_order(analysis, scores, result.curves_for_plan(), cost)):
        fit = fit_budget(analysis, scores, cost, order, {"macs": 0.7})
        assert 0.63 <= fit.achieved["macs"] <= 0.7
        accuracy[order.strategy], _ = test(sensitivity.cut_copy(model, analysis, fit.plan))
    print(f"held-out accuracy at 70% MACs: {accuracy}")
    assert accuracy["sensitivity"] > accuracy["uniform"] + 0.1
    assert np.isfinite(list(accuracy.values())).all()
