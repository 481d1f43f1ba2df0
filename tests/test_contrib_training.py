"""Distillation fine-tuning through onnxruntime's contrib ops, as onnxruntime-genai's model builder emits them.

The model is built in code with the builder's pattern: Gather embedding → SimplifiedLayerNormalization /
SkipSimplifiedLayerNormalization → q/k/v MatMuls → GroupQueryAttention (rotary inside, cos/sin caches as
initializers) → o MatMul → SkipSimplifiedLayerNormalization → SwiGLU MLP → … → lm_head, with
``present.*`` outputs. Training differentiates the standard-op expansions (``onnxprune.training.decompose``);
the expansions are compared here with onnxruntime's kernels, their gradients in ``test_autodiff_rules.py``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune.errors import BadInputError
from onnxprune.training import FinetuneConfig, TrainData, finetune, select_trainable
from onnxprune.training.artifacts import export_artifacts
from onnxprune.training.decompose import (
    default_expansions,
    expand_contrib,
    expandable_nodes,
)

MS = "com.microsoft"
VOCAB, HIDDEN, HEADS, KV, HEAD, FFN, LAYERS, MAX_POS = 48, 32, 4, 2, 16, 48, 2, 32
ROOT = Path(__file__).parent


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _model(nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto], outputs: list[str],
           inits: dict[str, np.ndarray]) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
                          [numpy_helper.from_array(v, k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)])
    m.ir_version = 9
    return m


def _layer(i: int, x: str, residual: str | None, w: dict[str, np.ndarray], rng: np.random.Generator
           ) -> tuple[list[onnx.NodeProto], str, str]:
    """One decoder layer in the builder's pattern; returns its nodes, MLP output and the residual stream."""
    f = lambda *s: (rng.standard_normal(s) / np.sqrt(s[0])).astype(np.float32)
    p = f"layers.{i}"
    w.update({f"{p}.input_ln": 1 + 0.1 * f(HIDDEN), f"{p}.post_ln": 1 + 0.1 * f(HIDDEN), f"{p}.q": f(HIDDEN, HEADS * HEAD),
              f"{p}.k": f(HIDDEN, KV * HEAD), f"{p}.v": f(HIDDEN, KV * HEAD), f"{p}.o": f(HEADS * HEAD, HIDDEN),
              f"{p}.gate": f(HIDDEN, FFN), f"{p}.up": f(HIDDEN, FFN), f"{p}.down": f(FFN, HIDDEN)})
    n = helper.make_node
    if residual is None:
        nodes = [n("SimplifiedLayerNormalization", [x, f"{p}.input_ln"], [f"{p}/h"], axis=-1, epsilon=1e-5)]
        residual = x
    else:
        nodes = [n("SkipSimplifiedLayerNormalization", [x, residual, f"{p}.input_ln"], [f"{p}/h", "", "", f"{p}/res0"],
                   domain=MS, epsilon=1e-5)]
        residual = f"{p}/res0"
    nodes += [n("MatMul", [f"{p}/h", f"{p}.{t}"], [f"{p}/{t}"]) for t in "qkv"]
    nodes += [
        n("GroupQueryAttention", [f"{p}/q", f"{p}/k", f"{p}/v", f"past_key_values.{i}.key", f"past_key_values.{i}.value",
                                  "seqlens_k", "total_seq_len", "cos_cache", "sin_cache"],
          [f"{p}/attn", f"present.{i}.key", f"present.{i}.value"], domain=MS, num_heads=HEADS, kv_num_heads=KV,
          do_rotary=1, rotary_interleaved=0, local_window_size=-1),
        n("MatMul", [f"{p}/attn", f"{p}.o"], [f"{p}/o"]),
        n("SkipSimplifiedLayerNormalization", [f"{p}/o", residual, f"{p}.post_ln"], [f"{p}/h2", "", "", f"{p}/res1"],
          domain=MS, epsilon=1e-5),
        n("MatMul", [f"{p}/h2", f"{p}.gate"], [f"{p}/g"]), n("Sigmoid", [f"{p}/g"], [f"{p}/gs"]),
        n("Mul", [f"{p}/g", f"{p}/gs"], [f"{p}/silu"]),
        n("MatMul", [f"{p}/h2", f"{p}.up"], [f"{p}/u"]), n("Mul", [f"{p}/silu", f"{p}/u"], [f"{p}/m"]),
        n("MatMul", [f"{p}/m", f"{p}.down"], [f"{p}/down"]),
    ]
    return nodes, f"{p}/down", f"{p}/res1"


