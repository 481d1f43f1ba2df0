"""onnxruntime-genai's ``genai_config.json``: a pruned model saved from a genai model directory gets its own.

The genai runtime allocates the KV cache from the config (``num_key_value_heads`` x ``head_size`` per layer,
one count for every layer, ``num_hidden_layers`` caches named ``past_key_values.0..L-1``) and loads the file it
names, so a cut that removes KV groups or (``--depth``) attention layers must be described there. The counts
are read from the saved graph's GroupQueryAttention nodes, the single source of truth.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from typing import Any

import onnx

log = logging.getLogger(__name__)

GENAI_CONFIG = "genai_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja")
"""Files a genai model directory holds for ``og.Tokenizer``; copied beside the output when present."""


@dataclass(frozen=True)
class GenaiConfigUpdate:
    """What :func:`write_genai_config` did: the config written (None when not), its changed keys
    (``decoder.<key>`` → (before, after)), the files copied, or why nothing was written."""

    path: str | None
    changed: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    copied: list[str] = field(default_factory=list)
    skipped: str | None = None

    def note(self) -> str:
        if self.path is None:
            return f"{GENAI_CONFIG} not written: {self.skipped}"
        changes = ", ".join(f"{k} {a} -> {b}" for k, a, b in ((k, *v) for k, v in self.changed.items())) or "no changes"
        return f"{GENAI_CONFIG} written beside the output ({changes}; copied {', '.join(self.copied) or 'nothing'})"


def head_counts(model: onnx.ModelProto) -> tuple[int, int] | None:
    """(num_heads, kv_num_heads) shared by every GroupQueryAttention node; None without such nodes.

    Raises:
        ValueError: the layers have different counts (one config cannot describe them).
    """
    counts = {(_attr(n, "num_heads"), _attr(n, "kv_num_heads")) for n in _attention_nodes(model)}
    if len(counts) > 1:
        raise ValueError(f"the layers keep different (query, KV) head counts {sorted(counts)}")
    return counts.pop() if counts else None


def _attention_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The GroupQueryAttention nodes: one per layer that keeps a KV cache."""
    return [n for n in model.graph.node if n.op_type == "GroupQueryAttention" and n.domain == "com.microsoft"]


def _attr(node: onnx.NodeProto, name: str) -> int:
    return next((int(a.i) for a in node.attribute if a.name == name), 0)


def write_genai_config(source_model: str, model: onnx.ModelProto, output_model: str) -> GenaiConfigUpdate | None:
    """Write ``genai_config.json`` beside ``output_model`` when one sits beside ``source_model``: the saved
    model's file name, head counts and cached layers, the tokenizer files copied. None when the source has no config."""
    src_dir = os.path.dirname(os.path.abspath(source_model))
    out_dir = os.path.dirname(os.path.abspath(output_model))
    src = os.path.join(src_dir, GENAI_CONFIG)
    if not os.path.isfile(src):
        return None
    if os.path.realpath(src_dir) == os.path.realpath(out_dir):
        return GenaiConfigUpdate(None, skipped="the output sits beside the input, whose config it would replace "
                                               "(write the output to another directory)")
    try:
        with open(src, encoding="utf-8") as f:
            config = json.load(f)
        decoder = config["model"]["decoder"]
        counts = head_counts(model)
    except (OSError, ValueError, KeyError, TypeError) as e:
        return GenaiConfigUpdate(None, skipped=f"{src}: {e}")
    wanted: dict[str, Any] = {"filename": os.path.basename(output_model)}
    if counts is not None:
        wanted.update(num_attention_heads=counts[0], num_key_value_heads=counts[1],
                      num_hidden_layers=len(_attention_nodes(model)))
    changed = {f"decoder.{k}": (decoder.get(k), v) for k, v in wanted.items() if decoder.get(k) != v}
    decoder.update(wanted)
    out = os.path.join(out_dir, GENAI_CONFIG)
    with open(out, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=4)
        f.write("\n")
    copied = [name for name in TOKENIZER_FILES if os.path.isfile(os.path.join(src_dir, name))]
    for name in copied:
        shutil.copyfile(os.path.join(src_dir, name), os.path.join(out_dir, name))
    log.info("wrote %s", out)
    return GenaiConfigUpdate(out, changed, copied)
