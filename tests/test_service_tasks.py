"""What one service job does (``onnxprune.service.tasks.run_task``), called directly: no server, no worker process.

The job is a pure function of (request, input folder) → (result files, report); these tests pin that contract:
analyze returns a report and no files, prune writes the model and ``report.json`` and lists them relative to the
output folder, data paths in the spec resolve inside the input folder (never the working directory), and the
pipeline's errors, progress and cancellation pass through unchanged.
"""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from onnxprune.errors import BadInputError, CancelledError
from onnxprune.progress import Progress
from onnxprune.service.tasks import ANALYZE, PRUNE, REPORT_NAME, TaskRequest, run_task
from onnxprune.spec import PruneSpec

REPO = Path(__file__).resolve().parents[1]
DIGITS = REPO / "examples" / "digits_cnn.onnx"


@pytest.fixture
def job_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """An input folder holding the model (as the executor places it) and an empty output folder; the working
    directory is elsewhere, so a path resolved against it would miss."""
    in_dir, out_dir = tmp_path / "in", tmp_path / "out"
    (in_dir / "models").mkdir(parents=True)
    out_dir.mkdir()
    shutil.copyfile(DIGITS, in_dir / "models" / "digits.onnx")
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    return in_dir, out_dir


def _run(request: TaskRequest, dirs: tuple[Path, Path], cancel: threading.Event | None = None,
         progress: list[Progress] | None = None) -> object:
    events = progress if progress is not None else []
    return run_task(request, dirs[0], dirs[1], events.append, cancel or threading.Event())


def test_analyze_returns_the_report_and_writes_nothing(job_dirs: tuple[Path, Path]) -> None:
    request = TaskRequest(ANALYZE, PruneSpec().to_dict(), "models/digits.onnx")
    result = _run(request, job_dirs)
    assert result.files == [] and result.report["prunable_groups"] >= 1
    assert not any(job_dirs[1].iterdir())


def test_prune_writes_the_model_and_the_report_and_lists_them(job_dirs: tuple[Path, Path]) -> None:
    in_dir, out_dir = job_dirs
    np.savez(in_dir / "calib.npz", input=np.random.default_rng(0).standard_normal((8, 1, 8, 8)).astype(np.float32))
    spec = PruneSpec(ratio=0.5, criterion="l1", calib="calib.npz", calib_samples=8)
    progress: list[Progress] = []
    result = _run(TaskRequest(PRUNE, spec.to_dict(), "models/digits.onnx", "small.onnx"), job_dirs, progress=progress)
    assert result.files == sorted(["small.onnx", REPORT_NAME])
    assert json.loads((out_dir / REPORT_NAME).read_text()) == json.loads(json.dumps(result.report, default=str))
    assert result.report["pruned"]["params"] < result.report["original"]["params"]
    assert {"load", "cut", "verify"} <= {p.stage for p in progress}


def test_a_data_path_is_looked_up_in_the_input_folder_only(job_dirs: tuple[Path, Path]) -> None:
    np.savez(Path.cwd() / "calib.npz", input=np.zeros((2, 1, 8, 8), np.float32))  # in the cwd, not the job
    spec = PruneSpec(calib="calib.npz")
    with pytest.raises(BadInputError):
        _run(TaskRequest(PRUNE, spec.to_dict(), "models/digits.onnx"), job_dirs)


def test_a_bad_spec_is_the_users_error(job_dirs: tuple[Path, Path]) -> None:
    data = PruneSpec().to_dict() | {"ratio": 1.5}
    with pytest.raises(BadInputError) as info:
        _run(TaskRequest(PRUNE, data, "models/digits.onnx"), job_dirs)
    assert info.value.field == "ratio"


def test_a_cancelled_job_stops_with_cancelled_error(job_dirs: tuple[Path, Path]) -> None:
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(CancelledError):
        _run(TaskRequest(PRUNE, PruneSpec().to_dict(), "models/digits.onnx"), job_dirs, cancel=cancel)
    assert not any(job_dirs[1].iterdir())
