"""The pipeline: load → analyze → calibrate → score → plan → cut → reconstruct → fine-tune → verify → report.

``prune`` is the one function every front door calls (CLI embedded mode, gRPC service, Python API):
a pure function of (model file, spec) → (pruned model file, report), with progress and cancellation
passed in. It never touches server state.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Any

from onnxprune.progress import ProgressFn
from onnxprune.spec import PruneSpec


@dataclass
class PruneResult:
    """What a prune job produced: the pruned model's path and the JSON-able report (DESIGN.md)."""

    output_path: str
    report: dict[str, Any]


def prune(
    model_path: str | os.PathLike[str],
    output_path: str | os.PathLike[str],
    spec: PruneSpec | None = None,
    *,
    progress: ProgressFn | None = None,
    cancel: threading.Event | None = None,
) -> PruneResult:
    """Prune ``model_path`` according to ``spec`` and write the result to ``output_path``."""
    raise NotImplementedError("pipeline.prune is being written (issue 2)")


def analyze(model_path: str | os.PathLike[str], shapes: dict[str, list[int]] | None = None) -> dict[str, Any]:
    """Return the dependency groups of a model as JSON-able data (what ``onnxprune analyze --json`` prints)."""
    raise NotImplementedError("pipeline.analyze is being written (issue 2)")


run = prune
