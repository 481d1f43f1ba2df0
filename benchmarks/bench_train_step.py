"""One training step: onnxprune's exported artifacts on onnxruntime CPU vs PyTorch eager CPU.

Same architecture, same weights, same batch, SGD with momentum, BatchNormalization frozen (inference
statistics) on both sides, cross-entropy with labels. PyTorch is a benchmark extra only
(``pip install onnxprune[bench]``), never a dependency.

    python benchmarks/bench_train_step.py [--batch 32] [--size 32] [--threads 2] [--steps 30]

Prints median step times and the ratio onnxruntime / PyTorch (lower is better; the target is ≤ 1.5).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from onnxprune.training import OptimizerSpec, export_artifacts  # noqa: E402
from onnxprune.training.trainer import Trainer  # noqa: E402

# (in, out) channels of the Conv-BN-ReLU layers; "M" is a 2x2 MaxPool
LAYERS: list[tuple[int, int] | str] = [(3, 32), (32, 32), "M", (32, 64), (64, 64), "M", (64, 128), "M"]
CLASSES = 10


def make_weights(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    w: dict[str, np.ndarray] = {}
    i = 0
    for layer in LAYERS:
        if layer == "M":
            continue
        cin, cout = layer  # type: ignore[misc]
        w[f"conv{i}.weight"] = (rng.standard_normal((cout, cin, 3, 3)) * np.sqrt(2 / (cin * 9))).astype(np.float32)
        w[f"bn{i}.weight"] = (1 + 0.1 * rng.standard_normal(cout)).astype(np.float32)
        w[f"bn{i}.bias"] = (0.1 * rng.standard_normal(cout)).astype(np.float32)
        w[f"bn{i}.running_mean"] = (0.1 * rng.standard_normal(cout)).astype(np.float32)
        w[f"bn{i}.running_var"] = rng.uniform(0.5, 1.5, cout).astype(np.float32)
        i += 1
    last = [layer for layer in LAYERS if layer != "M"][-1][1]  # type: ignore[index]
    w["fc.weight"] = (rng.standard_normal((CLASSES, last)) * np.sqrt(1 / last)).astype(np.float32)
    w["fc.bias"] = np.zeros(CLASSES, np.float32)
    return w


def onnx_model(w: dict[str, np.ndarray]) -> onnx.ModelProto:
    nodes, x, i = [], "input", 0
    for layer in LAYERS:
        if layer == "M":
            nodes.append(helper.make_node("MaxPool", [x], [f"pool{i}"], kernel_shape=[2, 2], strides=[2, 2]))
            x = f"pool{i}"
            continue
        nodes += [
            helper.make_node("Conv", [x, f"conv{i}.weight"], [f"c{i}"], pads=[1, 1, 1, 1], name=f"conv{i}"),
            helper.make_node("BatchNormalization", [f"c{i}", f"bn{i}.weight", f"bn{i}.bias", f"bn{i}.running_mean",
                                                    f"bn{i}.running_var"], [f"b{i}"], name=f"bn{i}"),
            helper.make_node("Relu", [f"b{i}"], [f"r{i}"]),
        ]
        x, i = f"r{i}", i + 1
    nodes += [helper.make_node("GlobalAveragePool", [x], ["gap"]), helper.make_node("Flatten", ["gap"], ["flat"]),
              helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], ["logits"], transB=1, name="fc")]
    graph = helper.make_graph(nodes, "bench_cnn", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, "H", "W"])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", CLASSES])],
                              [numpy_helper.from_array(v, k) for k, v in w.items()])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def torch_stepper(w: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray, threads: int, lr: float):  # noqa: ANN201
    """A closure running one PyTorch training step and returning its loss."""
    import torch
    from torch import nn

    torch.set_num_threads(threads)
    mods: list[nn.Module] = []
    i = 0
    for layer in LAYERS:
        if layer == "M":
            mods.append(nn.MaxPool2d(2))
            continue
        cin, cout = layer  # type: ignore[misc]
        conv, bn = nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout)
        conv.weight.data = torch.from_numpy(w[f"conv{i}.weight"].copy())
        for attr in ("weight", "bias", "running_mean", "running_var"):
            getattr(bn, attr).data = torch.from_numpy(w[f"bn{i}.{attr}"].copy())
        mods += [conv, bn, nn.ReLU()]
        i += 1
    fc = nn.Linear(w["fc.weight"].shape[1], CLASSES)
    fc.weight.data, fc.bias.data = torch.from_numpy(w["fc.weight"].copy()), torch.from_numpy(w["fc.bias"].copy())
    net = nn.Sequential(*mods, nn.AdaptiveAvgPool2d(1), nn.Flatten(), fc)
    net.eval()  # frozen BN statistics, as in the exported graph
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        out = nn.functional.cross_entropy(net(xt), yt)
        out.backward()
        opt.step()
        return out.item()

    return step


def ort_stepper(w: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray, threads: int, lr: float):  # noqa: ANN201
    """A closure running one step of the exported artifacts (IO binding) and returning its loss."""
    arts = export_artifacts(onnx_model(w), loss="ce", optimizer=OptimizerSpec("sgd", momentum=0.9),
                            shapes={"input": list(x.shape)})
    trainer = Trainer(arts, ["CPUExecutionProvider"], threads=threads)
    return lambda: trainer.train_step({"input": x, "labels": y}, lr)


def interleaved(steppers: list, steps: int, warmup: int = 3) -> list[tuple[float, float]]:  # noqa: ANN001
    """Median step time and last loss of each stepper, run alternately so machine load hits both alike."""
    times: list[list[float]] = [[] for _ in steppers]
    losses = [0.0] * len(steppers)
    for i in range(steps + warmup):
        for j, step in enumerate(steppers):
            t0 = time.perf_counter()
            losses[j] = step()
            if i >= warmup:
                times[j].append(time.perf_counter() - t0)
    return [(statistics.median(t), loss) for t, loss in zip(times, losses)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=32, help="input height and width")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    w = make_weights(0)
    x = rng.standard_normal((args.batch, 3, args.size, args.size)).astype(np.float32)
    y = rng.integers(0, CLASSES, args.batch).astype(np.int64)
    ort_step = ort_stepper(w, x, y, args.threads, 0.01)
    try:
        torch_step = torch_stepper(w, x, y, args.threads, 0.01)
    except ImportError:
        ((t_ort, _),) = interleaved([ort_step], args.steps)
        print(f"onnxruntime CPU step: {t_ort * 1e3:.1f} ms (PyTorch not installed: pip install torch)")
        return 0
    (t_ort, l_ort), (t_torch, l_torch) = interleaved([ort_step, torch_step], args.steps)
    print(f"batch {args.batch}x3x{args.size}x{args.size}, {args.threads} threads, median of {args.steps} steps")
    print(f"onnxruntime CPU step: {t_ort * 1e3:8.1f} ms   (last loss {l_ort:.4f})")
    print(f"PyTorch eager CPU step: {t_torch * 1e3:6.1f} ms   (last loss {l_torch:.4f})")
    print(f"ratio onnxruntime / PyTorch: {t_ort / t_torch:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
