"""Training memory: dead gradient nodes dropped, cheap activations recomputed (same values), updates in place
(same trajectory), the teacher run per batch (same losses), and the peak-RSS bound on PP-OCRv4's recognizer."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import onnx.parser
import pytest

from onnxprune.training import TrainData, export_artifacts, finetune
from onnxprune.training import trainer as trainer_mod
from onnxprune.training.artifacts import build_gradient_model
from onnxprune.training.grad.memory import CHEAP_OPS, plan_recompute, prune_dead
from onnxprune.training.losses import LossSpec
from onnxprune.training.optimizers import OptimizerSpec
from onnxprune.training.trainer import FinetuneConfig, Trainer
from tests.models import run

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_train_memory as bench  # noqa: E402

# PP-OCR's pattern: Conv, a learnable affine (Mul/Add by per-channel params), HardSwish spelt Add/Clip/Mul/Div
HARDSWISH_CNN = """
<ir_version: 8, opset_import: ["" : 17]>
hswish (float[2, 4, 6, 6] x) => (float[2, 10] logits) <
    float[8, 4, 3, 3] w1 = {X}, float[8, 1, 1] s1 = {S}, float[8, 1, 1] b1 = {B},
    float[8, 8, 1, 1] w2 = {W2}, float[10, 8] fc = {FC}, float three = {{3.0}}, float zero = {{0.0}},
    float six = {{6.0}}
