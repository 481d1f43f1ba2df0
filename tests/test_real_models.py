"""Real trained or real-architecture models from installed wheels, pruned at ratio 0.5.

Each assertion states how much of the model is prunable (the share of parameters removed), so a
regression in the analysis that silently blocks more shows up, not only a crash.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxprune.pipeline import prune
from onnxprune.spec import PruneSpec

# name → (minimum share of parameters removed at ratio 0.5, shapes)
LIGHT = {
    "resnet50": 0.65,
    "densenet121": 0.6,
    "squeezenet": 0.55,
    "inception_v1": 0.6,
    "vgg19": 0.6,
}
RAPIDOCR = {
    "ch_ppocr_mobile_v2.0_cls_infer": (0.6, {"x": [1, 3, 48, 192]}),
    "ch_PP-OCRv4_det_infer": (0.65, {"x": [1, 3, 320, 320]}),
    "ch_PP-OCRv4_rec_infer": (0.3, {"x": [1, 3, 48, 320]}),
}


def _check(result, out: Path, min_removed: float) -> None:
    removed = 1 - result.report["pruned"]["params"] / result.report["original"]["params"]
    assert removed >= min_removed, f"only {removed:.2%} of parameters removed"
    assert result.report["pruned"]["bytes"] < result.report["original"]["bytes"]
    assert result.report["fidelity"]["samples"] >= 1
    onnx.checker.check_model(str(out), full_check=True)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(LIGHT))
def test_light_model_prunes(name: str, light_model: Callable[[str], Path], tmp_path: Path) -> None:
    out = tmp_path / f"{name}.onnx"
    result = prune(light_model(name), out, PruneSpec(ratio=0.5, device="cpu", fidelity_samples=1))
    _check(result, out, LIGHT[name])
    if name != "vgg19":
        assert result.report["pruned"]["macs"] < 0.5 * result.report["original"]["macs"]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(RAPIDOCR))
def test_ppocr_model_prunes(name: str, rapidocr_model: Callable[[str], Path], tmp_path: Path) -> None:
    min_removed, shapes = RAPIDOCR[name]
    out = tmp_path / f"{name}.onnx"
    result = prune(rapidocr_model(name), out, PruneSpec(ratio=0.5, shapes=shapes, device="cpu", fidelity_samples=1))
    _check(result, out, min_removed)
    assert np.isfinite(result.report["fidelity"]["cosine"])


# --- issue 3: attention heads, channel shuffle, grouped conv, depth ------------------------------------


@pytest.mark.slow
def test_light_shufflenet_grouped_conv_and_shuffle_prune(light_model: Callable[[str], Path], tmp_path: Path) -> None:
    """ShuffleNet V1 (group=4 1x1 convs, channel shuffle, depthwise): nearly every group prunes evenly per group."""
    from onnxprune.pipeline import analyze

    path = light_model("shufflenet")
    groups = analyze(path)["groups"]
    assert sum(1 for g in groups if g["prunable"]) >= len(groups) - 1  # only the logits stay
    out = tmp_path / "shufflenet.onnx"
    result = prune(path, out, PruneSpec(ratio=0.5, device="cpu", fidelity_samples=1))
    _check(result, out, 0.55)
    assert result.report["pruned"]["macs"] < 0.6 * result.report["original"]["macs"]


@pytest.mark.slow
def test_ppocr_rec_attention_heads_prune(rapidocr_model: Callable[[str], Path], tmp_path: Path) -> None:
    """SVTR blocks: fused QKV split into 8 heads through runtime-built Reshape targets, decomposed LayerNorm."""
    from onnxprune.pipeline import analyze

    shapes = {"x": [1, 3, 48, 320]}
    path = rapidocr_model("ch_PP-OCRv4_rec_infer")
    report = analyze(path, shapes)
    heads = [g for g in report["groups"] if g["channels"] == 8 and all("MatMul" in p for p in g["producers"])]
    assert len(heads) == 2 and all(g["prunable"] == 8 for g in heads)
    assert report["prunable_groups"] >= len(report["groups"]) - 1  # only the CTC logits (Softmax) stay
    assert [b["kind"] for b in report["removable_blocks"]] == ["attention", "mlp", "attention", "mlp"]
    out = tmp_path / "rec.onnx"
    result = prune(path, out, PruneSpec(ratio=0.5, shapes=shapes, device="cpu", fidelity_samples=1))
    _check(result, out, 0.6)


@pytest.mark.slow
def test_ppocr_rec_depth_and_width(rapidocr_model: Callable[[str], Path], tmp_path: Path) -> None:
    shapes = {"x": [1, 3, 48, 320]}
    out = tmp_path / "rec_depth.onnx"
    result = prune(rapidocr_model("ch_PP-OCRv4_rec_infer"), out,
                   PruneSpec(ratio=0.5, depth=2, shapes=shapes, device="cpu", fidelity_samples=1, calib_samples=2))
    _check(result, out, 0.6)
    assert len(result.report["depth"]["removed"]) == 2
