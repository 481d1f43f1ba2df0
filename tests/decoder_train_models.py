"""Tiny random-weight decoder LMs for the training tests, exported by torch.onnx (TorchScript, ``dynamo=False``).

Unlike ``tests/decoder_models.py`` (pruning), these keep the buffers a fine-tuning run must leave alone in the
graph as Hugging Face models do:

* ``llama``: RMSNorm (``x · rsqrt(mean(x²) + eps) · w``), grouped-query attention (4 query heads, 2 KV heads,
  ``repeat_kv`` by Expand/Reshape), rotary embeddings computed at run time from the ``inv_freq`` buffer
  (``inv_freq ⊗ positions`` → Concat → Cos/Sin, ``rotate_half`` by Slice/Neg/Concat), an additive causal mask
  built from ``torch.full(-inf).triu(1)`` (Trilu), SwiGLU ``down(silu(gate) · up)``, untied LM head.
* ``gpt2``: learned token and position embeddings, LayerNorm, fused ``c_attn`` + ``split``, the causal mask
  from a registered boolean ``bias`` buffer (``where(mask, w, finfo.min)``) or ``masked_fill`` or a
  ``tril`` of ones (``mask`` option), tanh or erf GELU (``gelu`` option), tied LM head.

With ``cache=True`` the graph also reads ``past_key_values.{i}.key/value`` ``[B, kv_heads, P, d]``, concatenates
them with the new keys/values and returns ``present.{i}.key/value``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class TinyLM:
    """Sizes and style options of one tiny decoder."""

    family: str = "llama"
    vocab: int = 53
    dim: int = 32
    heads: int = 4
    kv_heads: int = 2
    mlp: int = 48
    layers: int = 2
    max_pos: int = 16
    mask: str = "where"  # gpt2: where | masked_fill | tril
    gelu: str = "tanh"  # gpt2: tanh | erf

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads


LLAMA = TinyLM("llama")
GPT2 = TinyLM("gpt2", heads=4, kv_heads=4, mlp=64)


def _modules(torch: Any, c: TinyLM) -> Any:
    nn, F = torch.nn, torch.nn.functional
    d = c.head_dim

    class RMSNorm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(1.0 + 0.1 * torch.randn(c.dim))

        def forward(self, x: Any) -> Any:
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight

    def rotate_half(x: Any) -> Any:
        return torch.cat((-x[..., d // 2:], x[..., : d // 2]), dim=-1)

    def attend(q: Any, k: Any, v: Any, past: tuple[Any, Any] | None, causal: str) -> tuple[Any, Any, Any]:
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        present_k, present_v = k, v
        rep = c.heads // k.shape[1]
        if rep > 1:  # repeat_kv as transformers writes it
            b, h, s, hd = k.shape
            k = k[:, :, None].expand(b, h, rep, s, hd).reshape(b, h * rep, s, hd)
            v = v[:, :, None].expand(b, h, rep, s, hd).reshape(b, h * rep, s, hd)
        w = q @ k.transpose(-1, -2) / (d ** 0.5)
        t, s = w.shape[-2], w.shape[-1]
        if causal == "triu":
            w = w + torch.full((t, s), float("-inf")).triu(s - t + 1)
        elif causal == "tril":
            keep = torch.tril(torch.ones(t, s), diagonal=s - t)
            w = w.masked_fill(keep == 0, float("-inf"))
        elif causal == "masked_fill":
            i = torch.arange(t)[:, None] + (s - t)
            w = w.masked_fill(torch.arange(s)[None, :] > i, torch.finfo(w.dtype).min)
        else:  # where with the registered bias buffer, as GPT-2 does
            w = torch.where(self_bias[:, :, s - t:s, :s], w, torch.tensor(torch.finfo(w.dtype).min))
        return F.softmax(w, dim=-1) @ v, present_k, present_v

    self_bias = torch.tril(torch.ones(c.max_pos, c.max_pos, dtype=torch.bool)).view(1, 1, c.max_pos, c.max_pos)

    class LlamaBlock(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln1, self.ln2 = RMSNorm(), RMSNorm()
            self.q = nn.Linear(c.dim, c.heads * d, bias=True)
            self.k = nn.Linear(c.dim, c.kv_heads * d, bias=True)
            self.v = nn.Linear(c.dim, c.kv_heads * d, bias=True)
            self.o = nn.Linear(c.heads * d, c.dim, bias=False)
            self.gate = nn.Linear(c.dim, c.mlp, bias=False)
            self.up = nn.Linear(c.dim, c.mlp, bias=False)
            self.down = nn.Linear(c.mlp, c.dim, bias=False)

        def forward(self, x: Any, cos: Any, sin: Any, past: tuple[Any, Any] | None) -> tuple[Any, Any, Any]:
            b, t, _ = x.shape
            h = self.ln1(x)
            q = self.q(h).view(b, t, c.heads, d).transpose(1, 2)
            k = self.k(h).view(b, t, c.kv_heads, d).transpose(1, 2)
            v = self.v(h).view(b, t, c.kv_heads, d).transpose(1, 2)
            q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
            a, pk, pv = attend(q, k, v, past, "triu")
            x = x + self.o(a.transpose(1, 2).reshape(b, t, c.heads * d))
            h = self.ln2(x)
            return x + self.down(F.silu(self.gate(h)) * self.up(h)), pk, pv

    class GPT2Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln_1, self.ln_2 = nn.LayerNorm(c.dim), nn.LayerNorm(c.dim)
            self.c_attn = nn.Linear(c.dim, 3 * c.dim)
            self.c_proj = nn.Linear(c.dim, c.dim)
            self.c_fc = nn.Linear(c.dim, c.mlp)
            self.mlp_proj = nn.Linear(c.mlp, c.dim)

        def forward(self, x: Any, past: tuple[Any, Any] | None) -> tuple[Any, Any, Any]:
            b, t, _ = x.shape
            q, k, v = self.c_attn(self.ln_1(x)).split(c.dim, dim=2)
            q, k, v = (z.view(b, t, c.heads, d).transpose(1, 2) for z in (q, k, v))
            a, pk, pv = attend(q, k, v, past, c.mask)
            x = x + self.c_proj(a.transpose(1, 2).reshape(b, t, c.dim))
            gelu = F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh" if c.gelu == "tanh" else "none")
            return x + self.mlp_proj(gelu), pk, pv

    class LM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(c.vocab, c.dim)
            llama = c.family == "llama"
            self.blocks = nn.ModuleList([LlamaBlock() if llama else GPT2Block() for _ in range(c.layers)])
            if llama:
                self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, d, 2).float() / d))
                self.norm = RMSNorm()
                self.head = nn.Linear(c.dim, c.vocab, bias=False)
            else:
                self.wpe = nn.Embedding(c.max_pos, c.dim)
                self.norm = nn.LayerNorm(c.dim)

        def forward(self, input_ids: Any, *past: Any) -> Any:
            t = input_ids.shape[1]
            start = past[0].shape[2] if past else 0
            pos = torch.arange(start, start + t).unsqueeze(0)
            x = self.embed(input_ids)
            presents: list[Any] = []
            if c.family == "llama":
                freqs = self.inv_freq[None, :, None].float() @ pos[:, None, :].float()  # [1, d/2, T]
                emb = torch.cat((freqs, freqs), dim=1).transpose(1, 2)
                cos, sin = emb.cos()[:, None], emb.sin()[:, None]
            else:
                x = x + self.wpe(pos)
            for i, block in enumerate(self.blocks):
                pair = (past[2 * i], past[2 * i + 1]) if past else None
                x, pk, pv = block(x, cos, sin, pair) if c.family == "llama" else block(x, pair)
                presents += [pk, pv]
            x = self.norm(x)
            logits = self.head(x) if c.family == "llama" else x @ self.embed.weight.t()
            return (logits, *presents) if past else logits

    return LM


def cache_names(c: TinyLM) -> tuple[list[str], list[str]]:
    """``past_key_values.*`` input names and ``present.*`` output names, in graph order."""
    past = [f"past_key_values.{i}.{kv}" for i in range(c.layers) for kv in ("key", "value")]
    return past, [p.replace("past_key_values", "present") for p in past]


@dataclass(frozen=True)
class ExportedLM:
    """An exported tiny LM: its file and what PyTorch counted as parameters (buffers excluded)."""

    path: Path
    parameters: int  # elements of every nn.Parameter


def export_lm(path: Path, c: TinyLM, *, cache: bool = False, seed: int = 0, opset: int = 17) -> ExportedLM:
    """Export a random-weight ``c`` to ``path`` (symbolic batch and sequence; past length symbolic too)."""
    import torch

    torch.manual_seed(seed)
    model = _modules(torch, c)().eval()
    with torch.no_grad():  # distinct norm parameters: the exporter merges equal initializers into one
        for mod in model.modules():
            if isinstance(mod, torch.nn.LayerNorm):
                mod.weight.add_(0.1 * torch.randn_like(mod.weight))
                mod.bias.add_(0.1 * torch.randn_like(mod.bias))
    ids = torch.randint(0, c.vocab, (2, 6))
    past_names, present_names = cache_names(c) if cache else ([], [])
    past = tuple(torch.zeros(2, c.kv_heads, 0, c.head_dim) for _ in past_names)
    axes: dict[str, dict[int, str]] = {"input_ids": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"}}
    axes.update({n: {0: "batch", 2: "past"} for n in past_names})
    axes.update({n: {0: "batch", 2: "total"} for n in present_names})
    with torch.no_grad():
        torch.onnx.export(model, (ids, *past), str(path), input_names=["input_ids", *past_names],
                          output_names=["logits", *present_names], dynamic_axes=axes, opset_version=opset,
                          dynamo=False)
    return ExportedLM(path, sum(p.numel() for p in model.parameters()))


def token_feeds(c: TinyLM, n: int, t: int, *, cache: bool = False, seed: int = 0) -> dict[str, np.ndarray]:
    """Random token ids ``[n, t]`` (and empty caches at past length 0 when ``cache``)."""
    rng = np.random.default_rng(seed)
    feeds = {"input_ids": rng.integers(0, c.vocab, (n, t)).astype(np.int64)}
    if cache:
        feeds.update({p: np.zeros((n, c.kv_heads, 0, c.head_dim), np.float32) for p in cache_names(c)[0]})
    return feeds
