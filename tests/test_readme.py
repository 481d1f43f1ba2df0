"""The READMEs stay true: CI runs the test command verbatim, the prune command works, the example model is as stated."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from tests.data import digits_split, write_npz
from tests.models import run

REPO_ROOT = Path(__file__).resolve().parents[1]
README = REPO_ROOT / "README.md"


def fenced_blocks(text: str) -> list[str]:
    """Contents of the ``` fenced blocks of a markdown text, in order."""
    return [m.group(1).strip() for m in re.finditer(r"^```[^\n]*\n(.*?)^```", text, re.S | re.M)]


def setup_command(kind: str) -> str:
    """The README's set-up command: ``kind`` is "main" (installs and prunes) or "test" (installs and runs pytest)."""
    needle = "python3 -m pytest" if kind == "test" else "onnxprune prune examples/"
    found = [b for b in fenced_blocks(README.read_text()) if b.startswith("python3 -m pip install") and needle in b]
    assert len(found) == 1, f"README must have exactly one {kind} set-up block, found {len(found)}"
    assert "\n" not in found[0], f"the {kind} set-up command is one line"
    return found[0]


def test_readme_has_exactly_two_setup_commands() -> None:
    blocks = [b for b in fenced_blocks(README.read_text()) if b.startswith("python3 -m pip install")]
    assert len(blocks) == 2
    assert {setup_command("main"), setup_command("test")} == set(blocks)


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    assert setup_command("test") in ci.splitlines()
    assert "set -euo pipefail" in ci


def test_rapidocr_is_installed_without_deps() -> None:
    """Its deps would pull CPU onnxruntime over onnxruntime-gpu (both wheels install the same package folder)."""
    assert "--no-deps rapidocr-onnxruntime==1.4.4" in setup_command("test")


def _params(model: onnx.ModelProto) -> int:
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer)


@pytest.mark.slow
def test_readme_prune_command_runs(tmp_path: Path) -> None:
    """Run the ``onnxprune prune ...`` part of the main command (the install part is the environment's job).

    Runs ``python -m onnxprune.cli`` from a temp dir with the repo on PYTHONPATH, so it also works uninstalled.
    """
    prune = setup_command("main").split("&&")[-1].strip()
    argv = shlex.split(prune)
    assert argv[:3] == ["onnxprune", "prune", "examples/digits_cnn.onnx"]
    argv[2] = str(REPO_ROOT / argv[2])  # the README runs from the repo root; this test runs in tmp_path
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "2"}
    proc = subprocess.run(
        [sys.executable, "-m", "onnxprune.cli", *argv[1:]], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=300,
    )
    tail = f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0, f"exit {proc.returncode}\n{tail}"

    original = onnx.load(argv[2])
    pruned = onnx.load(str(tmp_path / argv[argv.index("-o") + 1]))
    onnx.checker.check_model(pruned, full_check=True)
    assert _params(pruned) < 0.75 * _params(original), "ratio 0.5 removes a large share of the parameters"
    assert [i.name for i in pruned.graph.input] == ["input"]
    assert [o.name for o in pruned.graph.output] == ["logits"]

    report = json.loads((tmp_path / argv[argv.index("--report") + 1]).read_text())
    assert report["pruned"]["params"] < report["original"]["params"]
    assert {"cosine", "max_abs_err", "top1_agreement", "samples"} <= set(report["fidelity"])

    _, _, x_test, _ = digits_split()
    logits = run(pruned, {"input": x_test[:16]}, threads=2)["logits"]
    assert logits.shape == (16, 10) and np.isfinite(logits).all()


def test_example_model_matches_examples_readme(digits_model_path: Path, digits: tuple[np.ndarray, ...]) -> None:
    """examples/README.md states the example's held-out accuracy and format; keep the claim and the file in step."""
    stated = re.search(r"held-out accuracy\*\* \| \*\*([\d.]+) %", (REPO_ROOT / "examples" / "README.md").read_text())
    assert stated, "examples/README.md states the held-out accuracy"
    model = onnx.load(str(digits_model_path))
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version <= 10 and model.opset_import[0].version == 17
    assert sum(n.op_type == "BatchNormalization" for n in model.graph.node) == 6, "BN kept, not fused"
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param, "dynamic batch"
    assert digits_model_path.stat().st_size < 1_000_000

    _, _, x_test, y_test = digits
    logits = run(model, {"input": x_test}, threads=2)["logits"]
    accuracy = float((logits.argmax(1) == y_test).mean())
    assert accuracy >= 0.97
    assert round(100 * accuracy, 2) == float(stated.group(1))


def test_digits_split_is_fixed_and_stratified(digits: tuple[np.ndarray, ...]) -> None:
    x_train, y_train, x_test, y_test = digits
    assert x_train.shape == (1347, 1, 8, 8) and x_test.shape == (450, 1, 8, 8)
    assert x_train.dtype == np.float32 and 0.0 <= x_train.min() and x_train.max() <= 1.0
    train_frac = np.bincount(y_train, minlength=10) / len(y_train)
    test_frac = np.bincount(y_test, minlength=10) / len(y_test)
    assert np.abs(train_frac - test_frac).max() < 0.01
    again = digits_split(seed=0)
    assert np.array_equal(again[2], x_test) and np.array_equal(again[3], y_test)


def test_write_npz_is_the_data_format(tmp_path: Path) -> None:
    x, y = np.zeros((3, 1, 8, 8), np.float32), np.arange(3)
    path = write_npz(tmp_path / "d.npz", x, y)
    with np.load(path) as data:
        assert sorted(data.files) == ["input", "labels"]
        assert data["input"].shape == (3, 1, 8, 8) and data["labels"].tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="batch"):
        write_npz(tmp_path / "bad.npz", x, y[:2])
