"""``onnxprune sensitivity``: prune each group alone at a sweep of ratios; write JSON, a PNG, and a table."""

from __future__ import annotations

import argparse
import json
from typing import Any

import onnx_graphsurgeon as gs

from onnxprune.io.load import load_model
from onnxprune.io.shapes import static_shapes
from onnxprune.planning.cost import CostModel
from onnxprune.measure.stats import model_stats
from onnxprune.planning import sensitivity
from onnxprune.errors import PlanError
from onnxprune.analysis.driver import analyze_graph
from onnxprune.importance.base import ScoringContext
from onnxprune.importance import default_criteria, score_groups
from onnxprune.spec import parse_shape_args


def run(args: argparse.Namespace) -> int:
    shapes = parse_shape_args(args.shape)
    loaded = load_model(args.model)
    model = loaded.model
    graph = gs.import_onnx(model)
    analysis = analyze_graph(graph, static_shapes(model, shapes))
    criteria = default_criteria()
    extras: dict[str, Any] = {}
    needs = criteria.needs.get(args.criterion, set())
    if needs:  # activation-based criteria score from the same calibration data
        from onnxprune.repair import calibration

        source, what = calibration.open_calibration(model, args.calib, args.calib_samples, shapes)
        extras["calibration"] = calibration.calibrate(model, graph, analysis, source, needs=needs, device=args.device,
                                                      description=what)
    ctx = ScoringContext(graph, analysis, extras=extras)
    scores = score_groups(ctx, args.criterion, criteria)
    if not scores:
        raise PlanError("the model has no prunable channel groups (see `onnxprune analyze`)")
    cost = CostModel(graph, analysis, model_stats(model, shapes or None))
    evaluate = sensitivity.evaluator_for(model, args.calib, args.calib_samples, shapes, args.device)
    result = sensitivity.scan(model, analysis, scores, evaluate, criterion=args.criterion, cost=cost)
    result.notes.extend(ctx.notes)
    if args.plot:
        result.curves = sensitivity.plot(result, args.plot)
    if args.output:
        result.save(args.output)
    _print_table(result)
    written = [p for p in (args.output, args.plot) if p]
    if written:
        print("wrote " + " and ".join(written))
    else:
        print(json.dumps({"curves": result.curves, "baseline": result.baseline}))
    return 0


def _print_table(result: sensitivity.SensitivityResult) -> None:
    print(f"{result.metric} per share of channels removed ({result.samples} samples, "
          f"baseline {result.baseline:.4f}, criterion {result.criterion})")
    head = "group  channels  " + "  ".join(f"{r:>5.2f}" for r in result.ratios) + "  producers"
    print(head)
    for c in result.groups:
        cells = "  ".join(f"{p.metric:>5.3f}" for p in c.points)
        print(f"{c.group:>5}  {c.channels:>8}  {cells}  {c.label.split(': ', 1)[-1]}")
