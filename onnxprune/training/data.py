"""Training data in the DATA format: ``.npz`` of input name → array (batch on axis 0, ``labels`` optional),
or a directory of such files concatenated in name order."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np

from onnxprune.data import npz_files, read_npz
from onnxprune.errors import BadInputError

LABELS_KEY = "labels"


@dataclass
class TrainData:
    """Model inputs by name (same length on axis 0), optional integer ``labels`` and teacher outputs."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None = None
    teacher: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.inputs:
            raise BadInputError("training data holds no input arrays", field="train_data")
        lengths = {k: len(v) for k, v in self.inputs.items()}
        if self.labels is not None:
            lengths[LABELS_KEY] = len(self.labels)
        lengths.update({f"teacher/{k}": len(v) for k, v in self.teacher.items()})
        if len(set(lengths.values())) != 1:
            raise BadInputError(f"training arrays differ in length on axis 0: {lengths}", field="train_data")
        if self.labels is not None and self.labels.dtype.kind not in "iu":
            raise BadInputError(f"'labels' must be integer class ids, got {self.labels.dtype}", field="train_data")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TrainData:
        """Read a ``.npz`` file or a directory of them.

        Raises:
            BadInputError: missing path, no ``.npz`` files, or files with different keys.
        """
        files = npz_files(path, field="train_data")
        parts = [read_npz(f, field="train_data") for f in files]
        keys = set(parts[0])
        for f, part in zip(files, parts):
            if set(part) != keys:
                raise BadInputError(f"--train-data {f}: keys {sorted(part)} differ from {sorted(keys)}", field="train_data")
        merged = {k: np.concatenate([part[k] for part in parts]) for k in sorted(keys)}
        labels = merged.pop(LABELS_KEY, None)
        return cls(merged, None if labels is None else labels.astype(np.int64))

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    def take(self, index: np.ndarray) -> TrainData:
        return TrainData(
            {k: v[index] for k, v in self.inputs.items()},
            None if self.labels is None else self.labels[index],
            {k: v[index] for k, v in self.teacher.items()},
        )

    def split(self, fraction: float, seed: int) -> tuple[TrainData, TrainData | None]:
        """(train, held-out) with ``fraction`` of the samples held out at random; None when too few."""
        n_held = int(round(len(self) * fraction))
        if n_held < 1 or n_held >= len(self):
            return self, None
        order = np.random.default_rng(seed).permutation(len(self))
        return self.take(np.sort(order[n_held:])), self.take(np.sort(order[:n_held]))

    def batches(
        self, batch_size: int, rng: np.random.Generator | None, drop_last: bool = True
    ) -> Iterator[TrainData]:
        """One epoch of batches; shuffled when ``rng`` is given."""
        order = rng.permutation(len(self)) if rng is not None else np.arange(len(self))
        stop = len(self) - (len(self) % batch_size if drop_last else 0)
        for start in range(0, stop, batch_size):
            yield self.take(order[start:start + batch_size])

    def feeds(self, dtypes: Mapping[str, np.dtype] | None = None) -> dict[str, np.ndarray]:
        """Model inputs cast to ``dtypes`` (name → numpy dtype)."""
        dtypes = dtypes or {}
        return {k: np.ascontiguousarray(v, dtype=dtypes.get(k, v.dtype)) for k, v in self.inputs.items()}