> {
    c1 = Conv <pads = [1, 1, 1, 1]> (x, w1)
    a1 = Mul (s1, c1)
    b = Add (a1, b1)
    d = Add (b, three)
    e = Clip (d, zero, six)
    f = Mul (b, e)
    h = Div (f, six)
    c2 = Conv (h, w2)
    g = GlobalAveragePool (c2)
    flat = Flatten (g)
    logits = Gemm <transB = 1> (flat, fc)
}
"""


def _values(shape: tuple[int, ...], seed: int) -> str:
    v = np.random.default_rng(seed).uniform(-1, 1, shape).round(3)
    return "{" + ", ".join(str(float(a)) for a in v.ravel()) + "}"


def hardswish_cnn() -> onnx.ModelProto:
    text = HARDSWISH_CNN.replace("{X}", _values((8, 4, 3, 3), 1)).replace("{S}", _values((8, 1, 1), 2))
    text = text.replace("{B}", _values((8, 1, 1), 3)).replace("{W2}", _values((8, 8, 1, 1), 4))
    text = text.replace("{FC}", _values((10, 8), 5)).replace("{{", "{").replace("}}", "}")
    return onnx.parser.parse_model(text)


FEEDS = {"x": np.random.default_rng(0).standard_normal((2, 4, 6, 6)).astype(np.float32),
         "labels": np.array([3, 7], np.int64)}


def _gradients(recompute: bool) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    gm = build_gradient_model(hardswish_cnn(), LossSpec("ce"), shapes={"x": [2, 4, 6, 6]}, recompute=recompute)
    out = run(gm.result.model, {**FEEDS, **gm.params})
    return gm.result.model, {n: out[g] for n, g in gm.result.grads.items()}


def _saved(model: onnx.ModelProto) -> set[str]:
    """Forward tensors that backward nodes read (what the step keeps from the forward to the backward)."""
    forward = {o for n in model.graph.node if not n.name.startswith(("grad/", "loss/")) for o in n.output}
    return {i for n in model.graph.node if n.name.startswith("grad/") for i in n.input if i in forward}


def test_recompute_gives_the_same_gradients_and_keeps_only_checkpoints() -> None:
    plain_model, plain = _gradients(recompute=False)
    model, grads = _gradients(recompute=True)
    assert plain.keys() == grads.keys() and len(grads) == 5
    for name in grads:
        np.testing.assert_allclose(grads[name], plain[name], rtol=1e-5, atol=1e-7, err_msg=name)
    producers = {o: n.op_type for n in model.graph.node for o in n.output}
    # without recompute the backward reads the HardSwish links; with it, only expensive ops' outputs
    assert any(producers.get(t) in CHEAP_OPS for t in _saved(plain_model))
    assert {producers[t] for t in _saved(model)} == {"Conv", "GlobalAveragePool"}


def test_no_dead_nodes_and_no_data_gradient() -> None:
    model, _ = _gradients(recompute=True)
    outputs = [o.name for o in model.graph.output]
    assert len(prune_dead(list(model.graph.node), outputs)) == len(model.graph.node)
    # x is not trained: the first conv's input gradient (a ConvTranspose) is never built
    assert sum(n.op_type == "ConvTranspose" for n in model.graph.node) == 1
    # static shapes: no Shape node keeps a forward tensor alive
    assert not any(n.op_type == "Shape" for n in model.graph.node)


def test_plan_recompute_cuts_long_chains() -> None:
    nodes = [onnx.helper.make_node("Relu", [f"t{i}"], [f"t{i + 1}"]) for i in range(10)]
    plan = plan_recompute(nodes, {"t0"}, max_chain=4)
    # t1..t4 recomputable from t0, t5 kept, t6..t9 recomputable from t5, t10 kept
    assert sorted(plan.producer, key=lambda t: int(t[1:])) == ["t1", "t2", "t3", "t4", "t6", "t7", "t8", "t9"]


def test_in_place_updates_follow_the_ping_pong_trajectory() -> None:
    arts = export_artifacts(hardswish_cnn(), loss="ce", shapes={"x": [2, 4, 6, 6]},
                            optimizer=OptimizerSpec("adamw", weight_decay=0.01, max_grad_norm=1.0))
    in_place = Trainer(arts, ["CPUExecutionProvider"], threads=1)
    legacy = type(arts)(arts.training_model, arts.eval_model, dict(arts.checkpoint),
                        {k: v for k, v in arts.manifest.items() if k != "updates"})
    ping_pong = Trainer(legacy, ["CPUExecutionProvider"], threads=1)
    assert in_place.in_place and not ping_pong.in_place
    start = {k: v.copy() for k, v in arts.checkpoint.items()}
    for step in range(4):
        lr = 0.05 * (step + 1)
        assert in_place.train_step(FEEDS, lr) == ping_pong.train_step(FEEDS, lr)
    a, b = in_place.params_numpy(), ping_pong.params_numpy()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
        assert not np.array_equal(a[name], start[name])
    for name, value in arts.checkpoint.items():  # the trainer never writes into the caller's arrays
        np.testing.assert_array_equal(value, start[name])


def test_teacher_per_batch_and_chunked_metrics_match_the_cached_run(digits_model_path: Path, digits,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    model = onnx.load(digits_model_path)
    data = TrainData({"input": digits[0][:96]})
    config = FinetuneConfig(steps=6, batch_size=16, lr=1e-3, eval_every=3, progress_bar=False, threads=1)
    cached = finetune(model, data, config, device="cpu")
    calls: list[int] = []
    original_values = trainer_mod._Teacher.values

    def counting(self, batch):  # noqa: ANN001, ANN202
        calls.append(len(batch))
        return original_values(self, batch)

    monkeypatch.setattr(trainer_mod, "TEACHER_CACHE_BYTES", 0)
    monkeypatch.setattr(trainer_mod, "METRIC_CHUNK_ELEMENTS", 1)
    monkeypatch.setattr(trainer_mod._Teacher, "values", counting)
    per_batch = finetune(model, data, config, device="cpu")
    assert len(calls) > 6  # once per training step and per held-out batch, not once over the data
    steps = lambda run: [(h["step"], "loss" in h) for h in run.history]  # noqa: E731
    assert steps(per_batch) == steps(cached)  # the same training steps and evaluations, in the same order
    assert [h["loss"] for h in per_batch.history if "loss" in h] == pytest.approx(
        [h["loss"] for h in cached.history if "loss" in h], rel=1e-5)
    for k, v in cached.final_metrics.items():
        if k != "seconds":
            assert per_batch.final_metrics[k] == pytest.approx(v, rel=1e-5, abs=1e-7), k


@pytest.mark.slow
def test_recognizer_finetune_peak_within_bound(rapidocr_model) -> None:  # noqa: ANN001
    """PP-OCRv4 rec, batch 2, fresh processes: fine-tuning peaks at most 3× inference + 4× parameter bytes."""
    rapidocr_model("ch_PP-OCRv4_rec_infer")  # fails with the install hint when the wheel is missing
    params = bench._param_bytes(bench._model("rec"))
    infer = bench.measure("rec", "infer", 2, threads=1, steps=3)
    tuned = bench.measure("rec", "finetune", 2, threads=1, steps=3, samples=16)
    goal = bench.goal_mb(infer["peak_mb"], params)
    assert tuned["peak_mb"] <= goal, (tuned, infer, goal)
