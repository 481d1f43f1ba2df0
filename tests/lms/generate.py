"""Greedy generation through onnxruntime-genai (installed with ``--no-deps``; tests skip without it)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


def greedy(directory: Path, prompt: list[int], length: int) -> list[int]:
    """The greedy sequence (prompt included) of ``length`` tokens that the genai model in ``directory`` writes."""
    og = pytest.importorskip("onnxruntime_genai")
    model = og.Model(str(directory))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=length, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array([prompt], dtype=np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    return [int(t) for t in generator.get_sequence(0)]
