"""How many channels each group loses, and which ones.

A :class:`Plan` maps group id → channel indices to remove. ``uniform`` removes the same fraction of
every group; ``global_ranking`` ranks all channels together after normalising each group's scores by
their mean, so groups with more unimportant channels lose more. Both keep at least one channel (or
``round_to``) per group, never touch blocked channels, and keep channel counts multiples of
``round_to`` when asked.

Budgets (``--target-macs/params/latency``): a :class:`RemovalOrder` says in which order channels go
(uniform, global ranking, one-shot sensitivity curves, or a greedy search that re-measures sensitivity
in the pruned model); every prefix of it is a plan, and :class:`CostModel` prices a plan without
cutting, so :func:`fit_budget` binary-searches the shortest prefix that meets the budget. Latency
cannot be priced, so :func:`fit_latency` measures a few candidates through a callback.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from onnxprune.analysis.core import Analysis, PruningGroup


@dataclass
class Plan:
    """Channels to remove per group (indices into the group's channels)."""

    removed: dict[int, np.ndarray] = field(default_factory=dict)

    def removed_classes(self, analysis: Analysis) -> np.ndarray:
        by_id = {g.id: g for g in analysis.groups}
        parts = [by_id[gid].classes[idx] for gid, idx in self.removed.items() if len(idx)]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def kept(self, group: PruningGroup) -> int:
        return group.size - len(self.removed.get(group.id, ()))

    @property
    def total_removed(self) -> int:
        return sum(len(v) for v in self.removed.values())


def feasible_removal(group: PruningGroup, wanted: int, round_to: int = 1) -> int:
    """Largest removal ≤ ``wanted`` that keeps ≥ 1 channel, spares blocked ones and honours ``round_to``."""
    n = min(max(wanted, 0), group.prunable, group.size - 1)
    if round_to > 1:
        if group.size <= round_to:
            return 0
        kept = group.size - n
        target = max(round_to, int(round(kept / round_to)) * round_to)
        n = group.size - target
        while n > min(group.prunable, group.size - 1) and n > 0:
            n -= round_to
        n = max(n, 0)
    return n


def lowest(group: PruningGroup, scores: np.ndarray, n: int) -> np.ndarray:
    """Indices of the ``n`` lowest-scoring prunable channels (ties broken by index)."""
    order = np.lexsort((np.arange(group.size), np.where(group.blocked, np.inf, scores)))
    return np.sort(order[:n]).astype(np.int64)


def uniform(analysis: Analysis, scores: dict[int, np.ndarray], ratio: float, round_to: int = 1) -> Plan:
    plan = Plan()
    for group in analysis.groups:
        if group.id not in scores:
            continue
        n = feasible_removal(group, int(np.floor(ratio * group.size + 1e-9)), round_to)
        if n:
            plan.removed[group.id] = lowest(group, scores[group.id], n)
    return plan


def normalized(scores: np.ndarray, blocked: np.ndarray) -> np.ndarray:
    free = scores[~blocked]
    mean = float(np.mean(free)) if free.size else 0.0
    return scores / mean if mean > 0 else np.zeros_like(scores)


def global_ranking(analysis: Analysis, scores: dict[int, np.ndarray], ratio: float, round_to: int = 1) -> Plan:
    """Remove the ``ratio`` share of all channels with the lowest group-normalised scores."""
    groups = [g for g in analysis.groups if g.id in scores]
    total = sum(g.size for g in groups)
    entries = []
    for g in groups:
        norm = normalized(scores[g.id], g.blocked)
        entries.extend((float(norm[i]), g.id, i) for i in range(g.size) if not g.blocked[i])
    entries.sort()
    budget = int(np.floor(ratio * total + 1e-9))
    wanted: dict[int, int] = {}
    by_id = {g.id: g for g in groups}
    for _, gid, _ in entries:
        if budget <= 0:
            break
        g = by_id[gid]
        if wanted.get(gid, 0) < min(g.prunable, g.size - 1):
            wanted[gid] = wanted.get(gid, 0) + 1
            budget -= 1
    plan = Plan()
    for gid, n in wanted.items():
        n = feasible_removal(by_id[gid], n, round_to)
        if n:
            plan.removed[gid] = lowest(by_id[gid], scores[gid], n)
    return plan


def tensor_channel_sets(analysis: Analysis) -> dict[int, list[np.ndarray]]:
    """Per group, the channel sets that one tensor holds entirely (a Split branch, one consumer's input...).

    A plan must leave at least one channel in each: a tensor with no channels left cannot be sliced.
    """
    group_of = {int(c): (g.id, i) for g in analysis.groups for i, c in enumerate(g.classes)}
    sizes = {g.id: g.size for g in analysis.groups}
    arrays = [s.ids for s in analysis.sites] + [ids for f in analysis.fixups for ids in f.ids]
    sets: dict[int, set[tuple[int, ...]]] = {}
    for ids in arrays:
        classes = analysis.classes_of(ids)
        if len(classes) == 0 or (classes < 0).any():
            continue  # fixed positions always stay
        owners = {group_of[int(c)] for c in np.unique(classes)}
        gids = {gid for gid, _ in owners}
        if len(gids) != 1:
            continue
        channels = tuple(sorted(i for _, i in owners))
        if len(channels) < sizes[next(iter(gids))]:
            sets.setdefault(next(iter(gids)), set()).add(channels)
    return {gid: [np.array(s, dtype=np.int64) for s in sorted(v)] for gid, v in sets.items()}


def keep_every_tensor(analysis: Analysis, plan: Plan, scores: dict[int, np.ndarray]) -> Plan:
    """Give back the best channel of any tensor-channel set the plan would empty (see ``tensor_channel_sets``)."""
    sets = tensor_channel_sets(analysis)
    for gid, removed in list(plan.removed.items()):
        chosen = set(removed.tolist())
        for channels in sets.get(gid, []):
            if chosen.issuperset(channels.tolist()):
                chosen.discard(int(channels[np.argmax(scores[gid][channels])]))
        plan.removed[gid] = np.array(sorted(chosen), dtype=np.int64)
    return plan
