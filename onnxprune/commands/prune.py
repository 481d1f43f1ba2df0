"""``onnxprune prune``: build a PruneSpec from the arguments and run the pipeline (or a remote job)."""

from __future__ import annotations

import argparse

from onnxprune.commands._output import write_report
from onnxprune.commands._progress import StageBar
from onnxprune.spec import PruneSpec, parse_shape_args


def spec_from_args(args: argparse.Namespace) -> PruneSpec:
    """The one mapping from CLI arguments to a PruneSpec (the service maps its proto in one place too)."""
    return PruneSpec(
        ratio=args.ratio, criterion=args.criterion, global_ranking=args.global_ranking,
        target_macs=args.target_macs, target_params=args.target_params, target_latency=args.target_latency,
        round_to=args.round_to, exclude=list(args.exclude), granularity=args.granularity, sparsity=args.sparsity,
        depth=args.depth, shapes=parse_shape_args(args.shape), calib=args.calib, calib_samples=args.calib_samples,
        reconstruct=args.reconstruct, finetune_steps=args.finetune_steps, train_data=args.train_data, lr=args.lr,
        batch_size=args.batch_size, iterations=args.iterations, bench=args.bench, device=args.device, seed=args.seed,
        heads=args.heads, depth_method=args.depth_method, eval_data=args.eval_data, metric=args.metric,
        max_drop=args.max_drop, quantize=args.quantize, quant_calibration=args.quant_calibration,
        quant_exclude=list(args.quant_exclude), keep_io_types=args.keep_io_types, quant_max_drop=args.quant_max_drop,
        feature_distill=args.feature_distill, prune_lm_hidden=args.prune_lm_hidden,
        allocation=args.allocation,
    ).validate()


def run(args: argparse.Namespace) -> int:
    spec = spec_from_args(args)
    if args.server:
        from onnxprune.commands import remote

        return remote.prune(args, spec)
    from onnxprune.pipeline import prune
    from onnxprune.report import render_table

    with StageBar("prune") as bar:
        result = prune(args.model, args.output, spec, progress=bar)
    write_report(result.report, args.report)
    print(render_table(result.report))
    print(f"wrote {result.output_path}" + (f" and {args.report}" if args.report else ""))
    return 0
