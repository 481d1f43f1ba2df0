"""The job function of the replica tests' servers: the real pipeline, except that a spec with ``seed >= 1000`` runs
``service_tasks.slow_task`` for ``seed - 1000`` steps of 0.1 s (a job that runs as long as a fault test needs),
logging one line as it starts and one as it ends.

Module-level and importable by name, because the servers' worker processes (and Ray's) import it.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from pathlib import Path

from onnxprune.progress import ProgressFn
from onnxprune.service.tasks import TaskRequest, TaskResult, run_task
from tests.service_tasks import slow_task

SLOW_SEED = 1000
log = logging.getLogger(__name__)


def mixed_task(request: TaskRequest, in_dir: Path, out_dir: Path, progress: ProgressFn,
               cancel: threading.Event) -> TaskResult:
    seed = int(request.spec.get("seed") or 0)
    if seed < SLOW_SEED:
        return run_task(request, in_dir, out_dir, progress, cancel)
    steps = seed - SLOW_SEED
    log.info("slow job: %d steps", steps)
    slow = dataclasses.replace(request, spec={**request.spec, "calib_samples": steps})
    result = slow_task(slow, in_dir, out_dir, progress, cancel)
    log.info("slow job: done")
    return result
