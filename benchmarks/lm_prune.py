"""Issue 11's "Done means" for the tiny trained LMs: perplexity after pruning to 0.7 of params (and ``--depth 1``) and
300 distillation steps, per LM, export style and criterion.

Each configuration runs ``onnxprune.pipeline.prune`` in its own subprocess (so peak RSS is its own) with
``--target-params 0.7 --calib`` (held-out windows ``CALIB``), ``--finetune-steps 300 --train-data`` (windows of the
LMs' training text: distillation from the original), ``--metric perplexity --eval-data`` (held-out windows ``VALID``,
which the pipeline also ranks channel allocations on) and records the original and pruned perplexity on the
remaining held-out windows ``TEST`` (never seen by the run), the pipeline's own validation numbers, params kept,
wall time and peak RSS. Targets: ratio ≤ 1.15 at 0.7 params, ≤ 1.3 at ``--depth 1``.

Usage:
    nice -n 10 python benchmarks/lm_prune.py [--kinds llama gpt2] [--styles plain cache] [--criteria l2 wanda]
        [--depth-runs] [--runs llama:plain:wanda:width ...] [--steps 300] [--batch-size 32]
        [--json out.json] [--markdown out.md]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from onnxprune.pipeline import prune
from onnxprune.spec import PruneSpec
from tests.lms.build import training_windows
from tests.lms.tokens import SEQ, heldout_ids, onnx_perplexity, write_tokens_npz

CALIB = (0, 64)
"""Held-out windows [start, stop) for --calib."""
VALID = (64, 128)
"""Held-out windows for --eval-data (the pipeline's validation: allocation and its metric section)."""
TEST = (128, 332)
"""Held-out windows the benchmark alone scores."""
TRAIN_WINDOWS = 1024
TARGETS = {"width": 1.15, "depth": 1.3}


@dataclass
class Config:
    """One run: an LM, its export style, the criterion and whether it is a width (0.7 params) or ``--depth 1`` run."""

    kind: str
    style: str
    criterion: str
    mode: str = "width"
    steps: int = 300
    lr: float = 1e-3
    batch_size: int = 32

    def spec(self, data: dict[str, Path]) -> PruneSpec:
        width = self.mode == "width"
        return PruneSpec(criterion=self.criterion, target_params=0.7 if width else None, depth=0 if width else 1,
                         ratio=0.0, calib=str(data["calib"]), finetune_steps=self.steps,
                         train_data=str(data["train"]) if self.steps else None, lr=self.lr,
                         batch_size=self.batch_size, eval_data=str(data["valid"]), metric="perplexity", device="cpu")


@dataclass
class Row:
    """What one run measured (perplexities on ``TEST`` unless named ``valid_*``)."""

    kind: str
    style: str
    criterion: str
    mode: str
    steps: int
    params_kept: float
    ppl_original: float
    ppl_pruned: float
    ratio: float
    valid_cut: float | None
    valid_final: float | None
    target: float
    met: bool
    wall_s: float
    peak_rss_mb: float


def write_data(model: Path, root: Path) -> dict[str, Path]:
    """calib / valid / train DATA files with every input ``model`` takes (mask, positions, empty past)."""
    parts = {name: heldout_ids(stop - start, SEQ, start) for name, (start, stop) in (("calib", CALIB), ("valid", VALID))}
    parts["train"] = training_windows(TRAIN_WINDOWS)
    return {name: write_tokens_npz(root / f"{model.stem}_{name}.npz", ids, model) for name, ids in parts.items()}


def run_one(config: Config, root: Path) -> Row:
    """Export, prune and score one configuration (in this process)."""
    from tests.lms.exports import export

    model = export(config.kind, config.style, root / f"{config.kind}_{config.style}.onnx")
    data = write_data(model, root)
    out = root / "pruned.onnx"
    t0 = time.perf_counter()
    report = prune(model, out, config.spec(data)).report
    wall = time.perf_counter() - t0
    test = heldout_ids(TEST[1] - TEST[0], SEQ, TEST[0])
    original, pruned = onnx_perplexity(model, test), onnx_perplexity(out, test)
    shown = (report.get("metric") or {}).get("shown") or {}
    stages = {s["stage"]: s["value"] for s in shown.get("stages", [])}
    target = TARGETS[config.mode]
    return Row(config.kind, config.style, config.criterion, config.mode, config.steps,
               report["pruned"]["params"] / report["original"]["params"], original, pruned, pruned / original,
               stages.get("cut"), shown.get("pruned"), target, pruned / original <= target, wall,
               resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def run_isolated(config: Config) -> Row:
    """:func:`run_one` in a fresh interpreter, so the peak RSS and any crash are that run's own."""
    cmd = [sys.executable, __file__, "--one", json.dumps(asdict(config))]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{config}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    return Row(**json.loads(proc.stdout.strip().splitlines()[-1]))


def markdown(rows: list[Row]) -> str:
    head = ("| LM | style | mode | criterion | params kept | ppl original | ppl pruned | ratio | target | "
            "valid ppl cut → final | wall s | peak RSS MB |\n|---|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        valid = f"{r.valid_cut:.2f} → {r.valid_final:.2f}" if r.valid_cut and r.valid_final else "-"
        lines.append(f"| {r.kind} | {r.style} | {r.mode} | {r.criterion} | {r.params_kept:.3f} | {r.ppl_original:.2f} "
                     f"| {r.ppl_pruned:.2f} | {r.ratio:.3f} | ≤ {r.target} {'yes' if r.met else 'NO'} | {valid} "
                     f"| {r.wall_s:.0f} | {r.peak_rss_mb:.0f} |")
    return "\n".join(lines)


def configs(args: argparse.Namespace) -> list[Config]:
    """``--runs`` in their order, else every kind × style × criterion (and the depth runs)."""
    extra = {"steps": args.steps, "lr": args.lr, "batch_size": args.batch_size}
    if args.runs:
        return [Config(*run.split(":"), **extra) for run in args.runs]
    out = [Config(k, s, c, "width", **extra) for k in args.kinds for s in args.styles for c in args.criteria]
    if args.depth_runs:
        out += [Config(k, s, "l2", "depth", **extra) for k in args.kinds for s in args.styles]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", nargs="+", default=["llama", "gpt2"], choices=["llama", "gpt2"])
    parser.add_argument("--styles", nargs="+", default=["plain", "cache"], choices=["plain", "cache", "dynamo"])
    parser.add_argument("--criteria", nargs="+", default=["l2", "activation", "wanda", "flap"])
    parser.add_argument("--depth-runs", action="store_true", help="add a --depth 1 run per LM and style")
    parser.add_argument("--runs", nargs="+", metavar="KIND:STYLE:CRITERION:MODE",
                        help="these runs in this order (MODE width or depth), e.g. llama:plain:wanda:width")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=32, help="fine-tuning windows per step")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(asdict(run_one(Config(**json.loads(args.one)), Path(tmp)))))
        return 0
    rows: list[Row] = []
    failed: list[dict[str, str]] = []
    for config in configs(args):
        try:
            rows.append(run_isolated(config))
            print(markdown(rows[-1:]).splitlines()[-1], flush=True)
        except RuntimeError as e:  # one broken configuration is a result too; the others still run
            failed.append({**asdict(config), "error": str(e)[-2000:]})
            print(f"FAILED {config}: {str(e).strip().splitlines()[-1]}", flush=True)
        if args.json:
            args.json.write_text(json.dumps({"rows": [asdict(r) for r in rows], "failed": failed}, indent=1))
    table = markdown(rows)
    print(table)
    if args.markdown:
        args.markdown.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
