"""Issue 11's "Done means" on the trained tiny Llama (plain export): 0.7 of params, 300 distillation steps, held-out
perplexity within 1.15× of the original's. ``benchmarks/lm_prune.py`` measures every LM, style and criterion."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from onnxprune.pipeline import prune
from onnxprune.spec import PruneSpec
from tests.lms.build import training_windows
from tests.lms.tokens import heldout_ids, onnx_perplexity, write_tokens_npz


@pytest.mark.slow  # ~2 CPU minutes: calibration, measured allocation, 300 fine-tuning steps of 8 windows
def test_llama_at_0_7_params_after_300_distillation_steps_stays_within_1_15x(
        lm_export: Callable[[str, str], Path], lm_tokens_npz: Callable[..., Path], tmp_path: Path) -> None:
    model = lm_export("llama", "plain")
    calib, valid = (lm_tokens_npz("llama", "plain", n=32, start=start) for start in (0, 32))
    train = write_tokens_npz(tmp_path / "train.npz", training_windows(512), model)
    spec = PruneSpec(criterion="wanda", target_params=0.7, calib=str(calib), finetune_steps=300, train_data=str(train),
                     batch_size=8, eval_data=str(valid), metric="perplexity", device="cpu")
    out = tmp_path / "small.onnx"
    report = prune(model, out, spec).report
    kept = report["pruned"]["params"] / report["original"]["params"]
    assert 0.65 <= kept <= 0.705
    test = heldout_ids(96, start=64)  # windows neither the calibration nor the allocation saw
    original, pruned = onnx_perplexity(model, test), onnx_perplexity(out, test)
    assert original < 25  # the trained model (held-out perplexity ~19.5), not a broken export
    assert pruned / original <= 1.15, (original, pruned)


@pytest.mark.slow  # ~1 CPU minute: the measured allocation cuts KV groups of a cache export many times
def test_budget_allocation_measures_cut_cache_exports_on_the_originals_data(
        lm_export: Callable[[str, str], Path], lm_tokens_npz: Callable[..., Path], tmp_path: Path) -> None:
    """Every candidate cut is measured on data holding the original's empty past (all KV heads): the candidate
    reads it through a view that keeps its own heads, as the final measurement does."""
    model = lm_export("llama", "cache")
    calib, valid = (lm_tokens_npz("llama", "cache", n=4, seq=32, start=start) for start in (0, 4))
    spec = PruneSpec(criterion="wanda", target_params=0.7, calib=str(calib), eval_data=str(valid),
                     metric="perplexity", device="cpu")
    report = prune(model, tmp_path / "small.onnx", spec).report
    assert report["pruned"]["params"] / report["original"]["params"] <= 0.705
    assert "allocation measured by" in " ".join(report["notes"])
    assert report["metric"]["shown"]["pruned"] < 4 * report["metric"]["shown"]["original"]
