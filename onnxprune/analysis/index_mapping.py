"""How channel positions move through index-remapping ops, as small composable mappings.

Every mapping turns the channel-id array of an input tensor (one id per position along the channel
axis, ``-1`` for positions that come from no prunable producer) into the id array of the output.
They are pure and tiny so each can be unit-tested alone (the idea of Torch-Pruning's
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
    """Reshape splitting a channel axis of ``prod(sizes)`` positions into several axes of ``sizes``.

    Used for attention heads ([.., D] → [.., h, d] or [.., 3, h, d]) and channel shuffle
    ([N, C, ..] → [N, g, C/g, ..]). The output map can carry ids on one of the new axes only, so the
    ids must be constant along the others: :meth:`ids_on` reads them when they are, and
    :meth:`ties` lists the position sets that must be coupled to make them so.
    """

    sizes: tuple[int, ...]

    def _grid(self, ids: np.ndarray, k: int) -> np.ndarray:
        return np.moveaxis(ids.reshape(self.sizes), k, 0).reshape(self.sizes[k], -1)

    def ids_on(self, ids: np.ndarray, k: int) -> np.ndarray | None:
        """The ids along new axis ``k`` when they do not vary along the other new axes, else None."""
        grid = self._grid(ids, k)
        return grid[:, 0].copy() if np.all(grid == grid[:, :1]) else None

    def ties(self, ids: np.ndarray, k: int) -> list[np.ndarray]:
        """Columns to couple position by position (each ``sizes[k]`` long) so ids depend on axis ``k`` only."""
        grid = self._grid(ids, k)
        return [grid[:, j] for j in range(grid.shape[1])]


@dataclass(frozen=True)
class GroupedMapping:
    """Grouped convolution with ``groups`` groups: channels come in equal consecutive blocks.

    A plan stays valid only if every group loses the same number of channels at the same offsets, so
    the blocks are coupled offset by offset (:meth:`blocks`) and a grouped producer's output ids repeat
    once per group (:meth:`tile`).
    """

    groups: int

    def blocks(self, ids: np.ndarray) -> list[np.ndarray]:
        return [b for b in ids.reshape(self.groups, -1)]

    def tile(self, ids: np.ndarray) -> np.ndarray:
        return np.tile(ids, self.groups)


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
