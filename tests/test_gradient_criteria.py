"""Taylor and OBD criteria: known answers on a small model and valid pruned models from the digits CNN."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

from onnxprune.io.shapes import static_shapes
from onnxprune.data import model_inputs, open_data
from onnxprune.analysis.driver import analyze_graph
from onnxprune.importance.base import Evidence, ScoringContext
from onnxprune.importance import score_groups
from onnxprune.importance.taylor import collect_gradients
from onnxprune.pipeline import prune
from onnxprune.spec import PruneSpec
from tests.data import write_npz
from tests.models import build_vgg, random_inputs, run, zero_channels


def _accuracy(model_path: str | Path, x: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(np.argmax(run(str(model_path), {"input": x})["logits"], axis=1) == y))


@pytest.mark.parametrize("criterion", ["taylor", "obd"])
def test_dead_channels_score_zero_and_go_first(criterion: str, tmp_path: Path) -> None:
    model = zero_channels(build_vgg(), "conv1", [1, 4])
    x = random_inputs(model, batch=16)["input"]
    write_npz(tmp_path / "calib.npz", x, np.arange(16) % 10)
    graph = gs.import_onnx(model)
    analysis = analyze_graph(graph, static_shapes(model, None))
    source = open_data(tmp_path / "calib.npz", model_inputs(model))
    ctx = ScoringContext(graph, analysis, evidence=Evidence(gradients=collect_gradients(model, source, device="cpu")))
    group = next(g for g in analysis.groups if "conv1" in g.producers)
    scores = score_groups(ctx, criterion)[group.id]
    assert scores[1] == pytest.approx(0.0, abs=1e-12) and scores[4] == pytest.approx(0.0, abs=1e-12)
    assert np.all(np.delete(scores, [1, 4]) > 0)


def test_unlabelled_non_classifier_is_a_clear_error() -> None:
    from tests.models import build_symbolic_spatial

    model = build_symbolic_spatial()
    source = open_data("random", model_inputs(model), shapes={"input": [1, 3, 16, 16]}, limit=2)
    with pytest.raises(Exception, match="need labels"):
        collect_gradients(model, source, device="cpu")


def test_digits_taylor_obd_beside_l2(digits, digits_model_path: Path, tmp_path: Path) -> None:
    x_train, y_train, x_test, y_test = digits
    write_npz(tmp_path / "calib.npz", x_train[:256], y_train[:256])
    accuracy = {"original": _accuracy(digits_model_path, x_test, y_test)}
    for criterion in ("l2", "taylor", "obd"):
        out = tmp_path / f"{criterion}.onnx"
        result = prune(digits_model_path, out, PruneSpec(ratio=0.5, criterion=criterion, calib=str(tmp_path / "calib.npz"),
                                                          device="cpu"))
        onnx.checker.check_model(str(out), full_check=True)
        assert result.report["pruned"]["params"] < 0.35 * result.report["original"]["params"]
        accuracy[criterion] = _accuracy(out, x_test, y_test)
    print("digits held-out accuracy at ratio 0.5, no fine-tuning:", accuracy)
    assert accuracy["original"] > 0.97
    assert max(accuracy["taylor"], accuracy["obd"]) >= 0.15  # chance is 0.10


def test_gradient_criteria_fix_the_batch_for_shape_dependent_ops(tmp_path: Path) -> None:
    """Resize's gradient needs static shapes: the symbolic batch is fixed to the calibration batch size."""
    from tests.models import build_misc_passthrough

    model = build_misc_passthrough()
    onnx.save(model, tmp_path / "m.onnx")
    for criterion in ("taylor", "obd"):
        result = prune(tmp_path / "m.onnx", tmp_path / "o.onnx",
                       PruneSpec(ratio=0.5, criterion=criterion, calib_samples=20, device="cpu"))
        assert result.report["pruned"]["params"] < result.report["original"]["params"]
        feeds = random_inputs(model)
        assert run(str(tmp_path / "o.onnx"), feeds)["output"].shape == run(model, feeds)["output"].shape


def test_unlabelled_sequence_model_uses_its_own_top1_over_the_class_axis() -> None:
    # [N, T, C] scores behind a Softmax over the last axis (a CTC recogniser's shape): the pseudo-labels
    # are [N, T] argmaxes over C, so a class column never picked by the model gets zero gradient.
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 5)).astype(np.float32)
    w[:, 4] = -50.0  # class 4 is never the top-1 and carries ~0 probability
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 4, 6])
    y = onnx.helper.make_tensor_value_info("probs", onnx.TensorProto.FLOAT, ["N", 4, 5])
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "w"], ["logits"]),
         onnx.helper.make_node("Softmax", ["logits"], ["probs"], axis=-1)],
        "seq", [x], [y], [onnx.numpy_helper.from_array(w, "w")])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    source = open_data("random", model_inputs(model), shapes={"x": [1, 4, 6]}, limit=8)
    stats = collect_gradients(model, source, device="cpu", batch_size=4)
    g2 = stats.fisher("w")
    assert g2.shape == (6, 5)
    assert np.all(g2[:, :4].sum(axis=0) > 1e-6)
    assert g2[:, 4].sum() < 1e-6 * g2[:, :4].sum()
