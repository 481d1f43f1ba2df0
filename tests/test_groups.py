"""Dependency analysis and surgery on every op pattern issue 2 names, each on a model built in code.

Each pattern is pruned through the real pipeline and checked for validity (full checker), shapes,
fewer parameters, and outputs that still run. The exactness tests zero chosen channels everywhere
they live (producer rows, biases, BN γ/β, consumer columns), prune exactly those, and require the
outputs to stay the same to 1e-4: a wrong index anywhere in the surgery breaks that.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

from onnxprune.io.load import LoadedModel, normalize
from onnxprune.io.shapes import static_shapes
from onnxprune.analysis.core import Analysis
from onnxprune.analysis.driver import analyze_graph
from onnxprune.io.export import export_graph
from onnxprune.pipeline import analyze, prune
from onnxprune.spec import PruneSpec
from onnxprune.transform.surgery import cut_channels
from tests.models import BUILDERS, VARIANTS, random_inputs, run

WIDTH_PATTERNS = [
    "mlp", "mlp_matmul", "vgg", "flatten_gemm", "reshape_gemm", "gap_gemm", "resnet_basic", "resnet_bottleneck",
    "mobilenetv2", "squeeze_excite", "densenet", "activations", "misc_passthrough", "residual_sub_mul",
    "paddle_constants", "conv_transpose", "conv1d", "conv3d",
]
VARIANT_PATTERNS = [
    "mlp[trans_b=False]", "squeeze_excite[hardsigmoid]", "squeeze_excite[reducemean]",
    "squeeze_excite[reducemean,opset18]", "squeeze_excite[gemm]", "vgg[opset13]", "mobilenetv2[opset21]",
]


def _model(name: str) -> onnx.ModelProto:
    return VARIANTS[name]() if name in VARIANTS else BUILDERS[name]()


def _save(model: onnx.ModelProto, tmp_path: Path, name: str = "model.onnx") -> Path:
    path = tmp_path / name
    onnx.save(model, path)
    return path


def _analysis(model: onnx.ModelProto, shapes: dict | None = None) -> tuple[gs.Graph, Analysis]:
    loaded = LoadedModel(model=model, path="", original_opset=0, file_bytes=0)
    normalize(loaded)
    graph = gs.import_onnx(loaded.model)
    return graph, analyze_graph(graph, static_shapes(loaded.model, shapes))


def _params(model: onnx.ModelProto) -> int:
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer)


def _group_of(analysis: Analysis, producer: str):
    return next(g for g in analysis.groups if producer in g.producers)


ISSUE3_PATTERNS = [
    "batched_matmul", "lstm", "lstm[gru]", "lstm[rnn]", "with_if", "transformer_block",
    "transformer_block[blocks=2,opset18]", "shufflenet", "shufflenet[slice]", "grouped_conv", "resnet_bottleneck[blocks=3]",
]


@pytest.mark.parametrize("name", WIDTH_PATTERNS + VARIANT_PATTERNS + ISSUE3_PATTERNS)
def test_pattern_prunes_to_valid_smaller_model(name: str, tmp_path: Path) -> None:
    model = _model(name)
    src = _save(model, tmp_path)
    result = prune(src, tmp_path / "out.onnx", PruneSpec(ratio=0.5, device="cpu"))
    pruned = onnx.load(result.output_path)
    onnx.checker.check_model(onnx.shape_inference.infer_shapes(pruned), full_check=True)
    assert [i.name for i in pruned.graph.input] == [i.name for i in model.graph.input]
    assert [o.name for o in pruned.graph.output] == [o.name for o in model.graph.output]
    feeds = random_inputs(model, batch=3)
    before, after = run(model, feeds), run(pruned, feeds)
    for key in before:
        assert after[key].shape == before[key].shape
        assert np.all(np.isfinite(after[key]))
    assert _params(pruned) < _params(model)
    assert result.report["pruned"]["params"] < result.report["original"]["params"]
    assert result.report["pruned"]["macs"] < result.report["original"]["macs"]


def test_symbolic_spatial_needs_no_shape_for_convs_and_reports_null_macs(tmp_path: Path) -> None:
    model = BUILDERS["symbolic_spatial"]()
    src = _save(model, tmp_path)
    result = prune(src, tmp_path / "out.onnx", PruneSpec(ratio=0.5, device="cpu"))
    assert result.report["original"]["macs"] is None
    assert result.report["pruned"]["params"] < result.report["original"]["params"]
    fixed = prune(src, tmp_path / "out2.onnx", PruneSpec(ratio=0.5, shapes={"input": [1, 3, 32, 32]}, device="cpu"))
    assert fixed.report["original"]["macs"] > fixed.report["pruned"]["macs"] > 0
    pruned = onnx.load(fixed.output_path)
    assert pruned.graph.input[0].type.tensor_type.shape.dim[2].dim_param  # the input stays symbolic
    feeds = random_inputs(model, batch=1, dims={"H": 24, "W": 40})
    assert run(pruned, feeds)["output"].shape == run(model, feeds)["output"].shape


def test_residual_add_couples_its_producers() -> None:
    _, a = _analysis(BUILDERS["resnet_basic"]())
    g = _group_of(a, "stem")
    assert "block1.conv2" in g.producers and "block1.conv1" not in g.producers
    g2 = _group_of(a, "block2.conv2")
    assert "block2.downsample" in g2.producers


def test_depthwise_conv_shares_its_input_channels_and_group_shrinks(tmp_path: Path) -> None:
    model = BUILDERS["mobilenetv2"]()
    _, a = _analysis(model)
    g = _group_of(a, "block1.expand")
    assert "block1.dw" in g.members and "block1.dw" not in [p for grp in a.groups for p in grp.producers]
    result = prune(_save(model, tmp_path), tmp_path / "out.onnx", PruneSpec(ratio=0.5, device="cpu"))
    pruned = onnx.load(result.output_path)
    dw = next(n for n in pruned.graph.node if n.name == "block1.dw")
    group = next(a.i for a in dw.attribute if a.name == "group")
    weight = next(t for t in pruned.graph.initializer if t.name == dw.input[1])
    assert group == weight.dims[0] == g.size // 2


def test_squeeze_excite_mul_couples_gate_with_block() -> None:
    _, a = _analysis(BUILDERS["squeeze_excite"]())
    g = _group_of(a, "block")
    assert "se.expand" in g.producers
    assert _group_of(a, "se.reduce").prunable > 0


def test_concat_offsets_map_each_input() -> None:
    _, a = _analysis(BUILDERS["densenet"]())
    concat_maps = [m for name, m in a.maps.items() if "concat" in name]
    assert concat_maps
    for m in concat_maps:
        assert len(set(a.classes_of(m.ids).tolist())) == len(m.ids)  # every position its own channel


def test_flatten_gemm_removes_whole_spatial_blocks(tmp_path: Path) -> None:
    model = BUILDERS["flatten_gemm"]()
    conv_w = next(t for t in model.graph.initializer if t.name.startswith("conv1") and len(t.dims) == 4)
    fc = next(n for n in model.graph.node if n.op_type == "Gemm")
    fc_w = next(t for t in model.graph.initializer if t.name == fc.input[1])
    result = prune(_save(model, tmp_path), tmp_path / "out.onnx", PruneSpec(ratio=0.5, device="cpu"))
    pruned = onnx.load(result.output_path)
    new_conv = next(t for t in pruned.graph.initializer if t.name == conv_w.name)
    new_fc = next(t for t in pruned.graph.initializer if t.name == fc_w.name)
    spatial = (fc_w.dims[1] if fc_w.dims[1] != 10 else fc_w.dims[0]) // conv_w.dims[0]
    assert new_conv.dims[0] == conv_w.dims[0] // 2
    assert new_conv.dims[0] * spatial in new_fc.dims


def test_graph_outputs_are_never_cut() -> None:
    _, a = _analysis(BUILDERS["mlp"]())
    last = _group_of(a, "fc3")
    assert last.prunable == 0 and "reaches graph output" in last.blocked_reason


def test_unknown_op_blocks_only_its_neighbours(tmp_path: Path) -> None:
    _, a = _analysis(BUILDERS["lstm"]())
    reasons = [r for g in a.groups for r in g.reasons]
    assert any("LSTM" in r and "not understood" in r for r in reasons)
    assert any(g.prunable for g in a.groups)
    result = prune(_save(BUILDERS["lstm"](), tmp_path), tmp_path / "out.onnx", PruneSpec(ratio=0.5, device="cpu"))
    assert result.report["pruned"]["params"] < result.report["original"]["params"]


def test_exclude_keeps_named_nodes_intact(tmp_path: Path) -> None:
    model = BUILDERS["vgg"]()
    result = prune(_save(model, tmp_path), tmp_path / "out.onnx", PruneSpec(ratio=0.5, exclude=["conv2"], device="cpu"))
    pruned = onnx.load(result.output_path)
    conv2 = next(n for n in model.graph.node if n.name == "conv2")
    before = next(t for t in model.graph.initializer if t.name == conv2.input[1])
    after = next(t for t in pruned.graph.initializer if t.name == conv2.input[1])
    assert list(after.dims) == list(before.dims)
    assert _params(pruned) < _params(model)


def test_analyze_reports_groups_and_reasons(tmp_path: Path) -> None:
    result = analyze(_save(BUILDERS["resnet_basic"](), tmp_path))
    assert result["prunable_groups"] >= 3
    assert any(g["blocked"] and "graph output" in g["blocked"] for g in result["groups"])


def test_weights_in_constant_and_identity_nodes_are_pruned(tmp_path: Path) -> None:
    model = BUILDERS["paddle_constants"]()
    result = prune(_save(model, tmp_path), tmp_path / "out.onnx", PruneSpec(ratio=0.5, device="cpu"))
    assert result.report["pruned"]["params"] < 0.7 * result.report["original"]["params"]


# --- exactness: zeroed channels removed → same outputs -----------------------------------------


def zero_classes(graph: gs.Graph, analysis: Analysis, classes: list[int] | np.ndarray) -> onnx.ModelProto:
    """Zero the given channel classes in every weight that follows them (producer rows, biases, BN γ/β,
    consumer columns; not BN statistics) and export the graph: those channels then contribute nothing."""
    chosen = np.asarray(classes, dtype=np.int64)
    tensors = graph.tensors()
    for site in analysis.sites:
        mask = np.isin(analysis.classes_of(site.ids), chosen)
        if site.role != "stat" and mask.any():
            values = np.array(tensors[site.tensor].values)
            index = [slice(None)] * values.ndim
            index[site.axis] = np.flatnonzero(mask)
            values[tuple(index)] = 0
            tensors[site.tensor].values = values
    return gs.export_onnx(graph)


def zero_channels_everywhere(model: onnx.ModelProto, ratio: float, seed: int = 0) -> tuple[onnx.ModelProto, int]:
    """Zero ``ratio`` of the prunable channels of every group in every tensor that follows them.

    Returns the edited model and how many channels were zeroed.
    """
    graph, a = _analysis(model)
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    for g in a.groups:
        n = min(int(np.floor(ratio * g.size + 1e-9)), g.prunable, g.size - 1)
        if n:
            free = np.flatnonzero(~g.blocked)
            chosen.extend(g.classes[rng.choice(free, size=n, replace=False)].tolist())
    return zero_classes(graph, a, chosen), len(chosen)


@pytest.mark.parametrize("name", [
    "resnet_basic", "resnet_bottleneck", "mobilenetv2", "squeeze_excite", "densenet", "flatten_gemm",
    "reshape_gemm", "gap_gemm", "vgg", "mlp", "mlp_matmul", "misc_passthrough", "residual_sub_mul",
    "conv_transpose", "conv1d",
    "batched_matmul", "conv3d", "lstm", "with_if", "transformer_block", "grouped_conv", "shufflenet",
])
def test_exactness_zeroed_channels_removed_without_output_change(name: str, tmp_path: Path) -> None:
    zeroed, n = zero_channels_everywhere(BUILDERS[name](), 0.5, seed=1)
    assert n > 0
    src = _save(zeroed, tmp_path)
    result = prune(src, tmp_path / "out.onnx", PruneSpec(ratio=0.5, criterion="l2", device="cpu"))
    pruned = onnx.load(result.output_path)
    removed = sum(g["channels"] - g["kept"] for g in result.report["groups"])
    assert removed == n
    feeds = random_inputs(zeroed, batch=4, seed=3)
    before, after = run(zeroed, feeds), run(pruned, feeds)
    for key in before:
        np.testing.assert_allclose(after[key], before[key], atol=1e-4, rtol=1e-4)
    assert _params(pruned) < _params(zeroed)


def test_ratio_zero_keeps_outputs(tmp_path: Path) -> None:
    model = BUILDERS["resnet_basic"]()
    result = prune(_save(model, tmp_path), tmp_path / "out.onnx", PruneSpec(ratio=0.0, device="cpu"))
    feeds = random_inputs(model, batch=2)
    before, after = run(model, feeds), run(onnx.load(result.output_path), feeds)
    for key in before:
        assert np.max(np.abs(after[key] - before[key])) <= 1e-5
    assert result.report["pruned"]["params"] == result.report["original"]["params"]


# --- issue 3 patterns --------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "op"), [("lstm", "LSTM"), ("lstm[gru]", "GRU"), ("lstm[rnn]", "RNN"), ("with_if", "If")])
def test_recurrent_and_control_flow_block_only_what_they_read(name: str, op: str) -> None:
    _, a = _analysis(_model(name))
    blocked = [g for g in a.groups if g.prunable == 0 and "graph output" not in (g.blocked_reason or "")]
    assert len(blocked) == 1 and blocked[0].blocked_reason.startswith(op)
    assert sum(1 for g in a.groups if g.prunable) >= 2


def test_if_reading_a_tensor_inside_its_branches_blocks_it() -> None:
    _, a = _analysis(BUILDERS["with_if"]())
    g = _group_of(a, "conv1")
    assert g.prunable == 0 and "inside a subgraph" in g.blocked_reason


def _shape_read_elsewhere(use: str) -> onnx.ModelProto:
    """conv1's channel count read by Shape and used on a side branch of the input: as a Reshape target
    entry (``reshape``) or as a value (``scale``)."""
    from tests.models import _Graph

    g = _Graph("shape_read", 0, 17)
    x = g.conv_bn_act("input", 3, 8, name="conv1")  # [N, 8, 8, 8]
    y = g.conv_bn_act(x, 8, 8, name="conv2")
    c = g.node("Unsqueeze", [g.node("Gather", [g.node("Shape", [x]), g.const("one", np.array(1, np.int64))], axis=0),
                             g.const("axis0", np.array([0], np.int64))])
    if use == "reshape":
        side = g.node("Reshape", ["input", g.node("Concat", [g.const("minus1", np.array([-1], np.int64)), c], axis=0)])
        side = g.reduce("ReduceMean", side, None, keepdims=0)
    else:
        side = g.reduce("ReduceMean", "input", None, keepdims=0)
        side = g.node("Mul", [side, g.node("Cast", [c], to=onnx.TensorProto.FLOAT)])
    out = g.node("Add", [g.head(y, 8), side])
    return g.finish(out, [2, 3, 8, 8])


def test_channel_count_read_by_shape_as_a_value_elsewhere_blocks_the_channels() -> None:
    """Shape(x)[C] used as a number: pruning x would change that value at runtime."""
    _, a = _analysis(_shape_read_elsewhere("scale"))
    blocked = _group_of(a, "conv1")
    assert blocked.prunable == 0 and "read by Shape" in blocked.blocked_reason
    assert _group_of(a, "conv2").prunable == 8


def test_channel_count_read_by_shape_for_another_tensors_reshape_is_frozen() -> None:
    """Shape(x)[C] in the target of a Reshape of a tensor without x's channels: the entry keeps its value
    (CoaT's ``qkv.reshape(B, N, 3, h, C // h)``), so the channels stay prunable and the cut is exact."""
    model = _shape_read_elsewhere("reshape")
    graph, a = _analysis(model)
    conv1 = _group_of(a, "conv1")
    assert conv1.prunable == 8
    zeroed = zero_classes(graph, a, conv1.classes[:4])
    graph, a = _analysis(zeroed)
    cut_channels(graph, a, _group_of(a, "conv1").classes[:4])
    pruned = export_graph(graph, zeroed)
    feeds = random_inputs(zeroed, batch=2)
    np.testing.assert_allclose(run(pruned, feeds)["output"], run(zeroed, feeds)["output"], atol=1e-4, rtol=1e-4)


def test_channels_last_flatten_into_dense_tf2onnx_style(tmp_path: Path) -> None:
    """NHWC graphs (tf2onnx): Transpose to NCHW around the convs, back to NHWC, Reshape [-1, H*W*C] →
    MatMul. The channels are the last axis of the flatten: each owns every H*W-th column."""
    from tests.models import _Graph

    g = _Graph("nhwc", 0, 17)
    x = g.node("Transpose", ["input"], perm=[0, 3, 1, 2])
    x = g.node("Relu", [g.conv(x, 3, 8, 3, name="conv1")])
    x = g.node("Relu", [g.conv(x, 8, 8, 3, name="conv2", stride=2)])
    x = g.node("Reshape", [g.node("Transpose", [x], perm=[0, 2, 3, 1]), g.const("flat", np.array([-1, 128], np.int64))])
    x = g.node("Relu", [g.linear(x, 128, 16, name="dense1")])
    model = g.finish(g.linear(x, 16, 10, name="dense2"), ["N", 8, 8, 3])
    _, a = _analysis(model)
    assert _group_of(a, "conv2").prunable == 8
    zeroed, n = zero_channels_everywhere(model, 0.5, seed=1)
    result = prune(_save(zeroed, tmp_path), tmp_path / "out.onnx", PruneSpec(ratio=0.5, device="cpu"))
    assert sum(g["channels"] - g["kept"] for g in result.report["groups"]) == n
    feeds = random_inputs(model, batch=3)
    np.testing.assert_allclose(run(onnx.load(result.output_path), feeds)["output"], run(zeroed, feeds)["output"],
                               atol=1e-4, rtol=1e-4)


def test_global_ranking_takes_dead_channels_from_the_group_that_has_them(tmp_path: Path) -> None:
    """Half of one group's channels are dead: --global removes exactly those and leaves other groups whole."""
    model = BUILDERS["vgg"]()
    graph, a = _analysis(model)
    target = next(g for g in a.groups if "conv1" in g.producers)
    dead = target.classes[: target.size // 2]
    zeroed = zero_classes(graph, a, dead)
    total = sum(g.size for g in a.groups if g.prunable)
    ratio = (len(dead) - 0.5) / total  # just under the dead channels' share of all channels
    result = prune(_save(zeroed, tmp_path), tmp_path / "out.onnx", PruneSpec(ratio=ratio, global_ranking=True, device="cpu"))
    removed = {g["producers"][0]: g["channels"] - g["kept"] for g in result.report["groups"]}
    assert removed["conv1"] == len(dead) - 1 and sum(removed.values()) == len(dead) - 1
    feeds = random_inputs(zeroed, batch=2)
    before, after = run(zeroed, feeds), run(onnx.load(result.output_path), feeds)
    np.testing.assert_allclose(after["output"], before["output"], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["vgg", "resnet_bottleneck", "mobilenetv2"])
def test_round_to_keeps_channel_counts_multiples(name: str, tmp_path: Path) -> None:
    result = prune(_save(BUILDERS[name](), tmp_path), tmp_path / "out.onnx",
                   PruneSpec(ratio=0.6, round_to=4, device="cpu"))
    changed = [g for g in result.report["groups"] if g["kept"] != g["channels"]]
    assert changed
    assert all(g["kept"] % 4 == 0 for g in changed)


def test_models_with_several_outputs_verify_each_output(tmp_path: Path) -> None:
    """A second graph output of another shape: every output is checked, fidelity is on the first."""
    from onnx import TensorProto, helper

    model = BUILDERS["vgg"]()
    pool = next(n for n in model.graph.node if n.op_type == "MaxPool").output[0]
    model.graph.output.append(helper.make_tensor_value_info(pool, TensorProto.FLOAT, None))
    result = prune(_save(model, tmp_path), tmp_path / "out.onnx", PruneSpec(ratio=0.5, device="cpu"))
    assert result.report["fidelity"]["samples"] == 8
    assert result.report["pruned"]["params"] < result.report["original"]["params"]
    feeds = random_inputs(model)
    before, after = run(model, feeds), run(onnx.load(result.output_path), feeds)
    assert [v.shape for v in after.values()] == [v.shape for v in before.values()]
