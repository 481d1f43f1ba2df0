"""Real-task benchmark: PP-OCR's text recognizer and direction classifier, pruned and repaired, scored on their task.

Why: a compression tool is only useful if the model still does its job. The trained models ship in the
rapidocr-onnxruntime 1.4.4 wheel; text lines rendered from matplotlib's fonts give ground truth (tests/tasks/ocr.py):
character and line accuracy for the recognizer (greedy CTC with the model's character list), top-1 for the 0/180
classifier. Training data, calibration data and held-out data are rendered with different seeds.

For each model and MACs budget (``--target-macs``, with ``--shape`` fixing the Paddle exports' dims) it runs the
project pipeline (:func:`onnxprune.pipeline.prune`) once per repair, each in a fresh process (peak RSS is that
process's own ``VmHWM``; a watchdog kills it above ``--max-rss-gb``), then scores the result on the held-out lines:

* ``cut``: the cut alone (the BatchNorm stage switched off in that process);
* ``cut+bn``: the pipeline's default with ``--calib``: BatchNorm statistics matched to the original's after the cut;
* ``reconstruct``: ``--reconstruct`` (and the BatchNorm stage, as by default);
* ``finetune``: ``--finetune-steps N --train-data`` (the classifier's data has labels 0/180; the recognizer's has
  none, so it distils from the original);
* ``reconstruct+finetune``: both, reconstruction first;
* ``max-drop``: ``--max-drop X --eval-data`` on a separate validation set with labels: 0/180 for the classifier
  (``--metric top1``), each line's character indices for the recognizer (``--metric ctc``);
* ``reconstruct-nobn``, ``finetune-nobn``: the same with the BatchNorm stage switched off.

Every run scores channels by ``--criterion`` (default ``l2``) and spreads its budget by ``--allocation`` (the
pipeline's options; ``auto`` is measured on the calibration data, which costs minutes per run here; ``global`` ranks
the criterion's scores across groups; ``uniform`` cuts every group by the same share).

Usage:
    python3 benchmarks/real_task.py [--models cls,rec] [--budgets 0.7,0.5] [--repairs cut,cut+bn,reconstruct,finetune]
        [--train-samples 512] [--calib-samples 256] [--eval-samples 256] [--finetune-steps 300] [--batch-size 16]
        [--criterion l2] [--allocation auto|uniform|global|measured] [--threads 2] [--max-rss-gb 6] [--timeout 1800] [--json results.json] [--quick]

The defaults are the issue's settings (300 fine-tuning steps, 512/256/256 lines); on 2 cores the classifier takes
about 15 minutes, the recognizer about an hour (one 300-step distillation run ~16 minutes). ``--quick`` runs every
repair once at MACs 0.7 with 128/64/128 lines and 30 steps (a few minutes), to check the harness, not the numbers.
Prints a table (markdown rows) and writes the rows as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from onnxprune.spec import ALLOCATIONS, CRITERIA
from tests.tasks import ocr

REPAIRS = ("cut", "cut+bn", "reconstruct", "finetune", "reconstruct+finetune", "max-drop")
NO_BN = "-nobn"
"""Suffix for a repair run with the BatchNorm stage switched off (``reconstruct-nobn``, ``finetune-nobn``)."""
REC_SHAPE = [1, 3, ocr.REC_HEIGHT, ocr.REC_WIDTH]
CLS_SHAPE = [1, *ocr.CLS_SHAPE]
SEEDS = {"train": 0, "eval": 1, "validation": 2}


# ----------------------------------------------------------------------------------------------
# Tasks


@dataclass
class Task:
    """One model with its data files and how it is scored."""

    name: str
    path: Path
    shape: list[int]
    train: Path
    """Training data (labels for the classifier), also the calibration data (its first --calib-samples)."""
    eval_images: np.ndarray
    score: Callable[[str | Path], dict[str, float]]
    headline: str
    """The score key the table and the tests look at first."""
    validation: Path | None = None
    """Labelled data for --max-drop (never the held-out set)."""
    metric: str = "top1"
    """--metric of the max-drop run on ``validation``."""


def make_tasks(names: list[str], args: argparse.Namespace, tmp: Path) -> list[Task]:
    """Render the data sets once (train/calibration, held-out, validation: different seeds)."""
    tasks = []
    for name in names:
        if name == "rec":
            images, _ = ocr.make_rec_dataset(args.train_samples, seed=SEEDS["train"])
            train = ocr.save_npz(tmp / "rec_train.npz", ocr.INPUT_NAME, images)
            held, texts = ocr.make_rec_dataset(args.eval_samples, seed=SEEDS["eval"])
            val_images, val_texts = ocr.make_rec_dataset(args.eval_samples, seed=SEEDS["validation"])
            validation = ocr.save_npz(tmp / "rec_val.npz", ocr.INPUT_NAME, val_images,
                                      ocr.text_labels(val_texts, ocr.load_charset()))
            tasks.append(Task("rec", ocr.rec_model_path(), REC_SHAPE, train, held,
                              lambda m, held=held, texts=texts: ocr.evaluate_rec(m, held, texts), "char_acc",
                              validation, "ctc"))
        elif name == "cls":
            images, labels = ocr.make_cls_dataset(args.train_samples, seed=SEEDS["train"])
            train = ocr.save_npz(tmp / "cls_train.npz", ocr.INPUT_NAME, images, labels)
            held, held_labels = ocr.make_cls_dataset(args.eval_samples, seed=SEEDS["eval"])
            val_images, val_labels = ocr.make_cls_dataset(args.eval_samples, seed=SEEDS["validation"])
            validation = ocr.save_npz(tmp / "cls_val.npz", ocr.INPUT_NAME, val_images, val_labels)
            tasks.append(Task("cls", ocr.cls_model_path(), CLS_SHAPE, train, held,
                              lambda m, held=held, labels=held_labels: ocr.evaluate_cls(m, held, labels), "top1",
                              validation))
        else:
            raise SystemExit(f"unknown model {name!r}: choose rec and/or cls")
    return tasks


def spec_for(task: Task, repair: str, budget: float, args: argparse.Namespace) -> dict[str, Any]:
    """The PruneSpec (as a dict) of one run: the user's command for that repair."""
    repair = repair.removesuffix(NO_BN)
    spec: dict[str, Any] = {"target_macs": budget, "criterion": args.criterion, "shapes": {ocr.INPUT_NAME: task.shape},
                            "calib": str(task.train), "calib_samples": args.calib_samples, "device": args.device,
                            "seed": 0, "allocation": args.allocation}
    if repair in ("reconstruct", "reconstruct+finetune"):
        spec["reconstruct"] = True
    if repair in ("finetune", "reconstruct+finetune", "max-drop"):
        spec.update(finetune_steps=args.finetune_steps, train_data=str(task.train), lr=args.lr,
                    batch_size=args.batch_size)
    if repair == "max-drop":
        del spec["target_macs"]
        spec.update(max_drop=args.max_drop, eval_data=str(task.validation), metric=task.metric)
    return spec


