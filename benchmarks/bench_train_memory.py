"""Training memory and speed on real graphs: peak RSS of a training step against inference of the same model.

Why: fine-tuning PP-OCRv4's recognizer was killed for memory at batch 16 on a 24 GB machine while its inference
at batch 4 peaks at a few hundred MB. The goal is a training peak of at most 3× the inference peak at the same
batch plus 4× the parameter bytes (params, gradients and AdamW's two moments), with a reasonable step time.

Every measurement runs in a fresh Python process and reads that process's ``VmHWM`` (peak RSS), so peaks never
mix; the process imports the same libraries in every case:

* ``infer``: ``onnxruntime.InferenceSession`` with its default options on the model file, ``--batch`` inputs,
  three runs;
* ``train``: :func:`onnxprune.training.export_artifacts` (distillation loss for the OCR models, labels for the
  CNN; AdamW) and :class:`~onnxprune.training.trainer.Trainer` steps on random inputs, the loop a user of the
  artifacts writes;
* ``finetune``: :func:`onnxprune.training.finetune` end to end on ``--samples`` random inputs (teacher runs,
  held-out evaluation every ``--steps`` // 2 steps included), what ``--finetune-steps`` runs;
* ``torch`` (the CNN only): the same Conv-BN-ReLU network as ``bench_train_step.py`` in PyTorch eager
  (AdamW). Its libraries alone take a few hundred MB, so compare the "over base" column (peak minus the
  resident set right after the imports), and time it with ``--threads 1`` on a busy machine: PyTorch's
  spinning worker threads slow down by an order of magnitude when cores are oversubscribed.

Models: ``rec`` (PP-OCRv4 recognizer, input [B, 3, 48, 320], output [B, 40, 6625] Softmax), ``cls`` (PP-OCR
mobile v2.0 direction classifier, [B, 3, 48, 192]), both from the rapidocr-onnxruntime wheel; ``cnn`` (the
train-step benchmark's CNN at 32x32, PyTorch twin).

Usage:
    python benchmarks/bench_train_memory.py [--models rec,cls,cnn] [--batch 4] [--steps 6] [--threads 2]
        [--samples 48] [--modes infer,train,finetune] [--root OTHER_CHECKOUT] [--json out.json]

``--root`` imports onnxprune from another checkout (e.g. ``git archive HEAD~1 | tar -x -C /tmp/before``) to
record the numbers before a change with the same harness.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("rec", "cls", "cnn")
MODES = ("infer", "train", "finetune", "torch")
OCR_FILES = {"rec": "ch_PP-OCRv4_rec_infer.onnx", "cls": "ch_ppocr_mobile_v2.0_cls_infer.onnx"}
OCR_SHAPES = {"rec": (3, 48, 320), "cls": (3, 48, 192)}
CNN_SIZE = 32


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {key} in /proc/self/status (Linux only)")


def peak_mb() -> float:
    """This process's peak resident set (``VmHWM``) in MiB."""
    return _status_mb("VmHWM")


# -- worker side (one measurement per process) --------------------------------------------------------------


def _model(name: str):  # noqa: ANN202 - onnx.ModelProto, imported lazily
    import onnx

    if name == "cnn":
        sys.path.insert(0, str(ROOT / "benchmarks"))
        import bench_train_step

        return bench_train_step.onnx_model(bench_train_step.make_weights(0))
    return onnx.load(str(_ocr_path(name)))


