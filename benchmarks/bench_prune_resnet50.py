"""Issue 2 benchmark: prune ResNet-50 (onnx wheel, light test data) at ratio 0.5.

Prints the wall time of each pipeline stage (surgery = the ``cut`` stage), peak memory of the prune
(Python heap incl. numpy via tracemalloc, and process RSS growth) against the model's size, and the
onnxruntime CPU latency before/after measured interleaved in the same run, next to the MACs reduction.

Run: ``python3 benchmarks/bench_prune_resnet50.py [--runs 30] [--threads 2]``
Aims (issue 2): surgery < 5 s; peak memory < 3x model size; latency speed-up >= 0.7 x MACs reduction.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import resource
import tempfile
import time
import tracemalloc
from pathlib import Path

from onnxprune.measure.bench import compare
from onnxprune.pipeline import prune
from onnxprune.spec import PruneSpec


def light_model(name: str) -> Path:
    spec = importlib.util.find_spec("onnx")
    assert spec is not None and spec.submodule_search_locations
    return Path(next(iter(spec.submodule_search_locations))) / "backend" / "test" / "data" / "light" / f"light_{name}.onnx"


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    src = light_model("resnet50")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "resnet50_pruned.onnx")
        prune(src, os.path.join(tmp, "warm.onnx"), PruneSpec(ratio=args.ratio, device="cpu", fidelity_samples=1))
        rss0 = rss_mb()
        tracemalloc.start()
        t0 = time.perf_counter()
        result = prune(src, out, PruneSpec(ratio=args.ratio, device="cpu", fidelity_samples=1))
        wall = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        r = result.report
        model_mb = r["original"]["bytes"] / 2**20
        cmp = compare(str(src), out, device="cpu", batch=1, runs=args.runs, warmup=5, threads=args.threads)
    macs_x = r["original"]["macs"] / r["pruned"]["macs"]
    print(f"ResNet-50 (light, {model_mb:.1f} MiB), ratio {args.ratio}")
    print(f"  params {r['original']['params']:,} -> {r['pruned']['params']:,} "
          f"({r['original']['params'] / r['pruned']['params']:.2f}x)")
    print(f"  MACs   {r['original']['macs']:,} -> {r['pruned']['macs']:,} ({macs_x:.2f}x)")
    print("  stage times (s): " + ", ".join(f"{k} {v:.2f}" for k, v in r["timings_s"].items()))
    print(f"  prune wall time {wall:.2f} s, surgery (cut) {r['timings_s']['cut']:.2f} s  [aim < 5 s]")
    print(f"  peak traced memory {peak / 2**20:.0f} MiB = {peak / 2**20 / model_mb:.2f}x model  [aim < 3x]; "
          f"RSS {rss0:.0f} -> peak {rss_peak:.0f} MiB")
    print(f"  CPU latency p50 ({args.threads} threads, batch 1): {cmp.a.p50_ms:.2f} ms -> {cmp.b.p50_ms:.2f} ms, "
          f"speed-up {cmp.speedup:.2f}x = {cmp.speedup / macs_x:.2f} of the MACs reduction  [aim >= 0.7]")


if __name__ == "__main__":
    main()