# ----------------------------------------------------------------------------------------------
# One run in a child process


def child(config: dict[str, Any]) -> int:
    """Prune once as ``config`` says and print what the report holds, wall time and peak RSS as JSON."""
    from onnxprune import pipeline
    from onnxprune.spec import PruneSpec

    if config["no_bn"]:  # the cut alone: the BatchNorm stage (on by default with --calib) leaves the pipeline
        kept = [(n, f) for n, f in pipeline.REPAIR_STAGES if n != "refresh-bn"]
        pipeline.REPAIR_STAGES[:] = kept
        pipeline.STAGES[:] = [(n, f) for n, f in pipeline.STAGES if n != "refresh-bn"]
    t0 = time.perf_counter()
    report = pipeline.prune(config["model"], config["out"], PruneSpec.from_dict(config["spec"])).report
    wall = time.perf_counter() - t0
    orig, pruned = report["original"].get("macs"), report["pruned"].get("macs")
    out = {"wall_s": round(wall, 2), "peak_rss_mib": round(_vm_hwm_mib()), "timings_s": report["timings_s"],
           "macs_fraction": round(pruned / orig, 4) if orig and pruned else None,
           "params_fraction": round(report["pruned"]["params"] / report["original"]["params"], 4),
           "notes": [n for n in report.get("notes", []) if n.startswith(("BatchNorm", "reconstructed", "fine-tuned",
                                                                        "budget", "allocation"))],
           "finetune": report.get("finetune"), "max_drop": report.get("max_drop")}
    print("RESULT " + json.dumps(out))
    return 0


