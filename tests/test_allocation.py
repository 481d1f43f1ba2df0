"""``--allocation``: how a budget spreads its cut over the groups, and what ``auto`` picks."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest

from onnxprune._proto.convert import spec_from_proto, spec_to_proto
from onnxprune.cli import main
from onnxprune.errors import BadInputError
from onnxprune.pipeline import allocation_for
from onnxprune.spec import PruneSpec
from tests.models import BUILDERS


def test_auto_is_measured_with_data_else_global() -> None:
    assert allocation_for(PruneSpec(target_macs=0.7, calib="c.npz", reconstruct=True)) == "measured"
    assert allocation_for(PruneSpec(target_macs=0.7, finetune_steps=10, train_data="t.npz", calib="c.npz")) == "measured"
    assert allocation_for(PruneSpec(target_macs=0.7, eval_data="v.npz")) == "measured"
    assert allocation_for(PruneSpec(target_macs=0.7, calib="random")) == "global"
    assert allocation_for(PruneSpec(target_macs=0.7, finetune_steps=10, train_data="t.npz")) == "global"
    assert allocation_for(PruneSpec(target_macs=0.7, calib="c.npz", allocation="uniform")) == "uniform"


@pytest.mark.parametrize(("spec", "message"), [
    (PruneSpec(allocation="even"), "--allocation must be one of auto, uniform, global, measured"),
    (PruneSpec(ratio=0.3, allocation="uniform"), "--allocation applies to a budget"),
    (PruneSpec(target_macs=0.5, allocation="measured"), "--allocation measured needs real data"),
    (PruneSpec(target_macs=0.5, calib="random", allocation="measured"), "--allocation measured needs real data"),
])
def test_bad_allocations_name_the_option(spec: PruneSpec, message: str) -> None:
    with pytest.raises(BadInputError, match=message) as err:
        spec.validate()
    assert err.value.field == "allocation"


def test_allocation_travels_through_the_proto() -> None:
    spec = PruneSpec(target_macs=0.5, allocation="uniform").validate()
    assert spec_from_proto(spec_to_proto(spec)).allocation == "uniform"
    assert spec_from_proto(spec_to_proto(PruneSpec())).allocation == "auto"


@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_cli_budget_follows_the_allocation(allocation: str, tmp_path: Path) -> None:
    model = tmp_path / "resnet.onnx"
    onnx.save(BUILDERS["resnet_basic"](), model)
    report_path = tmp_path / "report.json"
    assert main(["prune", str(model), "-o", str(tmp_path / "small.onnx"), "--target-macs", "0.6",
                 "--allocation", allocation, "--report", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert report["spec"]["allocation"] == allocation
    assert report["budget"]["strategy"] == allocation and report["budget"]["achieved"]["macs"] <= 0.6
    kept = [g["kept"] / g["channels"] for g in report["groups"] if g["kept"] < g["channels"]]
    if allocation == "uniform":  # every group the same share, within a channel
        assert max(kept) - min(kept) < 0.1
    assert main(["prune", str(model), "-o", str(tmp_path / "x.onnx"), "--allocation", allocation]) == 2


def test_random_calibration_budget_says_the_scores_decide(tmp_path: Path) -> None:
    """``auto`` with ``--calib random`` falls back to the score ranking and says why; a chosen ``global`` says nothing."""
    model = tmp_path / "resnet.onnx"
    onnx.save(BUILDERS["resnet_basic"](), model)
    notes = {}
    for allocation in ("auto", "global"):
        report_path = tmp_path / f"{allocation}.json"
        assert main(["prune", str(model), "-o", str(tmp_path / f"{allocation}.onnx"), "--target-macs", "0.6",
                     "--calib", "random", "--allocation", allocation, "--report", str(report_path)]) == 0
        report = json.loads(report_path.read_text())
        assert report["budget"]["strategy"] == "global"
        notes[allocation] = " ".join(report["notes"])
    assert "random calibration inputs cannot rank channels" in notes["auto"]
    assert "random calibration inputs cannot rank channels" not in notes["global"]
