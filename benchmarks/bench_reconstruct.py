"""``--reconstruct`` on a trained model: time, peak memory and task accuracy on PP-OCRv4's text recognizer.

Prunes ``ch_PP-OCRv4_rec_infer.onnx`` (from the rapidocr-onnxruntime wheel) by ``--ratio`` of every prunable group
with l2 through the project pipeline, calibrating on rendered text lines (``tests/tasks/ocr.py``), once without
repair and once with ``--reconstruct``, and measures the character and line accuracy of the original and both
pruned models on held-out lines rendered with another seed. Each prune runs in a child process so its peak RSS
is its own; the reconstruct time is the pipeline report's ``timings_s["reconstruct"]``.

Usage:
    python3 benchmarks/bench_reconstruct.py [--ratio 0.1] [--calib-samples 256] [--eval-samples 256] [--threads 2]

``--threads N`` pins the children to N cores (``os.sched_setaffinity``), as on a small CPU machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from onnxprune.pipeline import prune
from onnxprune.spec import PruneSpec
from tests.tasks import ocr


class StagePeaks:
    """Peak RSS per pipeline stage, sampled from /proc every 20 ms (ru_maxrss only gives the whole run's)."""

    def __init__(self) -> None:
        self.stage, self.peaks, self.stop = "start", {}, threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def progress(self, event: Any) -> None:
        self.stage = event.stage

    def _sample(self) -> None:
        while not self.stop.wait(0.02):
            with open("/proc/self/statm") as f:
                rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
            self.peaks[self.stage] = max(self.peaks.get(self.stage, 0.0), rss)


def child(args: argparse.Namespace) -> int:
    """Prune once and print the report's timings, the reconstruct errors and the peak RSS (whole run and per
    stage) as JSON."""
    spec = PruneSpec(ratio=args.ratio, criterion="l2", calib=args.calib, calib_samples=args.calib_samples,
                     reconstruct=args.reconstruct, device=args.device)
    peaks = StagePeaks()
    t0 = time.perf_counter()
    report = prune(ocr.rec_model_path(), args.child, spec, progress=peaks.progress).report
    peaks.stop.set()
    out = {"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time(), "timings_s": report["timings_s"],
           "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "stage_peak_rss_mib": {k: round(v) for k, v in peaks.peaks.items()},
           "reconstruct": report.get("reconstruct"),
           "notes": [n for n in report.get("notes", []) if n.startswith("reconstruct")],
           "macs": [report["original"].get("macs"), report["pruned"].get("macs")]}
    print("RESULT " + json.dumps(out))
    return 0


def run_child(out: Path, calib: Path, args: argparse.Namespace, reconstruct: bool) -> dict:
    """One prune in a fresh process (pinned to ``--threads`` cores), returning what :func:`child` printed."""
    cmd = [sys.executable, __file__, "--child", str(out), "--calib", str(calib), "--ratio", str(args.ratio),
           "--calib-samples", str(args.calib_samples), "--device", args.device]
    if reconstruct:
        cmd.append("--reconstruct")
    cores = sorted(os.sched_getaffinity(0))[: args.threads] if args.threads else None
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False,
                          preexec_fn=(lambda: os.sched_setaffinity(0, cores)) if cores else None)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"the prune child failed with exit code {proc.returncode}")
    return json.loads(line.removeprefix("RESULT "))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.1)
    parser.add_argument("--calib-samples", type=int, default=256)
    parser.add_argument("--eval-samples", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2, help="cores the prune children may use (0: all)")
    parser.add_argument("--device", default="cpu", choices=("auto", "cuda", "cpu"))
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--calib", help=argparse.SUPPRESS)
    parser.add_argument("--reconstruct", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args)

    images, _ = ocr.make_rec_dataset(args.calib_samples, seed=0)
    held_out, texts = ocr.make_rec_dataset(args.eval_samples, seed=1)
    rows = [("original", ocr.evaluate_rec(ocr.rec_model_path(), held_out, texts), None)]
    with tempfile.TemporaryDirectory() as tmp:
        calib = ocr.save_npz(Path(tmp) / "calib.npz", ocr.INPUT_NAME, images)
        for reconstruct in (False, True):
            out = Path(tmp) / f"pruned-{reconstruct}.onnx"
            run = run_child(out, calib, args, reconstruct)
            rows.append((f"l2 {args.ratio:g}" + (" + reconstruct" if reconstruct else ""),
                         ocr.evaluate_rec(out, held_out, texts), run))

    print(f"PP-OCRv4 rec, ratio {args.ratio:g} (l2), {args.calib_samples} calibration lines, "
          f"{args.eval_samples} held-out lines, children on {args.threads or 'all'} cores")
    print(f"{'model':<26}{'char acc':>9}{'line acc':>9}{'reconstruct s':>15}{'RSS in it':>10}{'prune s':>9}"
          f"{'cpu s':>7}{'peak RSS':>9}")
    for name, acc, run in rows:
        extra = ("",) * 5 if run is None else (
            f"{run['timings_s'].get('reconstruct', 0.0):.1f}",
            f"{run['stage_peak_rss_mib'].get('reconstruct', 0)}M" if run["timings_s"].get("reconstruct") else "",
            f"{run['wall_s']:.1f}", f"{run['cpu_s']:.0f}", f"{run['peak_rss_mib']:.0f}M")
        print(f"{name:<26}{100 * acc['char_acc']:>8.1f}%{100 * acc['line_acc']:>8.1f}%{extra[0]:>15}{extra[1]:>10}"
              f"{extra[2]:>9}{extra[3]:>7}{extra[4]:>9}")
    print("peak RSS per stage (MiB): " + ", ".join(f"{k} {v}" for k, v in rows[-1][2]["stage_peak_rss_mib"].items()))
    for note in rows[-1][2]["notes"]:
        print("  " + note)
    if args.json:
        Path(args.json).write_text(json.dumps([{"model": n, **a, **(r or {})} for n, a, r in rows], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
