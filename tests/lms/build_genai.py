"""Build the onnxruntime-genai model-builder export of a tiny Llama-style GQA LM (``tests/lms/genai_llama/``).

Run once by hand, in an environment that has ``transformers``, ``safetensors`` and ``onnxruntime-genai``
(the tests never import them for building: they read the committed output)::

    python tests/lms/build_genai.py [--out tests/lms/genai_llama]
    python tests/lms/build_genai.py --trained [--out tests/lms/genai_llama_trained]

Writes a Hugging Face ``LlamaForCausalLM`` checkpoint (random weights, fixed seed; 4 query heads sharing 2 KV
heads, 2 layers, hidden 64, SwiGLU width 128, vocabulary 512) with a byte-level BPE tokenizer trained on a
standard-library file, then runs the genai builder (fp32, CPU EP). The builder's CPU style packs Q/K/V into
one MatMul and applies the rotary embedding inside com.microsoft GroupQueryAttention; its normalisations are
SimplifiedLayerNormalization and com.microsoft SkipSimplifiedLayerNormalization.

``--trained`` writes the trained tiny LM of ``tests/lms/data/llama.npz`` instead (into ``genai_llama_trained/``): a
Hugging Face ``Qwen2ForCausalLM`` checkpoint (q/k/v with bias, o_proj without, as ``tests/lms/models.py``; Llama's
``attention_bias`` would add an o_proj bias too), checked to give the PyTorch model's logits, with the LMs'
tokenizer (``tests/lms/data/tokenizer.json``, no special tokens; token 0 stands for bos/eos/pad).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

OUT = Path(__file__).with_name("genai_llama")
TRAINED_OUT = Path(__file__).with_name("genai_llama_trained")
REPO = Path(__file__).resolve().parents[2]
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


def trained_config() -> dict[str, object]:
    """The Qwen2Config of the trained tiny llama (sizes, eps and rope theta as ``tests/lms/models.py``)."""
    from tests.lms.models import CONFIGS, RMSNorm

    c = CONFIGS["llama"]
    return {"vocab_size": c.vocab, "hidden_size": c.dim, "intermediate_size": c.hidden, "num_hidden_layers": c.layers,
            "num_attention_heads": c.heads, "num_key_value_heads": c.kv_heads, "head_dim": c.head_dim,
            "max_position_embeddings": c.max_len, "rms_norm_eps": RMSNorm(1).eps, "rope_theta": c.rope_theta,
            "tie_word_embeddings": False, "use_sliding_window": False, "hidden_act": "silu",
            "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}


def hf_name(name: str) -> str:
    """``tests/lms/models.py`` parameter name -> the Hugging Face Qwen2/Llama one."""
    name = name.replace("embed.", "model.embed_tokens.").replace("blocks.", "model.layers.")
    for proj in ("gate_proj", "up_proj", "down_proj"):
        name = name.replace(f".{proj}.", f".mlp.{proj}.")
    return "model.norm.weight" if name == "norm.weight" else name


def save_trained_checkpoint(hf_dir: Path) -> None:
    """The trained llama as a Qwen2ForCausalLM checkpoint; raises unless HF's logits equal ours within 1e-4."""
    import torch
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    from tests.lms.exports import trained, weights
    from tests.lms.tokens import DATA, heldout_ids

    model = Qwen2ForCausalLM(Qwen2Config(**trained_config())).eval()
    model.load_state_dict({hf_name(k): torch.from_numpy(v) for k, v in weights("llama").items()}, strict=True)
    ids = torch.from_numpy(heldout_ids(4, 128))
    with torch.no_grad():
        diff = float((model(ids).logits - trained("llama")(ids)[0]).abs().max())
    if diff > 1e-4:
        raise RuntimeError(f"HF Qwen2 logits differ from tests/lms/models.py's by {diff}")
    print(f"HF Qwen2ForCausalLM logits equal the PyTorch model's (max |diff| {diff:.2e})")
    model.save_pretrained(hf_dir, safe_serialization=True)
    PreTrainedTokenizerFast(tokenizer_file=str(DATA / "tokenizer.json"),
                            model_max_length=trained_config()["max_position_embeddings"]).save_pretrained(hf_dir)


def keep_tokenizer(hf_dir: Path, out: Path) -> None:
    """The LMs' own tokenizer files in ``out``, and eos 0 in its genai_config.json: the builder loads the tokenizer
    as the model type's (Qwen2Tokenizer) and adds an ``<|endoftext|>`` token (id 512) outside the vocabulary."""
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(hf_dir / name, out / name)
    config_path = out / "genai_config.json"
    config = json.loads(config_path.read_text())
    config["model"]["eos_token_id"] = 0
    config_path.write_text(json.dumps(config, indent=4) + "\n")


HIDE_TORCHVISION = ("import transformers.utils as u, transformers.utils.import_utils as iu\n"
                    "u.is_torchvision_available = iu.is_torchvision_available = lambda: False\n")
"""Tells transformers that torchvision is absent: its image utilities (imported by the builder and by model classes,
never used here) fail to import where torchvision does not match torch."""
RUN_BUILDER = ("import runpy, sys\nsys.argv[0] = 'builder'\n"
               "runpy.run_module('onnxruntime_genai.models.builder', run_name='__main__')")
SEPARATE_ROPE = ("import sys, onnxruntime_genai.models as m\nsys.path.insert(0, m.__path__[0])\n"
                 "import builders.base\nbuilders.base.Model.is_fused_rope_supported = lambda self: False\n"
                 "builders.base.Model.is_packed_matmul_supported = lambda self: False\n")
"""The builder's DML-style attention for the trained LM (separate q/k/v MatMuls, com.microsoft RotaryEmbedding on q
and k before GroupQueryAttention, ``position_ids`` an input): onnxruntime's CPU GroupQueryAttention rotates only
head sizes that are multiples of 16 ("head_size shall be a multiple of 16"), and the trained LM's is 24. (A
separate rotary with packed Q/K/V gives RotaryEmbedding an empty input.)"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--trained", action="store_true", help="the trained tiny llama (tests/lms/data/llama.npz)")
    args = parser.parse_args(argv)
    out = args.out or (TRAINED_OUT if args.trained else OUT)
    sys.path.insert(0, str(REPO))
    exec(HIDE_TORCHVISION)  # noqa: S102  # a constant string
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir, cache = Path(tmp) / "hf", Path(tmp) / "cache"
        (save_trained_checkpoint if args.trained else save_checkpoint)(hf_dir)
        if out.exists():
            shutil.rmtree(out)
        builder = HIDE_TORCHVISION + (SEPARATE_ROPE if args.trained else "") + RUN_BUILDER
        subprocess.run([sys.executable, "-c", builder, "-i", str(hf_dir), "-o", str(out), "-p", "fp32", "-e", "cpu",
                        "-c", str(cache)], check=True)
        if args.trained:
            keep_tokenizer(hf_dir, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
