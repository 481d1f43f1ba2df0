#!/usr/bin/env bash
# GPU smoke check on the CUDA execution provider; prints one JSON summary on stdout (progress on stderr).
#
#   benchmarks/gpu_check.sh            # needs an NVIDIA GPU and onnxruntime-gpu[cuda,cudnn]
#
# 1. digits CNN (examples/digits_cnn.onnx): prune --ratio 0.5 with activation statistics from calibration data,
#    BatchNorm refresh and 300 fine-tuning steps, all with --device cuda; held-out accuracy before and after.
# 2. ResNet-50 (the onnx wheel's light model with random weights, tests.models.randomize_light_weights): prune
#    --ratio 0.3 with activation statistics from 16 random calibration samples, --device cuda.
# 3. Latency of original vs pruned on CUDA (`onnxprune bench --device cuda`, batch 1 and 8) for both.
#
# Every onnxprune command runs with --device cuda, which refuses to fall back to the CPU, and the summary records
# the provider each latency was measured on. When CUDA is not usable the script prints
# {"ok": false, "error": "..."} with the reason and exits 2; a failing step prints {"ok": false, "step": ...}
# with the command's last output and exits 1. GPU_CHECK_DEVICE=cpu runs the same steps on the CPU (to check the
# script itself on a machine without a GPU); the summary then says "device": "cpu".
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
DEVICE="${GPU_CHECK_DEVICE:-cuda}"
WORK="$(mktemp -d -t onnxprune-gpu-check-XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
PY="${PYTHON:-python3}"

fail() {  # fail STEP LOGFILE
    "$PY" - "$1" "$2" <<'EOF'
import json, sys
step, log = sys.argv[1], sys.argv[2]
tail = open(log, errors="replace").read()[-3000:]
print(json.dumps({"ok": False, "step": step, "error": f"{step} failed", "output_tail": tail}))
EOF
    exit 1
}

run() {  # run STEP COMMAND...: time a step, keep its output, stop with a JSON error when it fails
    local step="$1"; shift
    echo "gpu_check: $step" >&2
    local start end
    start=$(date +%s.%N)
    if ! "$@" >"$WORK/$step.log" 2>&1; then
        fail "$step" "$WORK/$step.log"
    fi
    end=$(date +%s.%N)
    echo "$step $start $end" >>"$WORK/times"
}

# -- is CUDA usable? ----------------------------------------------------------------------------------------------
if [ "$DEVICE" = "cuda" ]; then
    if ! "$PY" - >"$WORK/probe.json" 2>"$WORK/probe.log" <<'EOF'
import json
import onnxruntime as ort
from onnxprune.runtime.device import probe_cuda
info = probe_cuda()
print(json.dumps({"cuda_usable": info.cuda_usable, "reason": info.reason, "onnxruntime": ort.__version__,
                  "available_providers": ort.get_available_providers()}))
EOF
    then
        fail "probe" "$WORK/probe.log"
    fi
    if ! "$PY" -c 'import json,sys; sys.exit(0 if json.load(open(sys.argv[1]))["cuda_usable"] else 1)' "$WORK/probe.json"; then
        "$PY" - "$WORK/probe.json" <<'EOF'
import json, sys
probe = json.load(open(sys.argv[1]))
print(json.dumps({"ok": False, "device": "cuda",
                  "error": f"CUDA execution provider is not usable: {probe['reason']}",
                  "onnxruntime": probe["onnxruntime"], "available_providers": probe["available_providers"],
                  "hint": "run on a machine with an NVIDIA GPU and onnxruntime-gpu[cuda,cudnn] installed"}))
EOF
        exit 2
    fi
fi

# -- 1. digits CNN: calibration, BN refresh, fine-tuning on the device --------------------------------------------
DIGITS=examples/digits_cnn.onnx
run data "$PY" examples/make_digits_data.py -o "$WORK/data"
run digits_prune "$PY" -m onnxprune.cli prune "$DIGITS" -o "$WORK/digits_small.onnx" --ratio 0.5 \
    --criterion activation --calib "$WORK/data/digits_train.npz" --calib-samples 256 \
    --finetune-steps 300 --train-data "$WORK/data/digits_train.npz" --eval-data "$WORK/data/digits_test.npz" \
    --device "$DEVICE" --report "$WORK/digits_report.json"
