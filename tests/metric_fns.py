"""User metrics for ``--metric python:tests.metric_fns:FUNC`` in tests (the CLI and the service import them).

Each takes ``(outputs, batches)``: per batch, the model's outputs by name and the fed arrays plus ``labels``.
"""

from __future__ import annotations

import numpy as np


def accuracy(outputs: list[dict[str, np.ndarray]], batches: list[dict[str, np.ndarray]]) -> float:
    """Top-1 accuracy of the first output against ``labels``, computed independently of onnxprune."""
    hits = total = 0
    for out, batch in zip(outputs, batches, strict=True):
        scores = next(iter(out.values()))
        hits += int(np.count_nonzero(scores.argmax(axis=1) == batch["labels"]))
        total += len(batch["labels"])
    return hits / total


def broken(outputs: list[dict[str, np.ndarray]], batches: list[dict[str, np.ndarray]]) -> float:
    raise RuntimeError("metric exploded")


def not_a_number(outputs: list[dict[str, np.ndarray]], batches: list[dict[str, np.ndarray]]) -> object:
    return "high"
