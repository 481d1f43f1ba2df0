"""What the prune and analyze commands print and write, shared by their embedded and remote (``--server``) runs.

Both runs must produce the same output, so it is written once here; the command modules and
``onnxprune.commands.remote`` import it, never each other.
"""

from __future__ import annotations

import json
import os
from typing import Any


def write_report(report: dict[str, Any], path: str | None) -> None:
    """Write the JSON report to ``path`` (``--report``), creating its folder; nothing when ``path`` is None."""
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
        with open(path, "w") as f:
            json.dump(report, f, indent=2)


def render_analysis(result: dict[str, Any]) -> str:
    """The ``onnxprune analyze`` table: groups, why any are blocked, removable residual blocks, notes."""
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
        if g.get("approximate"):
            lines.append(f"{'':>27}approximate: {g['approximate'][0]}")
    blocks = result.get("removable_blocks", [])
    lines.append(f"{len(blocks)} removable residual blocks (--depth K removes the K least important)")
    for b in blocks:
        lines.append(f"  {b['add']:<30} {b['kind']:<10} {b['nodes']:>3} nodes {b['params']:>10} params")
    for note in result.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)
