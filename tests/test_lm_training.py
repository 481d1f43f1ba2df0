"""Fine-tuning decoder LMs through onnxprune's own training graphs: which tensors train, LM loss semantics, distillation.

The models are tiny random-weight Llama-style (GQA, RoPE from an ``inv_freq`` buffer, RMSNorm, SwiGLU) and GPT-2-style
(fused ``c_attn`` + Split, LayerNorm, GELU, causal mask) decoders exported by torch.onnx (``dynamo=False``), with and
without a KV cache (``tests/decoder_train_models.py``), plus small hand-built graphs for the rules themselves.
"""

from __future__ import annotations

import resource
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune.training import FinetuneConfig, TrainData, finetune
from onnxprune.training.artifacts import (
    constants_to_initializers,
    export_artifacts,
    fix_input_shapes,
    select_trainable,
)
from onnxprune.training.gradcheck import check_gradients
from onnxprune.training.losses import LossSpec, add_loss, teacher_input
from onnxprune.training.outputs import cache_outputs
from tests.decoder_train_models import (
    GPT2,
    LLAMA,
    ExportedLM,
    export_lm,
    token_feeds,
)

pytest.importorskip("torch")

STYLES = {"llama": (LLAMA, False), "llama_cache": (LLAMA, True), "gpt2": (GPT2, False), "gpt2_cache": (GPT2, True),
          "gpt2_erf": (replace(GPT2, mask="masked_fill", gelu="erf"), False),
          "gpt2_tril": (replace(GPT2, mask="tril"), True)}


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ExportedLM]:
    root = tmp_path_factory.mktemp("lms")
    return {k: export_lm(root / f"{k}.onnx", c, cache=cache) for k, (c, cache) in STYLES.items()}


def _inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _cone(model: onnx.ModelProto, start: str) -> set[str]:
    """Op types of every node downstream of ``start`` by value (reading a shape carries no value)."""
    reach, ops = {start}, set()
    for node in model.graph.node:
        if node.op_type not in ("Shape", "Size") and any(i in reach for i in node.input):
            reach.update(node.output)
            ops.add(node.op_type)
    return ops


