"""The train-step benchmark runs, and (when PyTorch is installed) both sides compute the same loss."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_train_step as bench  # noqa: E402


def test_bench_step_matches_pytorch_loss() -> None:
    w = bench.make_weights(0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 3, 8, 8)).astype(np.float32)
    y = rng.integers(0, bench.CLASSES, 4).astype(np.int64)
    ((t_ort, loss_ort),) = bench.interleaved([bench.ort_stepper(w, x, y, threads=1, lr=0.01)], steps=2)
    assert t_ort > 0 and np.isfinite(loss_ort)
    if importlib.util.find_spec("torch") is None:
        pytest.skip("PyTorch not installed (benchmark extra)")
    ((_, loss_torch),) = bench.interleaved([bench.torch_stepper(w, x, y, threads=1, lr=0.01)], steps=2)
    # same weights, same data, same SGD: after 5 identical steps the losses agree
    assert loss_ort == pytest.approx(loss_torch, rel=1e-3)


def test_bench_transformer_step_matches_pytorch_loss() -> None:
    w = bench.make_transformer_weights(0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 5, bench.DIM)).astype(np.float32)
    y = rng.integers(0, bench.CLASSES, 3).astype(np.int64)
    ((_, loss_ort),) = bench.interleaved([bench.ort_stepper(w, x, y, 1, 0.05, "transformer")], steps=3)
    if importlib.util.find_spec("torch") is None:
        pytest.skip("PyTorch not installed (benchmark extra)")
    ((_, loss_torch),) = bench.interleaved([bench.torch_stepper(w, x, y, 1, 0.05, "transformer")], steps=3)
    assert loss_ort == pytest.approx(loss_torch, rel=1e-3)
