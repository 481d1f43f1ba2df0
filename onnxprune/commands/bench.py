"""``onnxprune bench MODEL [OTHER]``: latency percentiles and throughput, and the ratio of two models.

With two models the runs are interleaved in the same process (see :func:`onnxprune.measure.bench.compare`),
so the printed speed-up is measured under the same machine conditions for both.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
from typing import Any

from onnxprune.measure.bench import Comparison, LatencyStats, compare, fixed_batch, measure_latency
from onnxprune.errors import BadInputError
from onnxprune.runtime.session import Session, make_session
from onnxprune.runtime.device import select_device
from onnxprune.spec import parse_shape_args

logger = logging.getLogger(__name__)


def _usable_batches(sessions: list[Session], wanted: list[int]) -> tuple[list[int], list[int]]:
    """Batches every model can take: all when the batch dim is symbolic, else only the fixed one."""
    fixed = {b for b in (fixed_batch(s) for s in sessions) if b is not None}
    if not fixed:
        return list(wanted), []
    if len(fixed) > 1:
        raise BadInputError(f"the models have different fixed batch sizes {sorted(fixed)}", field="batch")
    only = fixed.pop()
    skipped = [b for b in wanted if b != only]
    if skipped:
        logger.warning("the model has a fixed batch of %d; measuring batch %d only (skipping %s)", only, only, skipped)
    return [only], skipped


def _row(label: str, s: LatencyStats) -> list[str]:
    return [
        str(s.batch),
        label,
        f"{s.p50_ms:.3f}",
        f"{s.p90_ms:.3f}",
        f"{s.p99_ms:.3f}",
        f"{s.mean_ms:.3f}",
        f"{s.throughput_per_s:.1f}",
    ]


def _format(result: dict[str, Any], rows: list[list[str]], notes: list[str]) -> str:
    header = ["batch", "model", "p50 ms", "p90 ms", "p99 ms", "mean ms", "samples/s"]
    table = [header, *rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    lines = [
        f"device {result['device']} ({result['provider']}), {result['threads']} thread(s), "
        f"{result['runs']} runs after {result['warmup']} warm-up"
    ]
    for key in ("a", "b"):
        if result["models"].get(key):
            lines.append(f"  {key.upper()}: {result['models'][key]}")
    for r in table:
        lines.append("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    lines.extend(notes)
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Measure one model, or two interleaved, for each ``--batch``; print a table or ``--json``.

    Raises:
        BadInputError: bad options or a model onnxruntime cannot run.
    """
    shapes = parse_shape_args(args.shape)
    batches = sorted(dict.fromkeys(args.batch))
    if any(b < 1 for b in batches):
        raise BadInputError(f"--batch values must be >= 1, got {args.batch}", field="batch")
    if args.runs < 1 or args.threads < 1:
        raise BadInputError("--runs and --threads must be >= 1", field="runs")
    warmup = min(10, max(2, args.runs // 10))
    choice = select_device(args.device)
    paths = [p for p in (args.model, args.other) if p]
    with contextlib.ExitStack() as stack:
        sessions = [stack.enter_context(make_session(p, choice, args.threads)) for p in paths]
        usable, skipped = _usable_batches(sessions, batches)
        result: dict[str, Any] = {
            "device": choice.name,
            "provider": sessions[0].provider,
            "device_note": choice.note,
            "threads": args.threads,
            "runs": args.runs,
            "warmup": warmup,
            "models": {"a": args.model, "b": args.other},
            "results": [],
            "skipped_batches": skipped,
        }
        rows: list[list[str]] = []
        notes: list[str] = []
        for batch in usable:
            if len(sessions) == 2:
                cmp: Comparison = compare(
                    sessions[0], sessions[1], batch=batch, runs=args.runs, warmup=warmup, shapes=shapes
                )
                result["results"].append({"batch": batch, **cmp.to_dict()})
                rows += [_row("A", cmp.a), _row("B", cmp.b)]
                notes.append(f"batch {batch}: B is {cmp.speedup:.2f}x the speed of A (p50, interleaved runs)")
            else:
                stats = measure_latency(sessions[0], batch=batch, runs=args.runs, warmup=warmup, shapes=shapes)
                result["results"].append({"batch": batch, "a": stats.to_dict()})
                rows.append(_row("A", stats))
    if skipped:
        notes.append(f"skipped batch(es) {skipped}: the model's batch dim is fixed")
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(_format(result, rows, notes))
    return 0
