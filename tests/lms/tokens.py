"""Token data for the tiny LMs: the committed held-out stream, ``[N, T]`` batches of it, ``.npz`` files for the CLI's
``--calib/--eval-data/--train-data``, the tokenizer, and the PyTorch perplexity everything is checked against."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
import onnx

from onnxprune.measure.metrics import TaskMetric
from onnxprune.spec import parse_metric

DATA = Path(__file__).resolve().parent / "data"
SEQ = 128


@functools.lru_cache(maxsize=1)
def heldout_stream() -> np.ndarray:
    """The held-out files' tokens (``build.HELDOUT_FILES``, never trained on) as one int64 stream."""
    with np.load(DATA / "heldout.npz") as f:
        return f["tokens"].astype(np.int64)


def windows(tokens: np.ndarray, seq: int = SEQ) -> np.ndarray:
    """Non-overlapping ``[N, seq]`` int64 windows of a token stream (a tail shorter than ``seq`` is dropped)."""
    n = len(tokens) // seq
    return np.ascontiguousarray(tokens[: n * seq].reshape(n, seq), dtype=np.int64)


def heldout_ids(n: int | None = None, seq: int = SEQ, start: int = 0) -> np.ndarray:
    """``input_ids [N, seq]`` int64: windows ``start .. start + n`` of the held-out stream (all when ``n`` is None).

    Raises:
        ValueError: the stream has fewer windows.
    """
    all_windows = windows(heldout_stream(), seq)
    stop = len(all_windows) if n is None else start + n
    if stop > len(all_windows):
        raise ValueError(f"held-out text has {len(all_windows)} windows of {seq} tokens, asked for {start}..{stop}")
    return all_windows[start:stop]


def tokenizer() -> object:
    """The byte-level BPE (``tokenizers.Tokenizer``) the LMs were trained with."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(DATA / "tokenizer.json"))


def feeds_for(model_path: Path, input_ids: np.ndarray) -> dict[str, np.ndarray]:
    """Every input of ``model_path`` for a prefill of ``input_ids``: ``attention_mask`` of ones, ``position_ids``
    0..T-1, and ``past_key_values.*`` of length 0 (their other dims read from the graph, a symbolic head size from the
    genai_config.json beside it)."""
    n, t = input_ids.shape
    model = onnx.load(str(model_path), load_external_data=False)
    init = {i.name for i in model.graph.initializer}
    feeds: dict[str, np.ndarray] = {}
    for inp in model.graph.input:
        if inp.name in init:
            continue
        if inp.name == "input_ids":
            feeds[inp.name] = input_ids.astype(np.int64)
        elif inp.name == "attention_mask":
            feeds[inp.name] = np.ones((n, t), np.int64)
        elif inp.name == "position_ids":
            feeds[inp.name] = np.broadcast_to(np.arange(t, dtype=np.int64), (n, t)).copy()
        elif inp.name.startswith("past_key_values."):
            dims = [d.dim_value for d in inp.type.tensor_type.shape.dim]
            feeds[inp.name] = np.zeros((n, dims[1], 0, dims[3] or _genai_head_size(model_path)), np.float32)
        else:
            raise ValueError(f"{model_path.name}: no LM feed for input {inp.name!r}")
    return feeds


def _genai_head_size(model_path: Path) -> int:
    """The head size of a genai-builder model, whose cache declares it as ``kv_cache_dim``: its genai_config.json's."""
    import json

    return int(json.loads((model_path.parent / "genai_config.json").read_text())["model"]["decoder"]["head_size"])


def write_tokens_npz(path: Path, input_ids: np.ndarray, model_path: Path | None = None) -> Path:
    """``input_ids`` as a DATA ``.npz`` (plus every other input of ``model_path``'s cache signature, see
    :func:`feeds_for`), usable as ``--calib``, ``--eval-data`` and ``--train-data``."""
    arrays = feeds_for(model_path, input_ids) if model_path is not None else {"input_ids": input_ids.astype(np.int64)}
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return path


def torch_perplexity(model: object, input_ids: np.ndarray, batch: int = 16) -> float:
    """exp(mean NLL) of each next token given the ones before it, over ``input_ids`` ``[N, T]`` (T - 1 per row)."""
    import torch
    from torch.nn import functional as F

    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(input_ids), batch):
            x = torch.from_numpy(np.asarray(input_ids[start:start + batch], dtype=np.int64))
            logits, _ = model(x)  # type: ignore[operator]
            nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).double(), x[:, 1:].reshape(-1),
                                  reduction="sum")
            total += float(nll)
            count += x[:, 1:].numel()
    return math.exp(total / count)


def onnx_perplexity(model_path: Path, input_ids: np.ndarray, batch: int = 32) -> float:
    """Perplexity of the ONNX LM ``model_path`` on ``input_ids [N, T]`` through ``--metric perplexity``'s own code,
    fed by :func:`feeds_for` so that a pruned cache export gets an empty past with its own head count."""
    feeds = feeds_for(model_path, input_ids)
    n = len(input_ids)
    task = TaskMetric.create(model_path, lambda: ({k: v[i:i + batch] for k, v in feeds.items()}
                                                  for i in range(0, n, batch)),
                             parse_metric("perplexity"), has_labels=False, device="cpu")
    assert task.shown is not None
    return task.shown.convert(task.baseline.value)
