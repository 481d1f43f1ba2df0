"""Two tiny decoder LMs in plain PyTorch (no ``transformers``), shaped like the models users export.

- ``llama``: Llama/Qwen2 style: RMSNorm, rotary positions computed from ``position_ids`` (an ``inv_freq`` buffer,
  Sin/Cos in the graph, as Hugging Face exports it), grouped-query attention (4 query heads share 2 KV heads,
  expanded by ``repeat_kv``), SwiGLU MLP (``gate_proj``/``up_proj``/``down_proj``), untied ``lm_head``.
- ``gpt2``: GPT-2 style: learned positions, LayerNorm, fused ``c_attn`` (q, k, v in one Linear), ``c_proj``, GELU
  MLP ``c_fc``/``c_proj``, ``lm_head`` tied to the token embedding.

Both take an optional KV cache (``past`` as ``[(key, value)]`` per layer, ``[batch, kv_heads, past, head_dim]``)
and return ``(logits, present)``, so the same module exports with and without a cache.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

KINDS = ("llama", "gpt2")
Cache = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class LMConfig:
    """Sizes of one tiny LM (``kv_heads == heads`` for GPT-2's multi-head attention)."""

    kind: str
    vocab: int = 512
    dim: int = 96
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    hidden: int = 256
    max_len: int = 256
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads


CONFIGS = {
    "llama": LMConfig("llama"),
    "gpt2": LMConfig("gpt2", kv_heads=4, hidden=384),
}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def repeat_kv(x: torch.Tensor, times: int) -> torch.Tensor:
    """``[B, kv, S, D]`` -> ``[B, kv * times, S, D]``: each KV head serves ``times`` query heads (HF's repeat_kv)."""
    if times == 1:
        return x
    b, kv, s, d = x.shape
    return x[:, :, None, :, :].expand(b, kv, times, s, d).reshape(b, kv * times, s, d)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Eager attention ``softmax(q·kᵀ/√d + mask)·v`` over ``[B, H, T, D]``, merged back to ``[B, T, H·D]``."""
    scores = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(head_dim) + mask
    out = torch.matmul(torch.softmax(scores, dim=-1), v)
    b, h, t, d = out.shape
    return out.transpose(1, 2).reshape(b, t, h * d)


def causal_mask(attention_mask: torch.Tensor, t: int) -> torch.Tensor:
    """Additive ``[B, 1, T, P+T]`` mask: query i (at position P+i) sees keys ≤ P+i that ``attention_mask`` keeps."""
    total = attention_mask.shape[1]
    query = torch.arange(t, device=attention_mask.device) + (total - t)
    key = torch.arange(total, device=attention_mask.device)
    allowed = (key[None, :] <= query[:, None])[None, None] & attention_mask[:, None, None, :].bool()
    return torch.where(allowed, 0.0, torch.finfo(torch.float32).min)


class LlamaAttention(nn.Module):
    def __init__(self, c: LMConfig) -> None:
        super().__init__()
        self.c = c
        self.q_proj = nn.Linear(c.dim, c.heads * c.head_dim, bias=True)
        self.k_proj = nn.Linear(c.dim, c.kv_heads * c.head_dim, bias=True)
        self.v_proj = nn.Linear(c.dim, c.kv_heads * c.head_dim, bias=True)
        self.o_proj = nn.Linear(c.heads * c.head_dim, c.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                past: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        b, t, _ = x.shape
        c = self.c
        q = self.q_proj(x).view(b, t, c.heads, c.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, c.kv_heads, c.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, c.kv_heads, c.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if past is not None:
            k = torch.cat((past[0], k), dim=2)
            v = torch.cat((past[1], v), dim=2)
        times = c.heads // c.kv_heads
        return self.o_proj(attend(q, repeat_kv(k, times), repeat_kv(v, times), mask, c.head_dim)), (k, v)


class LlamaBlock(nn.Module):
    def __init__(self, c: LMConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(c.dim)
        self.self_attn = LlamaAttention(c)
        self.post_attention_layernorm = RMSNorm(c.dim)
        self.gate_proj = nn.Linear(c.dim, c.hidden, bias=False)
        self.up_proj = nn.Linear(c.dim, c.hidden, bias=False)
        self.down_proj = nn.Linear(c.hidden, c.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                past: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        h, present = self.self_attn(self.input_layernorm(x), cos, sin, mask, past)
        x = x + h
        y = self.post_attention_layernorm(x)
        return x + self.down_proj(F.silu(self.gate_proj(y)) * self.up_proj(y)), present


class GPT2Block(nn.Module):
    def __init__(self, c: LMConfig) -> None:
        super().__init__()
        self.c = c
        self.ln_1 = nn.LayerNorm(c.dim)
        self.c_attn = nn.Linear(c.dim, 3 * c.dim)
        self.attn_proj = nn.Linear(c.dim, c.dim)
        self.ln_2 = nn.LayerNorm(c.dim)
        self.c_fc = nn.Linear(c.dim, c.hidden)
        self.c_proj = nn.Linear(c.hidden, c.dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        b, t, _ = x.shape
        c = self.c
        q, k, v = self.c_attn(self.ln_1(x)).split(c.dim, dim=2)
        q, k, v = (z.view(b, t, c.heads, c.head_dim).transpose(1, 2) for z in (q, k, v))
        if past is not None:
            k = torch.cat((past[0], k), dim=2)
            v = torch.cat((past[1], v), dim=2)
        x = x + self.attn_proj(attend(q, k, v, mask, c.head_dim))
        return x + self.c_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh")), (k, v)


class TinyLM(nn.Module):
    """``forward(input_ids, attention_mask=None, position_ids=None, past=None) -> (logits, present)``."""

    def __init__(self, c: LMConfig) -> None:
        super().__init__()
        if c.kind not in KINDS:
            raise ValueError(f"unknown LM kind {c.kind!r}; choose one of {KINDS}")
        self.c = c
        self.embed = nn.Embedding(c.vocab, c.dim)
        if c.kind == "llama":
            self.blocks = nn.ModuleList(LlamaBlock(c) for _ in range(c.layers))
            self.norm: nn.Module = RMSNorm(c.dim)
            self.lm_head = nn.Linear(c.dim, c.vocab, bias=False)
            inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, c.head_dim, 2, dtype=torch.float32) / c.head_dim))
            self.register_buffer("inv_freq", inv_freq, persistent=False)
        else:
            self.blocks = nn.ModuleList(GPT2Block(c) for _ in range(c.layers))
            self.norm = nn.LayerNorm(c.dim)
            self.wpe = nn.Embedding(c.max_len, c.dim)
            self.lm_head = nn.Linear(c.dim, c.vocab, bias=False)
            self.lm_head.weight = self.embed.weight

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past: Cache | None = None) -> tuple[torch.Tensor, Cache]:
        b, t = input_ids.shape
        past_len = 0 if past is None else past[0][0].shape[2]
        if attention_mask is None:
            attention_mask = torch.ones(b, past_len + t, dtype=torch.int64, device=input_ids.device)
        if position_ids is None:
            position_ids = (torch.arange(t, device=input_ids.device) + past_len)[None].expand(b, t)
        mask = causal_mask(attention_mask, t)
        x = self.embed(input_ids)
        present: Cache = []
        if self.c.kind == "llama":
            freqs = position_ids[:, :, None].float() * self.inv_freq[None, None, :]
            emb = torch.cat((freqs, freqs), dim=-1)[:, None]
            cos, sin = emb.cos(), emb.sin()
            for i, block in enumerate(self.blocks):
                x, kv = block(x, cos, sin, mask, None if past is None else past[i])
                present.append(kv)
        else:
            x = x + self.wpe(position_ids)
            for i, block in enumerate(self.blocks):
                x, kv = block(x, mask, None if past is None else past[i])
                present.append(kv)
        return self.lm_head(self.norm(x)), present


def build(kind: str, seed: int = 0) -> TinyLM:
    """A freshly initialised model of ``kind`` (GPT-2-style init: normal(0, 0.02))."""
    torch.manual_seed(seed)
    model = TinyLM(CONFIGS[kind])
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            nn.init.normal_(p, std=0.02)
        elif name.endswith("bias"):
            nn.init.zeros_(p)
    return model


def state_to_numpy(model: TinyLM) -> dict[str, np.ndarray]:
    """Parameters as float32 arrays (the tied GPT-2 head is stored once, under ``embed.weight``)."""
    return {k: v.detach().cpu().numpy().astype(np.float32) for k, v in model.state_dict().items()
            if not (model.c.kind == "gpt2" and k == "lm_head.weight")}


def load(kind: str, weights: dict[str, np.ndarray]) -> TinyLM:
    """The model of ``kind`` with ``weights`` (from :func:`state_to_numpy`), in eval mode."""
    model = TinyLM(CONFIGS[kind])
    state = {k: torch.from_numpy(np.asarray(v)) for k, v in weights.items()}
    if kind == "gpt2":
        state["lm_head.weight"] = state["embed.weight"]
    model.load_state_dict(state)
    return model.eval()


def config_dict(kind: str) -> dict[str, object]:
    return asdict(CONFIGS[kind])
