"""Repair stages on a KV-cache LM whose heads were cut: reconstruction and fine-tuning read data made for the
original (every head in the cache inputs), and the saved model keeps its own narrowed cache inputs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxprune.pipeline import prune
from onnxprune.spec import PruneSpec


def _past_heads(model: onnx.ModelProto) -> set[int]:
    return {i.type.tensor_type.shape.dim[1].dim_value for i in model.graph.input if i.name.startswith("past")}


def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


@pytest.fixture(scope="module")
def cache_lm(lm_export: Callable[[str, str], Path], lm_tokens_npz: Callable[..., Path]) -> tuple[Path, Path]:
    model = lm_export("llama", "cache")
    return model, lm_tokens_npz("llama", "cache", n=16, seq=64, start=0)


def test_reconstruct_on_the_originals_cache_data(cache_lm: tuple[Path, Path], tmp_path: Path) -> None:
    model, data = cache_lm
    report = prune(model, tmp_path / "small.onnx", PruneSpec(
        ratio=0.5, calib=str(data), calib_samples=16, reconstruct=True, eval_data=str(data),
        metric="perplexity")).report
    stages = {s["stage"]: s["value"] for s in report["metric"]["shown"]["stages"]}
    assert stages["reconstruct"] < stages["cut"]  # least squares helped (perplexity, lower is better)
    pruned = onnx.load(tmp_path / "small.onnx")
    assert _past_heads(pruned) == {1}  # the cut's cache, not the original's 2 heads
    assert not [n.name for n in pruned.graph.node if "kept_heads" in n.name]


def test_finetune_on_the_originals_cache_data(cache_lm: tuple[Path, Path], tmp_path: Path) -> None:
    model, data = cache_lm
    prune(model, tmp_path / "cut.onnx", PruneSpec(ratio=0.5))
    cut = onnx.load(tmp_path / "cut.onnx")
    report = prune(model, tmp_path / "tuned.onnx", PruneSpec(
        ratio=0.5, finetune_steps=6, train_data=str(data), batch_size=4, lr=1e-3)).report
    assert report["finetune"]["metrics"]["steps"] == 6
    assert any(k.startswith("feature_error/") for k in report["finetune"]["metrics"])  # features on the same data
    tuned = onnx.load(tmp_path / "tuned.onnx")
    assert _past_heads(tuned) == {1}
    assert not [n.name for n in tuned.graph.node if "kept_heads" in n.name]
    before, after = _weights(cut), _weights(tuned)
    assert before.keys() == after.keys()
    if report["finetune"]["metrics"]["best_step"] > 0:
        assert any(not np.array_equal(before[k], after[k]) for k in before)
