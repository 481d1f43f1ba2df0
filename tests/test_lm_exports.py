"""The trained tiny LMs (tests/lms): small, better than a unigram model on held-out text, and their ONNX exports
compute what PyTorch computes, with and without a KV cache."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from onnxprune.data import model_inputs, open_data
from tests.lms.tokens import (
    heldout_ids,
    heldout_stream,
    tokenizer,
    windows,
    write_tokens_npz,
)

KINDS = ["llama", "gpt2"]


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _torch_logits(kind: str, ids: np.ndarray) -> np.ndarray:
    import torch

    from tests.lms.exports import trained

    with torch.no_grad():
        return trained(kind)(torch.from_numpy(ids))[0].numpy()


def _decode_check(kind: str, path: Path) -> None:
    """Prefill with an empty past, then one decode step with the returned cache == the full sequence's logits."""
    from tests.lms.exports import cache_names
    from tests.lms.tokens import feeds_for

    session = _session(path)
    ids = heldout_ids(2, 40, start=3)
    full = _torch_logits(kind, ids)
    past_names, present_names = cache_names(kind)
    assert [o.name for o in session.get_outputs()] == ["logits", *present_names]
    prefill = feeds_for(path, ids[:, :-1])
    assert prefill[past_names[0]].shape[2] == 0
    out = session.run(None, prefill)
    np.testing.assert_allclose(out[0], full[:, :-1], atol=1e-4)
    assert out[1].shape[2] == ids.shape[1] - 1
    step = {"input_ids": ids[:, -1:], "attention_mask": np.ones(ids.shape, np.int64),
            "position_ids": np.full((2, 1), ids.shape[1] - 1, np.int64), **dict(zip(past_names, out[1:]))}
    np.testing.assert_allclose(session.run(["logits"], step)[0], full[:, -1:], atol=1e-4)


def test_trained_lms_are_small_and_beat_unigram() -> None:
    from tests.lms.exports import info, trained
    from tests.lms.tokens import torch_perplexity

    recorded = info()
    for kind in KINDS:
        model = trained(kind)
        assert sum(p.numel() for p in model.parameters()) <= 1_000_000
        ppl = torch_perplexity(model, heldout_ids(8, 128))
        assert ppl < recorded["unigram_perplexity"] / 3, (kind, ppl)  # type: ignore[operator]
        assert recorded[kind]["heldout_perplexity"] < recorded["unigram_perplexity"] / 3  # type: ignore[index]


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_recorded_heldout_perplexity_reproduces(kind: str) -> None:
    """lms.json's numbers are what the committed weights give on every held-out window."""
    from tests.lms.exports import info, trained
    from tests.lms.tokens import torch_perplexity

    recorded = info()[kind]["heldout_perplexity"]  # type: ignore[index]
    assert torch_perplexity(trained(kind), heldout_ids()) == pytest.approx(recorded, abs=2e-3)


def test_tokenizer_round_trips_and_heldout_is_its_vocabulary() -> None:
    tok = tokenizer()
    text = "def f(x):\n    return x + 1  # ü\n"
    assert tok.decode(tok.encode(text).ids) == text  # type: ignore[attr-defined]
    assert tok.get_vocab_size() == 512  # type: ignore[attr-defined]
    stream = heldout_stream()
    assert stream.min() >= 0 and stream.max() < 512 and len(stream) > 10_000
    assert windows(stream, 100).shape == (len(stream) // 100, 100)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("style", ["plain", "cache"])
def test_export_logits_match_torch(kind: str, style: str, lm_export: Callable[[str, str], Path]) -> None:
    from tests.lms.tokens import feeds_for

    path = lm_export(kind, style)
    ids = heldout_ids(3, 50)
    np.testing.assert_allclose(_session(path).run(["logits"], feeds_for(path, ids))[0], _torch_logits(kind, ids),
                               atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_cache_prefill_then_decode_matches_full_sequence(kind: str, lm_export: Callable[[str, str], Path]) -> None:
    _decode_check(kind, lm_export(kind, "cache"))


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_dynamo_export_matches_torch_with_cache(kind: str, lm_export: Callable[[str, str], Path]) -> None:
    _decode_check(kind, lm_export(kind, "dynamo"))


def test_token_npz_feeds_the_cache_model(lm_export: Callable[[str, str], Path], lm_tokens_npz: Callable[..., Path],
                                         tmp_path: Path) -> None:
    import onnx

    path = lm_export("gpt2", "cache")
    data = lm_tokens_npz("gpt2", "cache", n=4, seq=32, start=1)
    batch = next(open_data(data, model_inputs(onnx.load(str(path)))).batches(4))
    assert batch["input_ids"].shape == (4, 32) and batch["input_ids"].dtype == np.int64
    np.testing.assert_array_equal(batch["input_ids"], heldout_ids(4, 32, start=1))
    assert batch["past_key_values.0.key"].shape == (4, 4, 0, 24)
    plain = write_tokens_npz(tmp_path / "plain.npz", heldout_ids(2, 8))
    assert sorted(np.load(plain).files) == ["input_ids"]
