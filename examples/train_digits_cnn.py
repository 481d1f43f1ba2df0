"""Train the example model ``examples/digits_cnn.onnx``: a small CNN on scikit-learn's digits.

Why this exists: onnxprune's README prunes a *real trained* model so that the fidelity numbers
(top-1 agreement, accuracy after pruning) mean something. The data ships inside the scikit-learn
wheel (no download) and the split is ``tests.data.digits_split(seed=0)``, so tests can measure the
same held-out accuracy this script reports.

PyTorch is only a one-off tool here; it is NOT a dependency of onnxprune. To reproduce::

    python3 -m pip install torch==2.13.0          # CPU wheel; or in a venv made with --system-site-packages
    python3 examples/train_digits_cnn.py          # writes examples/digits_cnn.onnx

The ONNX is exported with the TorchScript exporter (``dynamo=False``), opset 17, with
BatchNormalization nodes kept (``training=TrainingMode.PRESERVE`` on an eval-mode model skips the
Conv+BN fusion) so pruning tests see Conv -> BN -> Relu chains, and a dynamic batch axis.

Architecture (input ``input`` [N,1,8,8], output ``logits`` [N,10])::

    Conv(1->32,3x3,p1)+BN+ReLU, Conv(32->32)+BN+ReLU,
    residual basic block (Conv+BN+ReLU, Conv+BN, Add, ReLU) at 32 channels,
    MaxPool 2 (8x8 -> 4x4), Conv(32->64)+BN+ReLU, Conv(64->64)+BN+ReLU,
    GlobalAveragePool, Flatten, Gemm(64->10)
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from tests.data import digits_split  # noqa: E402  (the shared, fixed split)

import torch  # noqa: E402
from torch import nn  # noqa: E402

SEED = 0
MAX_IR_VERSION = 10  # onnxruntime 1.31 reads IR <= 13; stay well inside it


def conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    """3x3 same-padding conv, BN and ReLU: the unit the pruning tests look for."""
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class BasicBlock(nn.Module):
    """ResNet basic block ``relu(x + bn(conv(relu(bn(conv(x))))))``: gives the model a residual Add."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(x + y)


class DigitsCNN(nn.Module):
    """The example network (see the module docstring)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(conv_bn_relu(1, 32), conv_bn_relu(32, 32))
        self.block = BasicBlock(32)
        self.pool = nn.MaxPool2d(2)
        self.stage2 = nn.Sequential(conv_bn_relu(32, 64), conv_bn_relu(64, 64))
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.block(self.stem(x)))
        x = self.gap(self.stage2(x))
        return self.fc(torch.flatten(x, 1))


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Shift each image by up to one pixel (zero fill): cheap, label-preserving for digits."""
    n = x.shape[0]
    padded = nn.functional.pad(x, (1, 1, 1, 1))
    dy = torch.randint(0, 3, (n,), generator=gen)
    dx = torch.randint(0, 3, (n,), generator=gen)
    out = torch.empty_like(x)
    for i in range(n):
        out[i] = padded[i, :, dy[i] : dy[i] + 8, dx[i] : dx[i] + 8]
    return out


def train(epochs: int, batch_size: int, lr: float) -> tuple[DigitsCNN, float]:
    """Train with Adam + cosine schedule; returns the eval-mode model and its held-out accuracy."""
    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)

    x_train, y_train, x_test, y_test = digits_split(seed=SEED)
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
    model = DigitsCNN()
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    gen = torch.Generator().manual_seed(SEED)
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(xt), generator=gen)
        total = 0.0
        for start in range(0, len(xt), batch_size):
            idx = order[start : start + batch_size]
            xb = augment(xt[idx], gen)
            opt.zero_grad()
            loss = loss_fn(model(xb), yt[idx])
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        sched.step()
        if (epoch + 1) % 10 == 0 or epoch == 0:
            acc = accuracy_torch(model, x_test, y_test)
            print(f"epoch {epoch + 1:3d}  loss {total / len(xt):.4f}  test acc {acc:.4f}")
    model.eval()
    return model, accuracy_torch(model, x_test, y_test)


@torch.no_grad()
def accuracy_torch(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    """Held-out top-1 accuracy in eval mode."""
    model.eval()
    pred = model(torch.from_numpy(x)).argmax(1).numpy()
    return float((pred == y).mean())


def export(model: DigitsCNN, path: Path) -> None:
    """Export with the TorchScript exporter, BN kept, dynamic batch, IR capped."""
    import onnx

    model.eval()
    dummy = torch.zeros(1, 1, 8, 8)
    torch.onnx.export(
        model,
        (dummy,),
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
        training=torch.onnx.TrainingMode.PRESERVE,
        do_constant_folding=False,
    )
    proto = onnx.load(str(path))
    proto.ir_version = min(proto.ir_version, MAX_IR_VERSION)
    proto.producer_name = "onnxprune examples/train_digits_cnn.py (pytorch " + torch.__version__ + ")"
    onnx.checker.check_model(proto, full_check=True)
    n_bn = sum(n.op_type == "BatchNormalization" for n in proto.graph.node)
    expected = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    if n_bn != expected:
        raise RuntimeError(f"expected {expected} BatchNormalization nodes in the export (BN fused?), found {n_bn}")
    onnx.save(proto, str(path))


def accuracy_onnx(path: Path, x: np.ndarray, y: np.ndarray) -> float:
    """Held-out accuracy of the exported file in onnxruntime (must match torch's)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    logits = sess.run(["logits"], {"input": x})[0]
    return float((logits.argmax(1) == y).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("-o", "--output", type=Path, default=REPO_ROOT / "examples" / "digits_cnn.onnx")
    args = parser.parse_args()

    model, acc_torch = train(args.epochs, args.batch_size, args.lr)
    export(model, args.output)
    _, _, x_test, y_test = digits_split(seed=SEED)
    acc_onnx = accuracy_onnx(args.output, x_test, y_test)
    print(f"held-out accuracy: torch {acc_torch:.4f}  onnxruntime {acc_onnx:.4f}  ({len(y_test)} images)")
    if abs(acc_torch - acc_onnx) > 1e-9:
        raise SystemExit("onnxruntime accuracy differs from torch's: export is wrong")
    print(f"wrote {args.output} ({args.output.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
