"""What the analysis finds: channel maps, weight sites, fixups, groups (the contract with planning and surgery)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from onnxprune.analysis.index_mapping import FIXED


class SiteRole(str, enum.Enum):
    """What a sliced constant is to the channels it follows (importance reads weights by role)."""

    OUT = "out"
    """A producer's output rows."""
    IN = "in"
    """A consumer's input columns."""
    PARAM = "param"
    """Per-channel parameters: bias, BN γ/β, broadcast constants."""
    STAT = "stat"
    """BN running statistics: sliced, never used as importance."""


class FixupKind(str, enum.Enum):
    """Non-weight edits a cut needs; each kind has one surgery handler."""

    CONV_GROUP = "conv_group"
    RESHAPE = "reshape"
    SPLIT = "split"
    SLICE = "slice"
    SHAPE_VALUE = "shape_value"
    SHAPE_PIN = "shape_pin"
    SHAPE_FREEZE = "shape_freeze"
    """A one-entry piece of a shape Concat read from a cut tensor's Shape that must keep its original value."""
    RESIZE_SIZES = "resize_sizes"
    ATTR_COUNT = "attr_count"
    """An integer attribute that counts channels (a contrib op's ``num_heads``): set to the kept count."""


@dataclass
class ChannelMap:
    """The channel ids carried by a tensor: position ``p`` along ``axis`` belongs to id ``ids[p]``."""

    axis: int
    ids: np.ndarray


@dataclass
class Site:
    """A constant tensor whose slices along ``axis`` follow channel ids.

    ``role``: ``out`` (a producer's output rows), ``in`` (a consumer's input columns), ``param``
    (per-channel parameters: bias, BN γ/β, broadcast constants) or ``stat`` (BN running statistics,
    sliced but never used as importance).
    """

    tensor: str
    axis: int
    ids: np.ndarray
    node: str
    op: str
    role: SiteRole


@dataclass
class Fixup:
    """A non-weight edit a cut requires: ``kind`` names the surgery handler, ``ids`` the channels it counts."""

    node: str
    kind: FixupKind
    ids: list[np.ndarray]
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class PruningGroup:
    """Channels that are removed together. ``classes[i]`` is channel ``i``'s union-find root.

    ``approximate`` says why cutting prunable channels changes what the kept ones compute (a normalisation
    whose statistics span the channel axis); empty when a cut of zeroed channels is exact.
    """

    id: int
    producers: list[str]
    members: list[str]
    classes: np.ndarray
    blocked: np.ndarray
    reasons: list[str]
    approximate: list[str] = field(default_factory=list)

    @property
    def size(self) -> int:
        return int(len(self.classes))

    @property
    def prunable(self) -> int:
        return int((~self.blocked).sum())

    @property
    def blocked_reason(self) -> str | None:
        """Set when no channel of the group may be removed."""
        return "; ".join(self.reasons) if self.prunable == 0 else None


@dataclass
class Analysis:
    """The result of :func:`analyze_graph`: groups plus everything surgery and importance need."""

    groups: list[PruningGroup]
    sites: list[Site]
    fixups: list[Fixup]
    class_of: np.ndarray
    maps: dict[str, ChannelMap]
    notes: list[str] = field(default_factory=list)
    cache_io: list[str] = field(default_factory=list)
    """Graph inputs and outputs that are generation state (a KV cache): they shrink with the heads their
    ``maps`` entry carries, where other graph outputs block."""

    def group_channel_index(self, group: PruningGroup) -> dict[int, int]:
        return {int(c): i for i, c in enumerate(group.classes)}

    def classes_of(self, ids: np.ndarray) -> np.ndarray:
        """Class roots for an id array; fixed positions stay -1."""
        return np.where(ids >= 0, self.class_of[np.maximum(ids, 0)], FIXED)

    def to_dict(self) -> dict[str, Any]:
        return {
            "groups": [group_to_dict(g) for g in self.groups],
            "prunable_groups": sum(1 for g in self.groups if g.prunable),
            "prunable_channels": sum(g.prunable for g in self.groups),
            "total_channels": sum(g.size for g in self.groups),
            "notes": list(self.notes),
        }


def group_to_dict(group: PruningGroup, kept: int | None = None) -> dict[str, Any]:
    return {
        "id": group.id,
        "channels": group.size,
        "prunable": group.prunable,
        "kept": group.size if kept is None else kept,
        "producers": list(group.producers),
        "members": list(group.members),
        "blocked": group.blocked_reason,
        "blocked_channels": int(group.blocked.sum()),
        "reasons": list(group.reasons),
        "approximate": list(group.approximate) if group.prunable else [],
    }


HEAD_GRANULARITIES = ("whole", "dims")


@dataclass(frozen=True)
class AnalysisOptions:
    """Choices the graph leaves open.

    ``heads``: ``whole`` prunes attention heads as units (a channel = a head: Q/K/V columns and the
    output-projection rows of that head); ``dims`` prunes the same dims of every head instead (a channel =
    dim j of every head; Q and K together, V with the output projection), keeping the head count.
    ``lm_stream``: see the field.
    """

    heads: str = "whole"
    lm_stream: bool = False
    """Prune the hidden size of a language model (the residual stream its token embedding starts). Off by
    default: every layer reads it, and cutting it costs far more quality than heads and MLP width."""

    def __post_init__(self) -> None:
        if self.heads not in HEAD_GRANULARITIES:
            raise ValueError(f"heads must be one of {', '.join(HEAD_GRANULARITIES)}, got {self.heads!r}")
