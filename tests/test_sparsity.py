"""Fine-grained pruning: exact element-wise shares, N:M patterns along the input axis, sparse initializers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import numpy_helper

from onnxprune.measure.stats import model_stats
from onnxprune.transform import sparsity
from onnxprune.errors import BadInputError
from onnxprune.pipeline import prune
from onnxprune.spec import PruneSpec
from tests.models import BUILDERS, random_inputs, run

NM_MODELS = ["vgg", "mlp", "mlp_matmul", "transformer_block", "conv_transpose", "grouped_conv", "flatten_gemm"]


def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _targets(model: onnx.ModelProto) -> list[sparsity.Target]:
    return sparsity.find_targets(gs.import_onnx(model))


def _assert_nm(w: np.ndarray, axis: int, n: int, m: int) -> None:
    moved = np.moveaxis(w, axis, -1)
    length = moved.shape[-1]
    for start in range(0, length, m):
        nonzero = np.count_nonzero(moved[..., start : start + m], axis=-1)
        assert nonzero.max() <= n


def test_nm_mask_example() -> None:
    keep = sparsity.nm_mask(np.array([[1.0, -4.0, 3.0, 2.0, 9.0, 0.5]]), 2, 4, axis=1)
    assert keep.tolist() == [[False, True, True, False, True, True]]  # the partial group keeps at most 2


def test_input_axes() -> None:
    model = BUILDERS["mlp"](trans_b=True)
    axes = {t.op: t.axis for t in _targets(model)}
    assert axes == {"Gemm": 1}
    assert {t.axis for t in _targets(BUILDERS["mlp"](trans_b=False))} == {0}
    assert {t.op: t.axis for t in _targets(BUILDERS["conv_transpose"]())}["ConvTranspose"] == 0
    assert {t.op: t.axis for t in _targets(BUILDERS["vgg"]())}["Conv"] == 1


@pytest.mark.parametrize("name", ["vgg", "resnet_bottleneck", "mobilenetv2", "transformer_block", "mlp_matmul"])
def test_element_half_is_exact_per_layer(name: str, tmp_path: Path) -> None:
    out = tmp_path / "sparse.onnx"
    report = prune(_save(BUILDERS[name](), tmp_path), out, PruneSpec(granularity="element", sparsity=0.5)).report
    pruned = onnx.load(str(out))
    weights = _weights(pruned)
    layers = report["sparsity"]["layers"]
    assert layers and report["sparsity"]["granularity"] == "element"
    for layer in layers:
        w = weights[layer["tensor"]]
        zeros = w.size - np.count_nonzero(w)
        assert abs(zeros - w.size / 2) <= 1
        assert layer["zeros"] == zeros and layer["elements"] == w.size
    onnx.checker.check_model(pruned, full_check=True)
    assert report["pruned"]["macs"] == report["original"]["macs"]  # shapes unchanged
    assert report["fidelity"]["cosine"] > 0.0


@pytest.mark.parametrize("name", NM_MODELS)
@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (3, 8)])
def test_nm_pattern_along_input_axis(name: str, n: int, m: int) -> None:
    model = BUILDERS[name]()
    graph = gs.import_onnx(model)
    targets = sparsity.find_targets(graph)
    result = sparsity.sparsify(graph, f"{n}:{m}")
    tensors = graph.tensors()
    for t in targets:
        w = np.asarray(tensors[t.tensor].values)
        _assert_nm(w, t.axis, n, m)
    for layer in result.layers:
        assert layer.sparsity <= 1 - n / m + 1e-9


def test_two_four_on_digits_keeps_model_valid(digits_model_path: Path, tmp_path: Path, digits) -> None:
    out = tmp_path / "nm.onnx"
    report = prune(digits_model_path, out, PruneSpec(granularity="2:4", device="cpu")).report
    pruned = onnx.load(str(out))
    onnx.checker.check_model(pruned, full_check=True)
    weights = _weights(pruned)
    for t in _targets(pruned):
        _assert_nm(weights[t.tensor], t.axis, 2, 4)
    rows = {r["tensor"]: r["sparsity"] for r in report["sparsity"]["layers"]}
    assert rows["stem.1.0.weight"] == 0.5 and rows["fc.weight"] == 0.5
    assert rows["stem.0.0.weight"] == 0.0  # one input channel: groups of one are left alone
    _, _, x_test, y_test = digits
    logits = run(pruned, {"input": x_test})["logits"]
    assert np.mean(logits.argmax(axis=1) == y_test) > 0.5


def test_global_threshold_differs_per_layer(tmp_path: Path) -> None:
    graph = gs.import_onnx(BUILDERS["vgg"]())
    result = sparsity.sparsify(graph, "element", 0.6, scope="global")
    assert result.overall == pytest.approx(0.6, abs=1e-3)
    assert len({round(layer.sparsity, 3) for layer in result.layers}) > 1


def test_cli_element_report(digits_model_path: Path, tmp_path: Path) -> None:
    report_path = tmp_path / "r.json"
    proc = subprocess.run(
        [sys.executable, "-m", "onnxprune.cli", "prune", str(digits_model_path), "-o", str(tmp_path / "e.onnx"),
         "--granularity", "element", "--sparsity", "0.5", "--report", str(report_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(report_path.read_text())
    assert report["sparsity"]["overall"] == pytest.approx(0.5, abs=1e-4)
    assert all(abs(r["sparsity"] - 0.5) < 0.01 for r in report["sparsity"]["layers"])


def test_sparse_initializers_only_when_smaller() -> None:
    model = BUILDERS["vgg"]()
    graph = gs.import_onnx(model)
    sparsity.sparsify(graph, "element", 0.9)
    dense = gs.export_onnx(graph)
    dense.ir_version = model.ir_version
    sparse = onnx.ModelProto()
    sparse.CopyFrom(dense)
    names = sparsity.to_sparse_initializers(sparse)
    assert names and len(sparse.graph.sparse_initializer) == len(names)
    assert sparse.ByteSize() < dense.ByteSize()
    onnx.checker.check_model(sparse)
    feeds = random_inputs(dense)
    for a, b in zip(run(dense, feeds).values(), run(sparse, feeds).values(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert model_stats(sparse).params < model_stats(dense).params
    half = gs.import_onnx(model)
    sparsity.sparsify(half, "element", 0.5)
    assert sparsity.to_sparse_initializers(gs.export_onnx(half)) == []  # 50 % zeros: indices cost more


def test_bad_patterns() -> None:
    for bad in ("4:2", "2:2", "0:4", "block"):
        with pytest.raises(BadInputError):
            sparsity.Pattern.parse(bad)
    with pytest.raises(BadInputError, match="--sparsity"):
        sparsity.sparsify(gs.import_onnx(BUILDERS["mlp"]()), "element", None)
    note = sparsity.sparsify(gs.import_onnx(BUILDERS["mlp"]()), "2:4", 0.7).notes
    assert any("ignored" in n for n in note)


def _save(model: onnx.ModelProto, tmp_path: Path) -> Path:
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path))
    return path


def test_high_sparsity_is_stored_as_sparse_initializers(tmp_path) -> None:
    """At 90 % zeros the weights go to sparse initializers: a smaller file with the same outputs."""
    import onnx

    from onnxprune.pipeline import prune
    from onnxprune.spec import PruneSpec
    from tests.models import build_vgg, random_inputs, run

    model = build_vgg()
    onnx.save(model, tmp_path / "m.onnx")
    dense = prune(tmp_path / "m.onnx", tmp_path / "d.onnx", PruneSpec(granularity="element", sparsity=0.5, device="cpu"))
    sparse = prune(tmp_path / "m.onnx", tmp_path / "s.onnx", PruneSpec(granularity="element", sparsity=0.9, device="cpu"))
    assert "sparse_initializers" not in dense.report["sparsity"]
    stored = sparse.report["sparsity"]["sparse_initializers"]
    saved = onnx.load(tmp_path / "s.onnx")
    assert {t.values.name for t in saved.graph.sparse_initializer} == set(stored)
    assert (tmp_path / "s.onnx").stat().st_size < 0.5 * (tmp_path / "m.onnx").stat().st_size
    feeds = random_inputs(model)
    assert run(str(tmp_path / "s.onnx"), feeds)["output"].shape == run(model, feeds)["output"].shape
