"""What one job does, as a pure function: (request, input directory) → (result files, report).

This is the only service module that calls the pipeline, and it knows nothing about the server: no store, no
blobs, no gRPC. Progress and cancellation come in as arguments, so the same function runs in a local
worker process today and as a remote task (another machine, no shared filesystem) later.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onnxprune.progress import ProgressFn

PRUNE, ANALYZE = "prune", "analyze"
REPORT_NAME = "report.json"


@dataclass(frozen=True)
class TaskRequest:
    """A job as the worker sees it. ``spec`` is ``PruneSpec.to_dict()`` with data paths relative to the inputs."""

    kind: str
    spec: dict[str, Any]
    model_path: str
    output_name: str = "pruned.onnx"


@dataclass
class TaskResult:
    """Result files (relative to the output directory) and the JSON-able report."""

    files: list[str] = field(default_factory=list)
    report: dict[str, Any] = field(default_factory=dict)


TaskFn = Callable[[TaskRequest, Path, Path, ProgressFn, threading.Event], TaskResult]


def run_task(
    request: TaskRequest, in_dir: Path, out_dir: Path, progress: ProgressFn, cancel: threading.Event
) -> TaskResult:
    """Run one prune or analyze job on files already placed in ``in_dir``; write results into ``out_dir``.

    Raises:
        OnnxpruneError: whatever the pipeline raises (recorded on the job by the caller).
    """
    from onnxprune import pipeline
    from onnxprune.spec import DATA_OPTIONS, PruneSpec

    model = in_dir / request.model_path
    if request.kind == ANALYZE:
        return TaskResult(report=pipeline.analyze(model, request.spec.get("shapes") or None))
    data = dict(request.spec)
    for key in DATA_OPTIONS:
        if data.get(key) and data[key] != "random":
            data[key] = str(in_dir / data[key])
    spec = PruneSpec.from_dict(data).validate()
    result = pipeline.prune(model, out_dir / request.output_name, spec, progress=progress, cancel=cancel)
    (out_dir / REPORT_NAME).write_text(json.dumps(result.report, indent=2, default=str))
    files = sorted(str(p.relative_to(out_dir)) for p in out_dir.rglob("*") if p.is_file())
    return TaskResult(files=files, report=result.report)