run digits_bench "$PY" -m onnxprune.cli bench "$DIGITS" "$WORK/digits_small.onnx" --device "$DEVICE" \
    --batch 1 8 --runs 200 --json
cp "$WORK/digits_bench.log" "$WORK/digits_bench.json"

# -- 2. ResNet-50: calibration on the device, latency ---------------------------------------------------------------
run resnet_model "$PY" - "$WORK/resnet50.onnx" <<'EOF'
import sys
import onnx
sys.path.insert(0, ".")
from tests.data import light_model_dir
from tests.models import randomize_light_weights
model = onnx.load(light_model_dir() / "light_resnet50.onnx")
onnx.save(randomize_light_weights(model, seed=0), sys.argv[1])
EOF
run resnet_prune "$PY" -m onnxprune.cli prune "$WORK/resnet50.onnx" -o "$WORK/resnet50_small.onnx" --ratio 0.3 \
    --criterion activation --calib random --calib-samples 16 --device "$DEVICE" --report "$WORK/resnet_report.json"
run resnet_bench "$PY" -m onnxprune.cli bench "$WORK/resnet50.onnx" "$WORK/resnet50_small.onnx" \
    --device "$DEVICE" --batch 1 8 --runs 50 --json
cp "$WORK/resnet_bench.log" "$WORK/resnet_bench.json"

# -- summary ----------------------------------------------------------------------------------------------------------
"$PY" - "$WORK" "$DEVICE" <<'EOF'
import json, sys
from pathlib import Path

work, device = Path(sys.argv[1]), sys.argv[2]
times = {}
for line in (work / "times").read_text().splitlines():
    step, start, end = line.split()
    times[step] = round(float(end) - float(start), 2)


def bench(name):
    text = (work / f"{name}.json").read_text()
    data = json.loads(text[text.index("{"):])
    rows = {}
    for row in data["results"]:
        rows[f"batch{row['batch']}"] = {
            "original_p50_ms": round(row["a"]["p50_ms"], 3), "pruned_p50_ms": round(row["b"]["p50_ms"], 3),
            "speedup": round(row["a"]["p50_ms"] / row["b"]["p50_ms"], 3),
            "providers": sorted({row["a"]["provider"], row["b"]["provider"]})}
    return data["provider"], rows


def prune_summary(name):
    report = json.loads((work / f"{name}_report.json").read_text())
    out = {"device": report.get("device"), "macs_original": report["original"].get("macs"),
           "macs_pruned": report["pruned"].get("macs"), "params_original": report["original"].get("params"),
           "params_pruned": report["pruned"].get("params"), "timings_s": report.get("timings_s")}
    metric = report.get("metric") or {}
    if metric:
        out["accuracy_original"] = metric.get("original")
        out["accuracy_pruned"] = metric.get("pruned")
        out["accuracy_by_stage"] = {s["stage"]: s["value"] for s in metric.get("stages", [])}
    finetune = report.get("finetune") or {}
    if finetune:
        out["finetune"] = {"steps": finetune.get("steps"), **(finetune.get("metrics") or {})}
    return out


digits_provider, digits_latency = bench("digits_bench")
resnet_provider, resnet_latency = bench("resnet_bench")
expected = "CUDAExecutionProvider" if device == "cuda" else "CPUExecutionProvider"
providers = {digits_provider, resnet_provider}
summary = {
    "ok": providers == {expected},
    "device": device,
    "provider": sorted(providers),
    "digits_cnn": {**prune_summary("digits"), "latency": digits_latency},
    "resnet50": {**prune_summary("resnet"), "latency": resnet_latency},
    "step_seconds": times,
}
if not summary["ok"]:
    summary["error"] = f"latency ran on {sorted(providers)}, expected {expected}"
print(json.dumps(summary))
sys.exit(0 if summary["ok"] else 1)
EOF