def genai_style_lm(seed: int = 0) -> onnx.ModelProto:
    """A tiny Llama-style decoder (GQA 4 query heads on 2 KV heads, RoPE in the attention op) in the builder's ops."""
    rng = np.random.default_rng(seed)
    ang = np.outer(np.arange(MAX_POS), 1.0 / 10000 ** (np.arange(0, HEAD, 2) / HEAD)).astype(np.float32)
    w: dict[str, np.ndarray] = {"embed": (0.5 * rng.standard_normal((VOCAB, HIDDEN))).astype(np.float32),
                                "cos_cache": np.cos(ang), "sin_cache": np.sin(ang),
                                "norm": np.ones(HIDDEN, np.float32),
                                "lm_head": (rng.standard_normal((HIDDEN, VOCAB)) / np.sqrt(HIDDEN)).astype(np.float32),
                                "one": np.array([1], np.int64), "one32": np.array(1, np.int32)}
    n = helper.make_node
    nodes = [n("Gather", ["embed", "input_ids"], ["x0"]),
             n("ReduceSum", ["attention_mask", "one"], ["len"], keepdims=0),
             n("Cast", ["len"], ["len32"], to=TensorProto.INT32), n("Sub", ["len32", "one32"], ["seqlens_k"]),
             n("Shape", ["attention_mask"], ["mshape"]), n("Gather", ["mshape", "one"], ["total64"]),
             n("Squeeze", ["total64"], ["total_sq"]), n("Cast", ["total_sq"], ["total_seq_len"], to=TensorProto.INT32)]
    x, residual = "x0", None
    for i in range(LAYERS):
        layer, x, residual = _layer(i, x, residual, w, rng)
        nodes += layer
    nodes += [n("SkipSimplifiedLayerNormalization", [x, residual, "norm"], ["final", "", "", ""], domain=MS, epsilon=1e-5),
              n("MatMul", ["final", "lm_head"], ["logits"])]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"])]
    for i in range(LAYERS):
        inputs += [helper.make_tensor_value_info(f"past_key_values.{i}.{t}", TensorProto.FLOAT, ["batch", KV, "past", HEAD])
                   for t in ("key", "value")]
    outputs = ["logits"] + [f"present.{i}.{t}" for i in range(LAYERS) for t in ("key", "value")]
    return _model(nodes, inputs, outputs, w)


