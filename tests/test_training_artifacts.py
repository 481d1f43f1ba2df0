"""Exported training artifacts run in a plain onnxruntime session and step exactly as hand-computed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from onnxprune.training.artifacts import TrainingArtifacts, apply_checkpoint, export_artifacts, select_trainable
from onnxprune.training.losses import LossSpec
from onnxprune.training.optimizers import OptimizerSpec


def tiny_classifier(seed: int = 0) -> onnx.ModelProto:
    """x[N,3] → Gemm(W[3,4], b[4]) → Relu → Gemm(V[4,2]^T...) simplified: one Gemm head plus a Mul scale."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((3, 4)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    nodes = [helper.make_node("Gemm", ["x", "W", "b"], ["logits"], name="fc")]
    g = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])],
                          [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 9
    return m


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_sgd_step_matches_hand_computation(tmp_path: Path) -> None:
    model = tiny_classifier()
    spec = OptimizerSpec(kind="sgd", momentum=0.9, weight_decay=0.1)
    arts = export_artifacts(model, loss="ce", optimizer=spec, output_dir=tmp_path)
    for name in ("training_model.onnx", "eval_model.onnx", "checkpoint.npz", "manifest.json"):
        assert (tmp_path / name).is_file()
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    sess = _session(onnx.load(tmp_path / "training_model.onnx"))  # plain onnxruntime, from disk
    assert {o["name"] for o in manifest["params"]} == {"W", "b"}
    x = np.array([[0.5, -1.0, 2.0], [1.5, 0.2, -0.3]], np.float32)
    y = np.array([2, 0], np.int64)
    ck = arts.checkpoint
    w, b, lr = ck["W"].astype(np.float64), ck["b"].astype(np.float64), 0.1
    feeds = {"x": x, "labels": y, "lr": np.asarray(lr, np.float32), "step": np.asarray(1, np.int64)}
    feeds.update({k: v for k, v in ck.items() if k != "__step__"})
    out = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
    # by hand: mean cross-entropy, its gradient, PyTorch-style SGD with momentum (decay on W only)
    p = _softmax(x @ w + b)
    onehot = np.eye(4)[y]
    loss = -np.mean(np.log(p[np.arange(2), y]))
    dz = (p - onehot) / 2
    gw, gb = x.T.astype(np.float64) @ dz + 0.1 * w, dz.sum(0)
    vw, vb = gw, gb  # momentum buffers start at zero
    np.testing.assert_allclose(out["loss"], loss, rtol=1e-5)
    np.testing.assert_allclose(out["W__new"], w - lr * vw, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["b__new"], b - lr * vb, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["W__momentum__new"], vw, rtol=1e-5, atol=1e-6)
    # second step: the momentum buffer is carried
    feeds2 = dict(feeds, W=out["W__new"], b=out["b__new"], W__momentum=out["W__momentum__new"],
                  b__momentum=out["b__momentum__new"], step=np.asarray(2, np.int64))
    out2 = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds2)))
    w1, b1 = out["W__new"].astype(np.float64), out["b__new"].astype(np.float64)
    dz = (_softmax(x @ w1 + b1) - onehot) / 2
    vw2 = 0.9 * vw + x.T @ dz + 0.1 * w1
    np.testing.assert_allclose(out2["W__new"], w1 - lr * vw2, rtol=1e-5, atol=1e-6)


def test_adamw_step_matches_hand_computation() -> None:
    model = tiny_classifier(1)
    spec = OptimizerSpec(kind="adamw", weight_decay=0.05, beta1=0.8, beta2=0.95, eps=1e-6)
    arts = export_artifacts(model, loss="ce", optimizer=spec)
    sess = _session(arts.training_model)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 3)).astype(np.float32)
    y = rng.integers(0, 4, 5)
    ck = arts.checkpoint
    m = {k: np.full(v.shape, 0.01) for k, v in ck.items() if k in ("W", "b")}
    v = {k: np.full(vv.shape, 0.02) for k, vv in ck.items() if k in ("W", "b")}
    feeds = {"x": x, "labels": y, "lr": np.asarray(0.01, np.float32), "step": np.asarray(3, np.int64),
             "W": ck["W"], "b": ck["b"]}
    for k in ("W", "b"):
        feeds[f"{k}__m"] = m[k].astype(np.float32)
        feeds[f"{k}__v"] = v[k].astype(np.float32)
    out = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
    w, b = ck["W"].astype(np.float64), ck["b"].astype(np.float64)
    dz = (_softmax(x @ w + b) - np.eye(4)[y]) / 5
    grads = {"W": x.T @ dz, "b": dz.sum(0)}
    for k, p in (("W", w), ("b", b)):
        g = grads[k]
        m1 = 0.8 * m[k] + 0.2 * g
        v1 = 0.95 * v[k] + 0.05 * g * g
        update = (m1 / (1 - 0.8**3)) / (np.sqrt(v1 / (1 - 0.95**3)) + 1e-6)
        decay = 0.05 if k == "W" else 0.0
        expected = p * (1 - 0.01 * decay) - 0.01 * update
        np.testing.assert_allclose(out[f"{k}__new"], expected, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(out[f"{k}__m__new"], m1, rtol=1e-5, atol=1e-7)


def test_distill_and_mse_losses() -> None:
    model = tiny_classifier(2)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 3)).astype(np.float32)
    t = rng.standard_normal((4, 4)).astype(np.float32)
    ck = None
    for spec, feed_name in ((LossSpec("distill", temperature=3.0), "teacher/logits"), (LossSpec("mse"), "target/logits")):
        arts = export_artifacts(model, loss=spec, optimizer=OptimizerSpec("sgd", momentum=0.0))
        ck = arts.checkpoint
        sess = _session(arts.training_model)
        feeds = {"x": x, feed_name: t, "lr": np.asarray(0.0, np.float32), "step": np.asarray(1, np.int64),
                 "W": ck["W"], "b": ck["b"]}
        loss = sess.run(["loss"], feeds)[0]
        z = x.astype(np.float64) @ ck["W"] + ck["b"]
        if spec.kind == "distill":
            p, logq = _softmax(t / 3.0), np.log(_softmax(z / 3.0))
            expected = 9.0 * np.mean(np.sum(p * (np.log(p) - logq), axis=1))
        else:
            expected = np.mean((z - t) ** 2)
        np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_eval_model_and_apply_checkpoint_roundtrip(tmp_path: Path) -> None:
    model = tiny_classifier(3)
    arts = export_artifacts(model, optimizer="adamw")
    arts.save(tmp_path)
    loaded = TrainingArtifacts.load(tmp_path)
    ck = dict(loaded.checkpoint)
    ck["W"] = ck["W"] * 2.0
    np.savez(tmp_path / "checkpoint.npz", **ck)
    tuned = apply_checkpoint(model, tmp_path)
    x = np.ones((2, 3), np.float32)
    ev = _session(loaded.eval_model).run(None, {"x": x, "W": ck["W"], "b": ck["b"]})[0]
    np.testing.assert_allclose(_session(tuned).run(None, {"x": x})[0], ev, rtol=1e-6)
    assert loaded.manifest["inputs"]["labels"] == "labels"
    assert [s["kind"] for s in loaded.manifest["state"]] == ["m", "v", "m", "v"]


