"""Feature distillation: which intermediate tensors a pruned model matches against its original, the teacher's
values at the kept channels, the loss term's gradients, and that training reduces the mismatch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import parser

from onnxprune import cli
from onnxprune.errors import BadInputError
from onnxprune.pipeline import prune
from onnxprune.spec import PruneSpec
from onnxprune.training import FinetuneConfig, TrainData, finetune
from onnxprune.training.artifacts import select_trainable
from onnxprune.training.features import affected_tensors, choose_features
from onnxprune.training.gradcheck import check_gradients
from onnxprune.training.losses import (
    LossKind,
    LossSpec,
    add_loss,
    teacher_plan,
    term_metrics,
)
from tests.data import write_npz
from tests.models import run


def _two_convs() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w1 = ", ".join(f"{v:.4f}" for v in rng.normal(size=4 * 2 * 9))
    w2 = ", ".join(f"{v:.4f}" for v in rng.normal(size=3 * 4 * 9))
    return parser.parse_model(f"""<ir_version: 8, opset_import: ["" : 17]>
g (float[2,2,5,5] x) => (float[2,3,5,5] y) <float[4,2,3,3] w1 = {{{w1}}}, float[3,4,3,3] w2 = {{{w2}}}> {{
  c1 = Conv<pads=[1,1,1,1]>(x, w1)
  h = Relu(c1)
  y = Conv<pads=[1,1,1,1]>(h, w2)
}}""")


def test_feature_term_gradients_numerically() -> None:
    model = _two_convs()
    rng = np.random.default_rng(1)
    lg = add_loss(model, LossSpec("distill", features=("h",), feature_weight=0.7))
    kinds = {t.output: t.kind for t in lg.loss_terms}
    assert kinds == {"y": LossKind.MSE, "h": LossKind.FEATURE}
    feeds = {"x": rng.standard_normal((2, 2, 5, 5)).astype(np.float32),
             "teacher/y": rng.standard_normal((2, 3, 5, 5)).astype(np.float32),
             "teacher/h": np.abs(rng.standard_normal((2, 4, 5, 5))).astype(np.float32)}
    res = check_gradients(lg.model, feeds, select_trainable(model) + ["x"], eps=1e-5, max_elements=20)
    assert res.max_rel_err < 1e-4 and res.max_rel_err_ort32 < 1e-3, (res.max_rel_err, res.max_rel_err_ort32)
    # the graph's value is the documented one, and the numpy evaluation agrees
    loss = run(lg.model, feeds)["loss"]
    out = run(model, {"x": feeds["x"]})
    term = next(t for t in lg.loss_terms if t.kind is LossKind.FEATURE)
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(onnx.helper.make_tensor_value_info("h", onnx.TensorProto.FLOAT, None))
    h = run(probe, {"x": feeds["x"]})["h"]
    relative = np.mean((h - feeds["teacher/h"]) ** 2) / (np.mean(feeds["teacher/h"] ** 2) + 1e-6)
    mse = np.mean((out["y"] - feeds["teacher/y"]) ** 2)
    np.testing.assert_allclose(loss, mse + 0.7 * relative, rtol=1e-4)
    assert term_metrics(term, h, reference=feeds["teacher/h"], feature_weight=0.7)["loss"] == pytest.approx(
        0.7 * relative, rel=1e-6)


def test_features_need_a_teacher_and_a_float_tensor() -> None:
    with pytest.raises(BadInputError, match="needs a teacher"):
        LossSpec("ce", features=("h",))
    with pytest.raises(BadInputError, match="not a float tensor"):
        add_loss(_two_convs(), LossSpec("distill", features=("nowhere",)))


@pytest.fixture(scope="module")
def cut_digits(digits_model_path: Path, tmp_path_factory: pytest.TempPathFactory):
    """The digits CNN, its half-width cut (no repair) and the state the pipeline planned it with."""
    from onnxprune import pipeline
    from onnxprune.progress import Reporter

    out = tmp_path_factory.mktemp("cut") / "half.onnx"
    state = pipeline.PruneState(str(digits_model_path), str(out), PruneSpec(ratio=0.5).validate(), Reporter(None))
    pipeline._run_stages(state, pipeline.PREPARE_STAGES + [("plan", pipeline.stage_plan), ("cut", pipeline.stage_cut)],
                         finish=False)
    return state


def test_channel_matched_features_equal_the_teachers_kept_channels(cut_digits) -> None:
    """Right after the cut, the first pruned conv's kept output channels are exactly the original's: the
    teacher's value gathered at the kept positions must equal the student's (the index mapping is right)."""
    state = cut_digits
    teacher, student = state.model, state.pruned
    found = choose_features(teacher, student, {"input": [1, 1, 8, 8]}, analysis=state.analysis, plan=state.plan)
    assert len(found) == 4 and all(m.keep is not None and m.axis == 1 for m in found)
    affected = affected_tensors(teacher, student)
    assert all(m.tensor in affected for m in found)
    # the first tensor the cut touches is computed from unchanged inputs: its kept channels are exact
    every = choose_features(teacher, student, {"input": [1, 1, 8, 8]}, analysis=state.analysis, plan=state.plan,
                            k=100)
    producer = {o: n for n in student.graph.node for o in n.output}
    first = next(m for m in every if not any(i in affected for i in producer[m.tensor].input))
    found = [*found, first]
    lg = add_loss(student, LossSpec("distill", features=tuple(m.tensor for m in found)))
    plan = teacher_plan(teacher, lg.loss_terms, [o.name for o in student.graph.output], found)
    x = np.random.default_rng(3).random((5, 1, 8, 8), dtype=np.float32)
    values = plan.values(dict(zip(plan.tensors, run(plan.model, {"input": x}, threads=1).values())))
    probe = onnx.ModelProto()
    probe.CopyFrom(student)
    probe.graph.output.append(onnx.helper.make_tensor_value_info(first.tensor, onnx.TensorProto.FLOAT, None))
    mine = run(probe, {"input": x})[first.tensor]
    assert values[first.tensor].shape == mine.shape == (5, len(first.keep), 8, 8)
    np.testing.assert_allclose(values[first.tensor], mine, rtol=1e-5, atol=1e-6)
    # without the plan only same-shaped tensors qualify, and a uniform cut leaves none
    assert choose_features(teacher, student, {"input": [1, 1, 8, 8]}) == []


def test_pooled_vectors_are_not_features() -> None:
    """An SE-style squeeze ([N, C, 1, 1]) is one number per channel: a weak distillation target, so the choice
    skips it and keeps the feature maps around it."""
    rng = np.random.default_rng(0)

    def model(mid: int) -> onnx.ModelProto:
        w0 = ", ".join(f"{v:.4f}" for v in rng.normal(size=mid * 2))
        w1 = ", ".join(f"{v:.4f}" for v in rng.normal(size=4 * mid * 9))
        return parser.parse_model(f"""<ir_version: 8, opset_import: ["" : 17]>
