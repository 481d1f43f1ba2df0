"""``onnxprune analyze``: list the channel dependency groups and why any are blocked."""

from __future__ import annotations

import argparse
import json

from onnxprune.commands._output import render_analysis
from onnxprune.spec import parse_shape_args


def run(args: argparse.Namespace) -> int:
    if getattr(args, "server", None):
        from onnxprune.commands import remote

        return remote.analyze(args)
    from onnxprune.pipeline import analyze

    result = analyze(args.model, parse_shape_args(args.shape))
    print(json.dumps(result, indent=2) if args.json else render_analysis(result))
    return 0
