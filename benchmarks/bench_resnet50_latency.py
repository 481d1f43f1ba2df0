"""Issue 7 benchmark: MACs reduction vs measured onnxruntime CPU speed-up for ResNet-50 (onnx wheel, light).

For ``--ratio`` 0.3/0.5/0.7 (share of every group's channels removed) with and without ``--round-to 8``,
prunes the model and measures original and pruned latency interleaved in the same run
(:func:`onnxprune.measure.bench.compare`, fixed threads, warm-up), so the speed-up is a ratio of medians taken
under the same machine load. MACs fall with the channel count squared; latency falls less (memory-bound
layers, fixed per-op overhead) and may not reward round-to-8 on CPU, which is what the table shows.

Run: ``python3 benchmarks/bench_resnet50_latency.py [--runs 20] [--repeat 3] [--threads 1] [--json]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from onnxprune.measure.bench import compare
from onnxprune.pipeline import prune  # noqa: E402
from onnxprune.spec import PruneSpec  # noqa: E402
from tests.data import light_model_dir  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    parser.add_argument("--round-to", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=1, help="the light model's batch is fixed at 1")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved comparisons per row; medians are shown")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON too")
    args = parser.parse_args()
    src = light_model_dir() / "light_resnet50.onnx"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for ratio in args.ratios:
            for round_to in args.round_to:
                out = os.path.join(tmp, f"r50_{ratio}_{round_to}.onnx")
                t0 = time.perf_counter()
                report = prune(src, out, PruneSpec(ratio=ratio, round_to=round_to, device="cpu",
                                                   fidelity_samples=1)).report
                prune_s = time.perf_counter() - t0
                results = [compare(str(src), out, device="cpu", batch=args.batch, runs=args.runs,
                                   warmup=args.warmup, threads=args.threads) for _ in range(args.repeat)]
                speedup = statistics.median(r.speedup for r in results)
                orig, pruned = report["original"], report["pruned"]
                macs_x = orig["macs"] / pruned["macs"]
                rows.append({
                    "ratio": ratio, "round_to": round_to,
                    "macs_kept": pruned["macs"] / orig["macs"], "macs_reduction_x": macs_x,
                    "params_kept": pruned["params"] / orig["params"],
                    "latency_original_ms": statistics.median(r.a.p50_ms for r in results),
                    "latency_pruned_ms": statistics.median(r.b.p50_ms for r in results),
                    "speedup_x": speedup, "speedup_per_macs_reduction": speedup / macs_x,
                    "speedups": [round(r.speedup, 3) for r in results],
                    "prune_s": prune_s,
                })
    print(f"ResNet-50 (onnx light), onnxruntime CPU, batch {args.batch}, {args.threads} thread(s), "
          f"{args.runs} interleaved runs x {args.repeat}, medians of p50")
    header = ("ratio", "round", "MACs kept", "MACs x", "params kept", "orig ms", "pruned ms", "speed-up x",
              "speed-up/MACs x")
    print("  ".join(f"{h:>11}" for h in header))
    for r in rows:
        cells = (f"{r['ratio']:.1f}", str(r["round_to"]), f"{r['macs_kept']:.3f}", f"{r['macs_reduction_x']:.2f}",
                 f"{r['params_kept']:.3f}", f"{r['latency_original_ms']:.2f}", f"{r['latency_pruned_ms']:.2f}",
                 f"{r['speedup_x']:.2f}", f"{r['speedup_per_macs_reduction']:.2f}")
        print("  ".join(f"{c:>11}" for c in cells))
    if args.json:
        print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