def lm_feeds(n: int, t: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {"input_ids": rng.integers(0, VOCAB, (n, t)).astype(np.int64), "attention_mask": np.ones((n, t), np.int64)}
    feeds.update({f"past_key_values.{i}.{k}": np.zeros((n, KV, 0, HEAD), np.float32)
                  for i in range(LAYERS) for k in ("key", "value")})
    return feeds


def _inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def noised(model: onnx.ModelProto, scale: float = 0.3, seed: int = 7) -> onnx.ModelProto:
    """Copy of ``model`` with Gaussian noise (``scale`` × each matrix's std) on its weight matrices, caches untouched."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    rng = np.random.default_rng(seed)
    for t in out.graph.initializer:
        a = numpy_helper.to_array(t)
        if a.dtype == np.float32 and a.ndim == 2 and not t.name.endswith("_cache"):
            t.CopyFrom(numpy_helper.from_array((a + scale * a.std() * rng.standard_normal(a.shape)).astype(np.float32), t.name))
    return out


def _kl(teacher: np.ndarray, student: np.ndarray) -> float:
    """Mean KL(teacher ‖ student) over the vocabulary per position."""
    def log_softmax(z: np.ndarray) -> np.ndarray:
        z = z.astype(np.float64) - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))
    lt, ls = log_softmax(teacher), log_softmax(student)
    return float(np.mean(np.sum(np.exp(lt) * (lt - ls), -1)))


# ------------------------------------------------------------------------------ expansions vs onnxruntime's kernels
def test_expanded_lm_matches_onnxruntime_contrib_kernels() -> None:
    """The whole expanded decoder (standard ops only) computes what onnxruntime's contrib kernels compute."""
    model = genai_style_lm()
    expanded = expand_contrib(model)
    assert {n.domain for n in expanded.graph.node} <= {""}
    assert not any(n.op_type.startswith(("Simplified", "Skip")) for n in expanded.graph.node)
    assert _inits(model).keys() <= _inits(expanded).keys()  # weights keep their names
    for n, t in [(2, 7), (3, 12), (1, 1)]:
        feeds = lm_feeds(n, t, seed=t)
        want = _session(model).run(None, feeds)
        got = _session(expanded).run(None, feeds)
        for a, b in zip(want, got):
            assert a.shape == b.shape
            np.testing.assert_allclose(b, a, atol=1e-5, rtol=1e-5)


def _run_both(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(onnxruntime's contrib kernels, the expansion) output pairs."""
    return list(zip(_session(model).run(None, feeds), _session(expand_contrib(model)).run(None, feeds)))


def _vi(name: str, a: np.ndarray) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(a.dtype), list(a.shape))


@pytest.mark.parametrize("shape,axis", [((2, 5, 16), -1), ((3, 4, 6, 8), -2), ((3, 4, 6, 8), 2), ((1, 1, 32), 2)])
def test_rms_norm_expansions_match_onnxruntime(shape: tuple[int, ...], axis: int) -> None:
    """SimplifiedLayerNormalization (y and inv_std_var) and SkipSimplifiedLayerNormalization (with and without bias:
    output, inv_std_var and the input+skip+bias sum)."""
    rng = np.random.default_rng(len(shape))
    x, skip = (rng.standard_normal(shape).astype(np.float32) for _ in range(2))
    w = {"w": rng.standard_normal(shape[axis:]).astype(np.float32), "g": rng.standard_normal(shape[-1:]).astype(np.float32),
         "b": rng.standard_normal(shape[-1:]).astype(np.float32)}
    n = helper.make_node
    nodes = [n("SimplifiedLayerNormalization", ["x", "w"], ["y", "inv"], axis=axis, epsilon=1e-5)]
    outputs = ["y", "inv"]
    if len(shape) == 3:  # onnxruntime's skip norms take [B, S, H] or [N, H] only
        nodes += [n("SkipSimplifiedLayerNormalization", ["x", "skip", "g", "b"], ["y2", "", "inv2", "sum2"], domain=MS,
                    epsilon=1e-6),
                  n("SkipSimplifiedLayerNormalization", ["x", "skip", "g"], ["y3"], domain=MS, epsilon=1e-6)]
        outputs += ["y2", "inv2", "sum2", "y3"]
    model = _model(nodes, [_vi("x", x), _vi("skip", skip)], outputs, w)
    for want, got in _run_both(model, {"x": x, "skip": skip}):
        assert want.shape == got.shape
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout,heads,interleaved", [("bsh", 4, 0), ("bsh", 0, 0), ("bnsd", 0, 0), ("bsh", 4, 1),
                                                      ("bnsd", 0, 1)])
