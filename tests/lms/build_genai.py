"""Build the onnxruntime-genai model-builder export of a tiny Llama-style GQA LM (``tests/lms/genai_llama/``).

Run once by hand, in an environment that has ``transformers``, ``safetensors`` and ``onnxruntime-genai``
(the tests never import them for building: they read the committed output)::

    python tests/lms/build_genai.py [--out tests/lms/genai_llama]

Writes a Hugging Face ``LlamaForCausalLM`` checkpoint (random weights, fixed seed; 4 query heads sharing 2 KV
heads, 2 layers, hidden 64, SwiGLU width 128, vocabulary 512) with a byte-level BPE tokenizer trained on a
standard-library file, then runs the genai builder (fp32, CPU EP). The builder's CPU style packs Q/K/V into
one MatMul and applies the rotary embedding inside com.microsoft GroupQueryAttention; its normalisations are
SimplifiedLayerNormalization and com.microsoft SkipSimplifiedLayerNormalization.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

OUT = Path(__file__).with_name("genai_llama")
SEED = 11
VOCAB = 512
LLAMA = {
    "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 128,
    "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False, "bos_token_id": 1,
    "eos_token_id": 2, "pad_token_id": 0,
}


def save_tokenizer(hf_dir: Path) -> None:
    """A byte-level BPE over one standard-library file, saved as a Hugging Face fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = (Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text()
    tok.train_from_iterator([text], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(hf_dir)


def save_checkpoint(hf_dir: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    model = LlamaForCausalLM(LlamaConfig(**LLAMA))
    with torch.no_grad():  # norms away from 1 so that their weights matter in tests
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(hf_dir, safe_serialization=True)
    save_tokenizer(hf_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir, cache = Path(tmp) / "hf", Path(tmp) / "cache"
        save_checkpoint(hf_dir)
        if args.out.exists():
            shutil.rmtree(args.out)
        subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o",
                        str(args.out), "-p", "fp32", "-e", "cpu", "-c", str(cache)], check=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
