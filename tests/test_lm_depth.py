"""``--depth`` on decoder LMs: a residual block (a layer's attention or its MLP) goes with the KV cache it owns.

The trained tiny LMs (tests/lms) in torch.onnx's plain and KV-cache styles and the onnxruntime-genai builder's
model: the pruned model equals the original with that block's branch output zeroed (a Mul by 0 before its join),
runs with its renumbered cache (prefill with an empty past, then a decode step equals the full sequence), and
the genai one generates through onnxruntime-genai with ``num_hidden_layers`` updated. Also the MACs of the
contrib attention ops.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper

from onnxprune.errors import PlanError
from onnxprune.io.export import export_graph
from onnxprune.io.genai import GENAI_CONFIG, write_genai_config
from onnxprune.io.shapes import static_shapes
from onnxprune.measure.stats import model_stats
from onnxprune.pipeline import prune
from onnxprune.spec import PruneSpec
from onnxprune.transform.depth import (
    ResidualBlock,
    find_residual_blocks,
    original_io,
    remove_blocks,
    renumber_cache,
)
from tests.lms.generate import greedy
from tests.models import run

GENAI_DIR = Path(__file__).parent / "lms" / "genai_llama"


def _blocks(model: onnx.ModelProto) -> list[ResidualBlock]:
    return find_residual_blocks(gs.import_onnx(model), static_shapes(model, None))


def _removed(model: onnx.ModelProto, block: ResidualBlock) -> tuple[onnx.ModelProto, dict[str, str]]:
    graph = gs.import_onnx(model)
    remove_blocks(graph, [block])
    renamed = renumber_cache(graph, block.cache)
    return export_graph(graph, model, check=False), renamed


def _zeroed(model: onnx.ModelProto, *blocks: ResidualBlock) -> onnx.ModelProto:
    """The original with each block's branch output multiplied by 0 before its join."""
    graph = gs.import_onnx(model)
    for block in blocks:
        join = next(n for n in graph.nodes if n.name == block.add)
        k = next(i for i, t in enumerate(join.inputs) if t.name == block.branch)
        zero = gs.Variable(f"{block.branch}_zeroed", dtype=np.float32)
        graph.nodes.append(gs.Node("Mul", f"{block.add}_zero", inputs=[join.inputs[k], gs.Constant(
            f"{block.add}_zero_c", np.zeros((), np.float32))], outputs=[zero]))
        join.inputs[k] = zero
    graph.toposort()
    return export_graph(graph, model, check=False)


def _attention(blocks: list[ResidualBlock], layer: int) -> ResidualBlock:
    return [b for b in blocks if b.kind == "attention"][layer]


def _cache_feeds(ids: np.ndarray, past: dict[str, np.ndarray], positions: bool) -> dict[str, np.ndarray]:
    start = next(iter(past.values())).shape[2] if past else 0
    total = start + ids.shape[1]
    feeds = {"input_ids": ids, "attention_mask": np.ones((ids.shape[0], total), np.int64), **past}
    if positions:
        feeds["position_ids"] = np.arange(start, total, dtype=np.int64)[None].repeat(ids.shape[0], 0)
    return feeds


def _empty_past(model: onnx.ModelProto, head_size: int = 16) -> dict[str, np.ndarray]:
    """Zero-length past for every cache input (the genai model leaves the head size symbolic: ``head_size``)."""
    dims = {i.name: i.type.tensor_type.shape.dim for i in model.graph.input if i.name.startswith("past_key_values")}
    return {name: np.zeros([1, d[1].dim_value, 0, d[3].dim_value or head_size], np.float32) for name, d in dims.items()}


def _prefill_decode(model: onnx.ModelProto, ids: np.ndarray, positions: bool) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """(the prefill outputs of ids[:, :-1], the logits of one decode step of the last token with that cache)."""
    first = run(model, _cache_feeds(ids[:, :-1], _empty_past(model), positions))
    past = {i.name: first[i.name.replace("past_key_values", "present")] for i in model.graph.input
            if i.name.startswith("past_key_values")}
    return first, run(model, _cache_feeds(ids[:, -1:], past, positions))["logits"]


