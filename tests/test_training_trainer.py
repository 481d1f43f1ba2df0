"""The onnxruntime trainer: learning-rate schedule, IO-binding steps, recovery on digits, CLI, cancel."""

from __future__ import annotations

import math
import threading
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxprune.cli import main
from onnxprune.errors import BadInputError, CancelledError
from onnxprune.progress import Reporter
from onnxprune.training import (
    FinetuneConfig,
    TrainData,
    accumulate_gradients,
    export_artifacts,
    finetune,
)
from onnxprune.training.trainer import Trainer, lr_at
from tests.data import write_npz
from tests.models import run


def damaged(model: onnx.ModelProto, scale: float = 0.8, seed: int = 0) -> onnx.ModelProto:
    """Add noise of ``scale``·std to every weight of rank ≥ 2 (a stand-in for pruning damage)."""
    rng = np.random.default_rng(seed)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for i, t in enumerate(out.graph.initializer):
        a = numpy_helper.to_array(t)
        if a.ndim >= 2:
            noisy = a + rng.standard_normal(a.shape).astype(a.dtype) * a.std() * scale
            out.graph.initializer[i].CopyFrom(numpy_helper.from_array(noisy.astype(a.dtype), t.name))
    return out


def accuracy(model: onnx.ModelProto, x: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(run(model, {"input": x})["logits"].argmax(1) == y))


def test_cosine_schedule_with_warmup() -> None:
    cfg = FinetuneConfig(lr=0.1, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, 110, cfg) == pytest.approx(0.01)
    assert lr_at(9, 110, cfg) == pytest.approx(0.1)
    assert lr_at(10, 110, cfg) == pytest.approx(0.1)
    assert lr_at(60, 110, cfg) == pytest.approx(0.01 + 0.5 * 0.09)
    assert lr_at(109, 110, cfg) == pytest.approx(0.01, abs=1e-3)
    assert lr_at(50, 110, FinetuneConfig(lr=0.1, warmup_steps=0, schedule="constant")) == 0.1