# ------------------------------------------------------------------------------ which tensors train
def _rotary_graph() -> onnx.ModelProto:
    """Embedding → RoPE from two buffers (inv_freq ⊗ positions by MatMul and by Mul) → masked attention → head.

    Buffers: ``inv_freq`` [1, 2, 1] (MatMul with float positions), ``inv_freq2`` [2] (Mul), ``mask`` (additive -inf
    triangle), ``scale``/``eps`` (single elements). Weights: ``embed``, ``norm_w``, ``w_out``.
    """
    t, d, v = 4, 4, 7
    rng = np.random.default_rng(0)
    f32 = lambda *s: rng.standard_normal(s).astype(np.float32)
    inits = {"embed": f32(v, d), "norm_w": 1 + 0.1 * f32(d), "w_out": f32(d, v),
             "inv_freq": np.array([[[1.0], [0.01]]], np.float32), "inv_freq2": np.array([1.0, 0.01], np.float32),
             "mask": np.triu(np.full((t, t), -np.inf, np.float32), 1), "scale": np.array(0.5, np.float32),
             "eps": np.array(1e-6, np.float32), "zero": np.array(0, np.int64), "one": np.array(1, np.int64),
             "tt": np.array(t, np.int64), "ax": np.array([0, 1], np.int64), "ax_col": np.array([1], np.int64)}
    n = helper.make_node
    nodes = [
        n("Gather", ["embed", "input_ids"], ["x"]),
        n("Range", ["zero", "tt", "one"], ["pos"]), n("Cast", ["pos"], ["posf"], to=TensorProto.FLOAT),
        n("Unsqueeze", ["posf", "ax"], ["pos3"]),  # [1, 1, T]
        n("MatMul", ["inv_freq", "pos3"], ["freqs"]),  # [1, 2, T]
        n("Transpose", ["freqs"], ["freqs_t"], perm=[0, 2, 1]),
        n("Unsqueeze", ["posf", "ax_col"], ["pos_col"]),  # [T, 1]
        n("Mul", ["pos_col", "inv_freq2"], ["freqs2"]),  # [T, 2]
        n("Add", ["freqs_t", "freqs2"], ["f"]),
        n("Concat", ["f", "f"], ["emb"], axis=-1),
        n("Cos", ["emb"], ["cos"]), n("Sin", ["emb"], ["sin"]),
        n("Mul", ["x", "cos"], ["xc"]), n("Mul", ["x", "sin"], ["xs"]), n("Add", ["xc", "xs"], ["xr"]),
        n("Mul", ["xr", "xr"], ["sq"]), n("ReduceMean", ["sq"], ["ms"], axes=[-1], keepdims=1),
        n("Add", ["ms", "eps"], ["mse"]), n("Sqrt", ["mse"], ["rt"]), n("Div", ["xr", "rt"], ["xn"]),
        n("Mul", ["xn", "norm_w"], ["h"]),
        n("Transpose", ["h"], ["ht"], perm=[0, 2, 1]), n("MatMul", ["h", "ht"], ["s0"]),
        n("Mul", ["s0", "scale"], ["s1"]), n("Add", ["s1", "mask"], ["s2"]), n("Softmax", ["s2"], ["p"], axis=-1),
        n("MatMul", ["p", "h"], ["a"]), n("MatMul", ["a", "w_out"], ["logits"]),
    ]
    g = helper.make_graph(nodes, "rope", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["n", t])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", t, v])],
                          [numpy_helper.from_array(a, k) for k, a in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 9
    return m


def test_buffers_feeding_sin_cos_and_masks_stay_constant() -> None:
    """inv_freq (MatMul or Mul with positions), the -inf mask and scalars are buffers; the rest trains without Sin/Cos."""
    model = _rotary_graph()
    assert select_trainable(model) == ["embed", "norm_w", "w_out"]
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 7, (16, 4)).astype(np.int64)
    res = finetune(model, TrainData({"input_ids": ids}, labels=rng.integers(0, 7, (16, 4)).astype(np.int64)),
                   FinetuneConfig(steps=5, lr=1e-2, batch_size=4, eval_fraction=0.0, progress_bar=False))
    before, after = _inits(model), _inits(res.model)
    for name in ("inv_freq", "inv_freq2", "mask", "scale", "eps"):
        np.testing.assert_array_equal(after[name], before[name])
    assert not np.allclose(after["w_out"], before["w_out"])
    # asked for on purpose, the buffer trains through the Sin/Cos rules
    arts = export_artifacts(model, trainable=["w_out", "inv_freq"], shapes={"input_ids": [2, 4]})
    assert [p["name"] for p in arts.manifest["params"]] == ["w_out", "inv_freq"]


