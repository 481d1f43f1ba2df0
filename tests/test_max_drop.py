"""``--max-drop``: the most compressed budget within the drop, never a result outside it on the eval data."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
from onnx import numpy_helper

from onnxprune import pipeline
from onnxprune.errors import PlanError
from onnxprune.pipeline import PruneState, prune
from onnxprune.planning.budget import DropProbe, bisect_max_drop
from onnxprune.report import render_table
from onnxprune.spec import PruneSpec
from tests.data import held_out_accuracy, write_npz


def test_bisection_keeps_the_smallest_passing_budget() -> None:
    """A metric that holds down to 0.4 of the MACs: the search ends within the tolerance above it."""
    def probe(target: float) -> DropProbe:
        return DropProbe(target, target, 1.0 if target >= 0.4 else 0.0, 0.0 if target >= 0.4 else 100.0,
                         target >= 0.4)

    probes = bisect_max_drop(probe, 0.1, tolerance=0.02, max_probes=10)
    best = min(p.achieved for p in probes if p.passed)
    assert 0.4 <= best < 0.42 and len(probes) <= 6


def test_max_drop_never_returns_a_model_outside_the_drop(digits_model_path: Path, digits_eval: Path, digits,
                                                          tmp_path: Path) -> None:
    original = held_out_accuracy(digits_model_path, digits)
    out, rep = tmp_path / "small.onnx", tmp_path / "r.json"
    from onnxprune import cli

    assert cli.main(["prune", str(digits_model_path), "-o", str(out), "--eval-data", str(digits_eval),
                     "--metric", "top1", "--max-drop", "1.0", "--device", "cpu", "--report", str(rep)]) == 0
    report = json.loads(rep.read_text())
    search = report["max_drop"]
    pruned = held_out_accuracy(out, digits)
    assert (original - pruned) * 100 <= 1.0 + 1e-9
    assert report["metric"]["pruned"] == pytest.approx(pruned) and report["metric"]["original"] == pytest.approx(original)
    passed = [p for p in search["probes"] if p["passed"]]
    assert passed and search["chosen"]["achieved"] == min(p["achieved"] for p in passed)
    assert any(not p["passed"] for p in search["probes"])  # the search found where the drop starts
    assert report["pruned"]["macs"] / report["original"]["macs"] == pytest.approx(search["chosen"]["achieved"], abs=0.01)
    assert all(p["drop_points"] > 1.0 for p in search["probes"] if not p["passed"])
    assert search["dimension"] == "macs" and search["probe_repair"] == "none"
    assert report["budget"]["achieved"]["macs"] == pytest.approx(search["chosen"]["achieved"])


def test_a_final_repair_outside_the_drop_steps_back_to_the_probe(digits_model_path: Path, digits_eval: Path, digits,
                                                                tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The full repair (more steps than a probe's) ruins the model: the passing probe's model is returned."""

    def ruinous_finetune(state: PruneState) -> None:
        if state.spec.finetune_steps <= pipeline.MAX_DROP_PROBE_STEPS:
            return  # probes: leave the cut model as it is
        model = onnx.ModelProto()
        model.CopyFrom(state.pruned)
        for init in model.graph.initializer:
            if init.name.endswith("weight") and len(init.dims) == 2:  # the classifier: scramble it
                w = numpy_helper.to_array(init)
                init.CopyFrom(numpy_helper.from_array(w[::-1].copy(), init.name))
        state.pruned = model

    stages = [(n, f) for n, f in pipeline.REPAIR_STAGES if n != "finetune"]
    monkeypatch.setattr(pipeline, "REPAIR_STAGES", stages + [("finetune", pipeline._measured("finetune",
                                                                                             ruinous_finetune))])
    x_train, y_train, _, _ = digits
    train = write_npz(tmp_path / "train.npz", x_train[:64], y_train[:64])
    spec = PruneSpec(eval_data=str(digits_eval), max_drop=1.0, finetune_steps=60, train_data=str(train),
                     device="cpu")
    out = tmp_path / "small.onnx"
    report = prune(digits_model_path, out, spec).report
    final = report["max_drop"]["final"]
    assert final["stepped_back_to_probe"] is True
    assert (report["metric"]["original"] - final["full_repair_value"]) * 100 > 1.0
    assert (held_out_accuracy(digits_model_path, digits) - held_out_accuracy(out, digits)) * 100 <= 1.0 + 1e-9
    assert final["value"] == pytest.approx(held_out_accuracy(out, digits))
    assert any("returning the passing probe" in n for n in report["notes"])
    assert "the passing probe" in render_table(report)


def test_no_budget_within_the_drop_is_a_plan_error(digits_model_path: Path, digits_eval: Path, tmp_path: Path) -> None:
    spec = PruneSpec(eval_data=str(digits_eval), metric="kl", max_drop=0.0, device="cpu")
    with pytest.raises(PlanError, match="no budget kept negative_kl within 0.0 points"):
        prune(digits_model_path, tmp_path / "x.onnx", spec)
    assert not (tmp_path / "x.onnx").exists()
