"""Tiny random-weight decoder LMs in pure PyTorch, exported by torch.onnx (TorchScript, ``dynamo=False``; or dynamo).

Two families, each with and without a KV cache:

* ``gpt2``: learned positions, LayerNorm, Hugging Face's ``Conv1D`` layers (Gemm between Reshapes), fused
  ``c_attn`` (to 3·D, ``split`` into q/k/v), heads by
  ``view(x.size()[:-1] + (H, d))`` (a runtime target with the head count constant), the causal mask as
  ``where(mask, scores, min)``, merge by ``view(x.size()[:-2] + (H·d,))``, ``c_fc → GELU → c_proj``.
* ``llama``: RMSNorm, rotary embeddings (cos/sin tables gathered by position, ``rotate_half`` by
  Slice/Neg/Concat), grouped-query attention (4 query heads share 2 KV heads via ``repeat_kv`` = Unsqueeze,
  Expand, Reshape; or repeat_interleave, or Tile), heads by ``view(B, T, -1, d)``, merged by ``reshape(b, t, h * d)`` with h and d read from
  the shape, an additive causal mask, SwiGLU ``down(silu(gate)·up)``.

With a cache the graph reads ``past_key_values.{i}.key/value`` [B, kv_heads, P, d], concatenates them with the
new keys/values on the sequence axis and returns them as ``present.{i}.key/value``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class DecoderConfig:
    """Sizes of one tiny decoder; ``kv_heads`` < ``heads`` is grouped-query attention."""

    family: str = "gpt2"
    vocab: int = 61
    dim: int = 32
    heads: int = 4
    kv_heads: int = 4
    mlp: int = 64
    layers: int = 2
    max_pos: int = 32
    qkv_split: str = "split"
    """How GPT-2's fused c_attn output is taken apart: ``split`` (a Split op) or ``slice`` (three Slices)."""
    kv_repeat: str = "expand"
    """How query heads get their KV head: HF's ``expand`` + reshape ([k0, k0, k1, k1]), ``interleave``
    (``repeat_interleave``, the same order) or ``tile`` (``repeat``: [k0, k1, k0, k1])."""

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads


GPT2 = DecoderConfig("gpt2")
LLAMA = DecoderConfig("llama", heads=4, kv_heads=2, mlp=48)


