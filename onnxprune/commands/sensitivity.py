"""``onnxprune sensitivity``: prune each group alone at a sweep of ratios; write JSON, a PNG, and a table."""

from __future__ import annotations

import argparse
import json

from onnxprune.pipeline import sensitivity as run_sensitivity
from onnxprune.planning import sensitivity
from onnxprune.spec import PruneSpec, parse_shape_args


def run(args: argparse.Namespace) -> int:
    spec = PruneSpec(criterion=args.criterion, calib=args.calib, calib_samples=args.calib_samples,
                     shapes=parse_shape_args(args.shape), device=args.device, exclude=list(args.exclude),
                     heads=args.heads, ratio=0.0, eval_data=args.eval_data, metric=args.metric).validate()
    result = run_sensitivity(args.model, spec)
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