def test_select_trainable_skips_bn_stats_and_scalar_constants() -> None:
    rng = np.random.default_rng(0)
    f = lambda *s: numpy_helper.from_array(rng.standard_normal(s).astype(np.float32))  # noqa: E731
    inits = []
    for name, shape in (("w", (4, 1, 3, 3)), ("s", (4,)), ("bb", (4,)), ("mu", (4,)), ("var", (4,)), ("six", (1,))):
        t = f(*shape)
        t.name = name
        inits.append(t)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "s", "bb", "mu", "var"], ["n"]),
             helper.make_node("Div", ["n", "six"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 5, 5])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    assert select_trainable(m) == ["w", "s", "bb"]


def test_constant_node_weights_are_trained_and_written_back() -> None:
    from tests.models import build, random_inputs, run

    model = build("paddle_constants")
    arts = export_artifacts(model, loss="distill", shapes={"input": [2, 3, 8, 8]})
    names = {p["name"] for p in arts.manifest["params"]}
    # Constant-node weights become initializers named after the node output
    assert {"conv1.weight.const_out", "bn1.scale.const_out", "conv2.weight", "fc.weight.const_out"} <= names
    assert not {"bn1.mean.const_out", "bn1.var.const_out"} & names
    scaled = {k: v * 0.5 for k, v in arts.checkpoint.items() if k in names}
    tuned = apply_checkpoint(model, scaled)
    feeds = random_inputs(model)
    assert not np.allclose(run(tuned, feeds)["output"], run(model, feeds)["output"])


def test_global_norm_clipping_matches_hand_computation() -> None:
    model = tiny_classifier(4)
    arts = export_artifacts(model, optimizer=OptimizerSpec("sgd", momentum=0.0, max_grad_norm=0.05))
    sess = _session(arts.training_model)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4, 3)).astype(np.float32)
    y = rng.integers(0, 4, 4)
    ck = arts.checkpoint
    out = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {
        "x": x, "labels": y, "lr": np.asarray(1.0, np.float32), "step": np.asarray(1, np.int64),
        "W": ck["W"], "b": ck["b"]})))
    dz = (_softmax(x @ ck["W"].astype(np.float64) + ck["b"]) - np.eye(4)[y]) / 4
    gw, gb = x.T @ dz, dz.sum(0)
    norm = np.sqrt((gw**2).sum() + (gb**2).sum())
    assert norm > 0.05  # the clip is active
    scale = 0.05 / (norm + 1e-6)
    np.testing.assert_allclose(out["W__new"], ck["W"] - scale * gw, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["b__new"], ck["b"] - scale * gb, rtol=1e-5, atol=1e-6)


def test_cross_entropy_on_dense_outputs() -> None:
    """Segmentation-style logits [N, C, H, W] with labels [N, H, W]: the class axis is 1."""
    rng = np.random.default_rng(5)
    w = rng.standard_normal((4, 2, 1, 1)).astype(np.float32)
    g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["logits"])], "seg",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 3, 3])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4, 3, 3])],
                          [numpy_helper.from_array(w, "w")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    arts = export_artifacts(model, optimizer=OptimizerSpec("sgd", momentum=0.0), shapes={"x": [2, 2, 3, 3]})
    x = rng.standard_normal((2, 2, 3, 3)).astype(np.float32)
    y = rng.integers(0, 4, (2, 3, 3))
    loss = _session(arts.training_model).run(["loss"], {"x": x, "labels": y, "w": w, "lr": np.asarray(0.0, np.float32),
                                                         "step": np.asarray(1, np.int64)})[0]
    z = np.einsum("nchw,mc->nmhw", x.astype(np.float64), w[:, :, 0, 0])
    logp = z - z.max(1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(1, keepdims=True))
    np.testing.assert_allclose(loss, -np.mean(np.take_along_axis(logp, y[:, None], axis=1)), rtol=1e-5)
