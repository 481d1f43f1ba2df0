"""Whole-model gradient checks: a small CNN and a transformer block against float64 central differences."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnxprune.training.artifacts import fix_input_shapes, select_trainable
from onnxprune.training.gradcheck import check_gradients
from onnxprune.training.losses import LossSpec, add_loss
from tests.models import build_resnet_basic, build_transformer_block, build_vgg, random_inputs


def _loss_only(model: onnx.ModelProto, spec: LossSpec) -> onnx.ModelProto:
    lg = add_loss(model, spec)
    keep = [o for o in lg.model.graph.output if o.name == lg.loss]
    del lg.model.graph.output[:]
    lg.model.graph.output.extend(keep)
    return lg.model


@pytest.mark.parametrize("builder,shape", [
    (build_vgg, [2, 3, 8, 8]),
    (build_resnet_basic, None),
    (build_transformer_block, [2, 8, 16]),
])
def test_whole_model_ce_gradients(builder, shape) -> None:  # noqa: ANN001
    model = builder(seed=3)
    feeds = random_inputs(model, batch=2, seed=1)
    model = fix_input_shapes(model, {"input": list(feeds["input"].shape)})
    m = _loss_only(model, LossSpec("ce"))
    feeds["labels"] = np.array([3, 7], np.int64)
    wrt = select_trainable(model) + ["input"]
    res = check_gradients(m, feeds, wrt, eps=1e-5, max_elements=20)
    assert res.max_rel_err < 1e-3, res.max_rel_err
    assert res.max_rel_err_ort32 < 1e-3, res.max_rel_err_ort32


def test_transformer_distill_kl_gradients() -> None:
    model = build_transformer_block(seed=5)
    feeds = random_inputs(model, batch=2, seed=2)
    model = fix_input_shapes(model, {"input": [2, 8, 16]})
    m = _loss_only(model, LossSpec("distill", temperature=2.0))
    feeds["teacher/output"] = np.random.default_rng(0).standard_normal((2, 10)).astype(np.float32)
    wrt = ["block0.q.weight", "block0.ln1.weight", "classifier.weight"]
    wrt = [w for w in wrt if w in select_trainable(model)] or select_trainable(model)[:3]
    res = check_gradients(m, feeds, wrt, eps=1e-5, max_elements=20)
    assert res.max_rel_err < 1e-3 and res.max_rel_err_ort32 < 1e-3


UNSUPPORTED = {"lstm": "LSTM", "with_if": "If"}


def _zoo() -> list[str]:
    from tests.models import BUILDERS

    return list(BUILDERS)


@pytest.mark.parametrize("name", _zoo())
def test_zoo_models_export_and_gradients(name: str) -> None:
    """Every zoo model exports (distillation + SGD) and a sample of its weight gradients checks out."""
    import onnxruntime as ort

    from onnxprune.errors import UnsupportedOpError
    from onnxprune.training import export_artifacts
    from tests.models import build, run

    model = build(name)
    feeds = random_inputs(model, batch=2)
    shapes = {"input": list(feeds["input"].shape)}
    if name in UNSUPPORTED:
        with pytest.raises(UnsupportedOpError) as err:
            export_artifacts(model, loss="distill", shapes=shapes)
        assert err.value.op_type == UNSUPPORTED[name] and err.value.node
        return
    arts = export_artifacts(model, loss="distill", optimizer="sgd", shapes=shapes)
    sess = ort.InferenceSession(arts.training_model.SerializeToString(), providers=["CPUExecutionProvider"])
    teacher = {n: v * 1.5 for n, v in run(model, feeds).items()}
    f = {**feeds, **{k: v for k, v in arts.checkpoint.items() if k != "__step__"},
         "lr": np.asarray(0.01, np.float32), "step": np.asarray(1, np.int64)}
    f.update({inp: teacher[out] for out, inp in arts.manifest["inputs"]["teacher"].items()})
    assert np.isfinite(sess.run(["loss"], f)[0])
    m = _loss_only(fix_input_shapes(model, shapes), LossSpec("distill"))
    params = [p["name"] for p in arts.manifest["params"]]
    res = check_gradients(m, {**feeds, **{f"teacher/{k}": v for k, v in teacher.items()}},
                          params[:3] + params[-2:], eps=1e-5, max_elements=4)
    assert res.max_rel_err < 1e-3 and res.max_rel_err_ort32 < 1e-3
