"""Transformers: attention heads, MLP hidden width and the residual stream, on models built in code.

``transformer_block`` (tests/models.py) is the TorchScript-export style with fused LayerNormalization,
constant Reshape targets and Erf-GELU. Two more styles are built here:

* ``vit``: a ViT classifier — Conv patch embedding → Reshape → Transpose, a class token expanded to the
  batch and concatenated, a positional Add, blocks with the *decomposed* LayerNorm
  (ReduceMean/Sub/Pow/Sqrt/Div) and Tanh-GELU, the class token gathered for the head. Its residual
  stream starts at a producer (the patch Conv), so the stream width is prunable.
* ``text``: a token classifier — Gather embedding from int64 ids, positional Gather + Add, one fused QKV
  MatMul split by Reshape [0, 0, 3, h, d] → Transpose [2, 0, 3, 1, 4] → Gather (Paddle/HF style), and
  head split/merge Reshape targets built at runtime from ``Shape`` → ``Gather`` → ``Concat``.

Exactness: heads and MLP units zeroed in every weight that follows them are removed and the outputs
stay equal to 1e-4. The residual stream is never exact (LayerNorm statistics change), so it is pruned
in the validity tests only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper

from onnxprune.io.load import LoadedModel, normalize
from onnxprune.io.shapes import static_shapes
from onnxprune.analysis.core import Analysis, AnalysisOptions, PruningGroup
from onnxprune.analysis.driver import analyze_graph
from onnxprune.io.export import export_graph
from onnxprune.pipeline import analyze, prune
from onnxprune.spec import PruneSpec
from onnxprune.transform.surgery import cut_channels
from tests.models import NUM_CLASSES, _Graph, build_transformer_block, random_inputs, run
from tests.test_groups import _analysis, _group_of, _save, zero_classes


# --- builders -----------------------------------------------------------------------------------------


def _finish(g: _Graph, output: str, inputs: list[onnx.ValueInfoProto]) -> onnx.ModelProto:
    for node in g.nodes:
        node.output[:] = ["output" if o == output else o for o in node.output]
    output = "output"
    graph = helper.make_graph(g.nodes, g.name, inputs, [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)],
                              g.initializers)
    opsets = [helper.make_opsetid("", g.opset)]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=max(8, helper.find_min_ir_version_for(opsets)))
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    model.graph.output[0].CopyFrom(next(o for o in inferred.graph.output if o.name == output))
    onnx.checker.check_model(model, full_check=True)
    return model


def _decomposed_ln(g: _Graph, x: str, dim: int, name: str) -> str:
    mean = g.reduce("ReduceMean", x, [-1], keepdims=1, name=f"{name}.mean")
    centered = g.node("Sub", [x, mean], name=f"{name}.sub")
    var = g.reduce("ReduceMean", g.node("Pow", [centered, g.const("two", np.float32(2.0))]), [-1], keepdims=1,
                   name=f"{name}.var")
    std = g.node("Sqrt", [g.node("Add", [var, g.const("eps", np.float32(1e-5))])])
    normed = g.node("Div", [centered, std])
    scale = g.const(f"{name}.weight", (1.0 + 0.1 * g.rng.standard_normal(dim)).astype(np.float32))
    return g.node("Add", [g.node("Mul", [normed, scale]), g.const(f"{name}.bias", g.small([dim]))], name=name)


def _tanh_gelu(g: _Graph, x: str, name: str) -> str:
    cube = g.node("Mul", [g.node("Pow", [x, g.const("three", np.float32(3.0))]), g.const("c", np.float32(0.044715))])
    inner = g.node("Mul", [g.node("Add", [x, cube]), g.const("k", np.float32(math.sqrt(2.0 / math.pi)))])
    one_plus = g.node("Add", [g.node("Tanh", [inner]), g.const("one", np.float32(1.0))])
    return g.node("Mul", [g.node("Mul", [x, one_plus]), g.const("half", np.float32(0.5))], name=name)


def _attention(g: _Graph, h: str, q: str, k: str, v: str, hd: int, split: str, merge: str, p: str) -> str:
    """q, k, v already [N, heads, T, hd]; returns the merged context before the output projection."""
    s = g.node("MatMul", [q, g.node("Transpose", [k], perm=[0, 1, 3, 2])], name=f"{p}.scores")
    s = g.node("Mul", [s, g.const("attn_scale", np.float32(1.0 / math.sqrt(hd)))])
    c = g.node("MatMul", [g.node("Softmax", [s], axis=-1), v], name=f"{p}.context")
    c = g.node("Transpose", [c], perm=[0, 2, 1, 3])
    return g.node("Reshape", [c, merge], name=f"{p}.merge_heads")


def build_vit(*, seed: int = 0, dim: int = 16, heads: int = 4, mlp: int = 32, blocks: int = 2) -> onnx.ModelProto:
    """ViT on [N, 3, 8, 8]: 4x4 patches (4 tokens) + class token, decomposed LayerNorm, Tanh-GELU."""
    g = _Graph("vit", seed, 17)
    hd = dim // heads
    x = g.conv("input", 3, dim, 4, name="patch_embed", stride=4, pad=0)  # [N, D, 2, 2]
    x = g.node("Reshape", [x, g.const("tokens_shape", np.array([0, dim, 4], np.int64))])
    x = g.node("Transpose", [x], perm=[0, 2, 1])  # [N, 4, D]
    batch = g.node("Shape", ["input"], start=0, end=1)
    cls_shape = g.node("Concat", [batch, g.const("ones", np.array([1, 1], np.int64))], axis=0)
    cls = g.node("Expand", [g.const("cls_token", g.small([1, 1, dim], 0.5)), cls_shape], name="cls.expand")
    x = g.node("Concat", [cls, x], name="cls.concat", axis=1)  # [N, 5, D]
    x = g.node("Add", [x, g.const("pos_embed", g.small([1, 5, dim], 0.5))], name="pos.add")
    split = g.const("heads_shape", np.array([0, 0, heads, hd], np.int64))
    merge = g.const("merge_shape", np.array([0, 0, dim], np.int64))
    for i in range(blocks):
        p = f"block{i}"
        h = _decomposed_ln(g, x, dim, f"{p}.ln1")
        q, k, v = (g.node("Transpose", [g.node("Reshape", [g.linear(h, dim, dim, name=f"{p}.{n}"), split])],
                          perm=[0, 2, 1, 3]) for n in "qkv")
        c = _attention(g, h, q, k, v, hd, split, merge, p)
        x = g.node("Add", [x, g.linear(c, dim, dim, name=f"{p}.o")], name=f"{p}.attn.add")
        h = _tanh_gelu(g, g.linear(_decomposed_ln(g, x, dim, f"{p}.ln2"), dim, mlp, name=f"{p}.fc1"), f"{p}.gelu")
        x = g.node("Add", [x, g.linear(h, mlp, dim, name=f"{p}.fc2")], name=f"{p}.mlp.add")
    x = g.node("Gather", [x, g.const("cls_index", np.array(0, np.int64))], name="cls.gather", axis=1)
    x = _decomposed_ln(g, x, dim, "ln_f")
    out = g.gemm(x, dim, NUM_CLASSES, name="classifier")
    return _finish(g, out, [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8])])


def build_text(*, seed: int = 0, vocab: int = 50, tokens: int = 6, dim: int = 16, heads: int = 4, mlp: int = 32
               ) -> onnx.ModelProto:
    """Token classifier on int64 ids [N, tokens]: embeddings, fused QKV, runtime-built Reshape targets."""
    g = _Graph("text", seed, 17)
    hd = dim // heads
    x = g.node("Gather", [g.const("tok_embed.weight", g.small([vocab, dim], 1.0)), "ids"], name="tok_embed", axis=0)
    pos = g.node("Gather", [g.const("pos_table", g.small([tokens, dim], 0.5)),
                            g.const("positions", np.arange(tokens, dtype=np.int64))], name="pos_embed", axis=0)
    x = g.node("Add", [x, pos], name="pos.add")
    h = g.node("LayerNormalization", [x, g.const("ln1.weight", np.ones(dim, np.float32)),
                                      g.const("ln1.bias", g.small([dim]))], name="ln1", axis=-1)
    qkv = g.linear(h, dim, 3 * dim, name="qkv")
    shape = g.node("Shape", [h])
    dims = [g.node("Unsqueeze", [g.node("Gather", [shape, g.const(f"i{j}", np.array(j, np.int64))], axis=0),
                                 g.const("zero_axis", np.array([0], np.int64))]) for j in (0, 1)]
    split = g.node("Concat", [*dims, g.const("qkv_split", np.array([3, heads, hd], np.int64))], axis=0)
    qkv = g.node("Transpose", [g.node("Reshape", [qkv, split], name="qkv.split_heads")], perm=[2, 0, 3, 1, 4])
    q, k, v = (g.node("Gather", [qkv, g.const(f"pick{j}", np.array(j, np.int64))], axis=0) for j in range(3))
    merge = g.node("Concat", [*dims, g.const("merged", np.array([dim], np.int64))], axis=0)
    c = _attention(g, h, q, k, v, hd, split, merge, "attn")
    x = g.node("Add", [x, g.linear(c, dim, dim, name="o")], name="attn.add")
    h = g.node("LayerNormalization", [x, g.const("ln2.weight", np.ones(dim, np.float32)),
                                      g.const("ln2.bias", g.small([dim]))], name="ln2", axis=-1)
    h = g.gelu(g.linear(h, dim, mlp, name="fc1"), name="gelu")
    x = g.node("Add", [x, g.linear(h, mlp, dim, name="fc2")], name="mlp.add")
    x = g.reduce("ReduceMean", x, [1], keepdims=0, name="pool")
    out = g.gemm(x, dim, NUM_CLASSES, name="classifier")
    return _finish(g, out, [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", tokens])])


def build_split_qkv(*, seed: int = 0, dim: int = 16, heads: int = 4, tokens: int = 5) -> onnx.ModelProto:
    """Dynamo-export style attention on [N, tokens, dim] (opset 18): fused QKV cut by Split, Reshape targets
    with -1, Div by sqrt(d), an additive mask; the residual stream starts at the graph input."""
    g = _Graph("split_qkv", seed, 18)
    hd = dim // heads
    h = g.node("LayerNormalization", ["input", g.const("ln.weight", np.ones(dim, np.float32)),
                                      g.const("ln.bias", g.small([dim]))], name="ln", axis=-1)
    parts = g.node("Split", [g.linear(h, dim, 3 * dim, name="qkv"), g.const("sizes", np.array([dim] * 3, np.int64))],
                   name="qkv.split", n_out=3, axis=-1)
    target = g.const("split_target", np.array([0, -1, heads, hd], np.int64))
    q, k, v = (g.node("Transpose", [g.node("Reshape", [t, target])], perm=[0, 2, 1, 3]) for t in parts)
    s = g.node("Div", [g.node("MatMul", [q, g.node("Transpose", [k], perm=[0, 1, 3, 2])]),
                       g.const("sqrt_d", np.float32(math.sqrt(hd)))])
    mask = np.where(np.arange(tokens) < tokens - 1, 0.0, -1e4).astype(np.float32).reshape(1, 1, 1, tokens)
    s = g.node("Add", [s, g.const("mask", mask)])
    c = g.node("MatMul", [g.node("Softmax", [s], axis=-1), v])
    c = g.node("Reshape", [g.node("Transpose", [c], perm=[0, 2, 1, 3]), g.const("merge", np.array([0, -1, dim],
                                                                                                   np.int64))])
    x = g.node("Add", ["input", g.linear(c, dim, dim, name="o")], name="attn.add")
    x = g.reduce("ReduceMean", x, [1], keepdims=0, name="pool")
    out = g.gemm(x, dim, NUM_CLASSES, name="classifier")
    return _finish(g, out, [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", tokens, dim])])


def build_unflatten_qkv(*, seed: int = 0, dim: int = 16, heads: int = 4, tokens: int = 5) -> onnx.ModelProto:
    """Fused QKV unflattened to [N, T, 3, D] (the q/k/v axis comes first, heads are split later), then
    Transpose [2, 0, 1, 3] and Gather per projection; the residual stream starts at a Conv1d embedding."""
    g = _Graph("unflatten_qkv", seed, 17)
    hd = dim // heads
    x = g.node("Transpose", [g.conv("input", 4, dim, [1], name="embed", pad=0)], perm=[0, 2, 1])  # [N, T, D]
    h = g.node("LayerNormalization", [x, g.const("ln.weight", np.ones(dim, np.float32)),
                                      g.const("ln.bias", g.small([dim]))], name="ln", axis=-1)
    qkv = g.node("Reshape", [g.linear(h, dim, 3 * dim, name="qkv"), g.const("unflatten", np.array([0, 0, 3, dim],
                                                                                                   np.int64))])
    qkv = g.node("Transpose", [qkv], perm=[2, 0, 1, 3])
    target = g.const("split_target", np.array([0, 0, heads, hd], np.int64))
    q, k, v = (g.node("Transpose", [g.node("Reshape", [g.node("Gather", [qkv, g.const(f"pick{j}", np.array(
        j, np.int64))], axis=0), target])], perm=[0, 2, 1, 3]) for j in range(3))
    c = _attention(g, h, q, k, v, hd, target, g.const("merge", np.array([0, 0, dim], np.int64)), "attn")
    x = g.node("Add", [x, g.linear(c, dim, dim, name="o")], name="attn.add")
    x = g.reduce("ReduceMean", x, [1], keepdims=0, name="pool")
    out = g.gemm(x, dim, NUM_CLASSES, name="classifier")
    return _finish(g, out, [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 4, tokens])])


def _feeds(model: onnx.ModelProto, batch: int = 3, seed: int = 0) -> dict[str, np.ndarray]:
    if model.graph.input[0].name == "ids":
        return {"ids": np.random.default_rng(seed).integers(0, 50, (batch, 6)).astype(np.int64)}
    return random_inputs(model, batch=batch, seed=seed)


MODELS: dict[str, Callable[[], onnx.ModelProto]] = {
    "transformer_block": lambda: build_transformer_block(blocks=2, heads=4),
    "vit": build_vit,
    "text": build_text,
    "split_qkv": build_split_qkv,
    "unflatten_qkv": build_unflatten_qkv,
}


# --- helpers ------------------------------------------------------------------------------------------


def _analysis_with(model: onnx.ModelProto, options: AnalysisOptions | None = None) -> tuple[gs.Graph, Analysis]:
    loaded = LoadedModel(model=model, path="", original_opset=0, file_bytes=0)
    normalize(loaded)
    graph = gs.import_onnx(loaded.model)
    return graph, analyze_graph(graph, static_shapes(loaded.model, None), options=options)


def _zero_groups(model: onnx.ModelProto, pick: Callable[[PruningGroup], bool], ratio: float = 0.5, seed: int = 0,
                 options: AnalysisOptions | None = None) -> tuple[onnx.ModelProto, list[int]]:
    """Zero ``ratio`` of the channels of the groups ``pick`` selects, in every weight that follows them.

    Returns the edited model and the zeroed channels' classes.
    """
    graph, a = _analysis_with(model, options)
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    for g in a.groups:
        n = min(int(np.floor(ratio * g.size + 1e-9)), g.prunable, g.size - 1)
        if n and pick(g):
            chosen.extend(g.classes[rng.choice(np.flatnonzero(~g.blocked), size=n, replace=False)].tolist())
    return zero_classes(graph, a, chosen), chosen


def _weights(model: onnx.ModelProto, layers: tuple[str, ...]) -> int:
    """Parameters of the layers named ``block*.<layer>.weight|bias``."""
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer
               if len(t.name.split(".")) >= 3 and t.name.split(".")[-2] in layers)


def _head_group(a) -> PruningGroup:
    return next(g for g in a.groups if any(p.endswith(".q") or p == "qkv" for p in g.producers))


def _is_width(g: PruningGroup) -> bool:
    """Heads and MLP hidden units: the groups whose removal is exact."""
    return any(p.endswith((".q", ".fc1")) or p in ("qkv", "fc1") for p in g.producers)


def test_unflattened_qkv_keeps_ids_off_the_qkv_axis() -> None:
    """[N, T, 3, D] is later indexed on the 3 axis: ids go on D (q_j, k_j, v_j coupled), heads follow."""
    _, a = _analysis(build_unflatten_qkv())
    heads = _group_of(a, "qkv")
    assert heads.size == 4 and heads.prunable == 4, heads.reasons
    assert _group_of(a, "embed").prunable == 16


def test_split_qkv_heads_are_coupled_across_the_split() -> None:
    _, a = _analysis(build_split_qkv())
    heads = _group_of(a, "qkv")
    assert heads.size == 4 and heads.prunable == 4 and "o" in heads.members


# --- analysis -----------------------------------------------------------------------------------------


def test_heads_are_one_group_per_block_with_one_channel_per_head() -> None:
    _, a = _analysis(build_transformer_block(blocks=2, heads=4))
    for i in range(2):
        g = _group_of(a, f"block{i}.q")
        assert {f"block{i}.q", f"block{i}.k", f"block{i}.v"} <= set(g.producers)
        assert g.size == 4 and g.prunable == 4  # whole heads
        assert f"block{i}.o" in g.members  # output projection rows follow
        assert _group_of(a, f"block{i}.fc1").size == 32


def test_residual_stream_fed_by_the_graph_input_is_blocked_with_a_reason() -> None:
    _, a = _analysis(build_transformer_block())
    stream = _group_of(a, "block0.o")
    assert "block0.fc2" in stream.producers and stream.prunable == 0
    assert "input" in stream.blocked_reason and "no prunable channels" in stream.blocked_reason


def test_vit_residual_stream_is_one_group_across_every_block_norm_and_token() -> None:
    _, a = _analysis(build_vit())
    stream = _group_of(a, "patch_embed")
    assert {"block0.o", "block0.fc2", "block1.o", "block1.fc2"} <= set(stream.producers)
    assert stream.prunable == stream.size == 16, stream.reasons
    members = set(stream.members)
    assert {"cls.expand", "pos.add", "ln_f", "block1.ln2", "classifier"} <= members  # γ/β, token, position, head
    assert _head_group(a).size == 4


def test_text_model_fused_qkv_and_runtime_reshape_targets() -> None:
    _, a = _analysis(build_text())
    heads = _group_of(a, "qkv")
    assert heads.size == 4 and heads.prunable == 4, heads.reasons
    stream = _group_of(a, "tok_embed")
    assert {"o", "fc2"} <= set(stream.producers) and stream.prunable == 16, stream.reasons
    assert {"pos.add", "ln1", "ln2", "classifier"} <= set(stream.members)  # positions folded to a constant


def test_batched_matmul_contracting_computed_features_couples_them() -> None:
    """Per-head dims: scores = q·kᵀ contracts q's and k's features, which must go together."""
    g = _Graph("qk", 0, 17)
    q = g.linear("input", 8, 8, name="q")
    k = g.linear("input", 8, 8, name="k")
    s = g.node("MatMul", [q, g.node("Transpose", [k], perm=[0, 2, 1])], name="scores")
    model = _finish(g, g.node("Softmax", [s], axis=-1), [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                                       ["N", 4, 8])])
    _, a = _analysis(model)
    grp = _group_of(a, "q")
    assert "k" in grp.producers and grp.prunable == 8
    zeroed, chosen = _zero_groups(model, lambda _: True)
    _assert_exact(zeroed, chosen)


# --- exactness ----------------------------------------------------------------------------------------


def _assert_exact(zeroed: onnx.ModelProto, chosen: list[int], options: AnalysisOptions | None = None
                  ) -> onnx.ModelProto:
    """Cut exactly the zeroed classes (other groups stay whole) and compare outputs."""
    assert chosen
    graph, a = _analysis_with(zeroed, options)
    summary = cut_channels(graph, a, np.array(chosen, dtype=np.int64))
    assert summary.params_removed > 0
    pruned = export_graph(graph, zeroed)
    feeds = _feeds(zeroed, batch=4, seed=3)
    before, after = run(zeroed, feeds), run(pruned, feeds)
    for key in before:
        np.testing.assert_allclose(after[key], before[key], atol=1e-4, rtol=1e-4)
    return pruned


@pytest.mark.parametrize("name", sorted(MODELS))
def test_exactness_zeroed_heads_and_mlp_units_removed(name: str, tmp_path: Path) -> None:
    model = MODELS[name]()
    zeroed, chosen = _zero_groups(model, _is_width, seed=1)
    pruned = _assert_exact(zeroed, chosen)
    assert sum(int(np.prod(t.dims)) for t in pruned.graph.initializer) < sum(
        int(np.prod(t.dims)) for t in model.graph.initializer)


def test_exactness_through_the_pipeline_when_only_heads_and_mlp_are_prunable(tmp_path: Path) -> None:
    zeroed, chosen = _zero_groups(build_transformer_block(blocks=2, heads=4), lambda _: True, seed=4)
    result = prune(_save(zeroed, tmp_path), tmp_path / "out.onnx", PruneSpec(ratio=0.5, device="cpu"))
    assert sum(g["channels"] - g["kept"] for g in result.report["groups"]) == len(chosen)
    feeds = _feeds(zeroed, batch=4, seed=3)
    before, after = run(zeroed, feeds), run(onnx.load(result.output_path), feeds)
    np.testing.assert_allclose(after["output"], before["output"], atol=1e-4, rtol=1e-4)


def test_exactness_zeroed_heads_only(tmp_path: Path) -> None:
    model = build_transformer_block(blocks=1, heads=4)
    zeroed, chosen = _zero_groups(model, lambda g: "block0.q" in g.producers, ratio=0.5, seed=2)
    assert len(chosen) == 2
    pruned = _assert_exact(zeroed, chosen)
    split = next(n for n in pruned.graph.node if n.name == "block0.q.split_heads")
    target = next(t for t in pruned.graph.initializer if t.name == split.input[1])
    assert list(onnx.numpy_helper.to_array(target)) == [0, 0, 2, 4]


DIMS = AnalysisOptions(heads="dims")


def test_per_head_dims_couple_q_with_k_and_v_with_the_output_projection() -> None:
    _, a = _analysis_with(build_transformer_block(heads=4), DIMS)
    qk, v = _group_of(a, "block0.q"), _group_of(a, "block0.v")
    assert set(qk.producers) == {"block0.q", "block0.k"} and qk.size == 4  # head_dim 4: dim j of every head
    assert v.producers == ["block0.v"] and v.size == 4 and "block0.o" in v.members


@pytest.mark.parametrize("name", ["transformer_block", "vit", "text", "split_qkv", "unflatten_qkv"])
def test_exactness_zeroed_per_head_dims_removed(name: str) -> None:
    model = MODELS[name]()
    zeroed, chosen = _zero_groups(model, lambda g: g.size <= 8 and not any("classifier" in p for p in g.producers),
                                  seed=5, options=DIMS)
    pruned = _assert_exact(zeroed, chosen, DIMS)
    assert sum(int(np.prod(t.dims)) for t in pruned.graph.initializer) < sum(
        int(np.prod(t.dims)) for t in model.graph.initializer)


def test_per_head_dims_keep_the_head_count() -> None:
    model = build_transformer_block(heads=4)
    zeroed, chosen = _zero_groups(model, lambda g: "block0.q" in g.producers, ratio=0.5, seed=1, options=DIMS)
    pruned = _assert_exact(zeroed, chosen, DIMS)
    split = next(n for n in pruned.graph.node if n.name == "block0.q.split_heads")
    target = next(t for t in pruned.graph.initializer if t.name == split.input[1])
    assert list(onnx.numpy_helper.to_array(target)) == [0, 0, 4, 2]


# --- pruning ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MODELS))
def test_prunes_to_valid_smaller_model(name: str, tmp_path: Path) -> None:
    model = MODELS[name]()
    result = prune(_save(model, tmp_path), tmp_path / "out.onnx", PruneSpec(ratio=0.5, device="cpu"))
    pruned = onnx.load(result.output_path)
    onnx.checker.check_model(onnx.shape_inference.infer_shapes(pruned), full_check=True)
    feeds = _feeds(model)
    before, after = run(model, feeds), run(pruned, feeds)
    assert after["output"].shape == before["output"].shape and np.all(np.isfinite(after["output"]))
    assert result.report["pruned"]["params"] < 0.7 * result.report["original"]["params"]


def test_classifier_at_half_loses_40_percent_of_attention_and_mlp(tmp_path: Path) -> None:
    model = build_transformer_block(blocks=2, heads=4)
    result = prune(_save(model, tmp_path), tmp_path / "out.onnx", PruneSpec(ratio=0.5, device="cpu"))
    pruned = onnx.load(result.output_path)
    for layers in (("q", "k", "v", "o"), ("fc1", "fc2")):
        before, after = _weights(model, layers), _weights(pruned, layers)
        assert before > 0 and after <= 0.6 * before, (layers, before, after)
    blocked = {g["id"]: g["blocked"] for g in result.report["groups"] if g["blocked"]}
    # what stays: the residual stream (it starts at the graph input) and the logits
    assert len(blocked) == 2
    assert any("graph output" in r for r in blocked.values())
    assert any("input" in r for r in blocked.values())


def test_vit_stream_pruning_updates_class_token_and_positions(tmp_path: Path) -> None:
    model = build_vit()
    result = prune(_save(model, tmp_path), tmp_path / "out.onnx", PruneSpec(ratio=0.5, device="cpu"))
    pruned = onnx.load(result.output_path)
    dims = {t.name: list(t.dims) for t in pruned.graph.initializer}
    assert dims["cls_token"] == [1, 1, 8] and dims["pos_embed"] == [1, 5, 8]
    assert dims["patch_embed.weight"][0] == 8 and dims["ln_f.weight"] == [8]


def test_analyze_lists_attention_and_mlp_blocks(tmp_path: Path) -> None:
    result = analyze(_save(build_transformer_block(blocks=2), tmp_path))
    kinds = [b["kind"] for b in result["removable_blocks"]]
    assert kinds == ["attention", "mlp", "attention", "mlp"]


# --- real PyTorch exports (TorchScript exporter) -----------------------------------------------------------


def _torch_models(torch):  # noqa: ANN001, ANN202
    nn = torch.nn

    class Encoder(nn.Module):
        """Embedding + nn.TransformerEncoderLayer (nn.MultiheadAttention) + mean + Linear."""

        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(50, 32)
            self.enc = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, dropout=0.0)
            self.head = nn.Linear(32, 10)

        def forward(self, ids):  # noqa: ANN001, ANN202
            return self.head(self.enc(self.emb(ids)).mean(1))

    class Attention(nn.Module):
        """timm's ViT attention: fused qkv reshaped to (B, N, 3, h, d), merged back with x's own C."""

        def __init__(self, d: int = 32, h: int = 4) -> None:
            super().__init__()
            self.h, self.hd = h, d // h
            self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)

        def forward(self, x):  # noqa: ANN001, ANN202
            b, n, c = x.shape
            q, k, v = self.qkv(x).reshape(b, n, 3, self.h, self.hd).permute(2, 0, 3, 1, 4).unbind(0)
            a = ((q @ k.transpose(-2, -1)) * self.hd ** -0.5).softmax(-1)
            return self.proj((a @ v).transpose(1, 2).reshape(b, n, c))

    class Block(nn.Module):
        def __init__(self, d: int = 32) -> None:
            super().__init__()
            self.n1, self.attn, self.n2 = nn.LayerNorm(d), Attention(d), nn.LayerNorm(d)
            self.fc1, self.fc2 = nn.Linear(d, 64), nn.Linear(64, d)

        def forward(self, x):  # noqa: ANN001, ANN202
            x = x + self.attn(self.n1(x))
            return x + self.fc2(nn.functional.gelu(self.fc1(self.n2(x))))

    class ViT(nn.Module):
        """Patch Conv, class token expanded to the batch, positions, two timm blocks, LayerNorm, head."""

        def __init__(self, d: int = 32) -> None:
            super().__init__()
            self.patch = nn.Conv2d(3, d, 4, 4)
            self.cls, self.pos = nn.Parameter(torch.randn(1, 1, d)), nn.Parameter(torch.randn(1, 5, d))
            self.blocks, self.norm, self.head = nn.Sequential(Block(d), Block(d)), nn.LayerNorm(d), nn.Linear(d, 10)

        def forward(self, x):  # noqa: ANN001, ANN202
            x = self.patch(x).flatten(2).transpose(1, 2)
            x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
            return self.head(self.norm(self.blocks(x))[:, 0])

    return Encoder, ViT


@pytest.fixture(scope="module")
def torch_exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    torch = pytest.importorskip("torch")
    encoder, vit = _torch_models(torch)
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("torch_exports")
    paths = {"encoder": directory / "encoder.onnx", "vit": directory / "vit.onnx"}
    args = {"encoder": (torch.randint(0, 50, (2, 6)),), "vit": (torch.randn(2, 3, 8, 8),)}
    for name, cls in (("encoder", encoder), ("vit", vit)):
        inputs = ["ids"] if name == "encoder" else ["input"]
        torch.onnx.export(cls().eval(), args[name], str(paths[name]), dynamo=False, opset_version=17,
                          input_names=inputs, output_names=["output"], dynamic_axes={inputs[0]: {0: "N"}})
    return paths


def test_torchscript_multihead_attention_heads_stream_and_mlp_prune(torch_exports: dict[str, Path],
                                                                    tmp_path: Path) -> None:
    """nn.MultiheadAttention computes head_dim = E // heads from the input's Shape for its Reshape of the
    projected q/k/v, which carry the heads, not the stream: that entry is frozen at its value, so the residual
    stream prunes too, as do heads (Reshape [T, B*h, d] targets traced through Mul) and the MLP."""
    groups = analyze(torch_exports["encoder"])["groups"]
    heads = next(g for g in groups if g["channels"] == 4)
    assert heads["prunable"] == 4 and any("self_attn" in p for p in heads["producers"])
    stream = next(g for g in groups if "/emb/Gather" in g["producers"])
    assert stream["prunable"] == stream["channels"]
    result = prune(torch_exports["encoder"], tmp_path / "out.onnx", PruneSpec(ratio=0.5, device="cpu"))
    kept = next(g for g in result.report["groups"] if "/emb/Gather" in g["producers"])["kept"]
    assert kept < stream["channels"]
    assert result.report["pruned"]["params"] < 0.65 * result.report["original"]["params"]
    ids = {"ids": np.random.default_rng(0).integers(0, 50, (3, 6)).astype(np.int64)}
    out = run(onnx.load(result.output_path), ids)["output"]
    assert out.shape == run(onnx.load(str(torch_exports["encoder"])), ids)["output"].shape and np.isfinite(out).all()


def test_torchscript_timm_vit_prunes_heads_mlp_and_stream(torch_exports: dict[str, Path], tmp_path: Path) -> None:
    groups = analyze(torch_exports["vit"])["groups"]
    assert sum(1 for g in groups if g["prunable"]) == len(groups) - 1  # all but the logits
    result = prune(torch_exports["vit"], tmp_path / "out.onnx", PruneSpec(ratio=0.5, depth=1, device="cpu"))
    assert result.report["pruned"]["params"] < 0.3 * result.report["original"]["params"]
    onnx.checker.check_model(str(tmp_path / "out.onnx"), full_check=True)


@pytest.mark.parametrize("name", ["encoder", "vit"])
def test_torchscript_exactness_zeroed_heads_and_mlp_units(name: str, torch_exports: dict[str, Path]) -> None:
    model = onnx.load(str(torch_exports[name]))
    zeroed, chosen = _zero_groups(model, lambda g: g.size in (4, 64), seed=3)
    assert len(chosen) == (2 + 32) * (1 if name == "encoder" else 2)
    inputs = {"ids": np.random.default_rng(0).integers(0, 50, (4, 6)).astype(np.int64)} if name == "encoder" else \
        random_inputs(model, batch=4)
    graph, a = _analysis(zeroed)
    cut_channels(graph, a, np.array(chosen, dtype=np.int64))
    pruned = export_graph(graph, zeroed)
    np.testing.assert_allclose(run(pruned, inputs)["output"], run(zeroed, inputs)["output"], atol=1e-4, rtol=1e-4)


def test_criterion_scores_are_aggregated_per_head(tmp_path: Path) -> None:
    """Head 2's Q/K/V columns and output rows are scaled down: l2 over the whole head removes exactly it."""
    model = build_transformer_block(blocks=1, heads=4)
    hd = 4
    for t in model.graph.initializer:
        parts = t.name.split(".")
        if len(parts) == 3 and parts[1] in ("q", "k", "v", "o") and parts[2] in ("weight", "bias"):
            w = onnx.numpy_helper.to_array(t).copy()
            if parts[1] == "o" and parts[2] == "weight":
                w[2 * hd : 3 * hd] *= 0.01
            elif parts[1] != "o":
                w[..., 2 * hd : 3 * hd] *= 0.01
            t.CopyFrom(onnx.numpy_helper.from_array(w, t.name))
    result = prune(_save(model, tmp_path), tmp_path / "out.onnx", PruneSpec(ratio=0.25, device="cpu"))
    pruned = onnx.load(result.output_path)
    q = onnx.numpy_helper.to_array(next(t for t in pruned.graph.initializer if t.name == "block0.q.weight"))
    original = onnx.numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "block0.q.weight"))
    kept = np.concatenate([original[:, : 2 * hd], original[:, 3 * hd :]], axis=1)
    np.testing.assert_array_equal(q, kept)