def _modules(torch: Any) -> dict[str, Any]:
    nn, F = torch.nn, torch.nn.functional

    def causal(scores: Any, past: int) -> Any:
        t, total = scores.shape[-2], scores.shape[-1]
        rows = torch.arange(t).unsqueeze(1) + (total - t)
        return torch.arange(total).unsqueeze(0) > rows  # True where a key is in the future

    class Conv1D(nn.Module):
        """Hugging Face GPT-2's linear layer: ``addmm`` on the flattened tokens (a Gemm between Reshapes)."""

        def __init__(self, n_in: int, n_out: int) -> None:
            super().__init__()
            self.weight = nn.Parameter(0.2 * torch.randn(n_in, n_out))
            self.bias = nn.Parameter(0.1 * torch.randn(n_out))

        def forward(self, x: Any) -> Any:
            size_out = x.size()[:-1] + (self.weight.shape[1],)
            return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)

    class GPT2Attention(nn.Module):
        def __init__(self, c: DecoderConfig) -> None:
            super().__init__()
            self.h, self.d, self.dim, self.qkv_split = c.heads, c.head_dim, c.dim, c.qkv_split
            self.c_attn, self.c_proj = Conv1D(c.dim, 3 * c.dim), Conv1D(c.dim, c.dim)

        def split_heads(self, x: Any) -> Any:
            return x.view(x.size()[:-1] + (self.h, self.d)).permute(0, 2, 1, 3)

        def forward(self, x: Any, past: tuple[Any, Any] | None) -> tuple[Any, Any, Any]:
            qkv = self.c_attn(x)
            if self.qkv_split == "slice":
                q, k, v = qkv[..., : self.dim], qkv[..., self.dim : 2 * self.dim], qkv[..., 2 * self.dim :]
            else:
                q, k, v = qkv.split(self.dim, dim=2)
            q, k, v = self.split_heads(q), self.split_heads(k), self.split_heads(v)
            if past is not None:
                k, v = torch.cat([past[0], k], dim=-2), torch.cat([past[1], v], dim=-2)
            w = torch.matmul(q, k.transpose(-1, -2)) / float(self.d) ** 0.5
            w = torch.where(causal(w, 0), torch.tensor(torch.finfo(w.dtype).min), w)
            a = torch.matmul(w.softmax(-1), v).permute(0, 2, 1, 3).contiguous()
            a = a.view(a.size()[:-2] + (self.h * self.d,))
            return self.c_proj(a), k, v

    class GPT2Block(nn.Module):
        def __init__(self, c: DecoderConfig) -> None:
            super().__init__()
            self.ln_1, self.attn, self.ln_2 = nn.LayerNorm(c.dim), GPT2Attention(c), nn.LayerNorm(c.dim)
            self.c_fc, self.c_proj = Conv1D(c.dim, c.mlp), Conv1D(c.mlp, c.dim)

        def forward(self, x: Any, past: tuple[Any, Any] | None) -> tuple[Any, Any, Any]:
            a, k, v = self.attn(self.ln_1(x), past)
            x = x + a
            return x + self.c_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh")), k, v

    class RMSNorm(nn.Module):
        def __init__(self, dim: int) -> None:
            super().__init__()
            self.weight = nn.Parameter(1.0 + 0.1 * torch.randn(dim))

        def forward(self, x: Any) -> Any:
            return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))

    def rotate_half(x: Any) -> Any:
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    class LlamaAttention(nn.Module):
        def __init__(self, c: DecoderConfig) -> None:
            super().__init__()
            self.h, self.kvh, self.d, self.kv_repeat = c.heads, c.kv_heads, c.head_dim, c.kv_repeat
            self.q_proj = nn.Linear(c.dim, c.heads * c.head_dim, bias=False)
            self.k_proj = nn.Linear(c.dim, c.kv_heads * c.head_dim, bias=False)
            self.v_proj = nn.Linear(c.dim, c.kv_heads * c.head_dim, bias=False)
            self.o_proj = nn.Linear(c.heads * c.head_dim, c.dim, bias=False)

        def repeat_kv(self, x: Any) -> Any:
            b, kvh, t, d = x.shape
            rep = self.h // self.kvh
            if self.kv_repeat == "interleave":
                return torch.repeat_interleave(x, rep, dim=1)
            if self.kv_repeat == "tile":
                return x.repeat(1, rep, 1, 1)
            return x[:, :, None, :, :].expand(b, kvh, rep, t, d).reshape(b, kvh * rep, t, d)

        def forward(self, x: Any, cos: Any, sin: Any, past: tuple[Any, Any] | None) -> tuple[Any, Any, Any]:
            shape = (*x.shape[:-1], -1, self.d)
            q = self.q_proj(x).view(shape).transpose(1, 2)
            k = self.k_proj(x).view(shape).transpose(1, 2)
            v = self.v_proj(x).view(shape).transpose(1, 2)
            q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
            if past is not None:
                k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
            w = torch.matmul(q, self.repeat_kv(k).transpose(2, 3)) / float(self.d) ** 0.5
            w = w + causal(w, 0).to(w.dtype) * torch.finfo(w.dtype).min
            a = torch.matmul(w.softmax(-1), self.repeat_kv(v))
            b, h, t, d = a.shape
            return self.o_proj(a.transpose(1, 2).reshape(b, t, h * d)), k, v

    class LlamaBlock(nn.Module):
        def __init__(self, c: DecoderConfig) -> None:
            super().__init__()
            self.input_layernorm, self.self_attn = RMSNorm(c.dim), LlamaAttention(c)
            self.post_attention_layernorm = RMSNorm(c.dim)
            self.gate_proj = nn.Linear(c.dim, c.mlp, bias=False)
            self.up_proj = nn.Linear(c.dim, c.mlp, bias=False)
            self.down_proj = nn.Linear(c.mlp, c.dim, bias=False)

        def forward(self, x: Any, cos: Any, sin: Any, past: tuple[Any, Any] | None) -> tuple[Any, Any, Any]:
            a, k, v = self.self_attn(self.input_layernorm(x), cos, sin, past)
            x = x + a
            h = self.post_attention_layernorm(x)
            return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h)), k, v

    class Decoder(nn.Module):
        """``forward(input_ids, *past)`` → logits (and the presents when ``cache``)."""

        def __init__(self, c: DecoderConfig, cache: bool) -> None:
            super().__init__()
            self.c, self.cache = c, cache
            self.embed = nn.Embedding(c.vocab, c.dim)
            if c.family == "gpt2":
                self.wpe = nn.Embedding(c.max_pos, c.dim)
                self.blocks = nn.ModuleList(GPT2Block(c) for _ in range(c.layers))
                self.norm: Any = nn.LayerNorm(c.dim)
            else:
                self.blocks = nn.ModuleList(LlamaBlock(c) for _ in range(c.layers))
                self.norm = RMSNorm(c.dim)
                inv = 1.0 / (10000 ** (torch.arange(0, c.head_dim, 2).float() / c.head_dim))
                freqs = torch.outer(torch.arange(c.max_pos).float(), inv)
                emb = torch.cat([freqs, freqs], dim=-1)
                self.register_buffer("cos_table", emb.cos(), persistent=False)
                self.register_buffer("sin_table", emb.sin(), persistent=False)
            self.lm_head = nn.Linear(c.dim, c.vocab, bias=False)

        def forward(self, input_ids: Any, *flat_past: Any) -> Any:
            past_len = flat_past[0].shape[2] if flat_past else 0
            pos = torch.arange(input_ids.shape[1]) + past_len
            x = self.embed(input_ids)
            if self.c.family == "gpt2":
                x = x + self.wpe(pos)
            else:
                cos, sin = self.cos_table[pos][None, None], self.sin_table[pos][None, None]
            presents = []
            for i, block in enumerate(self.blocks):
                past = (flat_past[2 * i], flat_past[2 * i + 1]) if flat_past else None
                x, k, v = block(x, past) if self.c.family == "gpt2" else block(x, cos, sin, past)
                presents += [k, v]
            logits = self.lm_head(self.norm(x))
            return (logits, *presents) if self.cache else logits

    return {"Decoder": Decoder}