def test_io_binding_steps_match_plain_session(digits_model_path: Path, digits) -> None:
    """Three bound steps (ping-pong device buffers) equal three plain-numpy runs of the same graph."""
    import onnxruntime as ort

    x, y = digits[0][:16], digits[1][:16]
    model = onnx.load(digits_model_path)
    arts = export_artifacts(model, optimizer="sgd", shapes={"input": [16, 1, 8, 8]})
    trainer = Trainer(arts, ["CPUExecutionProvider"], threads=1)
    plain = ort.InferenceSession(arts.training_model.SerializeToString(), providers=["CPUExecutionProvider"])
    state = {k: v for k, v in arts.checkpoint.items() if k != "__step__"}
    names = [o.name for o in plain.get_outputs()]
    for step in range(1, 4):
        loss = trainer.train_step({"input": x, "labels": y}, 0.05)
        out = dict(zip(names, plain.run(None, {"input": x, "labels": y, "lr": np.asarray(0.05, np.float32),
                                                "step": np.asarray(step, np.int64), **state})))
        state = {k: out[f"{k}__new"] for k in state}
        assert loss == pytest.approx(float(out["loss"]), rel=1e-5)
    got = trainer.params_numpy()
    for k in got:
        np.testing.assert_allclose(got[k], state[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("labels", [True, False])
def test_finetune_recovers_damaged_digits_cnn(digits_model_path: Path, digits, labels: bool) -> None:
    x_train, y_train, x_test, y_test = digits
    original = onnx.load(digits_model_path)
    broken = damaged(original)
    before = accuracy(broken, x_test, y_test)
    data = TrainData({"input": x_train}, y_train if labels else None)
    cfg = FinetuneConfig(steps=150, lr=3e-3, batch_size=32, eval_every=50, progress_bar=False, threads=1)
    res = finetune(broken, data, cfg, teacher=None if labels else original, device="cpu")
    after = accuracy(res.model, x_test, y_test)
    assert before < 0.6
    assert after >= accuracy(original, x_test, y_test) - (0.01 if labels else 0.02), (before, after)
    assert any("eval_loss" in h for h in res.history)
    assert ("accuracy" if labels else "agreement") in res.final_metrics


def test_a_run_that_only_hurts_gives_back_the_starting_model(digits_model_path: Path, digits) -> None:
    """lr 0.5 wrecks the trained CNN; the starting weights are measured first and win on held-out loss, so the
    model comes back unchanged (as on PP-OCR rec, where lr 3e-3 took 97 % of characters down to 5 %)."""
    x_train, y_train, x_test, y_test = digits
    original = onnx.load(digits_model_path)
    cfg = FinetuneConfig(steps=40, lr=0.5, batch_size=32, eval_every=20, progress_bar=False, threads=1)
    res = finetune(original, TrainData({"input": x_train}, y_train), cfg, device="cpu")
    assert res.final_metrics["best_step"] == 0
    assert [h["step"] for h in res.history if "eval_loss" in h] == [0, 20, 40]
    assert accuracy(res.model, x_test, y_test) == accuracy(original, x_test, y_test)


def test_early_stop_and_cancel(digits_model_path: Path, digits) -> None:
    model = onnx.load(digits_model_path)
    data = TrainData({"input": digits[0][:256]}, digits[1][:256])
    cfg = FinetuneConfig(steps=400, lr=1e-5, eval_every=5, patience=1, progress_bar=False, threads=1)
    res = finetune(model, data, cfg, device="cpu")
    assert res.final_metrics["steps"] < 400
    cancel = threading.Event()
    seen: list[float] = []

    def on_progress(p) -> None:
        seen.append(p.fraction)
        if p.fraction > 0.05:
            cancel.set()

    with pytest.raises(CancelledError):
        finetune(model, data, FinetuneConfig(steps=100, progress_bar=False, threads=1), device="cpu",
                 reporter=Reporter(on_progress, cancel))
    assert seen and max(seen) < 0.2


def test_bad_data_is_bad_input(digits_model_path: Path) -> None:
    model = onnx.load(digits_model_path)
    with pytest.raises(BadInputError, match="the model takes"):
        finetune(model, TrainData({"x": np.zeros((4, 1, 8, 8), np.float32)}), FinetuneConfig(steps=1))
    with pytest.raises(BadInputError, match="labels"):
        finetune(model, TrainData({"input": np.zeros((4, 1, 8, 8), np.float32)}), FinetuneConfig(steps=1, loss="ce"))


def test_accumulate_gradients_matches_artifact_grads(digits_model_path: Path, digits) -> None:
    model = onnx.load(digits_model_path)
    x, y = digits[0][:64], digits[1][:64]
    seen: list[dict[str, np.ndarray]] = []
    stats = accumulate_gradients(model, [{"input": x[:32], "labels": y[:32]}, {"input": x[32:], "labels": y[32:]}],
                                 device="cpu", on_batch=seen.append)
    assert stats.count == 2 and math.isfinite(stats.loss_sum) and len(seen) == 2
    for name in stats.grad_sum:
        np.testing.assert_allclose(stats.grad_sum[name], seen[0][name] + seen[1][name])
    # the batch-mean gradient equals the gradient of the mean loss over both batches (same size)
    whole = accumulate_gradients(model, [{"input": x, "labels": y}], device="cpu")
    for name in stats.grad_sum:
        np.testing.assert_allclose(stats.mean(name), whole.grad_sum[name], rtol=1e-3, atol=1e-6)
    w = "head.weight" if "head.weight" in stats.grad_sum else next(iter(stats.grad_sum))
    assert stats.grad_sum[w].shape == numpy_helper.to_array(
        next(t for t in model.graph.initializer if t.name == w)).shape
    assert np.all(stats.grad_sq_sum[w] >= 0) and np.abs(stats.grad_sum[w]).sum() > 0
    wv = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == w))
    np.testing.assert_allclose(stats.taylor(w, wv), np.abs(stats.grad_sum[w] / 2 * wv))
    np.testing.assert_allclose(stats.obd(w, wv), 0.25 * stats.grad_sq_sum[w] * wv.astype(np.float64) ** 2)
    dist = accumulate_gradients(damaged(model), [{"input": x}], loss="distill", teacher=model, device="cpu")
    assert dist.count == 1 and dist.loss_sum > 0


def test_cli_export_and_finetune(tmp_path: Path, digits_model_path: Path, digits, capsys) -> None:
    assert main(["export-artifacts", str(digits_model_path), "-o", str(tmp_path / "arts"), "--optimizer", "adamw"]) == 0
    assert {p.name for p in (tmp_path / "arts").iterdir()} == {
        "training_model.onnx", "eval_model.onnx", "checkpoint.npz", "manifest.json"}
    data = write_npz(tmp_path / "train.npz", digits[0][:128], digits[1][:128])
    out = tmp_path / "tuned.onnx"
    assert main(["finetune", str(digits_model_path), "--train-data", str(data), "-o", str(out), "--steps", "5",
                 "--device", "cpu"]) == 0
    assert out.is_file() and "accuracy" in capsys.readouterr().out
    assert main(["finetune", str(digits_model_path), "--train-data", str(tmp_path / "missing.npz"), "-o", str(out)]) == 2


def test_train_data_directory_split_and_epochs(tmp_path: Path, digits_model_path: Path, digits) -> None:
    x, y = digits[0][:96], digits[1][:96]
    write_npz(tmp_path / "a.npz", x[:40], y[:40])
    write_npz(tmp_path / "b.npz", x[40:], y[40:])
    data = TrainData.load(tmp_path)
    assert len(data) == 96 and np.array_equal(data.labels, y)
    train, held = data.split(0.25, seed=0)
    assert len(train) == 72 and held is not None and len(held) == 24
    assert sum(len(b) for b in train.batches(32, np.random.default_rng(0))) == 64  # partial batch dropped
    res = finetune(onnx.load(digits_model_path), data, FinetuneConfig(epochs=2, batch_size=16,
                   eval_fraction=0.25, progress_bar=False, threads=1), device="cpu")
    assert res.final_metrics["steps"] == 2 * (72 // 16)
    with pytest.raises(BadInputError, match="differ in length"):
        TrainData({"input": x}, y[:5])
