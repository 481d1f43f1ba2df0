"""Write the digits split as DATA files for ``--calib`` / ``--train-data`` / accuracy checks.

Why: the example model was trained on ``tests.data.digits_split(seed=0)``; pruning it with calibration data,
reconstruction or fine-tuning needs the same images in onnxprune's ``.npz`` format::

    python3 examples/make_digits_data.py            # writes digits_train.npz and digits_test.npz here
    onnxprune prune examples/digits_cnn.onnx -o small.onnx --ratio 0.5 \\
        --calib digits_train.npz --finetune-steps 300 --train-data digits_train.npz --report report.json
    python3 examples/make_digits_data.py --accuracy small.onnx
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from tests.data import digits_split, write_npz  # noqa: E402


def accuracy(model_path: Path, x: np.ndarray, y: np.ndarray) -> float:
    """Held-out top-1 accuracy of a model with input ``input`` and one output of 10 logits."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
    logits = sess.run(None, {"input": x})[0]
    return float((logits.argmax(1) == y).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--out-dir", type=Path, default=Path("."), help="where to write the .npz files")
    parser.add_argument("--accuracy", type=Path, nargs="*", metavar="MODEL", help="print test accuracy instead")
    args = parser.parse_args()
    x_train, y_train, x_test, y_test = digits_split(seed=0)
    if args.accuracy:
        for path in args.accuracy:
            print(f"{path}: {accuracy(path, x_test, y_test):.4f} on {len(y_test)} held-out digits")
        return
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name, x, y in (("digits_train.npz", x_train, y_train), ("digits_test.npz", x_test, y_test)):
        print("wrote", write_npz(args.out_dir / name, x, y))


if __name__ == "__main__":
    main()
