"""One training step: onnxprune's exported artifacts on onnxruntime CPU vs PyTorch eager CPU.

Same architecture, same weights, same batch, SGD with momentum, BatchNormalization frozen (inference
statistics) on both sides, cross-entropy with labels. PyTorch is a benchmark extra only
(``pip install onnxprune[bench]``), never a dependency.

    python benchmarks/bench_train_step.py [--arch cnn|transformer] [--batch 32] [--size 32] [--threads 1] [--steps 20]

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


# --- transformer encoder (pre-LN, Erf-GELU MLP, mean-pooled tokens → linear head) ------------------------
DIM, HEADS, MLP, BLOCKS = 128, 4, 512, 2


def make_transformer_weights(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    w: dict[str, np.ndarray] = {}

    def lin(name: str, i: int, o: int) -> None:
        w[f"{name}.weight"] = (rng.standard_normal((i, o)) / np.sqrt(i)).astype(np.float32)  # x @ W
        w[f"{name}.bias"] = (0.02 * rng.standard_normal(o)).astype(np.float32)

    for b in range(BLOCKS):
        for ln in ("ln1", "ln2"):
            w[f"b{b}.{ln}.weight"] = (1 + 0.1 * rng.standard_normal(DIM)).astype(np.float32)
            w[f"b{b}.{ln}.bias"] = (0.02 * rng.standard_normal(DIM)).astype(np.float32)
        for n in ("q", "k", "v", "o"):
            lin(f"b{b}.{n}", DIM, DIM)
        lin(f"b{b}.fc1", DIM, MLP)
        lin(f"b{b}.fc2", MLP, DIM)
    lin("head", DIM, CLASSES)
    return w


def onnx_transformer(w: dict[str, np.ndarray], tokens: int) -> onnx.ModelProto:
    nodes: list[onnx.NodeProto] = []
    consts = {"split": np.array([0, 0, HEADS, DIM // HEADS], np.int64), "merge": np.array([0, 0, DIM], np.int64),
              "scale": np.array(1 / np.sqrt(DIM // HEADS), np.float32), "sqrt2": np.array(np.sqrt(2), np.float32),
              "one": np.array(1, np.float32), "half": np.array(0.5, np.float32), "tok_axis": np.array([1], np.int64)}
    n = 0

    def op(kind: str, inputs: list[str], **attrs: object) -> str:
        nonlocal n
        n += 1
        out = f"{kind.lower()}_{n}"
        nodes.append(helper.make_node(kind, inputs, [out], **attrs))
        return out

    def linear(x: str, name: str) -> str:
        return op("Add", [op("MatMul", [x, f"{name}.weight"]), f"{name}.bias"])

    x = "input"
    for b in range(BLOCKS):
        h = op("LayerNormalization", [x, f"b{b}.ln1.weight", f"b{b}.ln1.bias"], axis=-1)
        q, k, v = (op("Reshape", [linear(h, f"b{b}.{t}"), "split"]) for t in "qkv")
        q, v = op("Transpose", [q], perm=[0, 2, 1, 3]), op("Transpose", [v], perm=[0, 2, 1, 3])
        k = op("Transpose", [k], perm=[0, 2, 3, 1])
        a = op("Softmax", [op("Mul", [op("MatMul", [q, k]), "scale"])], axis=-1)
        c = op("Reshape", [op("Transpose", [op("MatMul", [a, v])], perm=[0, 2, 1, 3]), "merge"])
        x = op("Add", [x, linear(c, f"b{b}.o")])
        h = linear(op("LayerNormalization", [x, f"b{b}.ln2.weight", f"b{b}.ln2.bias"], axis=-1), f"b{b}.fc1")
        h = op("Mul", [op("Mul", [h, "half"]), op("Add", [op("Erf", [op("Div", [h, "sqrt2"])]), "one"])])
        x = op("Add", [x, linear(h, f"b{b}.fc2")])
    pooled = op("ReduceMean", [x, "tok_axis"], keepdims=0)
    nodes.append(helper.make_node("Gemm", [pooled, "head.weight", "head.bias"], ["logits"]))
    inits = [numpy_helper.from_array(v, k) for k, v in {**w, **consts}.items()]
    graph = helper.make_graph(nodes, "bench_transformer",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", tokens, DIM])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", CLASSES])], inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 8
    return m


def torch_transformer(w: dict[str, np.ndarray]):  # noqa: ANN201
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, b: int) -> None:
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
            self.lin = nn.ModuleDict({t: nn.Linear(DIM, DIM) for t in "qkvo"})
            self.fc1, self.fc2 = nn.Linear(DIM, MLP), nn.Linear(MLP, DIM)
            for name, mod in [("ln1", self.ln1), ("ln2", self.ln2)]:
                mod.weight.data, mod.bias.data = (torch.from_numpy(w[f"b{b}.{name}.{p}"].copy()) for p in ("weight", "bias"))
            for name, mod in [*((t, self.lin[t]) for t in "qkvo"), ("fc1", self.fc1), ("fc2", self.fc2)]:
                mod.weight.data = torch.from_numpy(w[f"b{b}.{name}.weight"].T.copy())
                mod.bias.data = torch.from_numpy(w[f"b{b}.{name}.bias"].copy())

        def forward(self, x):  # noqa: ANN001, ANN202
            n, t, _ = x.shape
            h = self.ln1(x)
            q, k, v = (self.lin[c](h).view(n, t, HEADS, DIM // HEADS).transpose(1, 2) for c in "qkv")
            a = torch.softmax(q @ k.transpose(-1, -2) / np.sqrt(DIM // HEADS), dim=-1)
            x = x + self.lin["o"]((a @ v).transpose(1, 2).reshape(n, t, DIM))
            return x + self.fc2(nn.functional.gelu(self.fc1(self.ln2(x))))

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.Sequential(*[Block(b) for b in range(BLOCKS)])
            self.head = nn.Linear(DIM, CLASSES)
            self.head.weight.data = torch.from_numpy(w["head.weight"].T.copy())
            self.head.bias.data = torch.from_numpy(w["head.bias"].copy())

        def forward(self, x):  # noqa: ANN001, ANN202
            return self.head(self.blocks(x).mean(dim=1))

    return Net()


def torch_cnn(w: dict[str, np.ndarray]):  # noqa: ANN201
    import torch
    from torch import nn

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
    return nn.Sequential(*mods, nn.AdaptiveAvgPool2d(1), nn.Flatten(), fc)


def torch_stepper(w: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray, threads: int, lr: float,  # noqa: ANN201
                  arch: str = "cnn"):
    """A closure running one PyTorch training step and returning its loss."""
    import torch
    from torch import nn

    torch.set_num_threads(threads)
    net = torch_cnn(w) if arch == "cnn" else torch_transformer(w)
    net.eval()  # frozen BN statistics (and no dropout), as in the exported graph
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        out = nn.functional.cross_entropy(net(xt), yt)
        out.backward()
        opt.step()
        return out.item()

    return step


def ort_stepper(w: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray, threads: int, lr: float,  # noqa: ANN201
                arch: str = "cnn"):
    """A closure running one step of the exported artifacts (IO binding) and returning its loss."""
    model = onnx_model(w) if arch == "cnn" else onnx_transformer(w, x.shape[1])
    arts = export_artifacts(model, loss="ce", optimizer=OptimizerSpec("sgd", momentum=0.9),
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
    p.add_argument("--arch", choices=("cnn", "transformer"), default="cnn")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=32, help="input height and width (cnn) or tokens (transformer)")
    p.add_argument("--threads", type=int, default=1, help="both sides; 1 keeps a shared machine's load fair")
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    if args.arch == "cnn":
        w = make_weights(0)
        x = rng.standard_normal((args.batch, 3, args.size, args.size)).astype(np.float32)
    else:
        w = make_transformer_weights(0)
        x = rng.standard_normal((args.batch, args.size, DIM)).astype(np.float32)
    y = rng.integers(0, CLASSES, args.batch).astype(np.int64)
    ort_step = ort_stepper(w, x, y, args.threads, 0.01, args.arch)
    try:
        torch_step = torch_stepper(w, x, y, args.threads, 0.01, args.arch)
    except ImportError:
        ((t_ort, _),) = interleaved([ort_step], args.steps)
        print(f"onnxruntime CPU step: {t_ort * 1e3:.1f} ms (PyTorch not installed: pip install torch)")
        return 0
    (t_ort, l_ort), (t_torch, l_torch) = interleaved([ort_step, torch_step], args.steps)
    print(f"{args.arch}: input {list(x.shape)}, {args.threads} threads, median of {args.steps} steps")
    print(f"onnxruntime CPU step: {t_ort * 1e3:8.1f} ms   (last loss {l_ort:.4f})")
    print(f"PyTorch eager CPU step: {t_torch * 1e3:6.1f} ms   (last loss {l_torch:.4f})")
    print(f"ratio onnxruntime / PyTorch: {t_ort / t_torch:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
