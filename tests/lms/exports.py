"""The trained tiny LMs (``tests/lms/data``) loaded and exported to ONNX in the styles users produce.

- ``plain``: ``torch.onnx.export(dynamo=False)`` without a cache: ``input_ids [batch, seq]`` -> ``logits
  [batch, seq, vocab]``.
- ``cache``: the TorchScript exporter with a KV cache, as optimum lays it out: ``input_ids [batch, seq]``,
  ``attention_mask [batch, total]`` (total = past + seq), ``position_ids [batch, seq]``,
  ``past_key_values.{i}.key/value [batch, kv_heads, past, head_dim]`` -> ``logits``, ``present.{i}.key/value
  [batch, kv_heads, total, head_dim]``. Prefill feeds a past of length 0.
- ``dynamo``: ``torch.onnx.export(dynamo=True)`` (needs ``onnxscript``) of the same cache signature.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import torch

from tests.decoder_models import cache_names as decoder_cache_names
from tests.lms.models import CONFIGS, KINDS, TinyLM, load
from tests.lms.tokens import DATA

STYLES = ("plain", "cache", "dynamo")
OPSET = 17


@functools.cache
def weights(kind: str) -> dict[str, np.ndarray]:
    """The committed trained weights of ``kind`` (``llama`` or ``gpt2``)."""
    if kind not in KINDS:
        raise ValueError(f"unknown LM {kind!r}; choose one of {KINDS}")
    with np.load(DATA / f"{kind}.npz") as f:
        return {k: f[k] for k in f.files}


def trained(kind: str) -> TinyLM:
    """A fresh PyTorch copy of the trained LM ``kind`` in eval mode."""
    return load(kind, weights(kind))


def info() -> dict[str, object]:
    """``lms.json``: files, sizes, training steps and the held-out perplexities recorded when the LMs were built."""
    return json.loads((DATA / "lms.json").read_text())  # type: ignore[no-any-return]


def cache_names(kind: str) -> tuple[list[str], list[str]]:
    """(``past_key_values.{i}.key/value`` inputs, ``present.{i}.key/value`` outputs) in layer order."""
    return decoder_cache_names(CONFIGS[kind])  # type: ignore[arg-type]  # reads only ``layers``


class CachedLM(torch.nn.Module):
    """``forward(input_ids, attention_mask, position_ids, *past flat) -> (logits, *present flat)``: flat tensors,
    as the exporters need them."""

    def __init__(self, model: TinyLM) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        pairs = [(past[i], past[i + 1]) for i in range(0, len(past), 2)]
        logits, present = self.model(input_ids, attention_mask, position_ids, pairs)
        return (logits, *[t for kv in present for t in kv])


class PlainLM(torch.nn.Module):
    """``forward(input_ids) -> logits``."""

    def __init__(self, model: TinyLM) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids)[0]


def export(kind: str, style: str, path: Path) -> Path:
    """Write the trained LM ``kind`` as ONNX in ``style`` (``plain``, ``cache`` or ``dynamo``) to ``path``."""
    model = trained(kind)
    ids = torch.randint(0, CONFIGS[kind].vocab, (2, 5))
    if style == "plain":
        torch.onnx.export(PlainLM(model).eval(), (ids,), str(path), dynamo=False, opset_version=OPSET,
                          input_names=["input_ids"], output_names=["logits"],
                          dynamic_axes={"input_ids": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"}})
        return path
    if style not in STYLES:
        raise ValueError(f"unknown export style {style!r}; choose one of {STYLES}")
    past_names, present_names = cache_names(kind)
    c, past_len = CONFIGS[kind], 3  # traced with a non-empty past so no shape is specialised to 0
    feeds = {"input_ids": ids, "attention_mask": torch.ones(2, past_len + 5, dtype=torch.int64),
             "position_ids": (torch.arange(5) + past_len)[None].expand(2, 5).contiguous(),
             **{n: torch.randn(2, c.kv_heads, past_len, c.head_dim) for n in past_names}}
    inputs = ["input_ids", "attention_mask", "position_ids", *past_names]
    args = tuple(feeds[name] for name in inputs)
    flat = CachedLM(model).eval()
    if style == "cache":
        axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "total"},
                "position_ids": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"},
                **{n: {0: "batch", 2: "past"} for n in past_names}, **{n: {0: "batch", 2: "total"} for n in present_names}}
        torch.onnx.export(flat, args, str(path), dynamo=False, opset_version=OPSET, input_names=inputs,
                          output_names=["logits", *present_names], dynamic_axes=axes)
        return path
    return _export_dynamo(flat, args, inputs, ["logits", *present_names], path)


def _export_dynamo(flat: CachedLM, args: tuple[torch.Tensor, ...], inputs: list[str], outputs: list[str], path: Path) -> Path:
    auto = torch.export.Dim.AUTO  # the exporter finds total = past + seq itself
    shapes = ({0: auto, 1: auto},) * 3 + (({0: auto, 2: auto},) * (len(inputs) - 3),)  # *past is one tuple
    program = torch.onnx.export(flat, args, dynamic_shapes=shapes, input_names=inputs, output_names=outputs,
                                dynamo=True, opset_version=18, external_data=False, verbose=False)
    program.save(str(path), external_data=False)
    return path
