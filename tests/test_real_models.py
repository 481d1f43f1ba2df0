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
