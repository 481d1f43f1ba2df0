"""``onnxprune apply-checkpoint``: turn trained parameters back into an inference model."""

from __future__ import annotations

import argparse
from pathlib import Path

from onnxprune.errors import BadInputError


def run(args: argparse.Namespace) -> int:
    from onnxprune.io.load import load_model
    from onnxprune.io.save import save_model
    from onnxprune.training import apply_checkpoint
    from onnxprune.training.artifacts import load_checkpoint

    loaded = load_model(args.model)
    source = Path(args.checkpoint)
    path = source / "checkpoint.npz" if source.is_dir() else source
    if not path.is_file():
        raise BadInputError(f"no checkpoint at {args.checkpoint} (a checkpoint.npz or an artifacts directory)",
                            field="checkpoint")
    values = load_checkpoint(path)
    names = {t.name for t in loaded.model.graph.initializer}
    matched = sorted(set(values) & names)
    if not matched:
        raise BadInputError(f"{path} holds no parameter of {args.model}; was it exported from this model?",
                            field="checkpoint")
    save_model(apply_checkpoint(loaded.model, values), args.output)
    print(f"wrote {args.output}: {len(matched)} parameters from {path}")
    return 0