def cache_names(c: DecoderConfig) -> tuple[list[str], list[str]]:
    """(past input names, present output names), key then value per layer."""
    past = [f"past_key_values.{i}.{kind}" for i in range(c.layers) for kind in ("key", "value")]
    return past, [name.replace("past_key_values", "present") for name in past]


def export_decoder(path: Path, c: DecoderConfig, *, cache: bool, seed: int = 0, dynamo: bool = False) -> Path:
    """Build a random-weight decoder and export it with the TorchScript exporter (opset 17), or the dynamo one."""
    import torch

    torch.manual_seed(seed)
    model = _modules(torch)["Decoder"](c, cache).eval()
    ids = torch.randint(0, c.vocab, (2, 3))
    past_names, present_names = cache_names(c)
    if dynamo:
        return _export_dynamo(torch, model, path, c, ids, cache)
    dyn: dict[str, dict[int, str]] = {"input_ids": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"}}
    args: tuple[Any, ...] = (ids,)
    if cache:
        args += tuple(torch.randn(2, c.kv_heads, 2, c.head_dim) for _ in past_names)
        dyn.update({n: {0: "batch", 2: "past_seq"} for n in past_names})
        dyn.update({n: {0: "batch", 2: "total_seq"} for n in present_names})
    with torch.no_grad():
        torch.onnx.export(model, args, str(path), dynamo=False, opset_version=17,
                          input_names=["input_ids", *(past_names if cache else [])],
                          output_names=["logits", *(present_names if cache else [])], dynamic_axes=dyn)
    return path


def _export_dynamo(torch: Any, model: Any, path: Path, c: DecoderConfig, ids: Any, cache: bool) -> Path:
    """torch.export-based export: ``*flat_past`` gets its dynamic dims as one tuple."""
    past_names, present_names = cache_names(c)
    batch, seq, past = torch.export.Dim("batch"), torch.export.Dim("seq"), torch.export.Dim("past_seq")
    args: tuple[Any, ...] = (ids,)
    shapes: tuple[Any, ...] = ({0: batch, 1: seq},)
    if cache:
        args += tuple(torch.randn(2, c.kv_heads, 2, c.head_dim) for _ in past_names)
        shapes += (tuple({0: batch, 2: past} for _ in past_names),)
    with torch.no_grad():
        program = torch.onnx.export(model, args, dynamo=True, input_names=["input_ids", *(past_names if cache else [])],
                                    output_names=["logits", *(present_names if cache else [])], dynamic_shapes=shapes)
    program.save(str(path))
    return path


def empty_past(c: DecoderConfig, batch: int, kv_heads: int | None = None) -> dict[str, np.ndarray]:
    """The cache feeds of a prefill: zero-length past for every layer."""
    shape = (batch, c.kv_heads if kv_heads is None else kv_heads, 0, c.head_dim)
    return {name: np.zeros(shape, np.float32) for name in cache_names(c)[0]}