def test_rotary_embedding_expansion_matches_onnxruntime(layout: str, heads: int, interleaved: int) -> None:
    rng = np.random.default_rng(3)
    for b, s in [(2, 5), (1, 9)]:
        shape = (b, s, 4 * HEAD) if layout == "bsh" else (b, 4, s, HEAD)
        x = rng.standard_normal(shape).astype(np.float32)
        pos = rng.integers(0, MAX_POS, (b, s)).astype(np.int64)
        ang = rng.uniform(0, 3, (MAX_POS, HEAD // 2)).astype(np.float32)
        node = helper.make_node("RotaryEmbedding", ["x", "pos", "cos", "sin"], ["y"], domain=MS, num_heads=heads,
                                interleaved=interleaved)
        model = _model([node], [_vi("x", x), _vi("pos", pos)], ["y"], {"cos": np.cos(ang), "sin": np.sin(ang)})
        for want, got in _run_both(model, {"x": x, "pos": pos}):
            np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("packed,interleaved,half,head,scale", [
    (False, 0, 8, 16, 0.0), (False, 1, 8, 16, 0.0), (True, 0, 8, 16, 0.0), (False, 0, 8, 32, 0.0),
    (False, 0, None, 16, 0.3), (True, 1, 16, 32, 0.1)])
def test_group_query_attention_expansion_matches_onnxruntime(packed: bool, interleaved: int, half: int | None,
                                                             head: int, scale: float) -> None:
    """Output and present key/value at prefill, several shapes; right-padded rows (seqlens_k < S - 1) too."""
    rng = np.random.default_rng(head)
    for b, s, lens in [(2, 5, None), (3, 7, [6, 2, 4]), (1, 1, None)]:
        q, k, v = (rng.standard_normal((b, s, h * head)).astype(np.float32) for h in (HEADS, KV, KV))
        feeds = {"q": np.concatenate([q, k, v], -1) if packed else q, "pk": np.zeros((b, KV, 0, head), np.float32),
                 "sl": np.array(lens or [s - 1] * b, np.int32), "tl": np.array(s, np.int32)}
        feeds["pv"] = feeds["pk"]
        if not packed:
            feeds.update(k=k, v=v)
        inits = {}
        if half is not None:
            ang = rng.uniform(0, 3, (MAX_POS, half)).astype(np.float32)
            inits = {"cos": np.cos(ang), "sin": np.sin(ang)}
        names = ["q", "" if packed else "k", "" if packed else "v", "pk", "pv", "sl", "tl"]
        node = helper.make_node("GroupQueryAttention", names + (["cos", "sin"] if half else []), ["y", "pk_out", "pv_out"],
                                domain=MS, num_heads=HEADS, kv_num_heads=KV, do_rotary=int(half is not None),
                                rotary_interleaved=interleaved, scale=scale)
        model = _model([node], [_vi(k_, a) for k_, a in feeds.items()], ["y", "pk_out", "pv_out"], inits)
        for want, got in _run_both(model, feeds):
            assert want.shape == got.shape
            np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def _gqa(**attrs: object) -> onnx.ModelProto:
    b, s = 2, 3
    q = helper.make_tensor_value_info("q", TensorProto.FLOAT, [b, s, HEADS * HEAD])
    kv = [helper.make_tensor_value_info(k, TensorProto.FLOAT, [b, s, KV * HEAD]) for k in ("k", "v")]
    past = [helper.make_tensor_value_info(p, TensorProto.FLOAT, [b, KV, attrs.pop("past", 0), HEAD]) for p in ("pk", "pv")]
    ints = [helper.make_tensor_value_info("sl", TensorProto.INT32, [b]), helper.make_tensor_value_info("tl", TensorProto.INT32, [])]
    node = helper.make_node("GroupQueryAttention", ["q", "k", "v", "pk", "pv", "sl", "tl"], ["y", "pk_out", "pv_out"],
                            domain=MS, name="attn", num_heads=HEADS, kv_num_heads=KV, **attrs)
    return _model([node], [q, *kv, *past, *ints], ["y", "pk_out", "pv_out"], {})


@pytest.mark.parametrize("attrs,named", [({"local_window_size": 4}, "local_window_size"), ({"softcap": 30.0}, "softcap"),
                                         ({"past": 5}, "past of length 5")])
def test_group_query_attention_refuses_what_prefill_training_does_not_compute(attrs: dict, named: str) -> None:
    with pytest.raises(BadInputError, match=named):
        expand_contrib(_gqa(**attrs))


def test_unproduced_contrib_output_read_by_the_graph_is_refused() -> None:
    """SkipSimplifiedLayerNormalization's mean output has no expansion: a graph reading it is refused by name."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8])
    node = helper.make_node("SkipSimplifiedLayerNormalization", ["x", "x", "w"], ["y", "mean"], domain=MS, name="ln")
    model = _model([node, helper.make_node("Add", ["y", "mean"], ["z"])], [x], ["z"], {"w": np.ones(8, np.float32)})
    with pytest.raises(BadInputError, match="output 1"):
        expand_contrib(model)
    assert expandable_nodes(model)


def test_expansion_needs_opset_13() -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8])
    model = _model([helper.make_node("SimplifiedLayerNormalization", ["x", "w"], ["y"])], [x], ["y"],
                   {"w": np.ones(8, np.float32)})
    model.opset_import[0].version = 12
    with pytest.raises(BadInputError, match="opset 13"):
        expand_contrib(model)


def test_every_expansion_is_checked_against_onnxruntime_here() -> None:
    """A new expansion needs a forward test above and a gradient test in test_autodiff_rules.py."""
    assert default_expansions().ops() == ["GroupQueryAttention", "RotaryEmbedding", "SimplifiedLayerNormalization",
                                          "SkipSimplifiedLayerNormalization"]


# ------------------------------------------------------------------------------ distillation end to end
def test_rotary_caches_are_buffers_and_norms_train() -> None:
    model = genai_style_lm()
    chosen = select_trainable(model)
    assert "cos_cache" not in chosen and "sin_cache" not in chosen
    for name in ("embed", "lm_head", "norm", "layers.0.input_ln", "layers.1.input_ln", "layers.0.post_ln", "layers.1.q",
                 "layers.1.k", "layers.1.v", "layers.1.o", "layers.0.gate", "layers.0.up", "layers.0.down"):
        assert name in chosen
    arts = export_artifacts(model, loss="distill", shapes={k: v.shape for k, v in lm_feeds(4, 6).items()})
    assert {"cos_cache", "sin_cache"}.isdisjoint(arts.param_names)
    assert not any(n.domain == MS for n in arts.training_model.graph.node)


def test_distil_genai_style_lm_from_noised_copy(tmp_path: Path) -> None:
    """30 AdamW steps of KL distillation bring a noised copy back towards the original; the result keeps its ops."""
    teacher = genai_style_lm()
    student = noised(teacher)
    held = lm_feeds(8, 12, seed=99)
    kl_before = _kl(_session(teacher).run(["logits"], held)[0], _session(student).run(["logits"], held)[0])
    res = finetune(student, TrainData(lm_feeds(64, 12, seed=1)),
                   FinetuneConfig(steps=30, lr=3e-3, batch_size=8, eval_fraction=0.0, progress_bar=False),
                   teacher=teacher)
    losses = [h["loss"] for h in res.history if "loss" in h]
    assert len(losses) == 30 and np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
    tuned = res.model
    assert [n.op_type for n in tuned.graph.node] == [n.op_type for n in student.graph.node]  # contrib ops kept
    before, after = _inits(student), _inits(tuned)
    for name in ("cos_cache", "sin_cache"):
        np.testing.assert_array_equal(after[name], before[name])
    assert not np.allclose(after["layers.0.q"], before["layers.0.q"])
    path = tmp_path / "tuned.onnx"
    onnx.save(tuned, path)
    outs = _session(onnx.load(path)).run(None, held)
    kl_after = _kl(_session(teacher).run(["logits"], held)[0], outs[0])
    assert outs[1].shape == (8, KV, 12, HEAD)  # present.0.key
    assert kl_after < 0.6 * kl_before, (kl_before, kl_after)


GENAI_MODEL = ROOT / "lms" / "genai_llama" / "model.onnx"


@pytest.mark.slow
@pytest.mark.skipif(not GENAI_MODEL.exists(), reason="the onnxruntime-genai builder model is not built")
def test_distil_genai_builder_model_a_few_steps() -> None:
    """onnxruntime-genai's own builder output: its expansion matches onnxruntime, and a noised copy distils back
    towards it in 20 steps, keeping its contrib ops."""
    import json

    model = onnx.load(GENAI_MODEL)
    decoder = json.loads((GENAI_MODEL.parent / "genai_config.json").read_text())["model"]["decoder"]
    kv, head = decoder["num_key_value_heads"], decoder["head_size"]
    rng = np.random.default_rng(0)
    feeds = {"input_ids": rng.integers(0, 200, (32, 8)).astype(np.int64), "attention_mask": np.ones((32, 8), np.int64)}
    feeds.update({i.name: np.zeros((32, kv, 0, head), np.float32) for i in model.graph.input
                  if i.name.startswith("past_key_values")})
    for a, b in zip(_session(model).run(None, feeds), _session(expand_contrib(model)).run(None, feeds)):
        np.testing.assert_allclose(b, a, atol=1e-4, rtol=1e-4)  # the expansion computes what the kernels do
    student = noised(model, scale=1.0)
    held = {k: v[:8] for k, v in feeds.items()}
    held["input_ids"] = rng.integers(0, 200, (8, 8)).astype(np.int64)
    kl_before = _kl(_session(model).run(["logits"], held)[0], _session(student).run(["logits"], held)[0])
    res = finetune(student, TrainData(feeds), FinetuneConfig(steps=20, lr=3e-3, batch_size=4, eval_fraction=0.0,
                                                             progress_bar=False), teacher=model)
    kl_after = _kl(_session(model).run(["logits"], held)[0], _session(res.model).run(["logits"], held)[0])
    assert kl_after < 0.7 * kl_before, (kl_before, kl_after)
    assert [n.op_type for n in res.model.graph.node] == [n.op_type for n in model.graph.node]
