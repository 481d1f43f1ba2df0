"""Issue 14 benchmark: prune, then quantize in the same job — size, CPU latency and accuracy per stage.

Parts (``--parts``):

- ``resnet50``: ResNet-50 from the onnx wheel (``light_resnet50``, stand-in weights replaced by realistic random
  ones, batch made symbolic so batch 8 can be timed) pruned at ratio 0.5 and quantized ``int8`` (static QDQ,
  per-channel, calibrated on random-normal images: the weights are random too, so only size and speed mean
  anything here). File size against the FP32 original (aim ≤ 0.08×) and onnxruntime CPU latency of the INT8 model
  against the pruned FP32 model it came from, measured interleaved in the same run at 1 and 2 threads, batch 1
  and 8 (``--round-to`` 1 and 8), with the CPU's 8-bit instruction set from ``/proc/cpuinfo``.
- ``digits``: the example digits CNN at ratio 0.5, BatchNorm refresh and 300 fine-tuning steps with labels, then
  ``int8``, ``int8-dynamic`` and ``fp16``: held-out accuracy of the pruned FP32 model and of each quantized one
  (aim: int8 within 0.5 point).
- ``ocr``: PP-OCRv4 rec (rapidocr-onnxruntime) unpruned, ``int8`` (minmax, then percentile calibration) and
  ``int8`` with the accuracy guard (``--quant-max-drop 1`` on rendered validation lines, ``--metric ctc``), scored
  by character accuracy on other held-out rendered lines (aim: within 1 point of FP32, or the report names the
  layers kept float).

Run: ``python3 benchmarks/bench_quantize.py [--parts resnet50,digits,ocr] [--runs 20] [--json out.json]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from onnxprune.measure.bench import compare  # noqa: E402
from onnxprune.pipeline import prune  # noqa: E402
from onnxprune.spec import PruneSpec  # noqa: E402
from tests.data import digits_split, held_out_accuracy, light_model_dir, write_npz  # noqa: E402

CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")


def cpu_features() -> dict[str, Any]:
    """The CPU model and which 8-bit dot-product paths its flags allow (what INT8 kernels can use)."""
    flags: set[str] = set()
    model = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
            elif line.startswith("model name") and model == "?":
                model = line.split(":", 1)[1].strip()
    have = {name: name in flags for name in CPU_FLAGS}
    if have["amx_int8"]:
        path = "AMX INT8 tiles"
    elif have["avx512_vnni"] or have["avx_vnni"]:
        path = "VNNI (8-bit dot products in one instruction: U8S8 without range reduction)"
    elif have["avx2"]:
        path = "AVX2 without VNNI (8-bit products need three instructions; INT8 gains are small)"
    else:
        path = "no AVX2"
    return {"model": model, "cores": os.cpu_count(), "flags": have, "int8_path": path}


def symbolic_batch(model: onnx.ModelProto) -> onnx.ModelProto:
    """The light model with batch dim ``N`` (its Reshape to ``[1, 2048]`` becomes ``[-1, 2048]``)."""
    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Reshape" and node.input[1] in inits:
            shape = numpy_helper.to_array(inits[node.input[1]]).copy()
            if shape.size and shape[0] == 1:
                shape[0] = -1
                inits[node.input[1]].CopyFrom(numpy_helper.from_array(shape, node.input[1]))
    for value in [*model.graph.input[:1], *model.graph.output]:
        value.type.tensor_type.shape.dim[0].dim_param = "N"
    del model.graph.value_info[:]
    return model


def resnet50(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    from tests.models import randomize_light_weights

    src = symbolic_batch(randomize_light_weights(onnx.load(str(light_model_dir() / "light_resnet50.onnx"))))
    fp32 = tmp / "resnet50_fp32.onnx"
    onnx.save(src, fp32)
    name = src.graph.input[0].name
    rng = np.random.default_rng(0)
    calib = tmp / "resnet50_calib.npz"
    np.savez(calib, **{name: rng.standard_normal((args.calib_samples, 3, 224, 224)).astype(np.float32)})
    rows = []
    for round_to in args.round_to:
        base = dict(ratio=0.5, round_to=round_to, calib=str(calib), calib_samples=args.calib_samples, device="cpu",
                    fidelity_samples=1, shapes={name: [1, 3, 224, 224]})
        pruned, int8 = tmp / f"pruned_r{round_to}.onnx", tmp / f"int8_r{round_to}.onnx"
        prune(fp32, pruned, PruneSpec(**base))
        t0 = time.perf_counter()
        report = prune(fp32, int8, PruneSpec(**base, quantize="int8")).report
        job_s = time.perf_counter() - t0
        sizes = {"fp32_original": fp32.stat().st_size, "pruned_fp32": pruned.stat().st_size,
                 "pruned_int8": int8.stat().st_size}
        latency = []
        for threads in args.threads:
            for batch in args.batches:
                speedups, a, b = [], [], []
                for _ in range(args.repeat):
                    c = compare(pruned, int8, device="cpu", batch=batch, runs=args.runs, warmup=3, threads=threads)
                    speedups.append(c.speedup)
                    a.append(c.a.p50_ms)
                    b.append(c.b.p50_ms)
                latency.append({"threads": threads, "batch": batch, "pruned_fp32_p50_ms": statistics.median(a),
                                "int8_p50_ms": statistics.median(b), "speedup": statistics.median(speedups)})
                print(f"resnet50 round-to {round_to}: {threads} thread(s), batch {batch}: pruned FP32 "
                      f"{latency[-1]['pruned_fp32_p50_ms']:.1f} ms, INT8 {latency[-1]['int8_p50_ms']:.1f} ms "
                      f"({latency[-1]['speedup']:.2f}x)", flush=True)
        row = {"round_to": round_to, "bytes": sizes,
               "int8_vs_original": sizes["pruned_int8"] / sizes["fp32_original"],
               "pruned_vs_original": sizes["pruned_fp32"] / sizes["fp32_original"],
               "macs_kept": report["pruned"]["macs"] / report["original"]["macs"],
               "nodes_kept_float": report["quantize"]["nodes_kept_float"], "job_s": job_s, "latency": latency}
        print(f"resnet50 round-to {round_to}: bytes original {sizes['fp32_original']}, pruned FP32 "
              f"{sizes['pruned_fp32']} ({row['pruned_vs_original']:.3f}x), pruned INT8 {sizes['pruned_int8']} "
              f"({row['int8_vs_original']:.4f}x; aim <= 0.08x), MACs kept {row['macs_kept']:.3f}, "
              f"job {job_s:.1f} s", flush=True)
        rows.append(row)
    return {"rows": rows}


def digits(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    x_train, y_train, x_test, y_test = digits_split(seed=0)
    train = write_npz(tmp / "digits_train.npz", x_train, y_train)
    test = write_npz(tmp / "digits_test.npz", x_test, y_test)
    model = REPO / "examples" / "digits_cnn.onnx"
    base = dict(ratio=0.5, calib=str(train), calib_samples=512, finetune_steps=300, train_data=str(train), lr=3e-3,
                batch_size=64, eval_data=str(test), device="cpu")
    rows = []
    for mode in ("int8", "int8-dynamic", "fp16"):
        out = tmp / f"digits_{mode}.onnx"
        report = prune(model, out, PruneSpec(**base, quantize=mode)).report
        stages = {s["stage"]: s for s in report["quantize"]["stages"]}
        row = {"mode": mode, "original_acc": stages["original"]["metric"],
               "pruned_fp32_acc": stages["pruned"]["metric"], "quantized_acc": stages["quantized"]["metric"],
               "onnxruntime_acc": held_out_accuracy(out, (x_train, y_train, x_test, y_test)),
               "bytes": {k: v["bytes"] for k, v in stages.items()}}
        row["drop_points"] = 100 * (row["pruned_fp32_acc"] - row["quantized_acc"])
        print(f"digits 0.5 + BN + 300 steps + {mode}: accuracy original {row['original_acc']:.4f}, pruned FP32 "
              f"{row['pruned_fp32_acc']:.4f}, {mode} {row['quantized_acc']:.4f} (drop {row['drop_points']:.2f} "
              f"points), bytes {row['bytes']}", flush=True)
        rows.append(row)
    return {"rows": rows}


def ocr(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    from tests.tasks import ocr as task

    calib_images, _ = task.make_rec_dataset(args.ocr_calib, seed=11)
    calib = task.save_npz(tmp / "rec_calib.npz", task.INPUT_NAME, calib_images)
    val_images, val_texts = task.make_rec_dataset(args.ocr_val, seed=12)
    val = task.save_npz(tmp / "rec_val.npz", task.INPUT_NAME, val_images,
                        task.text_labels(val_texts, task.load_charset()))
    held, texts = task.make_rec_dataset(args.ocr_eval, seed=13)
    model = task.rec_model_path()
    fp32 = task.evaluate_rec(model, held, texts)
    shapes = {task.INPUT_NAME: [1, 3, task.REC_HEIGHT, task.REC_WIDTH]}
    rows = [{"model": "fp32", **fp32}]
    print(f"ocr rec FP32: char acc {fp32['char_acc']:.4f}, line acc {fp32['line_acc']:.4f}", flush=True)
    for label, extra in (("int8", {}), ("int8 percentile", {"quant_calibration": "percentile"}),
                         ("int8 + guard 1 point", {"quant_max_drop": 1.0})):
        out = tmp / f"rec_{len(rows)}.onnx"
        t0 = time.perf_counter()
        report = prune(model, out, PruneSpec(ratio=0.0, calib=str(calib), calib_samples=args.ocr_calib,
                                             eval_data=str(val), metric="ctc", quantize="int8", device="cpu",
                                             shapes=shapes, **extra)).report
        q = report["quantize"]
        scores = task.evaluate_rec(out, held, texts)
        row = {"model": label, **scores, "drop_points": 100 * (fp32["char_acc"] - scores["char_acc"]),
               "validation_metric": q["metric"], "nodes_kept_float": q["nodes_kept_float"],
               "bytes": {"fp32": model.stat().st_size, "int8": out.stat().st_size}, "job_s": time.perf_counter() - t0}
        print(f"ocr rec {label}: char acc {scores['char_acc']:.4f} (drop {row['drop_points']:.2f} points), line acc "
              f"{scores['line_acc']:.4f}; validation {q['metric']['before']:.4f} -> {q['metric']['after']:.4f}; "
              f"{len(q['nodes_kept_float'])} layers float; bytes {row['bytes']}; job {row['job_s']:.0f} s", flush=True)
        rows.append(row)
    return {"rows": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="resnet50,digits,ocr")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=3, help="interleaved comparisons per cell; medians shown")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--round-to", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--ocr-calib", type=int, default=64)
    parser.add_argument("--ocr-val", type=int, default=96)
    parser.add_argument("--ocr-eval", type=int, default=200)
    parser.add_argument("--json", metavar="OUT.json")
    args = parser.parse_args(argv)
    results: dict[str, Any] = {"cpu": cpu_features()}
    cpu = results["cpu"]
    print(f"CPU: {cpu['model']} ({cpu['cores']} cores), INT8 path: {cpu['int8_path']}; flags {cpu['flags']}",
          flush=True)
    parts = {"resnet50": resnet50, "digits": digits, "ocr": ocr}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.parts.split(","):
            results[name] = parts[name](args, Path(tmp))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
