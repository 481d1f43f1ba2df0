"""Decoder LMs exported by torch.onnx: MLP width, attention heads (MHA and GQA key-value groups), the KV cache.

The models (tests/decoder_models.py) are tiny random-weight GPT-2 and Llama-style decoders, with and without a
KV cache. Exactness: heads, KV groups and MLP units zeroed in every weight that follows them are cut and the
logits (and the kept heads of the cache) stay equal. The cut model with a cache also generates: a prefill
with an empty past and one decode step give the logits of the full sequence.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

from onnxprune.analysis.core import Analysis, AnalysisOptions, PruningGroup
from onnxprune.analysis.driver import analyze_graph
from onnxprune.io.export import export_graph
from onnxprune.io.load import LoadedModel, normalize
from onnxprune.io.shapes import static_shapes
from onnxprune.pipeline import analyze, prune
from onnxprune.spec import PruneSpec
from onnxprune.transform.surgery import CutSummary, cut_channels
from tests.decoder_models import (
    GPT2,
    LLAMA,
    DecoderConfig,
    cache_names,
    empty_past,
    export_decoder,
)
from tests.models import run
from tests.test_transformer import _zero_groups

CONFIGS = {"gpt2": GPT2, "llama": LLAMA}
NAMES = [f"{family}_{style}" for family in CONFIGS for style in ("nocache", "cache")]


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    pytest.importorskip("torch")
    directory = tmp_path_factory.mktemp("decoders")
    return {name: export_decoder(directory / f"{name}.onnx", CONFIGS[name.split("_")[0]], cache=name.endswith("_cache"))
            for name in NAMES}


def _config(name: str) -> DecoderConfig:
    return CONFIGS[name.split("_")[0]]


def _analysis(model: onnx.ModelProto, shapes: dict[str, list[int]] | None = None) -> tuple[gs.Graph, Analysis]:
    loaded = LoadedModel(model=model, path="", original_opset=0, file_bytes=0)
    normalize(loaded)
    graph = gs.import_onnx(loaded.model)
    return graph, analyze_graph(graph, static_shapes(loaded.model, shapes))


def _is_attention(g: PruningGroup) -> bool:
    return any(p.endswith(("c_attn/Gemm", "q_proj/MatMul")) for p in g.producers)


def _is_mlp(g: PruningGroup) -> bool:
    return any(p.endswith(("c_fc/Gemm", "gate_proj/MatMul")) for p in g.producers)


def _kinds(a: Analysis) -> dict[str, list[PruningGroup]]:
    return {"attention": [g for g in a.groups if _is_attention(g)], "mlp": [g for g in a.groups if _is_mlp(g)]}


def _width(g: PruningGroup) -> bool:
    return _is_attention(g) or _is_mlp(g)


def _cut(model: onnx.ModelProto, chosen: list[int]) -> tuple[onnx.ModelProto, CutSummary, Analysis]:
    graph, a = _analysis(model)
    summary = cut_channels(graph, a, np.array(chosen, dtype=np.int64))
    return export_graph(graph, model), summary, a


def _ids(c: DecoderConfig, batch: int, length: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, c.vocab, (batch, length)).astype(np.int64)


# --- analysis -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_heads_kv_groups_and_mlp_are_prunable_without_shapes(name: str, exports: dict[str, Path]) -> None:
    c = _config(name)
    _, a = _analysis(onnx.load(exports[name]))
    kinds = _kinds(a)
    assert len(kinds["attention"]) == len(kinds["mlp"]) == c.layers
    for g in kinds["attention"]:
        assert g.size == g.prunable == c.kv_heads, g.reasons  # MHA: one channel per head; GQA: per KV group
        if c.family == "llama":
            assert {p.rsplit("/", 2)[-2] for p in g.producers} >= {"q_proj", "k_proj", "v_proj"}
            assert any(m.endswith("o_proj/MatMul") for m in g.members)
        else:
            assert any(m.endswith("attn/c_proj/Gemm") for m in g.members)
    for g in kinds["mlp"]:
        assert g.size == g.prunable == c.mlp, g.reasons
        if c.family == "llama":  # SwiGLU: gate and up coupled through the Mul, down's rows follow
            assert any(p.endswith("up_proj/MatMul") for p in g.producers)
            assert any(m.endswith("down_proj/MatMul") for m in g.members)


@pytest.mark.parametrize("name", ["gpt2_nocache", "llama_cache"])
def test_same_groups_with_shape(name: str, exports: dict[str, Path]) -> None:
    c = _config(name)
    shapes: dict[str, list[int]] = {"input_ids": [1, 5]}
    if name.endswith("_cache"):
        shapes.update({n: [1, c.kv_heads, 3, c.head_dim] for n in cache_names(c)[0]})
    _, a = _analysis(onnx.load(exports[name]), shapes)
    kinds = _kinds(a)
    assert [g.prunable for g in kinds["attention"]] == [c.kv_heads] * c.layers
    assert [g.prunable for g in kinds["mlp"]] == [c.mlp] * c.layers


def test_cache_inputs_and_outputs_follow_the_kv_heads(exports: dict[str, Path]) -> None:
    c = LLAMA
    _, a = _analysis(onnx.load(exports["llama_cache"]))
    past, present = cache_names(c)
    assert sorted(a.cache_io) == sorted(past + present)
    for i, g in enumerate(_kinds(a)["attention"]):
        for name in (past[2 * i], present[2 * i + 1]):
            m = a.maps[name]
            assert m.axis == 1 and sorted(set(a.classes_of(m.ids).tolist())) == sorted(g.classes.tolist())


@pytest.mark.parametrize("name", ["gpt2_nocache", "llama_cache"])
def test_residual_stream_of_a_language_model_stays_unless_asked_for(name: str, exports: dict[str, Path]) -> None:
    model = onnx.load(exports[name])
    _, a = _analysis(model)
    stream = next(g for g in a.groups if "/embed/Gather" in g.producers)
    assert stream.size == _config(name).dim and stream.prunable == 0
    assert "hidden size of a language model" in stream.blocked_reason
    loaded = LoadedModel(model=model, path="", original_opset=0, file_bytes=0)
    normalize(loaded)
    asked = analyze_graph(gs.import_onnx(loaded.model), static_shapes(loaded.model, None),
                          options=AnalysisOptions(lm_stream=True))
    assert next(g for g in asked.groups if "/embed/Gather" in g.producers).prunable == _config(name).dim


def test_rotary_tables_are_blocked_without_blocking_heads(exports: dict[str, Path]) -> None:
    _, a = _analysis(onnx.load(exports["llama_nocache"]))
    tables = [g for g in a.groups if not _width(g) and g.size == LLAMA.head_dim]
    assert tables and all(g.prunable == 0 and "another axis" in g.reasons[0] for g in tables)


# --- exactness ----------------------------------------------------------------------------------------


def _zeroed_and_cut(model: onnx.ModelProto, seed: int) -> tuple[onnx.ModelProto, onnx.ModelProto, CutSummary]:
    """Half of every head/KV-group and MLP group zeroed in the original, then cut: (zeroed, pruned, summary)."""
    zeroed, chosen = _zero_groups(model, _width, seed=seed)
    pruned, summary, _ = _cut(zeroed, chosen)
    return zeroed, pruned, summary


@pytest.mark.parametrize("name", ["gpt2_nocache", "llama_nocache"])
def test_exactness_zeroed_heads_and_mlp_units_removed(name: str, exports: dict[str, Path]) -> None:
    c = _config(name)
    zeroed, pruned, summary = _zeroed_and_cut(onnx.load(exports[name]), seed=1)
    assert summary.params_removed > 0 and not summary.cache
    feeds = {"input_ids": _ids(c, 2, 7)}
    np.testing.assert_allclose(run(pruned, feeds)["logits"], run(zeroed, feeds)["logits"], atol=1e-4, rtol=1e-4)


def _assert_exact_with_cache(c: DecoderConfig, zeroed: onnx.ModelProto, pruned: onnx.ModelProto,
                             summary: CutSummary) -> None:
    """Half the KV heads went: the cache is declared with the rest, and fed the kept heads of a past the cut
    model gives the zeroed model's logits and the kept heads of its presents."""
    past, present = cache_names(c)
    kept = c.kv_heads // 2
    assert all(summary.cache[n].shape[1] == kept for n in past + present), summary.cache
    declared = {vi.name: vi.type.tensor_type.shape.dim[1].dim_value for vi in [*pruned.graph.input, *pruned.graph.output]}
    assert all(declared[n] == kept for n in past + present)
    rng = np.random.default_rng(0)
    feeds = {"input_ids": _ids(c, 2, 3), **{n: rng.standard_normal((2, c.kv_heads, 4, c.head_dim)).astype(np.float32)
                                               for n in past}}
    small = {**feeds, **{n: summary.cache[n].narrow(feeds[n]) for n in past}}
    before, after = run(zeroed, feeds), run(pruned, small)
    np.testing.assert_allclose(after["logits"], before["logits"], atol=1e-4, rtol=1e-4)
    for n in present:
        np.testing.assert_allclose(after[n], summary.cache[n].narrow(before[n]), atol=1e-4, rtol=1e-4)