@pytest.mark.parametrize("style", ["llama", "gpt2"])
def test_exported_lm_trains_every_parameter_and_no_buffer(exported: dict[str, ExportedLM], style: str) -> None:
    c, _ = STYLES[style]
    model = constants_to_initializers(onnx.load(str(exported[style].path)))
    inits = _inits(model)
    chosen = select_trainable(model)
    trained = sum(inits[n].size for n in chosen)
    # GPT-2's tied head is exported as a transposed copy of the token embedding: one more [D, V] tensor
    assert trained == exported[style].parameters + (c.vocab * c.dim if c.family == "gpt2" else 0)
    for name in chosen:
        assert not {"Sin", "Cos", "Trilu", "Range"} & _cone(model, name), name
    rotary = [n for n, a in inits.items() if a.shape == (1, c.head_dim // 2, 1)]
    assert (len(rotary) == 1) == (c.family == "llama") and not set(rotary) & set(chosen)


# ------------------------------------------------------------------------------ LM loss semantics
@pytest.mark.parametrize("style", ["llama_cache", "gpt2_cache"])
def test_lm_logits_distil_by_kl_over_vocab_and_cache_gets_no_loss(exported: dict[str, ExportedLM], style: str) -> None:
    c, _ = STYLES[style]
    model = onnx.load(str(exported[style].path))
    assert len(cache_outputs(model)) == 2 * c.layers
    lg = add_loss(fix_input_shapes(model, {"input_ids": [2, 5]}), LossSpec("distill", temperature=2.0))
    assert lg.terms == {"logits": "kl"} and list(lg.teacher) == ["logits"]
    assert lg.loss_terms[0].class_axis == 2
    feeds = token_feeds(c, 2, 5, cache=True)
    sess = ort.InferenceSession(lg.model.SerializeToString(), providers=["CPUExecutionProvider"])
    student = sess.run(["logits"], {**feeds, teacher_input("logits"): np.zeros((2, 5, c.vocab), np.float32)})[0]
    teacher = student + np.random.default_rng(0).standard_normal(student.shape).astype(np.float32)
    loss = sess.run([lg.loss], {**feeds, teacher_input("logits"): teacher})[0]

    def log_softmax(z: np.ndarray) -> np.ndarray:  # over the vocabulary, per position
        z = z.astype(np.float64) / 2.0
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    lp, lq = log_softmax(teacher), log_softmax(student)
    expected = (np.exp(lp) * (lp - lq)).sum(-1).mean() * 4.0
    assert float(loss) == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("width,term", [(7, "kl"), (5, "mse")])
def test_token_logits_found_through_a_view_of_the_ids(width: int, term: str) -> None:
    """GPT-2 views ``input_ids`` before the lookup; a raw [N, T, V] output over the vocabulary distils by KL, while
    an [N, T, D] output of another width stays a regression (MSE)."""
    n = helper.make_node
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((7, 4)).astype(np.float32), "embed"),
             numpy_helper.from_array(rng.standard_normal((4, width)).astype(np.float32), "w"),
             numpy_helper.from_array(np.array([-1, 3], np.int64), "view")]
    nodes = [n("Reshape", ["input_ids", "view"], ["ids"]), n("Gather", ["embed", "ids"], ["x"]),
             n("MatMul", ["x", "w"], ["out"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [2, 3])],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 3, width])], inits)
    lg = add_loss(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), LossSpec("distill"))
    assert lg.terms == {"out": term}


def test_cache_outputs_found_by_name_or_by_appending_to_an_input() -> None:
    n = helper.make_node
    nodes = [n("Concat", ["past_k", "k"], ["kv_out"], axis=2), n("Identity", ["k"], ["present.0.value"]),
             n("Relu", ["k"], ["y"])]
    vi = helper.make_tensor_value_info
    g = helper.make_graph(nodes, "g", [vi("past_k", TensorProto.FLOAT, [1, 2, 0, 4]), vi("k", TensorProto.FLOAT, [1, 2, 3, 4])],
                          [vi(o, TensorProto.FLOAT, None) for o in ("kv_out", "present.0.value", "y")])
    assert cache_outputs(helper.make_model(g)) == ("kv_out", "present.0.value")


# ------------------------------------------------------------------------------ gradients and training
@pytest.mark.parametrize("style", ["llama_cache", "gpt2", "gpt2_erf", "gpt2_tril"])
def test_whole_lm_gradients_match_central_differences(exported: dict[str, ExportedLM], style: str) -> None:
    c, cache = STYLES[style]
    model = constants_to_initializers(onnx.load(str(exported[style].path)))
    shapes = {"input_ids": [2, 5]} | ({i.name: [2, c.kv_heads, 0, c.head_dim] for i in model.graph.input
                                       if i.name.startswith("past")} if cache else {})
    lg = add_loss(fix_input_shapes(model, shapes), LossSpec("distill"))
    keep = [o for o in lg.model.graph.output if o.name == lg.loss]
    del lg.model.graph.output[:]
    lg.model.graph.output.extend(keep)
    feeds = token_feeds(c, 2, 5, cache=cache)
    feeds[teacher_input("logits")] = np.random.default_rng(2).standard_normal((2, 5, c.vocab)).astype(np.float32)
    chosen = select_trainable(model)
    wrt = [chosen[0], chosen[1], chosen[-1]] + [n for n in chosen if "bias" in n][:1]
    res = check_gradients(lg.model, feeds, wrt, eps=1e-5, max_elements=12)
    assert res.max_rel_err < 1e-3 and res.max_rel_err_ort32 < 2e-2, res


