"""Session fixtures for the trained tiny LMs (imported by ``tests/conftest.py``): exports built once from the
committed weights in a few seconds (the dynamo style takes ~40 s: only slow tests should ask for it)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.lms.tokens import SEQ, heldout_ids, write_tokens_npz


@pytest.fixture(scope="session")
def lm_export(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, str], Path]:
    """``lm_export("llama", "cache")`` -> the trained LM ``llama``/``gpt2`` exported in style ``plain`` (no cache),
    ``cache`` (TorchScript, ``past_key_values.*`` in, ``present.*`` out) or ``dynamo`` (same signature, dynamo=True).
    Built on first use, once per session; treat the file as read-only (copy it to edit)."""
    root = tmp_path_factory.mktemp("lms")
    built: dict[tuple[str, str], Path] = {}

    def get(kind: str, style: str) -> Path:
        if (kind, style) not in built:
            # imported here so that torch loads only in tests that use the LMs
            from tests.lms.exports import export

            built[(kind, style)] = export(kind, style, root / f"{kind}_{style}.onnx")
        return built[(kind, style)]

    return get


@pytest.fixture(scope="session")
def lm_tokens_npz(lm_export: Callable[[str, str], Path], tmp_path_factory: pytest.TempPathFactory
                  ) -> Callable[..., Path]:
    """``lm_tokens_npz("llama", "cache", n=16, seq=128, start=0)`` -> a DATA ``.npz`` of held-out ``input_ids
    [n, seq]`` with every other input that export takes (mask of ones, positions, empty past), for ``--calib``,
    ``--eval-data`` or ``--train-data``. Different ``start`` values give disjoint windows."""
    root = tmp_path_factory.mktemp("lm_tokens")

    def get(kind: str, style: str, n: int = 16, seq: int = SEQ, start: int = 0) -> Path:
        path = root / f"{kind}_{style}_{n}x{seq}_{start}.npz"
        if not path.exists():
            write_tokens_npz(path, heldout_ids(n, seq, start), lm_export(kind, style))
        return path

    return get
