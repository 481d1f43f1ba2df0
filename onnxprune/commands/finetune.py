"""``onnxprune finetune``: train a model's weights on DATA with onnxruntime and save the result."""

from __future__ import annotations

import argparse
import sys


def run(args: argparse.Namespace) -> int:
    from onnxprune.io.load import load_model
    from onnxprune.io.save import save_model
    from onnxprune.training import FinetuneConfig, TrainData, finetune

    model = load_model(args.model).model
    teacher = load_model(args.teacher).model if args.teacher else None
    data = TrainData.load(args.train_data)
    config = FinetuneConfig(
        steps=args.steps, lr=args.lr, batch_size=args.batch_size, optimizer=args.optimizer, seed=args.seed,
        progress_bar=sys.stderr.isatty(),
    )
    result = finetune(model, data, config, teacher=teacher, device=args.device)
    save_model(result.model, args.output)
    shown = ", ".join(f"{k} {v:.4g}" for k, v in result.final_metrics.items())
    print(f"wrote {args.output} ({'labels' if data.labels is not None else 'distillation'}): {shown}")
    return 0
