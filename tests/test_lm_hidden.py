"""``--prune-lm-hidden``: a language model's hidden size (its residual stream) is cut only when asked for."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import onnx
from onnx import numpy_helper

from onnxprune._proto.convert import spec_from_proto, spec_to_proto
from onnxprune.spec import PruneSpec

def _embedding_width(path: Path) -> int:
    model = onnx.load(path)
    table = next(t for t in model.graph.initializer if numpy_helper.to_array(t).shape[0] == 512 and len(t.dims) == 2)
    return int(table.dims[1])


def _prune(model: Path, out: Path, *extra: str) -> dict:
    report = out.with_suffix(".json")
    proc = subprocess.run([sys.executable, "-m", "onnxprune.cli", "prune", str(model), "-o", str(out), "--ratio", "0.5",
                           "--report", str(report), *extra], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(report.read_text())


def test_hidden_size_is_cut_only_when_asked(lm_export: Callable[[str, str], Path], tmp_path: Path) -> None:
    model = lm_export("llama", "plain")
    width = _embedding_width(model)
    kept = _prune(model, tmp_path / "heads_mlp.onnx")
    assert _embedding_width(tmp_path / "heads_mlp.onnx") == width
    stream = next(g for g in kept["groups"] if g["channels"] == width)
    assert stream["prunable"] == 0 and "--prune-lm-hidden" in stream["blocked"]
    both = _prune(model, tmp_path / "hidden.onnx", "--prune-lm-hidden")
    assert _embedding_width(tmp_path / "hidden.onnx") < width
    assert both["spec"]["prune_lm_hidden"] is True
    assert both["pruned"]["params"] < kept["pruned"]["params"]
    stream = next(g for g in both["groups"] if g["channels"] == width)
    assert stream["prunable"] == width and stream["approximate"]  # through RMSNorm: stated, never silent


def test_option_crosses_the_wire() -> None:
    spec = PruneSpec(prune_lm_hidden=True)
    assert spec_from_proto(spec_to_proto(spec)).prune_lm_hidden is True
    assert spec_from_proto(spec_to_proto(PruneSpec())).prune_lm_hidden is False
