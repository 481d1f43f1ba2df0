"""The paper's experiment on the trained digits CNN: held-out accuracy after a 50 % cut, no fine-tuning.

He et al. 2017 report that channel selection by LASSO regression plus least-squares reconstruction keeps far
more accuracy than magnitude pruning. This prunes ``examples/digits_cnn.onnx`` by 50 % of every prunable group
with l2, bn-scale, apoz and regression, each with and without ``--reconstruct``, calibrating on the training
split and measuring accuracy on the held-out split (``tests.data.digits_split``), and prints a table.

Usage:
    python3 benchmarks/bench_criteria.py [--ratio 0.5] [--calib-samples 512] [--device cpu]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from onnxprune.runtime.session import make_session
from onnxprune.pipeline import prune  # noqa: E402
from onnxprune.spec import PruneSpec  # noqa: E402
from tests.data import digits_split, write_npz  # noqa: E402

CRITERIA = ("l2", "bn-scale", "apoz", "regression")


def accuracy(model: onnx.ModelProto | Path, x: np.ndarray, y: np.ndarray, device: str) -> float:
    with make_session(model if isinstance(model, onnx.ModelProto) else str(model), device) as sess:
        logits = sess.run({"input": x})["logits"]
    return float((logits.argmax(axis=1) == y).mean())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(REPO / "examples" / "digits_cnn.onnx"))
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--calib-samples", type=int, default=512)
    parser.add_argument("--device", default="cpu", choices=("auto", "cuda", "cpu"))
    args = parser.parse_args(argv)

    x_train, y_train, x_test, y_test = digits_split(seed=0)
    rows = [("original", "-", accuracy(Path(args.model), x_test, y_test, args.device), None, None, 0.0)]
    with tempfile.TemporaryDirectory() as tmp:
        calib = write_npz(Path(tmp) / "train.npz", x_train, y_train)
        for criterion in CRITERIA:
            for reconstruct in (False, True):
                out = Path(tmp) / f"{criterion}-{reconstruct}.onnx"
                spec = PruneSpec(ratio=args.ratio, criterion=criterion, reconstruct=reconstruct, calib=str(calib),
                                 calib_samples=args.calib_samples, device=args.device)
                t0 = time.perf_counter()
                report = prune(args.model, out, spec).report
                seconds = time.perf_counter() - t0
                rows.append((criterion, "yes" if reconstruct else "no", accuracy(out, x_test, y_test, args.device),
                             report["pruned"]["params"] / report["original"]["params"],
                             report["pruned"]["macs"] / report["original"]["macs"], seconds))
    print(f"digits CNN, {args.ratio:.0%} of every prunable group, no fine-tuning; calibration: "
          f"{min(args.calib_samples, len(x_train))} training samples; test: {len(x_test)} held-out samples; "
          f"device: {args.device}")
    print("| criterion | reconstruct | test accuracy | params | MACs | time (s) |")
    print("|---|---|---|---|---|---|")
    for name, rec, acc, params, macs, seconds in rows:
        fmt = (lambda v: "-" if v is None else f"{v:.1%}")
        print(f"| {name} | {rec} | {acc:.2%} | {fmt(params)} | {fmt(macs)} | {seconds:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