@pytest.mark.parametrize("style", ["cache", pytest.param("dynamo", marks=pytest.mark.slow)])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_cache_export_attention_block_owns_its_cache_and_goes_with_it(
        kind: str, style: str, lm_export: Callable[[str, str], Path]) -> None:
    """dynamo also reads the past length with Shape of some layers' cache: those reads move to a kept layer."""
    original = onnx.load(lm_export(kind, style))
    blocks = _blocks(original)
    assert [b.kind for b in blocks] == ["attention", "mlp"] * 4
    block = _attention(blocks, 1)
    assert block.cache == ["past_key_values.1.key", "past_key_values.1.value", "present.1.key", "present.1.value"]
    pruned, renamed = _removed(original, block)
    assert renamed["past_key_values.3.key"] == "past_key_values.2.key" and renamed["present.2.value"] == "present.1.value"
    assert [o.name for o in pruned.graph.output] == ["logits"] + [f"present.{i}.{n}" for i in range(3)
                                                                  for n in ("key", "value")]
    ids = np.random.default_rng(0).integers(0, 512, (1, 9)).astype(np.int64)
    first, step = _prefill_decode(pruned, ids, positions=True)
    ref_first, ref_step = _prefill_decode(_zeroed(original, block), ids, positions=True)
    np.testing.assert_allclose(first["logits"], ref_first["logits"], atol=1e-4)
    np.testing.assert_allclose(step, ref_step, atol=1e-4)
    full = run(pruned, _cache_feeds(ids, _empty_past(pruned), positions=True))["logits"]
    np.testing.assert_allclose(step, full[:, -1:], atol=1e-4)  # decode with the cache = the full sequence
    np.testing.assert_allclose(first["present.1.key"], ref_first["present.2.key"], atol=1e-5)  # layer 2's cache
    assert not np.allclose(full, run(original, _cache_feeds(ids, _empty_past(original), True))["logits"], atol=1e-3)
    cache_io = {**dict.fromkeys(block.cache), **renamed}
    view = run(original_io(pruned, original, cache_io), _cache_feeds(ids, _empty_past(original), True))  # its data
    np.testing.assert_allclose(view["logits"], full, atol=1e-5)
    assert "present.3.key" in view and "present.1.key" not in view  # old names, layer 1 gone


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_plain_export_blocks_remove_exactly(kind: str, lm_export: Callable[[str, str], Path]) -> None:
    original = onnx.load(lm_export(kind, "plain"))
    blocks = _blocks(original)
    assert [b.kind for b in blocks] == ["attention", "mlp"] * 4 and not any(b.cache for b in blocks)
    ids = np.random.default_rng(1).integers(0, 512, (2, 7)).astype(np.int64)
    for block in (blocks[2], blocks[5]):
        pruned, renamed = _removed(original, block)
        assert renamed == {}
        np.testing.assert_allclose(run(pruned, {"input_ids": ids})["logits"],
                                   run(_zeroed(original, block), {"input_ids": ids})["logits"], atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_cli_depth_1_on_a_cache_export_keeps_perplexity_within_1_3x(
        kind: str, lm_export: Callable[[str, str], Path], lm_tokens_npz: Callable[..., Path], tmp_path: Path) -> None:
    spec = PruneSpec(ratio=0.0, depth=1, calib=str(lm_tokens_npz(kind, "cache", n=8)), calib_samples=8,
                     eval_data=str(lm_tokens_npz(kind, "cache", n=16, start=8)), metric="perplexity")
    result = prune(lm_export(kind, "cache"), tmp_path / "small.onnx", spec)
    (removed,) = result.report["depth"]["removed"]
    assert removed["kind"] == "attention" and removed["cache"], removed  # the measured choice on both LMs
    layer = removed["cache"][0].split(".")[1]
    assert f"cache IO removed with its blocks: past_key_values.{layer}.key, past_key_values.{layer}.value, " \
           f"present.{layer}.key, present.{layer}.value" in result.report["notes"]
    pruned = onnx.load(tmp_path / "small.onnx")
    layers = sorted(i.name.split(".")[1] for i in pruned.graph.input if i.name.endswith(".key"))
    assert layers == ["0", "1", "2"]
    metric = result.report["metric"]
    assert np.exp(metric["original"] - metric["pruned"]) <= 1.3  # perplexity ratio (llama 1.18, gpt2 1.03)


@pytest.mark.slow
def test_depth_then_distillation_on_the_originals_cache_data(
        lm_export: Callable[[str, str], Path], lm_tokens_npz: Callable[..., Path], tmp_path: Path) -> None:
    """The student trains under the original's cache names (original_io) against a teacher without the removed
    cache outputs, and is saved with the names --depth left."""
    tokens = str(lm_tokens_npz("llama", "cache", n=8))
    spec = PruneSpec(ratio=0.0, depth=1, depth_method="fidelity", calib=tokens, calib_samples=8, train_data=tokens,
                     finetune_steps=3, batch_size=4)
    result = prune(lm_export("llama", "cache"), tmp_path / "small.onnx", spec)
    assert result.report["finetune"]["steps"] == 3
    pruned = onnx.load(tmp_path / "small.onnx")
    assert sorted(i.name for i in pruned.graph.input if i.name.endswith(".key")) == [
        f"past_key_values.{i}.key" for i in range(3)]
    assert len(pruned.graph.output) == 7


# --- onnxruntime-genai's builder model ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def genai() -> onnx.ModelProto:
    return onnx.load(GENAI_DIR / "model.onnx")


def test_genai_blocks_are_the_branches_between_skip_norms(genai: onnx.ModelProto) -> None:
    blocks = _blocks(genai)
    assert [(b.add.split("/")[2:4], b.kind) for b in blocks] == [
        (["layers.0", "post_attention_layernorm"], "attention"), (["layers.1", "input_layernorm"], "mlp"),
        (["layers.1", "post_attention_layernorm"], "attention"), (["layers.2", "final_norm_layernorm"], "mlp")]
    assert blocks[0].cache == ["past_key_values.0.key", "past_key_values.0.value", "present.0.key", "present.0.value"]


def _genai_feeds(ids: np.ndarray, past: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return _cache_feeds(ids, past, positions=False)


@pytest.mark.parametrize("index", [0, 1, 2, 3])
def test_genai_block_removal_equals_the_zeroed_branch_with_its_cache(genai: onnx.ModelProto, index: int) -> None:
    block = _blocks(genai)[index]
    pruned, renamed = _removed(genai, block)
    ops = [n.op_type for n in pruned.graph.node]
    assert ops.count("SkipSimplifiedLayerNormalization") == 3 and ops.count("GroupQueryAttention") == (
        1 if block.kind == "attention" else 2)
    if block.kind == "attention" and index == 0:
        assert renamed == {"past_key_values.1.key": "past_key_values.0.key", "past_key_values.1.value":
                           "past_key_values.0.value", "present.1.key": "present.0.key", "present.1.value": "present.0.value"}
    ids = np.random.default_rng(2).integers(3, 512, (1, 7)).astype(np.int64)
    first = run(pruned, _genai_feeds(ids[:, :6], _empty_past(pruned)))
    ref = run(_zeroed(genai, block), _genai_feeds(ids[:, :6], _empty_past(genai)))
    np.testing.assert_allclose(first["logits"], ref["logits"], atol=1e-4)
    past = {n.replace("present", "past_key_values"): v for n, v in first.items() if n.startswith("present")}
    step = run(pruned, _genai_feeds(ids[:, 6:], past))["logits"]
    full = run(pruned, _genai_feeds(ids, _empty_past(pruned)))["logits"]
    np.testing.assert_allclose(step, full[:, -1:], atol=1e-4)


def _reference_dir(tmp_path: Path, zeroed: onnx.ModelProto) -> Path:
    """A genai model directory with the zeroed original and the original's config."""
    ref = tmp_path / "ref"
    ref.mkdir()
    onnx.save(zeroed, ref / "model.onnx")
    for name in (GENAI_CONFIG, "tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(GENAI_DIR / name, ref / name)
    return ref


def test_genai_without_layer_0_attention_generates_like_the_zeroed_original(
        genai: onnx.ModelProto, tmp_path: Path) -> None:
    block = _blocks(genai)[0]
    pruned, small = _removed(genai, block)[0], tmp_path / "small"
    small.mkdir()
    onnx.save(pruned, small / "model.onnx")
    update = write_genai_config(str(GENAI_DIR / "model.onnx"), pruned, str(small / "model.onnx"))
    assert update is not None and update.changed["decoder.num_hidden_layers"] == (2, 1)
    ref = _reference_dir(tmp_path, _zeroed(genai, block))
    prompt = [1, 5, 9, 30]
    tokens = greedy(small, prompt, 14)
    assert len(tokens) == 14 and tokens == greedy(ref, prompt, 14)


def test_genai_cli_depth_renumbers_the_cache_and_generates(genai: onnx.ModelProto, tmp_path: Path) -> None:
    ids = np.random.default_rng(3).integers(3, 512, (4, 24)).astype(np.int64)
    np.savez(tmp_path / "tokens.npz", **_genai_feeds(ids, {n: np.repeat(v, 4, 0) for n, v in _empty_past(genai).items()}))
    result = prune(GENAI_DIR / "model.onnx", tmp_path / "small" / "model.onnx",
                   PruneSpec(ratio=0.0, depth=3, calib=str(tmp_path / "tokens.npz"), calib_samples=4))
    removed = {b["add"] for b in result.report["depth"]["removed"]}
    assert "/model/layers.0/post_attention_layernorm/SkipLayerNorm" in removed  # layer 0's attention: 1 -> 0
    assert result.report["depth"]["cache_io"]["present.1.key"] == "present.0.key"
    assert any(n.startswith("cache IO renumbered: past_key_values.1.key -> past_key_values.0.key") for n in
               result.report["notes"])
    config = json.loads((tmp_path / "small" / GENAI_CONFIG).read_text())["model"]["decoder"]
    assert config["num_hidden_layers"] == 1
    ref = _reference_dir(tmp_path, _zeroed(genai, *(b for b in _blocks(genai) if b.add in removed)))
    assert greedy(tmp_path / "small", [1, 5, 9, 30], 12) == greedy(ref, [1, 5, 9, 30], 12)


# --- MACs of contrib attention ------------------------------------------------------------------------------


def test_group_query_attention_macs_count_qk_and_av(genai: onnx.ModelProto) -> None:
    shapes = {"input_ids": [1, 5], "attention_mask": [1, 5],
              **{i.name: [1, 2, 0, 16] for i in genai.graph.input if i.name.startswith("past")}}
    stats = model_stats(genai, shapes)
    gqa = [layer for layer in stats.layers if layer.op == "GroupQueryAttention"]
    assert [layer.macs for layer in gqa] == [2 * 1 * 4 * 5 * 5 * 16] * 2  # 2·B·H·S·T·D
    matmuls = sum(layer.macs or 0 for layer in stats.layers if layer.op == "MatMul")
    assert stats.macs == matmuls + sum(layer.macs or 0 for layer in gqa)


def test_multi_head_attention_macs_use_the_key_length() -> None:
    heads, size, s, t = 2, 4, 3, 6
    hidden = heads * size
    graph = helper.make_graph(
        [helper.make_node("MultiHeadAttention", ["q", "k", "v"], ["y"], domain="com.microsoft", num_heads=heads)],
        "mha", [helper.make_tensor_value_info("q", TensorProto.FLOAT, [1, s, hidden]),
                helper.make_tensor_value_info("k", TensorProto.FLOAT, [1, t, hidden]),
                helper.make_tensor_value_info("v", TensorProto.FLOAT, [1, t, hidden])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, s, hidden])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
                              ir_version=8)
    assert model_stats(model).macs == 2 * heads * s * t * size


# --- code-built: a cache input that Shape also reads outside its block ----------------------------------------


def _shape_read_cache(layers: int) -> onnx.ModelProto:
    """``layers`` blocks x + h·Σ(concat(past_i, h)) with h = x·W_i, and Shape(past_0) as a graph output (the
    past length, as dynamo reads it)."""
    rng = np.random.default_rng(0)
    nodes, inits, inputs, outputs = [], [], [helper.make_tensor_value_info("x0", TensorProto.FLOAT, [1, "S", 4])], []
    for i in range(layers):
        inits.append(onnx.numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), f"w{i}"))
        inputs.append(helper.make_tensor_value_info(f"past.{i}", TensorProto.FLOAT, [1, "P", 4]))
        outputs.append(helper.make_tensor_value_info(f"present.{i}", TensorProto.FLOAT, [1, "T", 4]))
        nodes += [helper.make_node("MatMul", [f"x{i}", f"w{i}"], [f"h{i}"], name=f"mm{i}"),
                  helper.make_node("Concat", [f"past.{i}", f"h{i}"], [f"present.{i}"], name=f"cat{i}", axis=1),
                  helper.make_node("ReduceSum", [f"present.{i}", "axis"], [f"r{i}"], name=f"sum{i}", keepdims=1),
                  helper.make_node("Mul", [f"h{i}", f"r{i}"], [f"b{i}"], name=f"mul{i}"),
                  helper.make_node("Add", [f"x{i}", f"b{i}"], [f"x{i + 1}"], name=f"add{i}")]
    nodes.append(helper.make_node("Shape", ["past.0"], ["past_len"], name="past_len", start=1, end=2))
    inits.append(onnx.numpy_helper.from_array(np.array([1], np.int64), "axis"))
    outputs = [helper.make_tensor_value_info(f"x{layers}", TensorProto.FLOAT, [1, "S", 4]),
               helper.make_tensor_value_info("past_len", TensorProto.INT64, [1]), *outputs]
    graph = helper.make_graph(nodes, "shape_read", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_shape_reads_of_a_removed_cache_move_to_a_kept_layer() -> None:
    model = _shape_read_cache(2)
    blocks = _blocks(model)
    assert [b.cache for b in blocks] == [["past.0", "present.0"], ["past.1", "present.1"]]
    pruned, renamed = _removed(model, blocks[0])
    assert renamed == {"past.1": "past.0", "present.1": "present.0"}
    shape = next(n for n in pruned.graph.node if n.op_type == "Shape")
    assert list(shape.input) == ["past.0"]  # the old past.1, renamed
    feeds = {"x0": np.ones((1, 2, 4), np.float32), "past.0": np.zeros((1, 3, 4), np.float32)}
    assert run(pruned, feeds)["past_len"].tolist() == [3]


def test_a_cache_whose_shape_is_read_and_has_no_kept_copy_refuses() -> None:
    model = _shape_read_cache(1)
    (block,) = _blocks(model)
    with pytest.raises(PlanError, match="past.0 is read by past_len"):
        _removed(model, block)


def test_group_query_attention_macs_with_a_filled_cache(genai: onnx.ModelProto) -> None:
    """A decode step over a past of 3: the keys span T = past + S."""
    shapes = {"input_ids": [1, 1], "attention_mask": [1, 4],
              **{i.name: [1, 2, 3, 16] for i in genai.graph.input if i.name.startswith("past")}}
    gqa = [layer for layer in model_stats(genai, shapes).layers if layer.op == "GroupQueryAttention"]
    assert [layer.macs for layer in gqa] == [2 * 1 * 4 * 1 * 4 * 16] * 2
