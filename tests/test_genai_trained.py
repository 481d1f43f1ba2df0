"""Issue 11's perplexity targets on the onnxruntime-genai model builder's export of the *trained* tiny llama.

``tests/lms/genai_llama_trained/`` was written once by ``tests/lms/build_genai.py --trained``: the weights of
``tests/lms/data/llama.npz`` as a Hugging Face Qwen2ForCausalLM checkpoint (its logits checked equal to
``tests/lms/models.py``'s), run through the builder (fp32, CPU: packed Q/K/V with bias, rotary inside
com.microsoft GroupQueryAttention, Skip/SimplifiedLayerNormalization). Its held-out perplexity equals the PyTorch
model's; pruned to 0.7 of params with 300 distillation steps (and ``--depth 1``), as ``benchmarks/lm_prune.py``
runs the other export styles, it keeps perplexity within 1.15x (1.3x) on windows no run saw, and generates
through onnxruntime-genai.
"""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path
from types import ModuleType

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnxprune.pipeline import prune
from tests.lms.exports import trained
from tests.lms.generate import greedy
from tests.lms.tokens import (
    SEQ,
    feeds_for,
    heldout_ids,
    onnx_perplexity,
    torch_perplexity,
)


def _lm_prune() -> ModuleType:
    """benchmarks/lm_prune.py as a module (benchmarks/ is not a package)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "lm_prune.py"
    spec = importlib.util.spec_from_file_location("lm_prune", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["lm_prune"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


LM_PRUNE = _lm_prune()
TEST = LM_PRUNE.TEST
MODEL_DIR = Path(__file__).parent / "lms" / "genai_llama_trained"
MODEL = MODEL_DIR / "model.onnx"


def _test_ids(n: int | None = None) -> np.ndarray:
    """Held-out windows that neither calibration, validation nor training uses (``lm_prune.TEST``)."""
    return heldout_ids(n if n is not None else TEST[1] - TEST[0], SEQ, TEST[0])


def test_builder_model_is_the_trained_llama_in_contrib_ops() -> None:
    ops = {(n.domain, n.op_type) for n in onnx.load(MODEL, load_external_data=False).graph.node}
    assert {("com.microsoft", "GroupQueryAttention"), ("com.microsoft", "SkipSimplifiedLayerNormalization"),
            ("", "SimplifiedLayerNormalization")} <= ops
    assert {i.name for i in onnx.load(MODEL, load_external_data=False).graph.input} >= {"input_ids", "attention_mask",
                                                                                         "past_key_values.3.value"}


def test_builder_model_perplexity_equals_the_torch_models() -> None:
    ids = _test_ids(32)
    ours, theirs = onnx_perplexity(MODEL, ids), torch_perplexity(trained("llama"), ids)
    assert ours < 40  # trained, not random (vocabulary 512)
    assert abs(ours / theirs - 1) < 0.01, (ours, theirs)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return LM_PRUNE.write_data(MODEL, tmp_path_factory.mktemp("genai_trained_data"))


@pytest.fixture(scope="module")
def original_perplexity() -> float:
    return onnx_perplexity(MODEL, _test_ids())


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["width", "depth"])
def test_pruned_and_distilled_keeps_perplexity_and_generates(mode: str, data: dict[str, Path],
                                                             original_perplexity: float, tmp_path: Path) -> None:
    """``--target-params 0.7`` (or ``--depth 1``) ``--criterion wanda --finetune-steps 300 --metric perplexity``."""
    out = tmp_path / "small.onnx"
    start = time.perf_counter()
    report = prune(MODEL, out, LM_PRUNE.Config("llama", "genai", "wanda", mode).spec(data)).report
    wall = time.perf_counter() - start
    kept = report["pruned"]["params"] / report["original"]["params"]
    ratio = onnx_perplexity(out, _test_ids()) / original_perplexity
    print(f"genai trained llama {mode}: params kept {kept:.3f}, perplexity {original_perplexity:.2f} -> "
          f"{ratio * original_perplexity:.2f} (ratio {ratio:.3f}), prune wall {wall:.0f} s")
    if mode == "width":
        assert kept <= 0.7 + 0.01
    assert ratio <= LM_PRUNE.TARGETS[mode]

    prompt = [int(t) for t in _test_ids(1)[0, :8]]
    sequence = greedy(tmp_path, prompt, 24)
    assert sequence[:8] == prompt and len(sequence) > 8
    ids = np.array([sequence], np.int64)
    logits = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(
        ["logits"], feeds_for(out, ids))[0]
    assert sequence[8:] == [int(t) for t in logits[0, 7:-1].argmax(-1)]  # genai's greedy tokens are the model's