g (float[2,2,5,5] x) => (float[2,4,5,5] y) <float[{mid},2,1,1] w0 = {{{w0}}}, float[4,{mid},3,3] w1 = {{{w1}}}> {{
  a = Conv(x, w0)
  c = Conv<pads=[1,1,1,1]>(a, w1)
  h = Relu(c)
  p = GlobalAveragePool(h)
  s = Mul(h, p)
  y = Sigmoid(s)
}}""")

    teacher, student = model(3), model(2)  # the student lost one of ``a``'s channels
    every = choose_features(teacher, student, {"x": [2, 2, 5, 5]}, k=100)
    assert [m.tensor for m in every] == ["c", "h", "s"]  # not ``p``, nor ``a`` (its shape changed, no plan)


def test_distillation_reduces_the_feature_mismatch(cut_digits, digits) -> None:
    state = cut_digits
    x_train = digits[0]
    found = tuple(choose_features(state.model, state.pruned, {"input": [1, 1, 8, 8]}, analysis=state.analysis,
                                  plan=state.plan))
    cfg = FinetuneConfig(steps=240, lr=3e-3, batch_size=32, progress_bar=False, threads=1, eval_every=120,
                         features=found)
    res = finetune(state.pruned, TrainData({"input": x_train}), cfg, teacher=state.model, device="cpu")
    errors = [{k: v for k, v in h.items() if k.startswith("eval_feature_error/")} for h in res.history]
    errors = [e for e in errors if e]
    assert len(errors) == 3 and len(errors[0]) == 4  # steps 0 (the cut model), 120 and 240
    first_loss = np.mean([h["loss"] for h in res.history if "loss" in h][:5])
    assert res.final_metrics["train_loss"] < 0.5 * first_loss
    assert all(errors[-1][k] < 0.8 * v for k, v in errors[0].items()), errors


def test_pipeline_distils_features_without_labels(digits_model_path: Path, digits, tmp_path: Path) -> None:
    x_train = digits[0]
    train = write_npz(tmp_path / "train.npz", x_train)
    report = prune(digits_model_path, tmp_path / "small.onnx",
                   PruneSpec(ratio=0.5, finetune_steps=20, train_data=str(train), batch_size=32)).report
    assert any(n.startswith("distilled intermediate features too:") for n in report["notes"])
    kinds = [t["term"] for t in report["finetune"]["terms"].values()]
    assert kinds.count("feature") == 4 and kinds.count("kl") == 1
    # --no-feature-distill: the outputs alone
    out = tmp_path / "plain.onnx"
    assert cli.main(["prune", str(digits_model_path), "-o", str(out), "--ratio", "0.5", "--finetune-steps", "5",
                     "--train-data", str(train), "--no-feature-distill", "--report", str(tmp_path / "r.json")]) == 0
    plain = json.loads((tmp_path / "r.json").read_text())
    assert [t["term"] for t in plain["finetune"]["terms"].values()] == ["kl"]
    assert plain["spec"]["feature_distill"] is False
    # with labels the loss is cross-entropy alone
    labelled = write_npz(tmp_path / "labelled.npz", x_train, digits[1])
    report = prune(digits_model_path, tmp_path / "small2.onnx",
                   PruneSpec(ratio=0.5, finetune_steps=5, train_data=str(labelled))).report
    assert [t["term"] for t in report["finetune"]["terms"].values()] == ["ce"]