def _ocr_path(name: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("rapidocr-onnxruntime==1.4.4 is not installed (pip install --no-deps rapidocr-onnxruntime==1.4.4)")
    return Path(next(iter(spec.submodule_search_locations))) / "models" / OCR_FILES[name]


def _input_shape(name: str, batch: int) -> list[int]:
    return [batch, *OCR_SHAPES.get(name, (3, CNN_SIZE, CNN_SIZE))]


def _input_name(name: str) -> str:
    return "input" if name == "cnn" else "x"


def _param_bytes(model) -> int:  # noqa: ANN001
    """Bytes of the tensors fine-tuning trains (float weights, Constant-node weights included)."""
    from onnx import numpy_helper

    from onnxprune.training.artifacts import constants_to_initializers, select_trainable

    m = constants_to_initializers(model)
    chosen = set(select_trainable(m))
    return sum(numpy_helper.to_array(t).nbytes for t in m.graph.initializer if t.name in chosen)


def work_infer(name: str, batch: int, threads: int, steps: int) -> dict[str, float]:
    import numpy as np
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    path = str(_ocr_path(name)) if name != "cnn" else _model(name).SerializeToString()
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal(_input_shape(name, batch)).astype(np.float32)
    times = []
    for _ in range(max(3, steps)):
        t0 = time.perf_counter()
        sess.run(None, {_input_name(name): x})
        times.append(time.perf_counter() - t0)
    return {"peak_mb": peak_mb(), "ms": 1e3 * statistics.median(times[1:])}


def work_train(name: str, batch: int, threads: int, steps: int) -> dict[str, float]:
    import numpy as np

    from onnxprune.training import export_artifacts
    from onnxprune.training.losses import LossSpec
    from onnxprune.training.trainer import Trainer

    model = _model(name)
    params = _param_bytes(model)
    rng = np.random.default_rng(0)
    shape = _input_shape(name, batch)
    loss = LossSpec("ce") if name == "cnn" else LossSpec("distill")
    x = rng.standard_normal(shape).astype(np.float32)
    outs = _output_shapes(model, _input_name(name), x)  # teacher logits are shaped like the outputs
    t0 = time.perf_counter()
    arts = export_artifacts(model, loss=loss, optimizer="adamw", shapes={_input_name(name): shape})
    built = time.perf_counter() - t0
    del model
    trainer = Trainer(arts, ["CPUExecutionProvider"], threads)
    arts.checkpoint.clear()  # the trainer has its own copy (as finetune() does)
    feeds = {_input_name(name): x}
    for i in arts.training_model.graph.input:
        if i.name == arts.manifest["inputs"]["labels"]:
            feeds[i.name] = rng.integers(0, 10, [d.dim_value for d in i.type.tensor_type.shape.dim]).astype(np.int64)
    for out, feed in arts.manifest["inputs"]["teacher"].items():
        feeds[feed] = rng.standard_normal(outs[out]).astype(np.float32)
    times, cpu = [], []
    for _ in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        trainer.train_step(feeds, 1e-4)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {"peak_mb": peak_mb(), "ms": 1e3 * statistics.median(times[1:] or times), "param_bytes": float(params),
            "cpu_ms": 1e3 * statistics.median(cpu[1:] or cpu), "build_s": built, "first_step_ms": 1e3 * times[0]}


def _output_shapes(model, input_name: str, x) -> dict[str, tuple[int, ...]]:  # noqa: ANN001
    """Shapes of ``model``'s outputs on ``x`` (shape inference leaves some exporters' dims unknown)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return {o.name: v.shape for o, v in zip(sess.get_outputs(), sess.run(None, {input_name: x}))}


def work_finetune(name: str, batch: int, threads: int, steps: int, samples: int) -> dict[str, float]:
    import numpy as np

    from onnxprune.training import FinetuneConfig, TrainData, finetune

    model = _model(name)
    rng = np.random.default_rng(0)
    inputs = {_input_name(name): rng.standard_normal(_input_shape(name, samples)).astype(np.float32)}
    labels = rng.integers(0, 10, samples).astype(np.int64) if name == "cnn" else None
    config = FinetuneConfig(steps=steps, batch_size=batch, lr=1e-4, threads=threads, progress_bar=False,
                            eval_fraction=0.125, eval_every=max(1, steps // 2))
    t0 = time.perf_counter()
    res = finetune(model, TrainData(inputs, labels), config, device="cpu")
    wall = time.perf_counter() - t0
    return {"peak_mb": peak_mb(), "ms": 1e3 * res.final_metrics["seconds"] / max(steps, 1), "wall_s": wall}


def work_torch(name: str, batch: int, threads: int, steps: int) -> dict[str, float]:
    import numpy as np
    import torch

    base = _status_mb("VmRSS")  # PyTorch's libraries alone take a few hundred MB
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_train_step

    if name != "cnn":
        raise SystemExit("the PyTorch twin exists for the cnn only")
    rng = np.random.default_rng(0)
    x = rng.standard_normal(_input_shape(name, batch)).astype(np.float32)
    y = rng.integers(0, bench_train_step.CLASSES, batch).astype(np.int64)
    torch.set_num_threads(threads)
    net = bench_train_step.torch_cnn(bench_train_step.make_weights(0))
    net.eval()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=0.0)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    times = []
    for _ in range(steps + 3):  # PyTorch's first steps set up its kernels
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(net(xt), yt).backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return {"peak_mb": peak_mb(), "ms": 1e3 * statistics.median(times[3:]), "base_mb": base}


def worker(args: argparse.Namespace) -> int:
    if args.root:
        sys.path.insert(0, str(Path(args.root).resolve()))
    else:
        sys.path.insert(0, str(ROOT))
    import numpy  # noqa: F401 - the same imports in every mode, so baselines compare
    import onnx  # noqa: F401
    import onnxruntime  # noqa: F401

    name, mode = args.worker
    base = _status_mb("VmRSS")
    if mode == "infer":
        out = work_infer(name, args.batch, args.threads, args.steps)
    elif mode == "train":
        out = work_train(name, args.batch, args.threads, args.steps)
    elif mode == "finetune":
        out = work_finetune(name, args.batch, args.threads, args.steps, args.samples)
    else:
        out = work_torch(name, args.batch, args.threads, args.steps)
    print(json.dumps({"base_mb": base, **out}))
    return 0


# -- driver side ----------------------------------------------------------------------------------------------


def measure(name: str, mode: str, batch: int, *, threads: int = 2, steps: int = 6, samples: int = 48,
            root: str | None = None, timeout: float = 1800) -> dict[str, float]:
    """One measurement in a fresh process: ``{"peak_mb", "ms", ...}``.

    Raises:
        RuntimeError: the worker failed (its stderr's tail in the message).
    """
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, mode, "--batch", str(batch),
           "--threads", str(threads), "--steps", str(steps), "--samples", str(samples)]
    if root:
        cmd += ["--root", root]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{name}/{mode} at batch {batch} failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def goal_mb(infer_peak_mb: float, param_bytes: float) -> float:
    """The memory goal: 3× the inference peak at the same batch plus 4× the parameter bytes."""
    return 3 * infer_peak_mb + 4 * param_bytes / 2**20


def run(models: list[str], modes: list[str], batch: int, threads: int, steps: int, samples: int,
        root: str | None) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for name in models:
        res = {m: measure(name, m, batch, threads=threads, steps=steps, samples=samples, root=root)
               for m in ("infer", "train")}  # always: the goal needs both
        for m in modes:
            if m == "finetune" or (m == "torch" and name == "cnn"):
                res[m] = measure(name, m, batch, threads=threads, steps=steps, samples=samples, root=root)
        params = float(res["train"]["param_bytes"])
        goal = goal_mb(res["infer"]["peak_mb"], params)
        for mode, r in res.items():
            rows.append({"model": name, "mode": mode, "batch": batch, "peak_mb": round(r["peak_mb"], 1),
                         "ms_per_step": round(r["ms"], 1), "param_mb": round(params / 2**20, 2),
                         "goal_mb": round(goal, 1),
                         "ratio_to_goal": round(r["peak_mb"] / goal, 3) if mode in ("train", "finetune") else None,
                         **{k: round(v, 2) for k, v in r.items() if k not in ("peak_mb", "ms", "param_bytes")}})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="rec,cls,cnn", help=f"comma-separated, from {','.join(MODELS)}")
    p.add_argument("--modes", default="infer,train,finetune,torch", help=f"comma-separated, from {','.join(MODES)}")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--samples", type=int, default=48, help="random samples for the finetune mode")
    p.add_argument("--root", help="import onnxprune from this checkout instead (numbers before a change)")
    p.add_argument("--json", help="also write the rows here")
    p.add_argument("--worker", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    models = [m for m in args.models.split(",") if m]
    modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in models if m not in MODELS] + [m for m in modes if m not in MODES]
    if bad:
        p.error(f"unknown model or mode: {', '.join(bad)}")
    rows = run(models, modes, args.batch, args.threads, args.steps, args.samples, args.root)
    print(f"batch {args.batch}, {args.threads} threads, median of steps 2..{args.steps}; goal = 3 x infer peak + 4 x params")
    print(f"{'model':6s} {'mode':9s} {'peak MB':>8s} {'over base':>9s} {'goal MB':>8s} {'ratio':>6s} {'ms/step':>9s} "
          f"{'params MB':>9s}")
    for r in rows:
        ratio = f"{r['ratio_to_goal']:.2f}" if r["ratio_to_goal"] is not None else ""
        print(f"{r['model']:6s} {r['mode']:9s} {r['peak_mb']:8.1f} {r['peak_mb'] - r['base_mb']:9.1f} "
              f"{r['goal_mb']:8.1f} {ratio:>6s} {r['ms_per_step']:9.1f} {r['param_mb']:9.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
