"""Budgets end to end: ``--target-macs/params/latency`` land where asked on the digits CNN and ResNet-50."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxprune.errors import PlanError
from onnxprune.pipeline import prune
from onnxprune.spec import PruneSpec

REPO = Path(__file__).resolve().parents[1]


def _fractions(report: dict) -> tuple[float, float]:
    orig, pruned = report["original"], report["pruned"]
    return pruned["macs"] / orig["macs"], pruned["params"] / orig["params"]


def _check_valid(path: Path) -> None:
    onnx.checker.check_model(str(path), full_check=True)


@pytest.fixture(scope="module")
def resnet50(light_model: Callable[[str], Path]) -> Path:
    return light_model("resnet50")


@pytest.mark.parametrize("round_to", [1, 8])
@pytest.mark.parametrize(("option", "target"), [("target_macs", 0.5), ("target_params", 0.3)])
def test_digits_budget_lands(digits_model_path: Path, tmp_path: Path, option: str, target: float,
                             round_to: int) -> None:
    out = tmp_path / "small.onnx"
    report = prune(digits_model_path, out, PruneSpec(**{option: target}, round_to=round_to)).report
    macs, params = _fractions(report)
    landed = macs if option == "target_macs" else params
    assert 0.9 * target <= landed <= target
    assert report["budget"]["achieved"][option.removeprefix("target_")] == pytest.approx(landed, abs=1e-6)
    if round_to > 1:
        for g in report["groups"]:
            assert g["kept"] == g["channels"] or g["kept"] % round_to == 0
    _check_valid(out)


@pytest.mark.slow
@pytest.mark.parametrize(("option", "target", "round_to"), [
    ("target_macs", 0.5, 1), ("target_params", 0.3, 1), ("target_macs", 0.5, 8), ("target_params", 0.3, 8),
])
def test_resnet50_budget_lands(resnet50: Path, tmp_path: Path, option: str, target: float, round_to: int) -> None:
    out = tmp_path / "r50.onnx"
    report = prune(resnet50, out, PruneSpec(**{option: target}, round_to=round_to)).report
    macs, params = _fractions(report)
    landed = macs if option == "target_macs" else params
    assert 0.9 * target <= landed <= target
    if round_to > 1:
        kept = [g["kept"] for g in report["groups"] if g["kept"] != g["channels"]]
        assert kept and all(k % round_to == 0 for k in kept)
    assert "budget" in " ".join(report["notes"])
    _check_valid(out)


def test_unreachable_budget(digits_model_path: Path, tmp_path: Path) -> None:
    with pytest.raises(PlanError, match="cannot be met"):
        prune(digits_model_path, tmp_path / "x.onnx", PruneSpec(target_params=0.001))


def test_cli_budget_and_bench(digits_model_path: Path, tmp_path: Path) -> None:
    report_path = tmp_path / "r.json"
    proc = subprocess.run(
        [sys.executable, "-m", "onnxprune.cli", "prune", str(digits_model_path), "-o", str(tmp_path / "s.onnx"),
         "--target-macs", "0.5", "--round-to", "8", "--bench", "--device", "cpu", "--report", str(report_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(report_path.read_text())
    assert 0.45 <= _fractions(report)[0] <= 0.5
    for side in ("original", "pruned"):
        latency = report[side]["latency_ms"]
        assert latency["p50"] > 0 and latency["p90"] >= latency["p50"] and latency["p99"] >= latency["p90"]
    assert report["latency_speedup"] > 0
    assert "latency" in proc.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "onnxprune.cli", "prune", str(digits_model_path), "-o", str(tmp_path / "t.onnx"),
         "--target-params", "0.001"], capture_output=True, text=True, timeout=300,
    )
    assert bad.returncode == 2 and "cannot be met" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.slow
def test_resnet50_target_latency(resnet50: Path, tmp_path: Path) -> None:
    """Measured on onnxruntime CPU: the search keeps the least-pruned candidate measured under the target."""
    report = prune(resnet50, tmp_path / "fast.onnx", PruneSpec(target_latency=0.75, device="cpu")).report
    budget = report["budget"]
    assert budget["targets"] == {"latency": 0.75}
    assert budget["achieved"]["latency"] <= 0.75
    assert 1 <= len(budget["candidates"]) <= 6
    assert any(c["latency"] == pytest.approx(budget["achieved"]["latency"], abs=1e-3) for c in budget["candidates"])
    assert _fractions(report)[0] < 1.0


def test_calibrated_budget_beats_uniform_on_held_out_digits(digits_model_path: Path, tmp_path: Path, digits) -> None:
    """Sensitivity-guided allocation vs the same share of every group, both at 50 % MACs, no fine-tuning."""
    import onnx_graphsurgeon as gs

    from onnxprune.io.load import load_model
    from onnxprune.io.shapes import static_shapes
    from onnxprune.planning.budget import fit_budget, uniform_order
    from onnxprune.planning.cost import CostModel
    from onnxprune.measure.stats import model_stats
    from onnxprune.planning import sensitivity
    from onnxprune.analysis.driver import analyze_graph
    from onnxprune.importance.base import ScoringContext
    from onnxprune.importance import score_groups
    from tests.data import write_npz

    x_train, y_train, x_test, y_test = digits
    calib = write_npz(tmp_path / "calib.npz", x_train[:512], y_train[:512])
    spec = PruneSpec(target_macs=0.5, calib=str(calib), calib_samples=512, device="cpu")
    result = prune(digits_model_path, tmp_path / "sens.onnx", spec)
    assert result.report["budget"]["strategy"] == "sensitivity-greedy"
    sens_macs = _fractions(result.report)[0]

    model = load_model(digits_model_path).model
    graph = gs.import_onnx(model)
    analysis = analyze_graph(graph, static_shapes(model, {}))
    scores = score_groups(ScoringContext(graph, analysis), "l2")
    cost = CostModel(graph, analysis, model_stats(model))
    uniform = fit_budget(analysis, scores, cost, uniform_order(analysis, scores), {"macs": 0.5})
    test = sensitivity.Evaluator.from_data(model, [{"input": x_test}], y_test, "cpu")
    acc_uniform, _ = test(sensitivity.cut_copy(model, analysis, uniform.plan))
    acc_sens, _ = test(onnx.load(str(tmp_path / "sens.onnx")))
    print(f"held-out accuracy at MACs {sens_macs:.3f}/{uniform.achieved['macs']:.3f}: "
          f"sensitivity {acc_sens:.3f}, uniform {acc_uniform:.3f} (original {test.baseline:.3f})")
    assert 0.45 <= sens_macs <= 0.5 and 0.45 <= uniform.achieved["macs"] <= 0.5
    assert acc_sens > acc_uniform + 0.03
    assert np.isfinite(acc_sens)