def _vm_hwm_mib() -> float:
    """This process's peak resident memory (``VmHWM``), MiB."""
    with open("/proc/self/status") as f:
        line = next(ln for ln in f if ln.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


@dataclass
class RunResult:
    """What a child printed, or why it has nothing to say."""

    data: dict[str, Any] = field(default_factory=dict)
    failure: str | None = None
    watched_peak_mib: float = 0.0


def run_child(config: dict[str, Any], args: argparse.Namespace) -> RunResult:
    """One prune in a fresh process pinned to ``--threads`` cores, killed above ``--max-rss-gb`` or ``--timeout``."""
    cmd = [sys.executable, __file__, "--child", json.dumps(config)]
    cores = sorted(os.sched_getaffinity(0))[: args.threads] if args.threads else None
    if cores and shutil.which("taskset"):  # not preexec_fn: this process has onnxruntime's threads running
        cmd = ["taskset", "-c", ",".join(map(str, cores)), *cmd]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    result = RunResult()
    limit_mib = args.max_rss_gb * 1024

    def watch() -> None:
        while proc.poll() is None:
            rss = _rss_mib(proc.pid)
            result.watched_peak_mib = max(result.watched_peak_mib, rss)
            if rss > limit_mib:
                result.failure = f"killed: RSS {rss / 1024:.1f} GB > {args.max_rss_gb} GB"
                proc.kill()
                return
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        stdout, stderr = proc.communicate(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
        result.failure = result.failure or f"killed: over {args.timeout} s"
    watcher.join()
    line = next((ln for ln in stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is not None:
        result.data = json.loads(line.removeprefix("RESULT "))
    elif result.failure is None:
        last = (stderr.strip().splitlines() or ["no output"])[-1]
        result.failure = f"exit {proc.returncode}: {last[:300]}"
    return result


def _rss_mib(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            line = next((ln for ln in f if ln.startswith("VmRSS:")), "VmRSS: 0 kB")
    except OSError:
        return 0.0
    return int(line.split()[1]) / 1024


# ----------------------------------------------------------------------------------------------
# The table


@dataclass
class Row:
    """One line of the table (and of the JSON)."""

    model: str
    config: str
    scores: dict[str, float] | None
    macs_fraction: float | None = 1.0
    wall_s: float | None = None
    peak_rss_mib: float | None = None
    failure: str | None = None
    notes: list[str] = field(default_factory=list)
    timings_s: dict[str, float] = field(default_factory=dict)


def run_task(task: Task, args: argparse.Namespace, tmp: Path) -> list[Row]:
    t0 = time.perf_counter()
    rows = [Row(task.name, "original", task.score(task.path), wall_s=None)]
    rows[0].notes.append(f"scored in {time.perf_counter() - t0:.1f} s")
    _print_row(rows[-1])
    for budget in args.budgets:
        for repair in args.repairs:
            if repair.startswith("max-drop") and (task.validation is None or budget != args.budgets[0]):
                continue
            rows.append(run_config(task, repair, budget, args, tmp))
            _print_row(rows[-1])
    return rows


def run_config(task: Task, repair: str, budget: float, args: argparse.Namespace, tmp: Path) -> Row:
    out = tmp / f"{task.name}-{repair}-{budget}.onnx"
    config = {"model": str(task.path), "out": str(out), "spec": spec_for(task, repair, budget, args),
              "no_bn": repair == "cut" or repair.endswith(NO_BN)}
    label = f"max-drop {args.max_drop:g}" if repair.startswith("max-drop") else f"macs {budget:g} {repair}"
    if repair.removesuffix(NO_BN) in ("finetune", "reconstruct+finetune", "max-drop"):
        label += f" {args.finetune_steps}" + (" labels" if task.name == "cls" else " distill")
    run = run_child(config, args)
    if run.failure is not None:
        return Row(task.name, label, None, None, None, round(run.watched_peak_mib), run.failure)
    data = run.data
    row = Row(task.name, label, task.score(out), data["macs_fraction"], data["wall_s"], data["peak_rss_mib"],
              notes=data["notes"], timings_s=data["timings_s"])
    out.unlink(missing_ok=True)
    return row


def _print_row(row: Row) -> None:
    scores = row.scores or {}
    cells = [f"{100 * scores[k]:.1f}" if k in scores else "" for k in ("char_acc", "line_acc", "top1")]
    macs = f"{row.macs_fraction:.3f}" if row.macs_fraction is not None else "?"
    wall = f"{row.wall_s:.0f}" if row.wall_s is not None else ""
    rss = f"{row.peak_rss_mib:.0f}" if row.peak_rss_mib is not None else ""
    print(f"| {row.model} | {row.config} | {macs} | {' | '.join(cells)} | {wall} | {rss} | {row.failure or ''} |",
          flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="cls,rec", help="comma-separated: cls, rec")
    parser.add_argument("--budgets", default="0.7,0.5", help="comma-separated MACs fractions (--target-macs)")
    parser.add_argument("--repairs", default="cut,cut+bn,reconstruct,finetune,max-drop",
                        help=f"comma-separated, of {', '.join(REPAIRS)}")
    parser.add_argument("--train-samples", type=int, default=512)
    parser.add_argument("--calib-samples", type=int, default=256)
    parser.add_argument("--eval-samples", type=int, default=256)
    parser.add_argument("--finetune-steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--max-drop", type=float, default=2.0, help="points, for the max-drop runs")
    parser.add_argument("--criterion", default="l2", choices=CRITERIA, help="channel scores (the pipeline's --criterion)")
    parser.add_argument("--allocation", default="auto", choices=ALLOCATIONS,
                        help="how each budget spreads its cut (the pipeline's --allocation)")
    parser.add_argument("--threads", type=int, default=2, help="cores each run may use (0: all)")
    parser.add_argument("--max-rss-gb", type=float, default=6.0)
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per run")
    parser.add_argument("--device", default="cpu", choices=("auto", "cuda", "cpu"))
    parser.add_argument("--json", default="real_task.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="small data, MACs 0.7, 30 steps: checks the harness")
    args = parser.parse_args(argv)
    if args.child:
        return child(json.loads(args.child))
    if args.quick:
        args.budgets, args.train_samples, args.calib_samples, args.eval_samples = "0.7", 128, 64, 128
        args.finetune_steps = 30
    args.budgets = [float(b) for b in args.budgets.split(",") if b]
    args.repairs = [r for r in args.repairs.split(",") if r]
    unknown = sorted({r.removesuffix(NO_BN) for r in args.repairs} - set(REPAIRS))
    if unknown:
        raise SystemExit(f"unknown repairs {unknown}: choose from {', '.join(REPAIRS)}")
    print(f"train {args.train_samples} / calibration {args.calib_samples} / held-out {args.eval_samples} lines, "
          f"criterion {args.criterion}, allocation {args.allocation}, fine-tuning {args.finetune_steps} steps at batch {args.batch_size}, lr {args.lr:g}, "
          f"{args.threads or 'all'} cores per run")
    print("| model | configuration | MACs | char % | line % | top-1 % | prune s | peak RSS MiB | |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="real-task-") as tmp:
        for task in make_tasks([m for m in args.models.split(",") if m], args, Path(tmp)):
            rows.extend(run_task(task, args, Path(tmp)))
    settings = {k: v for k, v in vars(args).items() if k != "child"}
    Path(args.json).write_text(json.dumps({"settings": settings, "rows": [dataclasses.asdict(r) for r in rows]},
                                          indent=1))
    for row in rows:
        for note in row.notes:
            print(f"  {row.model} {row.config}: {note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
