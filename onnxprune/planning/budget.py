"""Budgets: the order channels go in, and the search for the plan that meets a params, MACs or latency target."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from onnxprune.analysis.core import Analysis, PruningGroup
from onnxprune.errors import PlanError
from onnxprune.planning.cost import CostModel
from onnxprune.planning.plan import Plan, feasible_removal, lowest, normalized

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RemovalOrder:
    """The order in which channels go: ``groups[k]`` loses its next channel at step ``k``.

    A prefix of the order is a plan, so one binary search over the prefix length finds the least
    pruning that meets a budget, for any allocation rule (uniform, global ranking, sensitivity).
    ``strategy`` names the rule for the report.
    """

    groups: np.ndarray
    strategy: str

    def counts(self, n: int) -> dict[int, int]:
        ids, counts = np.unique(self.groups[: max(n, 0)], return_counts=True)
        return {int(g): int(c) for g, c in zip(ids, counts)}

    def __len__(self) -> int:
        return int(len(self.groups))


def _cap(group: PruningGroup, max_ratio: float) -> int:
    return max(0, min(group.prunable, group.size - 1, int(np.floor(max_ratio * group.size + 1e-9))))


def _order(entries: list[tuple[float, float, int]], strategy: str) -> RemovalOrder:
    entries.sort()
    return RemovalOrder(np.array([gid for _, _, gid in entries], dtype=np.int64), strategy)


def uniform_order(analysis: Analysis, scores: dict[int, np.ndarray], max_ratio: float = 0.9) -> RemovalOrder:
    """Every group loses the same share: the k-th channel of a group of n goes at key (k+1)/n."""
    entries = [((k + 1) / g.size, 0.0, g.id)
               for g in analysis.groups if g.id in scores for k in range(_cap(g, max_ratio))]
    return _order(entries, "uniform")


def global_order(analysis: Analysis, scores: dict[int, np.ndarray], max_ratio: float = 0.9) -> RemovalOrder:
    """Channels by their group-normalised score (as :func:`global_ranking`); ties go uniformly.

    Ties matter: on models whose weights are all alike (the onnx wheel's light models) every score
    is 1, and ranking by group id would strip whole groups first.
    """
    entries = []
    for g in analysis.groups:
        if g.id not in scores:
            continue
        norm = np.sort(normalized(scores[g.id], g.blocked)[~g.blocked])
        entries.extend((float(norm[k]), (k + 1) / g.size, g.id) for k in range(_cap(g, max_ratio)))
    return _order(entries, "global")


def sensitivity_order(
    analysis: Analysis,
    scores: dict[int, np.ndarray],
    curves: dict[int, tuple[np.ndarray, np.ndarray]],
    cost: CostModel,
    metric: str = "macs",
    max_ratio: float = 0.9,
) -> RemovalOrder:
    """Channels in order of loss per unit of cost saved, from per-group sensitivity curves.

    ``curves[gid] = (ratios, loss)``: the loss (e.g. accuracy drop) of pruning that group alone at
    each ratio. The loss is interpolated per channel and made non-decreasing; a channel's priority is
    its loss increment divided by what one channel of its group saves (MACs or params), kept
    non-decreasing within a group so that the order respects each group's own sequence. This is the
    greedy solution of "least total loss for the budget" when losses add up, and it prunes groups that
    are cheap to lose and expensive to keep first. Groups without a curve are not pruned.
    """
    full = cost.fraction(Plan(), metric)
    entries: list[tuple[float, float, int]] = []
    for g in analysis.groups:
        if g.id not in scores or g.id not in curves:
            continue
        cap = _cap(g, max_ratio)
        if cap == 0:
            continue
        half = max(1, cap // 2)
        saved = (full - cost.fraction(Plan({g.id: lowest(g, scores[g.id], half)}), metric)) / half
        ratios, loss = (np.asarray(v, dtype=np.float64) for v in curves[g.id])
        keep = np.argsort(ratios, kind="stable")
        ratios = np.concatenate([[0.0], ratios[keep]])
        loss = np.maximum.accumulate(np.maximum(np.concatenate([[0.0], loss[keep]]), 0.0))
        at = np.interp(np.arange(cap + 1) / g.size, ratios, loss)
        step = np.maximum.accumulate(np.diff(at) / max(saved, 1e-30))
        entries.extend((float(step[k]), (k + 1) / g.size, g.id) for k in range(cap))
    return _order(entries, "sensitivity")


def plan_from_counts(
    analysis: Analysis, scores: dict[int, np.ndarray], counts: dict[int, int], round_to: int = 1
) -> Plan:
    """The plan removing about ``counts[gid]`` lowest-scoring channels per group (``round_to`` honoured)."""
    plan = Plan()
    for g in analysis.groups:
        wanted = counts.get(g.id, 0)
        if wanted and g.id in scores:
            n = feasible_removal(g, wanted, round_to)
            if n:
                plan.removed[g.id] = lowest(g, scores[g.id], n)
    return plan


@dataclass
class BudgetResult:
    """The plan a budget search chose, and how close it landed (fractions of the original)."""

    plan: Plan
    strategy: str
    targets: dict[str, float]
    achieved: dict[str, float]
    steps: int
    candidates: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return {
            "strategy": self.strategy,
            "targets": dict(self.targets),
            "achieved": {k: round(v, 6) for k, v in self.achieved.items()},
            "channels_removed": self.plan.total_removed,
            "groups_pruned": sum(1 for v in self.plan.removed.values() if len(v)),
            "search_steps": self.steps,
            "candidates": list(self.candidates),
        }


def fit_budget(
    analysis: Analysis,
    scores: dict[int, np.ndarray],
    cost: CostModel,
    order: RemovalOrder,
    targets: dict[str, float],
    round_to: int = 1,
) -> BudgetResult:
    """The shortest prefix of ``order`` whose plan meets every target (``{"macs": 0.5, "params": 0.3}``).

    Costs only fall as the prefix grows (``feasible_removal`` is monotone), so a binary search finds
    the prefix where one more channel would be needed: the result never exceeds a target and sits
    at most one step (one channel, or ``round_to`` channels of one group) below it.

    Raises:
        PlanError: even the whole order (every group down to its cap) misses a target.

    Example:
        >>> fit_budget(analysis, scores, cost, global_order(analysis, scores), {"macs": 0.5}).achieved
        {'macs': 0.4993}
    """
    steps = 0

    def at(n: int) -> tuple[Plan, dict[str, float]]:
        nonlocal steps
        steps += 1
        plan = plan_from_counts(analysis, scores, order.counts(n), round_to)
        return plan, {m: cost.fraction(plan, m) for m in targets}

    def ok(fr: dict[str, float]) -> bool:
        return all(fr[m] <= t + 1e-12 for m, t in targets.items())

    plan, fr = at(0)
    if ok(fr):
        return BudgetResult(plan, order.strategy, dict(targets), fr, steps)
    best_plan, best = at(len(order))
    if not ok(best):
        missed = ", ".join(f"{m} {best[m]:.3f} (asked {t})" for m, t in targets.items() if best[m] > t)
        raise PlanError(
            f"the budget cannot be met: pruning every group as far as allowed still leaves {missed} of the "
            "original; blocked channels (see `onnxprune analyze`) and the per-group cap keep the rest"
        )
    lo, hi = 0, len(order)  # lo misses the targets, hi meets them
    while hi - lo > 1:
        mid = (lo + hi) // 2
        plan, fr = at(mid)
        if ok(fr):
            hi, best_plan, best = mid, plan, fr
        else:
            lo = mid
    return BudgetResult(best_plan, order.strategy, dict(targets), best, steps)


def fit_latency(
    analysis: Analysis,
    scores: dict[int, np.ndarray],
    cost: CostModel,
    order: RemovalOrder,
    target: float,
    measure: Callable[[Plan], float],
    round_to: int = 1,
    *,
    max_candidates: int = 6,
    time_budget_s: float = 120.0,
    tolerance: float = 0.03,
) -> BudgetResult:
    """Least pruning whose *measured* latency is at most ``target`` of the original's.

    Latency is noisy and costs a cut plus a benchmark per candidate, so this is a short secant search
    on the MACs fraction (latency ≈ MACs^k, k fitted from the last two candidates): each candidate is the
    MACs-budget plan for the current guess, ``measure(plan)`` returns its latency as a fraction of the
    original's, and the next guess is kept between the best known feasible and infeasible ones. It stops within ``tolerance`` below the target, after ``max_candidates`` or after
    ``time_budget_s``, and returns the feasible candidate with the least pruning.

    Raises:
        PlanError: no candidate measured at or below the target.
    """
    start = time.perf_counter()
    floor = cost.fraction(plan_from_counts(analysis, scores, order.counts(len(order)), round_to), "macs")
    guess, feasible, infeasible = max(target, floor), 0.0, 1.0
    tried: list[dict[str, float]] = []
    best: tuple[BudgetResult, float] | None = None
    steps = 0
    for _ in range(max_candidates):
        budget = fit_budget(analysis, scores, cost, order, {"macs": guess}, round_to)
        steps += budget.steps
        ratio = float(measure(budget.plan))
        macs = budget.achieved["macs"]
        tried.append({"macs": round(macs, 6), "latency": round(ratio, 4)})
        log.info("latency search: MACs %.3f -> latency %.3f (target %.3f)", macs, ratio, target)
        if ratio <= target:
            feasible = max(feasible, macs)
            if best is None or ratio > best[1]:
                best = (budget, ratio)
            if target - ratio <= tolerance:
                break
        else:
            infeasible = min(infeasible, macs)
        nxt = macs * (target / max(ratio, 1e-9)) ** (1.0 / _latency_exponent(tried))
        if not feasible < nxt < infeasible:
            nxt = (feasible + infeasible) / 2 if feasible > 0 else min(infeasible, macs) * 0.7
        nxt = max(nxt, floor)
        if abs(nxt - macs) < 1e-3 or time.perf_counter() - start > time_budget_s:
            break
        guess = nxt
    if best is None:
        lowest_seen = min(t["latency"] for t in tried)
        raise PlanError(
            f"--target-latency {target} not reached: the fastest of {len(tried)} candidates ran at "
            f"{lowest_seen:.3f} of the original latency; ask for less, or check with `onnxprune bench`"
        )
    chosen, ratio = best
    achieved = dict(chosen.achieved)
    achieved["latency"] = ratio
    achieved["params"] = cost.fraction(chosen.plan, "params")
    return BudgetResult(chosen.plan, order.strategy, {"latency": target}, achieved, steps, tried)


def _latency_exponent(tried: list[dict[str, float]]) -> float:
    """k in latency ∝ MACs^k, from the last two candidates (0.7 before there are two: latency falls slower)."""
    if len(tried) >= 2:
        (m1, l1), (m2, l2) = ((t["macs"], t["latency"]) for t in tried[-2:])
        if m1 > 0 and m2 > 0 and l1 > 0 and l2 > 0 and abs(np.log(m1 / m2)) > 1e-3:
            return float(np.clip(np.log(l1 / l2) / np.log(m1 / m2), 0.3, 1.5))
    return 0.7


def greedy_order(
    analysis: Analysis,
    scores: dict[int, np.ndarray],
    cost: CostModel,
    metric: str,
    target: float,
    loss: Callable[[Plan], float],
    *,
    step: float = 0.05,
    round_to: int = 1,
    max_ratio: float = 0.9,
    max_evaluations: int = 400,
    time_budget_s: float = 300.0,
) -> RemovalOrder:
    """An order found by re-measuring every group's sensitivity in the already-pruned model.

    One-shot sensitivity curves assume losses add up; they do not (pruning two coupled layers hurts
    more than the sum), so this follows NetAdapt: from the current plan, each group proposes the
    smallest removal that saves ``step`` of the original ``metric`` (or reaches ``target``), ``loss``
    measures each proposal on calibration data, and the least harmful one is taken; repeat until the
    target is met. About ``groups × (1 - target) / step`` evaluations; once ``max_evaluations`` or
    ``time_budget_s`` run out, the rest follows the global ranking. The order then continues with every
    remaining channel (global ranking), so :func:`fit_budget` can land on the exact target.
    """
    start = time.perf_counter()
    groups = {g.id: g for g in analysis.groups if g.id in scores}
    caps = {gid: _cap(g, max_ratio) for gid, g in groups.items()}
    counts = {gid: 0 for gid in groups}
    seq: list[int] = []
    evaluations = 0

    def frac(c: dict[int, int]) -> float:
        return cost.fraction(plan_from_counts(analysis, scores, c, round_to), metric)

    current = frac(counts)
    strategy = "sensitivity-greedy"
    while current > target + 1e-12:
        if evaluations >= max_evaluations or time.perf_counter() - start > time_budget_s:
            log.info("greedy allocation stopped after %d evaluations; the rest follows the global ranking", evaluations)
            strategy = f"sensitivity-greedy down to {current:.3f} ({evaluations} evaluations), then global"
            break
        goal = max(target, current - step)
        best: tuple[float, int, int, float] | None = None
        for gid in groups:
            if counts[gid] >= caps[gid]:
                continue
            trial = dict(counts)
            lo, hi = counts[gid], caps[gid]
            while hi - lo > 1:
                trial[gid] = (lo + hi) // 2
                if frac(trial) <= goal:
                    hi = trial[gid]
                else:
                    lo = trial[gid]
            trial[gid] = hi
            saved = current - frac(trial)
            if saved <= 0:
                continue
            value = float(loss(plan_from_counts(analysis, scores, trial, round_to)))
            evaluations += 1
            # Compare per unit saved only when a group hits its cap short of the step.
            key = value if saved >= 0.999 * (current - goal) else value * (current - goal) / saved
            if best is None or key < best[0]:
                best = (key, gid, hi, current - saved)
        if best is None:
            break
        _, gid, n, current = best
        seq.extend([gid] * (n - counts[gid]))
        counts[gid] = n
    rest = global_order(analysis, scores, max_ratio)
    taken = dict(counts)
    for gid in rest.groups.tolist():
        if taken.get(gid, 0) > 0:
            taken[gid] -= 1
        else:
            seq.append(gid)
    log.info("greedy allocation: %d evaluations", evaluations)
    return RemovalOrder(np.array(seq, dtype=np.int64), strategy)


@dataclass(frozen=True)
class DropProbe:
    """One candidate budget of a ``--max-drop`` search, measured after the probe's (cheap) repair.

    ``target``/``achieved``: fractions of the original's MACs (or params when MACs are unknown);
    ``value``: the task metric; ``drop``: points below the original.
    """

    target: float
    achieved: float
    value: float
    drop: float
    passed: bool

    def to_dict(self) -> dict[str, object]:
        return {"target": round(self.target, 6), "achieved": round(self.achieved, 6), "value": self.value,
                "drop_points": round(self.drop, 6), "passed": self.passed}


@dataclass
class DropSearch:
    """What ``--max-drop`` tried and chose, for the report.

    ``final_value`` is the returned model's metric: the full repair at the chosen budget, or, when that fell
    outside the drop (``stepped_back``), the passing probe's model itself.
    """

    max_drop: float
    metric: str
    dimension: str
    baseline: float
    floor: float
    probe_repair: str
    final_repair: str
    probes: list[DropProbe] = field(default_factory=list)
    chosen: DropProbe | None = None
    final_value: float | None = None
    full_repair_value: float | None = None
    stepped_back: bool = False

    def to_dict(self) -> dict[str, object]:
        final_drop = None if self.final_value is None else round((self.baseline - self.final_value) * 100.0, 6)
        return {
            "max_drop_points": self.max_drop, "metric": self.metric, "dimension": self.dimension,
            "original": self.baseline, "floor": round(self.floor, 6),
            "probe_repair": self.probe_repair, "final_repair": self.final_repair,
            "probes": [p.to_dict() for p in self.probes],
            "chosen": self.chosen.to_dict() if self.chosen else None,
            "final": {"value": self.final_value, "drop_points": final_drop,
                      "full_repair_value": self.full_repair_value, "stepped_back_to_probe": self.stepped_back},
        }


def bisect_max_drop(probe: Callable[[float], DropProbe], floor: float, *, tolerance: float = 0.02,
                    max_probes: int = 7) -> list[DropProbe]:
    """Bisection over the budget for the most compressed one whose probe stays within the drop.

    No pruning (1.0) passes by definition and ``floor`` (every group down to its cap) bounds the other side;
    each probe halves the interval between the lowest passing and the highest failing budget, until it is
    narrower than ``tolerance`` or ``max_probes`` ran. The metric is assumed to fall as the budget shrinks
    (removal orders are nested, so a smaller budget removes a superset of channels). Returns the probes in
    the order they ran; the caller picks the passing one with the smallest ``achieved``.
    """
    passing, failing = 1.0, floor
    probes: list[DropProbe] = []
    while len(probes) < max_probes and passing - failing >= tolerance:
        target = (passing + failing) / 2
        result = probe(target)
        probes.append(result)
        log.info("max-drop probe: target %.4f -> achieved %.4f, metric %.6g (drop %.3g points, %s)", target,
                 result.achieved, result.value, result.drop, "pass" if result.passed else "fail")
        if result.passed:
            passing = target
        else:
            failing = target
    return probes
