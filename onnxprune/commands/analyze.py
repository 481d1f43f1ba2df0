"""``onnxprune analyze``: list the channel dependency groups and why any are blocked."""

from __future__ import annotations

import argparse
import json
from typing import Any

from onnxprune.spec import parse_shape_args


def render(result: dict[str, Any]) -> str:
    lines = [
        f"{result['model']}: {result['prunable_groups']} prunable groups, "
        f"{result['prunable_channels']}/{result['total_channels']} channels prunable",
        f"{'group':>5}  {'channels':>8}  {'prunable':>8}  producers / reason",
    ]
    for g in result["groups"]:
        producers = ", ".join(g["producers"][:3]) + (f" (+{len(g['producers']) - 3})" if len(g["producers"]) > 3 else "")
        lines.append(f"{g['id']:>5}  {g['channels']:>8}  {g['prunable']:>8}  {producers}")
        if g["reasons"]:
            lines.append(f"{'':>27}{'blocked' if g['blocked'] else 'partly blocked'}: {g['reasons'][0]}")
    blocks = result.get("removable_blocks", [])
    lines.append(f"{len(blocks)} removable residual blocks (--depth K removes the K least important)")
    for b in blocks:
        lines.append(f"  {b['add']:<30} {b['kind']:<10} {b['nodes']:>3} nodes {b['params']:>10} params")
    for note in result.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if getattr(args, "server", None):
        from onnxprune.commands import remote

        return remote.analyze(args)
    from onnxprune.pipeline import analyze

    result = analyze(args.model, parse_shape_args(args.shape))
    print(json.dumps(result, indent=2) if args.json else render(result))
    return 0