def _assert_generates(c: DecoderConfig, pruned: onnx.ModelProto) -> None:
    """A prefill with an empty past, then one decode step with its presents, give the full sequence's logits."""
    kv = c.kv_heads // 2
    past, present = cache_names(c)
    ids = _ids(c, 2, 6, seed=4)
    full = run(pruned, {"input_ids": ids, **empty_past(c, 2, kv)})["logits"]
    first = run(pruned, {"input_ids": ids[:, :5], **empty_past(c, 2, kv)})
    step = run(pruned, {"input_ids": ids[:, 5:], **{p: first[q] for p, q in zip(past, present)}})
    assert first[present[0]].shape == (2, kv, 5, c.head_dim)
    np.testing.assert_allclose(first["logits"], full[:, :5], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(step["logits"], full[:, 5:], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["gpt2_cache", "llama_cache"])
def test_exactness_with_cache_shrinks_past_and_present(name: str, exports: dict[str, Path]) -> None:
    zeroed, pruned, summary = _zeroed_and_cut(onnx.load(exports[name]), seed=2)
    _assert_exact_with_cache(_config(name), zeroed, pruned, summary)


@pytest.mark.parametrize("name", ["gpt2_cache", "llama_cache"])
def test_pruned_cache_model_prefill_then_decode_equals_full_sequence(name: str, exports: dict[str, Path]) -> None:
    _, pruned, summary = _zeroed_and_cut(onnx.load(exports[name]), seed=3)
    _assert_generates(_config(name), pruned)
    assert any("cache present.0.key is now" in n for n in summary.notes)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_dynamo_cache_export_prunes_heads_and_mlp_exactly_and_generates(family: str, tmp_path: Path) -> None:
    """torch.onnx's dynamo exporter (node names say nothing: groups are picked by size)."""
    pytest.importorskip("onnxscript")
    c = CONFIGS[family]
    model = onnx.load(export_decoder(tmp_path / "dynamo.onnx", c, cache=True, dynamo=True))
    _, a = _analysis(model)
    prunable = sorted(g.prunable for g in a.groups if g.prunable)
    assert prunable == sorted([c.kv_heads] * c.layers + [c.mlp] * c.layers), [(g.producers, g.reasons) for g in a.groups]
    zeroed, chosen = _zero_groups(model, lambda g: g.prunable > 0, seed=2)
    pruned, summary, _ = _cut(zeroed, chosen)
    _assert_exact_with_cache(c, zeroed, pruned, summary)
    _assert_generates(c, pruned)


VARIANTS = {
    "gqa_interleave": dataclasses.replace(LLAMA, kv_repeat="interleave", layers=1),
    "gqa_tile": dataclasses.replace(LLAMA, kv_repeat="tile", layers=1),
    "gpt2_qkv_slices": dataclasses.replace(GPT2, qkv_split="slice", layers=1),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variants_prune_heads_exactly_with_their_cache(variant: str, tmp_path: Path) -> None:
    """GQA's repeat_kv as repeat_interleave or Tile; GPT-2's fused q/k/v taken apart by Slices."""
    pytest.importorskip("torch")
    c = VARIANTS[variant]
    model = onnx.load(export_decoder(tmp_path / "gqa.onnx", c, cache=True))
    _, a = _analysis(model)
    assert [g.prunable for g in _kinds(a)["attention"]] == [c.kv_heads]
    zeroed, pruned, summary = _zeroed_and_cut(model, seed=5)
    _assert_exact_with_cache(c, zeroed, pruned, summary)


# --- pruning through the pipeline -----------------------------------------------------------------------


def _weights(model: onnx.ModelProto, pattern: str) -> int:
    """Parameters of the initializers read by the nodes whose names match ``pattern``."""
    sizes = {t.name: int(np.prod(t.dims)) for t in model.graph.initializer}
    used = {i for n in model.graph.node if re.search(pattern, n.name) for i in n.input if i in sizes}
    return sum(sizes[name] for name in used)


ATTENTION = r"/(attn/c_attn|attn/c_proj|q_proj|k_proj|v_proj|o_proj)/"
MLP = r"/blocks\.\d+/(c_fc|c_proj|gate_proj|up_proj|down_proj)/"


@pytest.mark.parametrize("name", ["gpt2_nocache", "llama_nocache"])
def test_ratio_half_keeps_at_most_60_percent_of_attention_and_mlp(name: str, exports: dict[str, Path],
                                                                     tmp_path: Path) -> None:
    c = _config(name)
    out = tmp_path / "out.onnx"
    result = prune(exports[name], out, PruneSpec(ratio=0.5, device="cpu", shapes={"input_ids": [1, 8]}))
    original, pruned = onnx.load(exports[name]), onnx.load(out)
    for pattern in (ATTENTION, MLP):
        assert 0 < _weights(pruned, pattern) <= 0.6 * _weights(original, pattern), pattern
    assert result.report["original"]["macs"] and result.report["pruned"]["macs"] < result.report["original"]["macs"]
    logits = run(pruned, {"input_ids": _ids(c, 2, 8)})["logits"]
    assert logits.shape == (2, 8, c.vocab) and np.all(np.isfinite(logits))


def test_analyze_reports_prunable_attention_without_shape(exports: dict[str, Path]) -> None:
    groups = analyze(exports["gpt2_nocache"])["groups"]
    heads = [g for g in groups if any("c_attn" in p for p in g["producers"])]
    assert [g["prunable"] for g in heads] == [GPT2.heads] * GPT2.layers


@pytest.mark.parametrize("past_len", [0, 3])
def test_pipeline_prunes_kv_groups_of_a_cache_model_and_reports_the_cache_shapes(
        past_len: int, exports: dict[str, Path], tmp_path: Path) -> None:
    """Verification feeds the cut model the kept heads of the past; the report's notes give the new cache shapes;
    MACs are known with --shape, also with the empty past of a prefill."""
    c = LLAMA
    past, present = cache_names(c)
    shapes = {"input_ids": [1, 4], **{n: [1, c.kv_heads, past_len, c.head_dim] for n in past}}
    out = tmp_path / "out.onnx"
    result = prune(exports["llama_cache"], out, PruneSpec(ratio=0.5, device="cpu", shapes=shapes))
    report = result.report
    assert report["pruned"]["macs"] and report["pruned"]["macs"] < report["original"]["macs"]
    for n in past:
        assert f"cache {n} is now ['batch', 1, 'past_seq', {c.head_dim}]" in report["notes"]
    for n in present:
        assert f"cache {n} is now ['batch', 1, 'total_seq', {c.head_dim}]" in report["notes"]
    assert report["cache"] == {**{n: ["batch", 1, "past_seq", c.head_dim] for n in past},
                               **{n: ["batch", 1, "total_seq", c.head_dim] for n in present}}
    step = run(onnx.load(out), {"input_ids": _ids(c, 2, 3), **empty_past(c, 2, 1)})
    assert step["logits"].shape == (2, 3, c.vocab) and step[present[0]].shape == (2, 1, 3, c.head_dim)


# --- the trained tiny LMs (tests/lms) ----------------------------------------------------------------------


def _lm_shapes(model: onnx.ModelProto, seq: int = 8, past: int = 3) -> dict[str, list[int]]:
    """--shape for every input of a trained LM's export: the attention mask spans past + seq."""
    shapes: dict[str, list[int]] = {}
    for vi in model.graph.input:
        dims = [d.dim_value for d in vi.type.tensor_type.shape.dim]
        if vi.name.startswith("past_key_values"):
            shapes[vi.name] = [1, dims[1], past, dims[3]]
        else:
            shapes[vi.name] = [1, seq + past if vi.name == "attention_mask" else seq]
    return shapes


@pytest.mark.parametrize("with_shape", [True, pytest.param(False, marks=pytest.mark.slow)])
@pytest.mark.parametrize("style", ["plain", "cache", pytest.param("dynamo", marks=pytest.mark.slow)])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_trained_lm_heads_kv_groups_and_mlp_are_prunable(kind: str, style: str, with_shape: bool,
                                                          lm_export: Callable[[str, str], Path]) -> None:
    """Without --shape the stand-ins find attention_mask's total = past + seq (and dynamo's one past per layer)."""
    from tests.lms.models import CONFIGS as LM_CONFIGS

    c = LM_CONFIGS[kind]
    model = onnx.load(lm_export(kind, style))
    _, a = _analysis(model, _lm_shapes(model) if with_shape else None)
    prunable = sorted(g.prunable for g in a.groups if g.prunable)
    assert prunable == sorted([c.kv_heads] * c.layers + [c.hidden] * c.layers), [
        (g.producers[:2], g.reasons[:1]) for g in a.groups if not g.prunable]
    if style != "plain":
        assert len(a.cache_io) == 4 * c.layers


def test_trained_lm_with_cache_prunes_kv_groups_and_measures_perplexity(
        lm_export: Callable[[str, str], Path], lm_tokens_npz: Callable[..., Path], tmp_path: Path) -> None:
    """The evaluation data holds an empty past with the original's heads: the cut model is measured through a
    view that keeps its heads of that past (``full_cache_inputs``); the written model takes its own cache."""
    src = lm_export("llama", "cache")
    model = onnx.load(src)
    out = tmp_path / "out.onnx"
    spec = PruneSpec(ratio=0.5, device="cpu", shapes=_lm_shapes(model), eval_data=str(lm_tokens_npz("llama", "cache", n=4, seq=32)),
                     metric="perplexity")
    report = prune(src, out, spec).report
    shown = report["metric"]["shown"]
    assert shown["label"] == "perplexity" and 1 < shown["original"] < shown["pruned"] < 1e4
    assert "cache past_key_values.0.key is now ['batch', 1, 'past', 24]" in report["notes"]
    pruned = onnx.load(out)
    feeds = {vi.name: np.zeros([1, 1, 0, 24], np.float32) for vi in pruned.graph.input if vi.name.startswith("past")}
    feeds.update(input_ids=_ids(DecoderConfig(vocab=512), 1, 5), attention_mask=np.ones((1, 5), np.int64),
                 position_ids=np.arange(5)[None])
    assert run(pruned, feeds)["logits"].shape == (1, 5, 512)
