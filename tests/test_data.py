"""The DATA reader: .npz, directories of .npz, random draws, and clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from onnxprune.data import InputSpec, open_data
from onnxprune.errors import BadInputError

SPEC = [InputSpec("input", ("N", 1, 8, 8), np.dtype(np.float32))]


def _write(path: Path, n: int, labels: bool = True, start: int = 0) -> None:
    x = np.arange(start, start + n, dtype=np.float64)[:, None, None, None] * np.ones((1, 1, 8, 8))
    arrays = {"input": x}
    if labels:
        arrays["labels"] = np.arange(start, start + n) % 10
    np.savez(path, **arrays)


def test_npz_batches_cast_and_labels(tmp_path: Path) -> None:
    _write(tmp_path / "d.npz", 10)
    src = open_data(tmp_path / "d.npz", SPEC)
    assert src.count() == 10 and src.has_labels
    batches = list(src.batches(4, with_labels=True))
    assert [len(b["input"]) for b in batches] == [4, 4, 2]
    assert batches[0]["input"].dtype == np.float32 and batches[0]["labels"].dtype == np.int64
    assert "labels" not in next(src.batches(4))


def test_directory_streams_files_in_order_with_limit(tmp_path: Path) -> None:
    _write(tmp_path / "a.npz", 5, start=0)
    _write(tmp_path / "b.npz", 5, start=5)
    src = open_data(tmp_path, SPEC, limit=7)
    assert src.count() == 7
    seen = np.concatenate([b["input"][:, 0, 0, 0] for b in src.batches(3)])
    np.testing.assert_array_equal(seen, np.arange(7))


def test_random_uses_declared_and_given_shapes() -> None:
    src = open_data("random", SPEC, limit=5, seed=1)
    assert [b["input"].shape for b in src.batches(2)] == [(2, 1, 8, 8), (2, 1, 8, 8), (1, 1, 8, 8)]
    sym = [InputSpec("x", ("N", 3, "H", "W"), np.dtype(np.float32))]
    with pytest.raises(BadInputError, match="--shape x="):
        next(open_data("random", sym).batches(1))
    got = next(open_data("random", sym, shapes={"x": [1, 3, 16, 20]}).batches(2))
    assert got["x"].shape == (2, 3, 16, 20)


@pytest.mark.parametrize("content,match", [(b"garbage", "not a readable .npz"), (None, "has no array 'input'")])
def test_bad_files(tmp_path: Path, content: bytes | None, match: str) -> None:
    path = tmp_path / "bad.npz"
    if content is None:
        np.savez(path, other=np.zeros(3))
    else:
        path.write_bytes(content)
    with pytest.raises(BadInputError, match=match):
        list(open_data(path, SPEC).batches(2))


def test_missing_and_empty(tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match="does not exist"):
        open_data(tmp_path / "nope.npz", SPEC)
    with pytest.raises(BadInputError, match="holds no .npz"):
        open_data(tmp_path, SPEC)


def test_wrong_rank(tmp_path: Path) -> None:
    np.savez(tmp_path / "r.npz", input=np.zeros((4, 64), np.float32))
    with pytest.raises(BadInputError, match="rank 2"):
        list(open_data(tmp_path / "r.npz", SPEC).batches(2))


def test_single_array_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "one.npz"
    with open(path, "wb") as f:
        np.save(f, np.zeros((2, 1, 8, 8), np.float32))  # an .npy under an .npz name
    with pytest.raises(BadInputError, match="not a readable .npz file|holds one array"):
        list(open_data(path, SPEC).batches(2))
