"""Small real job functions for service tests (a helper module: the tests of ``tasks.run_task`` itself are in
``test_service_tasks.py``).

They have the signature of ``onnxprune.service.tasks.run_task`` and run in the server's worker processes, so they
must be module-level (the worker imports them by name). They exercise the executor and store quickly and
deterministically; the end-to-end tests in ``test_service.py`` use the real pipeline.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

from onnxprune.errors import InvariantError, PlanError
from onnxprune.progress import ProgressFn, Reporter
from onnxprune.service.tasks import TaskRequest, TaskResult


def copy_task(request: TaskRequest, in_dir: Path, out_dir: Path, progress: ProgressFn,
              cancel: threading.Event) -> TaskResult:
    """"Prunes" by copying the model; the report records the spec so tests can check what arrived."""
    Reporter(progress, cancel)("copy", 0.0, "copying")
    shutil.copyfile(in_dir / request.model_path, out_dir / request.output_name)
    report = {"spec": request.spec, "inputs": sorted(str(p.relative_to(in_dir)) for p in in_dir.rglob("*"))}
    (out_dir / "report.json").write_text(json.dumps(report))
    return TaskResult(files=[request.output_name, "report.json"], report=report)


def slow_task(request: TaskRequest, in_dir: Path, out_dir: Path, progress: ProgressFn,
              cancel: threading.Event) -> TaskResult:
    """Works for ``calib_samples`` × 0.1 s, checking for cancellation at every step, then copies."""
    report = Reporter(progress, cancel)
    steps = int(request.spec["calib_samples"])
    for i in range(steps):
        report("work", i / steps, f"step {i + 1}/{steps}")
        time.sleep(0.1)
    return copy_task(request, in_dir, out_dir, progress, cancel)


def failing_task(request: TaskRequest, in_dir: Path, out_dir: Path, progress: ProgressFn,
                 cancel: threading.Event) -> TaskResult:
    raise PlanError("nothing to prune in this test model")


def invariant_task(request: TaskRequest, in_dir: Path, out_dir: Path, progress: ProgressFn,
                   cancel: threading.Event) -> TaskResult:
    """Fails as the verify stage does when onnxruntime cannot load the pruned model: our bug, not bad input."""
    raise InvariantError("onnxruntime cannot load the pruned model: Node (conv1) input channel mismatch")


def buggy_task(request: TaskRequest, in_dir: Path, out_dir: Path, progress: ProgressFn,
               cancel: threading.Event) -> TaskResult:
    """Fails with an exception outside onnxprune's error tree, as a plain bug does."""
    return {}["missing"]


def stubborn_task(request: TaskRequest, in_dir: Path, out_dir: Path, progress: ProgressFn,
                  cancel: threading.Event) -> TaskResult:
    """Ignores cancellation (a job stuck in a long native call): the executor must terminate it."""
    time.sleep(600)
    raise AssertionError("unreachable")


def crashing_task(request: TaskRequest, in_dir: Path, out_dir: Path, progress: ProgressFn,
                  cancel: threading.Event) -> TaskResult:
    """Dies like an OOM-killed process: no result, no exception."""
    import os

    os._exit(9)