def _noisy(model: onnx.ModelProto, scale: float, seed: int) -> onnx.ModelProto:
    """``model`` with noise on its 2-D weights: a student that lost something to recover."""
    rng = np.random.default_rng(seed)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for t in out.graph.initializer:
        a = numpy_helper.to_array(t)
        if a.ndim == 2 and a.dtype == np.float32:
            t.CopyFrom(numpy_helper.from_array((a + scale * rng.standard_normal(a.shape)).astype(np.float32), t.name))
    return out


@pytest.mark.parametrize("style", ["llama", "gpt2_cache"])
def test_distillation_loss_falls_and_buffers_stay(exported: dict[str, ExportedLM], style: str) -> None:
    c, cache = STYLES[style]
    teacher = constants_to_initializers(onnx.load(str(exported[style].path)))
    student = _noisy(teacher, 0.2, seed=3)
    data = TrainData(token_feeds(c, 64, 8, cache=cache, seed=1))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    res = finetune(student, data, FinetuneConfig(steps=30, lr=1e-2, batch_size=8, eval_fraction=0.0,
                                                progress_bar=False, schedule="constant"), teacher=teacher)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 300 * 1024  # kB: measured ~30 MB
    losses = [h["loss"] for h in res.history if "loss" in h]
    assert len(losses) == 30 and np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5]), losses
    assert [t.output for t in res.loss_terms] == ["logits"]
    before, after = _inits(student), _inits(constants_to_initializers(res.model))
    frozen = set(before) - set(select_trainable(student))
    for name in frozen:
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)


@pytest.mark.parametrize("style", ["llama", "gpt2_cache"])
def test_pipeline_prunes_and_distils_an_lm(exported: dict[str, ExportedLM], style: str, tmp_path: Path) -> None:
    """``prune --ratio 0.2 --finetune-steps 30 --train-data tokens.npz``: no labels, the original is the teacher."""
    from onnxprune.pipeline import prune
    from onnxprune.spec import PruneSpec

    c, cache = STYLES[style]
    tokens = tmp_path / "tokens.npz"
    np.savez(tokens, **token_feeds(c, 64, 8, cache=cache, seed=1))
    out = tmp_path / "small.onnx"
    result = prune(str(exported[style].path), str(out), PruneSpec(ratio=0.2, finetune_steps=30, train_data=str(tokens),
                                                                  lr=3e-3, batch_size=8, device="cpu"))
    tuned = result.report["finetune"]
    assert tuned["loss"] == "distillation from the original model"
    assert tuned["terms"]["logits"] == {"term": "kl", "reads": "logits", "class_axis": 2, "output_kind": "logits"}
    assert not any(k.startswith("present") for k in tuned["terms"])
    assert tuned["metrics"]["best_step"] > 0  # the held-out loss fell below the pruned model's
    original, small = _inits(constants_to_initializers(onnx.load(str(exported[style].path)))), _inits(onnx.load(str(out)))
    rotary = [n for n, a in original.items() if a.shape == (1, c.head_dim // 2, 1)]
    for name in rotary:
        np.testing.assert_array_equal(small[name], original[name])
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert np.isfinite(sess.run(["logits"], token_feeds(c, 2, 5, cache=cache))[0]).all()
