"""The onnxruntime-genai model builder's export (com.microsoft contrib ops) of a tiny Llama-style GQA LM.

The model in ``tests/lms/genai_llama/`` was written once by ``tests/lms/build_genai.py`` (4 query heads sharing 2
KV heads, 2 layers, packed Q/K/V, rotary inside GroupQueryAttention, Skip/SimplifiedLayerNormalization). Pruned
models run in onnxruntime with their (shrunk) KV cache and equal the original with the removed heads and MLP
units zeroed; with the updated genai_config.json they also generate through onnxruntime-genai. Code-built
graphs cover what the builder's CPU style does not use: separate q/k/v inputs and RotaryEmbedding.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune.analysis.core import Analysis
from onnxprune.analysis.driver import analyze_graph
from onnxprune.io.export import export_graph
from onnxprune.io.genai import GENAI_CONFIG, head_counts, write_genai_config
from onnxprune.io.shapes import static_shapes
from onnxprune.pipeline import analyze, prune
from onnxprune.spec import PruneSpec
from onnxprune.transform.surgery import cut_channels
from tests.lms.generate import greedy
from tests.models import run

MODEL_DIR = Path(__file__).parent / "lms" / "genai_llama"
MODEL = MODEL_DIR / "model.onnx"
HEADS, KV_HEADS, HEAD_SIZE, LAYERS, MLP = 4, 2, 16, 2, 128
PAST = [f"past_key_values.{i}.{kind}" for i in range(LAYERS) for kind in ("key", "value")]
PRESENT = [f"present.{i}.{kind}" for i in range(LAYERS) for kind in ("key", "value")]
SPECS = {"ratio": PruneSpec(ratio=0.5), "params": PruneSpec(target_params=0.7)}


def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


@pytest.fixture(scope="module")
def original() -> onnx.ModelProto:
    return onnx.load(MODEL)


@pytest.fixture(scope="module", params=list(SPECS))
def pruned_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp(f"genai_{request.param}")
    result = prune(MODEL, out / "small.onnx", SPECS[request.param])
    (out / "report.json").write_text(json.dumps(result.report))
    return out


def test_builder_model_uses_the_contrib_ops() -> None:
    ops = {(n.domain, n.op_type) for n in onnx.load(MODEL, load_external_data=False).graph.node}
    assert {("com.microsoft", "GroupQueryAttention"), ("com.microsoft", "SkipSimplifiedLayerNormalization"),
            ("", "SimplifiedLayerNormalization"), ("", "MatMul")} <= ops


def test_kv_groups_and_mlp_width_prunable_hidden_width_kept_with_reason() -> None:
    result = analyze(MODEL)
    by_producer = {g["producers"][0]: g for g in result["groups"]}
    for i in range(LAYERS):
        attention = by_producer[f"/model/layers.{i}/attn/qkv_proj/MatMul"]
        assert (attention["channels"], attention["prunable"]) == (KV_HEADS, KV_HEADS)
        assert f"/model/layers.{i}/attn/o_proj/MatMul" in attention["members"]
        mlp = by_producer[f"/model/layers.{i}/mlp/gate_proj/MatMul"]
        assert (mlp["channels"], mlp["prunable"]) == (MLP, MLP)
    stream = by_producer["/model/embed_tokens/Gather"]
    assert stream["prunable"] == 0 and "hidden size of a language model" in stream["blocked"]
    assert "/model/layers.0/attn/o_proj/MatMul" in stream["producers"]  # the skip sums couple the stream


def _kept(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """Original column index of each column the cut kept (columns are unique in random weights)."""
    return np.array([int(np.flatnonzero((before == col[:, None]).all(0))[0]) for col in after.T])


def _zeroed_original(original: onnx.ModelProto, pruned: onnx.ModelProto) -> tuple[onnx.ModelProto, list[np.ndarray]]:
    """The original with the o_proj rows of the removed query heads and the down_proj rows of the removed MLP
    units zeroed, and the KV heads each layer kept."""
    zeroed, before, after = onnx.ModelProto(), _weights(original), _weights(pruned)
    zeroed.CopyFrom(original)
    new: dict[str, np.ndarray] = {}
    kv_kept: list[np.ndarray] = []
    for i in range(LAYERS):
        qkv, o, gate, down = (f"model.layers.{i}.{n}.MatMul.weight" for n in ("attn.qkv_proj", "attn.o_proj",
                                                                               "mlp.gate_proj", "mlp.down_proj"))
        kept = _kept(before[qkv], after[qkv])
        q_kept = kept[kept < HEADS * HEAD_SIZE]
        kv_kept.append(np.unique((kept[(kept >= HEADS * HEAD_SIZE) & (kept < (HEADS + KV_HEADS) * HEAD_SIZE)]
                                  - HEADS * HEAD_SIZE) // HEAD_SIZE))
        rows = np.setdiff1d(np.arange(HEADS * HEAD_SIZE), q_kept)
        new[o] = before[o].copy()
        new[o][rows] = 0
        new[down] = before[down].copy()
        new[down][np.setdiff1d(np.arange(MLP), _kept(before[gate], after[gate]))] = 0
    for t in zeroed.graph.initializer:
        if t.name in new:
            t.CopyFrom(numpy_helper.from_array(new[t.name], t.name))
    return zeroed, kv_kept


def _feeds(ids: np.ndarray, past: dict[str, np.ndarray], total: int) -> dict[str, np.ndarray]:
    return {"input_ids": ids, "attention_mask": np.ones((1, total), np.int64), **past}


def _empty_past(kv: int) -> dict[str, np.ndarray]:
    return {n: np.zeros((1, kv, 0, HEAD_SIZE), np.float32) for n in PAST}


def test_pruned_model_runs_with_its_cache_and_equals_the_zeroed_original(
        original: onnx.ModelProto, pruned_dir: Path) -> None:
    pruned = onnx.load(pruned_dir / "small.onnx")
    zeroed, kv_kept = _zeroed_original(original, pruned)
    kv = len(kv_kept[0])
    assert kv == 1 and all(len(k) == kv for k in kv_kept)
    declared = {v.name: v.type.tensor_type.shape.dim[1].dim_value for v in [*pruned.graph.input, *pruned.graph.output]}
    assert all(declared[n] == kv for n in PAST + PRESENT)
    ids = np.random.default_rng(0).integers(3, 512, (1, 6)).astype(np.int64)
    small = run(pruned, _feeds(ids[:, :5], _empty_past(kv), 5))  # prefill with an empty past
    ref = run(zeroed, _feeds(ids[:, :5], _empty_past(KV_HEADS), 5))
    np.testing.assert_allclose(small["logits"], ref["logits"], atol=1e-4, rtol=1e-4)
    for n, k in zip(PRESENT, np.repeat(kv_kept, 2, axis=0)):
        assert small[n].shape == (1, kv, 5, HEAD_SIZE)
        np.testing.assert_allclose(small[n], ref[n][:, k], atol=1e-5)
    step = run(pruned, _feeds(ids[:, 5:], {p: small[q] for p, q in zip(PAST, PRESENT)}, 6))  # one decode step
    ref_step = run(zeroed, _feeds(ids[:, 5:], {p: ref[q] for p, q in zip(PAST, PRESENT)}, 6))
    np.testing.assert_allclose(step["logits"], ref_step["logits"], atol=1e-4, rtol=1e-4)
    assert not np.allclose(step["logits"], run(original, _feeds(ids[:, 5:], {p: ref[q] for p, q in zip(PAST, PRESENT)},
                                                                6))["logits"], atol=1e-3)


def test_report_lists_the_new_cache_shapes_and_genai_config(pruned_dir: Path) -> None:
    notes = json.loads((pruned_dir / "report.json").read_text())["notes"]
    assert "cache present.1.value is now ['batch_size', 1, 'total_sequence_length', 'kv_cache_dim']" in notes
    assert any(n.startswith(GENAI_CONFIG) and "decoder.num_key_value_heads 2 -> 1" in n for n in notes), notes
    config = json.loads((pruned_dir / GENAI_CONFIG).read_text())["model"]["decoder"]
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["filename"]) == (2, 1, "small.onnx")
    assert (config["head_size"], config["hidden_size"]) == (HEAD_SIZE, 64)
    assert (pruned_dir / "tokenizer.json").read_bytes() == (MODEL_DIR / "tokenizer.json").read_bytes()


def test_generates_through_onnxruntime_genai_like_the_zeroed_original(
        original: onnx.ModelProto, pruned_dir: Path, tmp_path: Path) -> None:
    zeroed, _ = _zeroed_original(original, onnx.load(pruned_dir / "small.onnx"))
    onnx.save(zeroed, tmp_path / "model.onnx")
    for name in (GENAI_CONFIG, "tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(MODEL_DIR / name, tmp_path / name)
    prompt = [1, 5, 9, 30]
    tokens = greedy(pruned_dir, prompt, 12)
    assert len(tokens) == 12 and tokens[:4] == prompt
    assert tokens == greedy(tmp_path, prompt, 12)


def test_genai_config_is_not_written_over_the_inputs(original: onnx.ModelProto, tmp_path: Path) -> None:
    assert write_genai_config(str(tmp_path / "model.onnx"), original, str(tmp_path / "out" / "m.onnx")) is None
    beside = write_genai_config(str(MODEL), original, str(MODEL_DIR / "small.onnx"))
    assert beside is not None and beside.path is None and "beside the input" in beside.note()
    assert not (MODEL_DIR / "small.onnx").exists()


def test_layers_with_different_head_counts_get_no_config(original: onnx.ModelProto, tmp_path: Path) -> None:
    model = onnx.ModelProto()
    model.CopyFrom(original)
    gqa = next(n for n in model.graph.node if n.op_type == "GroupQueryAttention")
    next(a for a in gqa.attribute if a.name == "kv_num_heads").i = 1
    with pytest.raises(ValueError, match="different"):
        head_counts(model)
    update = write_genai_config(str(MODEL), model, str(tmp_path / "m.onnx"))
    assert update is not None and update.path is None and "different" in update.note()
    assert not (tmp_path / GENAI_CONFIG).exists()


# --- code-built graphs: separate q/k/v, RotaryEmbedding, unknown contrib ops ----------------------------


def build_split_qkv(seed: int = 0, dim: int = 32, heads: int = 4, kv_heads: int = 2) -> onnx.ModelProto:
    """q/k/v projections → RotaryEmbedding on q and k → GroupQueryAttention (separate inputs, KV cache) → o_proj."""
    rng = np.random.default_rng(seed)
    size = dim // heads

    def init(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)

    angles = np.arange(64)[:, None] / 10000 ** (np.arange(size // 2) / (size // 2))
    inits = [init("wq", dim, heads * size), init("wk", dim, kv_heads * size), init("wv", dim, kv_heads * size),
             init("wo", heads * size, dim), numpy_helper.from_array(np.cos(angles).astype(np.float32), "cos"),
             numpy_helper.from_array(np.sin(angles).astype(np.float32), "sin"),
             numpy_helper.from_array(np.array([1], np.int64), "one")]
    ms = "com.microsoft"
    nodes = [
        helper.make_node("MatMul", ["x", "wq"], ["q0"], name="q_proj"),
        helper.make_node("MatMul", ["x", "wk"], ["k0"], name="k_proj"),
        helper.make_node("MatMul", ["x", "wv"], ["v"], name="v_proj"),
        helper.make_node("RotaryEmbedding", ["q0", "pos", "cos", "sin"], ["q"], name="rope_q", domain=ms, num_heads=heads),
        helper.make_node("RotaryEmbedding", ["k0", "pos", "cos", "sin"], ["k"], name="rope_k", domain=ms),
        helper.make_node("ReduceSum", ["mask", "one"], ["total"], name="mask_sum", keepdims=1),
        helper.make_node("Sub", ["total", "one"], ["lens64"], name="lens"),
        helper.make_node("Cast", ["lens64"], ["seqlens"], name="lens_cast", to=TensorProto.INT32),
        helper.make_node("Shape", ["mask"], ["mask_shape"], name="mask_shape", start=1, end=2),
        helper.make_node("Squeeze", ["mask_shape"], ["total64"], name="total_squeeze"),
        helper.make_node("Cast", ["total64"], ["total_len"], name="total_cast", to=TensorProto.INT32),
        helper.make_node("GroupQueryAttention", ["q", "k", "v", "past_key", "past_value", "seqlens", "total_len"],
                         ["attn", "present_key", "present_value"], name="gqa", domain=ms, num_heads=heads,
                         kv_num_heads=kv_heads),
        helper.make_node("MatMul", ["attn", "wo"], ["y"], name="o_proj"),
    ]
    cache = ["B", kv_heads, "P", size]
    graph = helper.make_graph(
        nodes, "split_qkv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", dim]),
         helper.make_tensor_value_info("pos", TensorProto.INT64, ["B", "S"]),
         helper.make_tensor_value_info("mask", TensorProto.INT64, ["B", "T"]),
         helper.make_tensor_value_info("past_key", TensorProto.FLOAT, cache),
         helper.make_tensor_value_info("past_value", TensorProto.FLOAT, cache)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "S", dim]),
         helper.make_tensor_value_info("present_key", TensorProto.FLOAT, ["B", kv_heads, "T", size]),
         helper.make_tensor_value_info("present_value", TensorProto.FLOAT, ["B", kv_heads, "T", size])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(ms, 1)],
                             ir_version=8)


def _analysis(model: onnx.ModelProto) -> tuple[gs.Graph, Analysis]:
    graph = gs.import_onnx(model)
    return graph, analyze_graph(graph, static_shapes(model, None))


def test_separate_qkv_and_rotary_embedding_cut_whole_kv_groups_exactly() -> None:
    model = build_split_qkv()
    graph, a = _analysis(model)
    (group,) = [g for g in a.groups if g.prunable]
    assert group.size == group.prunable == 2
    assert {"q_proj", "k_proj", "v_proj", "o_proj"} <= set(group.members)
    summary = cut_channels(graph, a, group.classes[:1])
    pruned = export_graph(graph, model)
    attrs = {n.name: {a.name: a.i for a in n.attribute} for n in pruned.graph.node}
    assert (attrs["gqa"]["num_heads"], attrs["gqa"]["kv_num_heads"], attrs["rope_q"]["num_heads"]) == (2, 1, 2)
    assert summary.cache["past_key"].shape == ["B", 1, "P", 8] and list(summary.cache["present_value"].kept) == [1]
    wo = _weights(model)["wo"].copy()
    wo[:16] = 0  # the first KV group: query heads 0 and 1
    zeroed = onnx.ModelProto()
    zeroed.CopyFrom(model)
    next(t for t in zeroed.graph.initializer if t.name == "wo").CopyFrom(numpy_helper.from_array(wo, "wo"))
    rng = np.random.default_rng(1)
    feeds = {"x": rng.standard_normal((1, 3, 32)).astype(np.float32), "pos": np.arange(2, 5)[None].astype(np.int64),
             "mask": np.ones((1, 5), np.int64), "past_key": rng.standard_normal((1, 2, 2, 8)).astype(np.float32),
             "past_value": rng.standard_normal((1, 2, 2, 8)).astype(np.float32)}
    small = {**feeds, "past_key": feeds["past_key"][:, 1:], "past_value": feeds["past_value"][:, 1:]}
    before, after = run(zeroed, feeds), run(pruned, small)
    np.testing.assert_allclose(after["y"], before["y"], atol=1e-5)
    np.testing.assert_allclose(after["present_key"], before["present_key"][:, 1:], atol=1e-5)


def test_rotary_embedding_couples_the_dims_of_each_head() -> None:
    _, a = _analysis(build_split_qkv())
    (group,) = [g for g in a.groups if g.prunable]
    q_sites = [s for s in a.sites if s.tensor == "wq" and s.axis == 1]
    assert len(np.unique(a.classes_of(q_sites[0].ids))) == group.size  # 32 columns, one class per KV group


def test_unknown_com_microsoft_op_blocks_with_its_name() -> None:
    model = build_split_qkv()
    gqa = next(n for n in model.graph.node if n.op_type == "GroupQueryAttention")
    gqa.op_type = "SparseAttention"
    _, a = _analysis(model)
    assert not any(g.prunable for g in a.groups)
    assert any("SparseAttention at node gqa not understood" in r for g in a.groups for r in g.reasons)


@pytest.mark.parametrize("attr, value, reason", [("num_heads", 3, "query/key/value layout not understood"),
                                                  ("kv_num_heads", 4, "query/key/value layout not understood")])
def test_inconsistent_head_counts_block_with_a_reason(attr: str, value: int, reason: str) -> None:
    model = build_split_qkv()
    gqa = next(n for n in model.graph.node if n.op_type == "GroupQueryAttention")
    next(a for a in gqa.attribute if a.name == attr).i = value
    _, a = _analysis(model)
    assert not any(g.prunable for g in a.groups if "q_proj" in g.producers)
    assert any(reason in r for g in a.groups for r in g.reasons)


def test_prune_at_decode_shapes_with_a_filled_cache(tmp_path: Path) -> None:
    """``--shape`` of a decode step (past 3, one new token): verification's random feeds give GroupQueryAttention an
    all-ones attention_mask (a 0/1 draw made its seqlens_k -1 and onnxruntime refused the model), and MACs count."""
    shapes = {"input_ids": [1, 1], "attention_mask": [1, 4], **{name: [1, KV_HEADS, 3, HEAD_SIZE] for name in PAST}}
    report = prune(MODEL, tmp_path / "small.onnx", PruneSpec(ratio=0.3, shapes=shapes)).report
    assert report["fidelity_data"].startswith("random inputs") and report["fidelity"]["samples"] > 0
    assert 0 < report["pruned"]["macs"] < report["original"]["macs"]
