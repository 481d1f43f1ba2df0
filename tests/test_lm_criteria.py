"""``wanda`` and ``flap`` (activation-aware importance for LMs) against numpy references, masked tokens left out."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune import cli
from onnxprune.analysis.driver import analyze_graph
from onnxprune.importance import default_criteria, score_groups
from onnxprune.importance.base import Evidence, ScoringContext
from onnxprune.importance.flap import standardized
from onnxprune.io.load import load_model
from onnxprune.io.shapes import static_shapes
from onnxprune.pipeline import analysis_shapes
from onnxprune.repair.calibration import LAYER_INPUTS, calibrate, open_calibration
from tests.lms.tokens import feeds_for, heldout_ids

D, H, O = 6, 8, 5


def token_mlp(seed: int = 0) -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    """x [N, T, D] → MatMul W1 → Tanh → MatMul W2 → y, with an ``attention_mask [N, T]`` input (passed through)."""
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((D, H)).astype(np.float32)
    w2 = rng.standard_normal((H, O)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="up"),
             helper.make_node("Tanh", ["h"], ["a"], name="act"),
             helper.make_node("MatMul", ["a", "w2"], ["y"], name="down"),
             helper.make_node("Identity", ["attention_mask"], ["mask_out"], name="mask_id")]
    graph = helper.make_graph(
        nodes, "token_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "T", D]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["N", "T"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "T", O]),
         helper.make_tensor_value_info("mask_out", TensorProto.INT64, ["N", "T"])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), w1, w2


def token_data(tmp_path: Path, padded: bool = True) -> tuple[Path, np.ndarray, np.ndarray]:
    """Five samples of 7 tokens; padding (mask 0) holds huge values that would dominate any statistic."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 7, D)).astype(np.float32)
    mask = np.ones((5, 7), np.int64)
    if padded:
        mask[0, 4:] = 0
        mask[3, 5:] = 0
        x[mask == 0] = 50.0
    path = tmp_path / f"tokens_{int(padded)}.npz"
    np.savez(path, x=x, attention_mask=mask)
    return path, x, mask


def scores_of(model: onnx.ModelProto, data: Path, criterion: str) -> np.ndarray:
    """The hidden group's scores after calibrating on ``data`` in batches of 2."""
    graph = gs.import_onnx(model)
    analysis = analyze_graph(graph, static_shapes(model, None))
    registry = default_criteria()
    source, _ = open_calibration(model, str(data), 64, {})
    stats = calibrate(model, graph, analysis, source, needs=registry.needs[criterion], device="cpu", batch_size=2)
    ctx = ScoringContext(graph, analysis, evidence=Evidence(calibration=stats))
    scores = score_groups(ctx, criterion, registry)
    assert not ctx.notes
    (group,) = [g for g in analysis.groups if g.producers == ["up"]]
    return scores[group.id]


def reference(x: np.ndarray, mask: np.ndarray, w1: np.ndarray, w2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(wanda, flap) per hidden channel in float64 over the attended tokens only."""
    xs = x[mask != 0].astype(np.float64)
    a = np.tanh(xs @ w1.astype(np.float64))
    wanda = np.abs(w1).T @ np.linalg.norm(xs, axis=0) + np.linalg.norm(a, axis=0) * np.abs(w2).sum(axis=1)
    flap = a.var(axis=0, ddof=1) * (w2.astype(np.float64) ** 2).sum(axis=1)
    return wanda, flap


@pytest.mark.parametrize("criterion", ["wanda", "flap"])
def test_scores_equal_numpy_reference_on_attended_tokens(tmp_path: Path, criterion: str) -> None:
    model, w1, w2 = token_mlp()
    data, x, mask = token_data(tmp_path)
    want = dict(zip(("wanda", "flap"), reference(x, mask, w1, w2)))[criterion]
    got = scores_of(model, data, criterion)
    np.testing.assert_allclose(got, want, rtol=2e-5)
    # the padding would change the scores (and their order) if it were counted
    unmasked = dict(zip(("wanda", "flap"), reference(x, np.ones_like(mask), w1, w2)))[criterion]
    assert not np.allclose(got, unmasked, rtol=1e-2)


def test_flap_std_is_flap_standardised_around_one(tmp_path: Path) -> None:
    model, _, _ = token_mlp()
    data, _, _ = token_data(tmp_path)
    raw, std = scores_of(model, data, "flap"), scores_of(model, data, "flap-std")
    np.testing.assert_allclose(std, 1 + (raw - raw.mean()) / raw.std(), rtol=1e-9)
    assert std.mean() == pytest.approx(1.0) and std.std() == pytest.approx(1.0)
    assert standardized(np.full(3, 2.0)).tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("criterion", ["wanda", "flap"])
def test_cli_prunes_the_lowest_scored_channels(tmp_path: Path, criterion: str) -> None:
    model, w1, w2 = token_mlp()
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    data, x, mask = token_data(tmp_path)
    out = tmp_path / "small.onnx"
    assert cli.main(["prune", str(src), "-o", str(out), "--criterion", criterion, "--calib", str(data),
                     "--ratio", "0.5"]) == 0
    kept_w1 = {t.name: numpy_helper.to_array(t) for t in onnx.load(out).graph.initializer}["w1"]
    want = dict(zip(("wanda", "flap"), reference(x, mask, w1, w2)))[criterion]
    kept = np.sort(np.argsort(want)[H // 2:])
    np.testing.assert_array_equal(kept_w1, w1[:, kept])


def test_cli_refuses_an_unknown_criterion(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model, _, _ = token_mlp()
    onnx.save(model, tmp_path / "m.onnx")
    with pytest.raises(SystemExit) as e:
        cli.main(["prune", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "o.onnx"), "--criterion", "wandb"])
    assert e.value.code == 2 and "flap" in capsys.readouterr().err


@pytest.mark.slow  # ~15 s: export and analysis of the trained Llama with a KV cache
def test_cache_export_statistics_count_only_attended_tokens(lm_export: Callable[[str, str], Path],
                                                            tmp_path: Path) -> None:
    path = lm_export("llama", "cache")
    feeds = feeds_for(path, heldout_ids(6, 32))
    feeds["attention_mask"][:3, 20:] = 0  # right padding in half the windows
    np.savez(tmp_path / "calib.npz", **feeds)
    model = load_model(path).model  # as the pipeline loads it (symbolic dims folded, so heads are prunable)
    graph = gs.import_onnx(model)
    analysis = analyze_graph(graph, analysis_shapes(model, {}))
    source, _ = open_calibration(model, str(tmp_path / "calib.npz"), 64, {})
    stats = calibrate(model, graph, analysis, source, needs={LAYER_INPUTS}, device="cpu", batch_size=4)
    assert len(stats.layers) >= 16  # q, k, v, o, gate, up, down per block
    attended = int(feeds["attention_mask"].sum())
    assert {stats.tensors[v.input].count for v in stats.layers.values()} == {attended}
    ctx = ScoringContext(graph, analysis, evidence=Evidence(calibration=stats))
    scores = score_groups(ctx, "wanda")
    assert len(scores) == sum(g.prunable > 0 for g in analysis.groups) and not ctx.notes
