"""Progress events: within-stage fractions from the pipeline, placed on one overall bar."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

from onnxprune.commands._progress import StageBar
from onnxprune.errors import CancelledError
from onnxprune.pipeline import STAGES, prune
from onnxprune.progress import Progress
from onnxprune.spec import PruneSpec
from tests.models import build_vgg


def test_pipeline_reports_each_stage_within_its_own_range(tmp_path: Path) -> None:
    onnx.save(build_vgg(), tmp_path / "m.onnx")
    events: list[Progress] = []
    prune(tmp_path / "m.onnx", tmp_path / "o.onnx", PruneSpec(ratio=0.5, device="cpu"), progress=events.append)
    assert [e.stage for e in events if e.fraction == 0.0 and "(" in e.message] == [name for name, _ in STAGES]
    assert all(0.0 <= e.fraction <= 1.0 for e in events)
    assert events[-1] == Progress("done", 1.0, "done")
    bar = StageBar()
    placed = [bar.overall(e) for e in events]
    bar.close()
    assert placed == sorted(placed) and placed[0] == 0.0 and placed[-1] == 1.0


def test_cancel_stops_at_the_next_stage_boundary(tmp_path: Path) -> None:
    import threading

    onnx.save(build_vgg(), tmp_path / "m.onnx")
    cancel = threading.Event()
    seen: list[str] = []

    def progress(event: Progress) -> None:
        seen.append(event.stage)
        if event.stage == "score":
            cancel.set()

    with pytest.raises(CancelledError):
        prune(tmp_path / "m.onnx", tmp_path / "o.onnx", PruneSpec(device="cpu"), progress=progress, cancel=cancel)
    assert "cut" not in seen and not (tmp_path / "o.onnx").exists()
