"""``onnxprune export-artifacts``: write training_model/eval_model/checkpoint/manifest for a model."""

from __future__ import annotations

import argparse
import math

from onnxprune.spec import parse_shape_args


def run(args: argparse.Namespace) -> int:
    from onnxprune.io.load import load_model
    from onnxprune.training import LossSpec, OptimizerSpec, export_artifacts

    loaded = load_model(args.model)
    arts = export_artifacts(
        loaded.model,
        loss=LossSpec(kind=args.loss),
        optimizer=OptimizerSpec(kind=args.optimizer),
        shapes=parse_shape_args(args.shape),
        output_dir=args.output,
    )
    n = sum(math.prod(p["shape"]) for p in arts.manifest["params"])
    print(f"wrote {args.output}: {len(arts.manifest['params'])} trained tensors ({n} values), "
          f"loss {args.loss}, optimizer {args.optimizer}")
    return 0
