"""Planning: removal counts, orders, the cost model (checked against really cut models) and budget searches."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

from onnxprune.io.load import load_model
from onnxprune.io.shapes import static_shapes
from onnxprune.planning.budget import (
    fit_budget,
    fit_latency,
    global_order,
    greedy_order,
    plan_from_counts,
    sensitivity_order,
    uniform_order,
)
from onnxprune.planning.cost import CostModel
from onnxprune.planning.plan import Plan, feasible_removal, uniform
from onnxprune.measure.stats import ModelStats, model_stats
from onnxprune.errors import PlanError
from onnxprune.analysis.core import Analysis, PruningGroup
from onnxprune.analysis.driver import analyze_graph
from onnxprune.importance.base import ScoringContext
from onnxprune.importance import score_groups
from onnxprune.io.export import export_graph
from onnxprune.transform.surgery import cut_channels
from tests.models import BUILDERS


def _group(gid: int, size: int, blocked: int = 0) -> PruningGroup:
    mask = np.zeros(size, dtype=bool)
    mask[:blocked] = True
    return PruningGroup(gid, [f"p{gid}"], [], np.arange(size) + 1000 * gid, mask, [])


def _setup(model: onnx.ModelProto) -> tuple[gs.Graph, Analysis, dict[int, np.ndarray], CostModel]:
    graph = gs.import_onnx(model)
    analysis = analyze_graph(graph, static_shapes(model, {}))
    scores = score_groups(ScoringContext(graph, analysis), "l2")
    return graph, analysis, scores, CostModel(graph, analysis, model_stats(model))


def _cut_stats(model: onnx.ModelProto, analysis: Analysis, plan: Plan) -> ModelStats:
    graph = gs.import_onnx(model)
    cut_channels(graph, analysis, plan.removed_classes(analysis))
    return model_stats(export_graph(graph, model))


# --- counts and rounding -------------------------------------------------------------------


@pytest.mark.parametrize(("size", "wanted", "round_to", "expected"), [
    (64, 32, 1, 32), (64, 70, 1, 63), (64, 30, 8, 32), (64, 27, 8, 24), (8, 4, 8, 0), (20, 10, 8, 12),
])
def test_feasible_removal_keeps_multiples(size: int, wanted: int, round_to: int, expected: int) -> None:
    n = feasible_removal(_group(0, size), wanted, round_to)
    assert n == expected
    if n and round_to > 1:
        assert (size - n) % round_to == 0


def test_feasible_removal_spares_blocked_channels() -> None:
    assert feasible_removal(_group(0, 16, blocked=10), 12) == 6


def test_orders_are_prefix_plans() -> None:
    groups = [_group(0, 10), _group(1, 20)]
    analysis = Analysis(groups, [], [], np.zeros(0, dtype=np.int64), {})
    scores = {0: np.linspace(1, 2, 10), 1: np.linspace(1, 2, 20)}
    order = uniform_order(analysis, scores)
    assert len(order) == 9 + 18  # capped at 90% of each group
    assert order.counts(15) == {0: 5, 1: 10}  # the same share of both
    ties = global_order(analysis, {0: np.ones(10), 1: np.ones(20)})
    assert ties.counts(15) == {0: 5, 1: 10}  # equal scores prune uniformly, not group by group
    skewed = global_order(analysis, {0: np.ones(10), 1: np.r_[np.full(10, 0.01), np.ones(10)]})
    assert skewed.counts(10) == {1: 10}  # the clearly unimportant channels go first


# --- the cost model ------------------------------------------------------------------------

COST_MODELS = ["vgg", "resnet_basic", "resnet_bottleneck", "mobilenetv2", "squeeze_excite", "densenet",
               "grouped_conv", "conv_transpose", "conv1d", "flatten_gemm", "mlp_matmul", "transformer_block",
               "batched_matmul"]


@pytest.mark.parametrize("name", COST_MODELS)
def test_cost_model_matches_cut_models(name: str) -> None:
    model = BUILDERS[name]()
    _, analysis, scores, cost = _setup(model)
    rng = np.random.default_rng(1)
    for trial in range(2):
        counts = {gid: int(rng.integers(0, max(1, len(s) - 1))) for gid, s in scores.items()}
        plan = plan_from_counts(analysis, scores, counts, round_to=1 + trial)
        predicted = cost.evaluate(plan)
        real = _cut_stats(model, analysis, plan)
        assert (predicted.params, predicted.macs) == (real.params, real.macs)


def test_cost_model_digits(digits_model_path) -> None:
    model = load_model(digits_model_path).model
    _, analysis, scores, cost = _setup(model)
    plan = uniform(analysis, scores, 0.5)
    real = _cut_stats(model, analysis, plan)
    assert cost.fraction(plan, "macs") == pytest.approx(real.macs / cost.base.macs)
    assert cost.fraction(plan, "params") == pytest.approx(real.params / cost.base.params)
    assert cost.fraction(Plan(), "macs") == 1.0


def test_macs_unknown_is_a_plan_error() -> None:
    _, _, _, cost = _setup(BUILDERS["symbolic_spatial"]())
    with pytest.raises(PlanError, match="MACs"):
        cost.fraction(Plan(), "macs")


# --- budget search -------------------------------------------------------------------------


@pytest.mark.parametrize("round_to", [1, 4])
def test_fit_budget_lands_within_one_step(round_to: int) -> None:
    model = BUILDERS["vgg"]()
    _, analysis, scores, cost = _setup(model)
    order = global_order(analysis, scores)
    result = fit_budget(analysis, scores, cost, order, {"macs": 0.5}, round_to)
    assert result.achieved["macs"] <= 0.5
    # One channel less (the previous prefix) would miss the target.
    n = sum(len(v) for v in result.plan.removed.values())
    assert n > 0
    for k in range(len(order) + 1):
        if plan_from_counts(analysis, scores, order.counts(k), round_to).total_removed == n:
            previous = plan_from_counts(analysis, scores, order.counts(k - 1), round_to)
            assert cost.fraction(previous, "macs") > 0.5
            break
    for gid, idx in result.plan.removed.items():
        group = analysis.groups[gid]
        assert (group.size - len(idx)) % round_to == 0


def test_fit_budget_two_targets_and_no_op() -> None:
    _, analysis, scores, cost = _setup(BUILDERS["resnet_basic"]())
    order = uniform_order(analysis, scores)
    both = fit_budget(analysis, scores, cost, order, {"macs": 0.7, "params": 0.6})
    assert both.achieved["macs"] <= 0.7 and both.achieved["params"] <= 0.6
    assert max(both.achieved["macs"] / 0.7, both.achieved["params"] / 0.6) > 0.9
    assert fit_budget(analysis, scores, cost, order, {"macs": 1.0}).plan.total_removed == 0


def test_unreachable_budget_is_a_plan_error() -> None:
    _, analysis, scores, cost = _setup(BUILDERS["vgg"]())
    with pytest.raises(PlanError, match="cannot be met"):
        fit_budget(analysis, scores, cost, global_order(analysis, scores), {"params": 0.001})


def test_sensitivity_order_prunes_insensitive_groups_first() -> None:
    _, analysis, scores, cost = _setup(BUILDERS["vgg"]())
    gids = sorted(scores)
    ratios = np.array([0.25, 0.5, 0.75])
    curves = {gid: (ratios, ratios * (10.0 if gid == gids[0] else 0.1)) for gid in gids}
    order = sensitivity_order(analysis, scores, curves, cost)
    first = order.counts(len(order) // 3)
    assert first.get(gids[0], 0) == 0
    result = fit_budget(analysis, scores, cost, order, {"macs": 0.6})
    assert result.strategy == "sensitivity" and result.achieved["macs"] <= 0.6


def test_greedy_order_follows_measured_loss() -> None:
    _, analysis, scores, cost = _setup(BUILDERS["vgg"]())
    gids = sorted(scores)
    fragile = gids[0]

    def loss(plan: Plan) -> float:
        return 100.0 * len(plan.removed.get(fragile, ())) + sum(len(v) for v in plan.removed.values()) * 1e-3

    order = greedy_order(analysis, scores, cost, "macs", 0.6, loss, step=0.1)
    result = fit_budget(analysis, scores, cost, order, {"macs": 0.6})
    assert result.achieved["macs"] <= 0.6
    assert fragile not in result.plan.removed
    assert sorted(np.unique(order.groups)) == gids  # the order goes on to every group's cap


def test_fit_latency_search_with_a_model_of_latency() -> None:
    _, analysis, scores, cost = _setup(BUILDERS["vgg"]())
    order = global_order(analysis, scores)
    calls: list[float] = []

    def measure(plan: Plan) -> float:  # latency falls slower than MACs, plus fixed overhead
        ratio = 0.3 + 0.7 * cost.fraction(plan, "macs")
        calls.append(ratio)
        return ratio

    result = fit_latency(analysis, scores, cost, order, 0.7, measure, max_candidates=8)
    assert result.achieved["latency"] <= 0.7
    assert result.achieved["latency"] >= 0.7 - 0.03 - 1e-9
    assert len(calls) <= 8 and result.candidates
    with pytest.raises(PlanError, match="not reached"):
        fit_latency(analysis, scores, cost, order, 0.2, measure, max_candidates=3)


def test_greedy_order_stops_at_its_evaluation_budget() -> None:
    _, analysis, scores, cost = _setup(BUILDERS["vgg"]())
    calls: list[int] = []

    def loss(plan: Plan) -> float:
        calls.append(1)
        return 0.0

    order = greedy_order(analysis, scores, cost, "macs", 0.5, loss, max_evaluations=2)
    assert "then global" in order.strategy and len(calls) <= 2 + len(scores)
    assert fit_budget(analysis, scores, cost, order, {"macs": 0.5}).achieved["macs"] <= 0.5


def test_plan_never_empties_a_split_branch(tmp_path) -> None:
    """Random or APoZ scores can rank a whole Split branch lowest; the plan must keep one of its channels."""
    import onnx

    from onnxprune.pipeline import prune
    from onnxprune.spec import PruneSpec
    from tests.models import build_shufflenet, random_inputs, run

    model = build_shufflenet()
    onnx.save(model, tmp_path / "s.onnx")
    for seed in range(8):
        out = tmp_path / f"out{seed}.onnx"
        prune(tmp_path / "s.onnx", out, PruneSpec(ratio=0.7, criterion="random", seed=seed, device="cpu"))
        feeds = random_inputs(model)
        assert run(str(out), feeds)["output"].shape == run(model, feeds)["output"].shape
