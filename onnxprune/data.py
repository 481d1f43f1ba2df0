"""Reading the DATA format: ``.npz`` (input name → array, batch on axis 0, ``labels`` optional), a
directory of such files, or ``random`` (drawn from the model's declared input shapes).

Calibration, sensitivity, fidelity and fine-tuning all read data through :class:`DataSource`, which
streams: at most one file and one batch are held at a time, so memory stays bounded however many
samples a directory holds.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from onnxprune.errors import BadInputError

LABELS = "labels"


@dataclass(frozen=True)
class InputSpec:
    """What a model expects for one input: shape (ints; str for symbolic dims) and numpy dtype."""

    name: str
    shape: tuple[int | str, ...]
    dtype: np.dtype


@dataclass
class DataSource:
    """A stream of feed batches for a model.

    Attributes:
        inputs: the model inputs to feed.
        files: ``.npz`` files in order (empty for random data).
        limit: the most samples to yield (None: all).
        shapes: ``--shape`` overrides used for random data.
        seed: random seed for ``random`` data and shuffling.
    """

    inputs: list[InputSpec]
    files: list[Path] = field(default_factory=list)
    limit: int | None = None
    shapes: dict[str, list[int]] = field(default_factory=dict)
    seed: int = 0
    random_samples: int = 64

    @property
    def is_random(self) -> bool:
        return not self.files

    @property
    def has_labels(self) -> bool:
        return bool(self.files) and LABELS in _keys(self.files[0])

    def count(self) -> int:
        """Number of samples the stream yields (reads only array headers)."""
        if self.is_random:
            return self.limit or self.random_samples
        total = sum(_length(f, self.inputs[0].name) for f in self.files)
        return min(total, self.limit) if self.limit else total

    def batches(self, batch_size: int, *, with_labels: bool = False) -> Iterator[dict[str, np.ndarray]]:
        """Yield feeds of up to ``batch_size`` samples; ``labels`` included when asked and present.

        Raises:
            BadInputError: a file lacks an input, has the wrong rank or mismatched batch sizes.
        """
        if batch_size < 1:
            raise BadInputError("batch size must be >= 1", field="batch_size")
        remaining = self.count()
        if self.is_random:
            rng = np.random.default_rng(self.seed)
            while remaining > 0:
                n = min(batch_size, remaining)
                yield {spec.name: _random(spec, self.shapes, n, rng) for spec in self.inputs}
                remaining -= n
            return
        for path in self.files:
            arrays = self._read(path, with_labels)
            size = len(next(iter(arrays.values())))
            for start in range(0, size, batch_size):
                if remaining <= 0:
                    return
                n = min(batch_size, size - start, remaining)
                yield {k: v[start : start + n] for k, v in arrays.items()}
                remaining -= n

    def load_all(self, *, with_labels: bool = False) -> dict[str, np.ndarray]:
        """Every sample in one dict (for small data sets: training splits, tests)."""
        parts = list(self.batches(max(1, self.count()), with_labels=with_labels))
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else {}

    def _read(self, path: Path, with_labels: bool) -> dict[str, np.ndarray]:
        with open_npz(path) as data:
            out: dict[str, np.ndarray] = {}
            for spec in self.inputs:
                if spec.name not in data.files:
                    raise BadInputError(
                        f"{path.name} has no array {spec.name!r} (has {', '.join(data.files) or 'nothing'})", field="data"
                    )
                arr = data[spec.name]
                if len(spec.shape) and arr.ndim != len(spec.shape):
                    raise BadInputError(
                        f"{path.name}: {spec.name!r} has rank {arr.ndim}, the model expects {len(spec.shape)} "
                        f"(batch on axis 0)", field="data",
                    )
                out[spec.name] = arr.astype(spec.dtype, copy=False)
            if with_labels and LABELS in data.files:
                out[LABELS] = data[LABELS].astype(np.int64, copy=False)
        sizes = {len(v) for v in out.values()}
        if len(sizes) != 1:
            raise BadInputError(f"{path.name}: arrays disagree on the batch size ({sorted(sizes)})", field="data")
        return out


def fitted_batches(source: DataSource, batch_size: int, *, with_labels: bool = False) -> Iterator[dict[str, np.ndarray]]:
    """``source``'s batches sized for the model: inputs that fix the batch dim (often 1 in exported files) get
    exactly that many samples per run and a shorter last batch is dropped; otherwise up to ``batch_size``.

    Evaluation reads data through this so every pass over the same source yields the same batches.

    Raises:
        BadInputError: the inputs fix different batch sizes, or as :meth:`DataSource.batches`.
    """
    fixed = {s.shape[0] for s in source.inputs if s.shape and isinstance(s.shape[0], int) and s.shape[0] > 0}
    if len(fixed) > 1:
        raise BadInputError(f"the model's inputs fix different batch sizes {sorted(fixed)}", field="data")
    size = next(iter(fixed)) if fixed else batch_size
    for feeds in source.batches(size, with_labels=with_labels):
        if not fixed or len(next(iter(feeds.values()))) == size:
            yield feeds


def npz_files(source: str | os.PathLike[str], field: str = "data") -> list[Path]:
    """The ``.npz`` files a DATA argument names: the file itself, or a directory's files sorted by name.

    Raises:
        BadInputError: the path does not exist or a directory holds no ``.npz``.
    """
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix == ".npz")
        if not files:
            raise BadInputError(f"directory {path} holds no .npz files", field=field)
        return files
    if path.is_file():
        return [path]
    raise BadInputError(f"data {os.fspath(source)!r} does not exist (expected .npz, a directory or 'random')",
                        field=field)


def open_npz(path: Path, field: str = "data") -> np.lib.npyio.NpzFile:
    """``np.load`` of a ``.npz`` without pickles; arrays are read only when indexed.

    Raises:
        BadInputError: the file is not a readable ``.npz``.
    """
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise BadInputError(f"{path} is not a readable .npz file: {e}", field=field) from e
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise BadInputError(f"{path} holds one array, not a .npz of named arrays", field=field)
    return data


def read_npz(path: Path, field: str = "data") -> dict[str, np.ndarray]:
    """Every array of one ``.npz`` file."""
    with open_npz(path, field) as data:
        return {k: data[k] for k in data.files}


def _keys(path: Path) -> list[str]:
    with open_npz(path) as data:
        return list(data.files)


def _length(path: Path, name: str) -> int:
    """Batch size of one array, from the .npy header inside the zip (no data read)."""
    try:
        with zipfile.ZipFile(path) as zf, zf.open(f"{name}.npy") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, _ = read(f)
            return int(shape[0]) if shape else 1
    except KeyError:
        raise BadInputError(f"{path.name} has no array {name!r}", field="data") from None
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise BadInputError(f"{path} is not a readable .npz file: {e}", field="data") from e


def _random(spec: InputSpec, shapes: dict[str, list[int]], n: int, rng: np.random.Generator) -> np.ndarray:
    from onnxprune.runtime.feeds import random_array

    return random_array(spec, shapes, n, rng)  # type: ignore[arg-type]  # same name/shape/dtype fields


def open_data(
    source: str | os.PathLike[str],
    inputs: Sequence[InputSpec],
    *,
    limit: int | None = None,
    shapes: dict[str, list[int]] | None = None,
    seed: int = 0,
) -> DataSource:
    """Open ``.npz``, a directory of ``.npz`` files (sorted by name), or ``random``.

    Raises:
        BadInputError: the path does not exist, a directory holds no .npz, or limit < 1.

    Example:
        >>> src = open_data("calib.npz", model_inputs(model), limit=64)
        >>> next(src.batches(16))["input"].shape
        (16, 1, 8, 8)
    """
    if limit is not None and limit < 1:
        raise BadInputError(f"sample limit must be >= 1, got {limit}", field="calib_samples")
    common = dict(inputs=list(inputs), limit=limit, shapes=dict(shapes or {}), seed=seed)
    if os.fspath(source) == "random":
        return DataSource(**common)
    return DataSource(files=npz_files(source), **common)


def model_inputs(model: object) -> list[InputSpec]:
    """The inputs to feed for an ``onnx.ModelProto`` (graph inputs that are not initializers)."""
    from onnxprune.runtime.session import model_input_specs

    return [InputSpec(s.name, tuple(s.shape), np.dtype(s.dtype)) for s in model_input_specs(model)]  # type: ignore[arg-type]
