"""Train the tokenizer and the two tiny LMs whose weights ``tests/lms/data/`` holds (tests never train).

``python -m tests.lms.build [--steps N]`` rewrites ``tokenizer.json``, ``heldout.npz`` (the held-out token stream),
``llama.npz``, ``gpt2.npz`` and ``lms.json`` (sizes, steps, seconds and held-out perplexity against a unigram
baseline). One CPU thread; a few minutes per model.

Text: fixed lists of ``.py`` files from Python's standard library, training and held-out files disjoint.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np

from tests.lms.tokens import DATA, SEQ, tokenizer, windows

VOCAB = 512
TRAIN_FILES = ("argparse.py", "textwrap.py", "functools.py", "inspect.py", "dataclasses.py", "typing.py", "enum.py",
               "pathlib.py", "shutil.py", "tempfile.py", "heapq.py", "difflib.py", "configparser.py",
               "logging/__init__.py", "random.py", "statistics.py", "contextlib.py")
HELDOUT_FILES = ("string.py", "csv.py", "json/encoder.py", "json/decoder.py", "fractions.py", "bisect.py", "abc.py")


def stdlib_text(files: tuple[str, ...]) -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return [(root / f).read_text(encoding="utf-8") for f in files]


def train_tokenizer(texts: list[str]) -> object:
    from tokenizers import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(texts, vocab_size=VOCAB, min_frequency=2, show_progress=False)
    return tok


def encode(tok: object, texts: list[str]) -> np.ndarray:
    return np.concatenate([np.asarray(e.ids, dtype=np.int64) for e in tok.encode_batch(texts)])  # type: ignore[attr-defined]


def training_windows(n: int, seed: int = 0) -> np.ndarray:
    """``n`` random ``[n, SEQ]`` windows (sorted, disjoint) of the text the LMs were trained on, e.g. ``--train-data``
    for distillation that never sees held-out text."""
    all_windows = windows(encode(tokenizer(), stdlib_text(TRAIN_FILES)), SEQ)
    pick = np.random.default_rng(seed).choice(len(all_windows), size=min(n, len(all_windows)), replace=False)
    return all_windows[np.sort(pick)]


def unigram_perplexity(train: np.ndarray, heldout: np.ndarray) -> float:
    """Perplexity of token frequencies from ``train`` (add-one smoothed) on ``heldout``: the bar a LM must clear."""
    counts = np.bincount(train, minlength=VOCAB) + 1.0
    logp = np.log(counts / counts.sum())
    return float(math.exp(-logp[heldout].mean()))


def train_model(kind: str, tokens: np.ndarray, heldout: np.ndarray, steps: int, batch: int = 16) -> tuple[object, dict[str, float]]:
    import torch
    from torch.nn import functional as F

    from tests.lms.models import build
    from tests.lms.tokens import torch_perplexity, windows

    model = build(kind)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.05)
    rng = np.random.default_rng(0)
    data = torch.from_numpy(tokens)
    start = time.time()
    model.train()
    for step in range(steps):
        starts = rng.integers(0, len(tokens) - SEQ - 1, batch)
        x = torch.stack([data[s:s + SEQ + 1] for s in starts])
        logits, _ = model(x[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 200 == 0:
            print(f"{kind} step {step} loss {loss.item():.3f} {time.time() - start:.0f}s", flush=True)
    seconds = time.time() - start
    model.eval()
    ppl = torch_perplexity(model, windows(heldout))
    return model, {"steps": steps, "train_seconds": round(seconds, 1), "heldout_perplexity": round(ppl, 3)}


def main(argv: list[str] | None = None) -> int:
    import torch

    from tests.lms.models import config_dict, state_to_numpy

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--kinds", nargs="+", default=["llama", "gpt2"])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    DATA.mkdir(exist_ok=True)
    train_texts, held_texts = stdlib_text(TRAIN_FILES), stdlib_text(HELDOUT_FILES)
    tok = train_tokenizer(train_texts)
    tok.save(str(DATA / "tokenizer.json"))  # type: ignore[attr-defined]
    train, held = encode(tok, train_texts), encode(tok, held_texts)
    np.savez_compressed(DATA / "heldout.npz", tokens=held.astype(np.int16))
    info_path = DATA / "lms.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    info.update({"python": sys.version.split()[0], "vocab": VOCAB, "seq": SEQ, "train_files": list(TRAIN_FILES),
                 "heldout_files": list(HELDOUT_FILES), "train_tokens": len(train),
                 "heldout_tokens": len(held), "unigram_perplexity": round(unigram_perplexity(train, held), 3)})
    for kind in args.kinds:
        model, stats = train_model(kind, train, held, args.steps)
        np.savez_compressed(DATA / f"{kind}.npz", **state_to_numpy(model))  # type: ignore[arg-type]
        info[kind] = {"config": config_dict(kind), "params": sum(p.numel() for p in model.parameters()), **stats}  # type: ignore[attr-defined]
        print(kind, info[kind], flush=True)
        info_path.write_text(json.dumps(info, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
