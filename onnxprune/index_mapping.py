"""How channel positions move through index-remapping ops, as small composable mappings.

Every mapping turns the channel-id array of an input tensor (one id per position along the channel
axis, ``-1`` for positions that come from no prunable producer) into the id array of the output.
They are pure and tiny so each can be unit-tested alone (STYLE.md habit 4, after Torch-Pruning's
``index_mapping.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FIXED = -1


@dataclass(frozen=True)
class ConcatMapping:
    """Concat along the channel axis: the output ids are the inputs' ids end to end."""

    sizes: tuple[int, ...]

    def apply(self, parts: list[np.ndarray | None]) -> np.ndarray:
        out = [p if p is not None else np.full(n, FIXED, np.int64) for p, n in zip(parts, self.sizes)]
        return np.concatenate(out).astype(np.int64)


@dataclass(frozen=True)
class SliceMapping:
    """Split/Slice along the channel axis: keep positions ``start:stop:step``."""

    start: int
    stop: int
    step: int = 1

    def apply(self, ids: np.ndarray) -> np.ndarray:
        return ids[self.start : self.stop : self.step]


@dataclass(frozen=True)
class RepeatMapping:
    """Flatten/Reshape merging the channel axis with ``inner`` trailing elements: each channel owns a block."""

    inner: int

    def apply(self, ids: np.ndarray) -> np.ndarray:
        return np.repeat(ids, self.inner)


@dataclass(frozen=True)
class SplitAxisMapping:
    """Reshape splitting a channel axis of ``outer * inner`` into (outer, inner) keeps the ids on one of them.

    Used for attention heads ([.., D] → [.., h, d]) and channel shuffle ([N, C] → [N, g, C/g]): ``keep``
    says whether the ids live on the ``outer`` or ``inner`` axis. The ids must be constant along the other.
    """

    outer: int
    inner: int

    def outer_ids(self, ids: np.ndarray) -> np.ndarray | None:
        grid = ids.reshape(self.outer, self.inner)
        return grid[:, 0] if np.all(grid == grid[:, :1]) else None

    def inner_ids(self, ids: np.ndarray) -> np.ndarray | None:
        grid = ids.reshape(self.outer, self.inner)
        return grid[0] if np.all(grid == grid[:1]) else None


@dataclass(frozen=True)
class TransposeMapping:
    """Transpose moves the channel axis to ``perm.index(axis)``; the ids are unchanged."""

    perm: tuple[int, ...]

    def axis(self, axis: int) -> int:
        return self.perm.index(axis)


def keep_positions(ids: np.ndarray, removed_classes: np.ndarray, class_of: np.ndarray) -> np.ndarray:
    """Boolean mask of positions to keep: fixed positions always stay."""
    classes = np.where(ids >= 0, class_of[np.maximum(ids, 0)], FIXED)
    return (ids < 0) | ~np.isin(classes, removed_classes)
