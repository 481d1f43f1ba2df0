"""Side by side on issue 11's architectures: onnxprune on the ONNX export vs Torch-Pruning 1.6.1 on the module.

Issue 11 asks that exports of Swin-T, CoaT-Lite, PoolFormer, ConvNeXt-V2, MobileViT and GPT-2 (random weights)
keep <= 0.45 of params at ``--ratio 0.5``, no more than Torch-Pruning + 0.03 where Torch-Pruning handles the
model, with MACs known under ``--shape``. This builds each model with random weights, exports it with the
TorchScript exporter (opset 17, dynamic batch, as users export), prunes it with ``onnxprune.pipeline.prune``
(l2, ratio 0.5, ``--shape`` at batch 1) and, on a fresh copy of the module, with Torch-Pruning's ``MetaPruner``
(l2 group magnitude, ratio 0.5, per-layer, classifier / lm_head ignored, attention ``num_heads`` given and head
dims pruned, as its ViT examples do). A Torch-Pruning result counts only if the pruned module still runs. For
every model that misses a target, the blocked groups ``onnxprune analyze`` states are saved in the JSON.

Extras (benchmark only, not test dependencies; keep the installed torch):
    pip install --no-deps timm torch-pruning==1.6.1 transformers torchvision==<the one matching torch>
    pip install huggingface_hub safetensors pyyaml typer rich

A CUDA build of torchvision next to a CPU torch fails to import (``operator torchvision::nms does not exist``);
timm needs torchvision only for ``FrozenBatchNorm2d``, so the script then declares the two missing op schemas
and imports it again (no torchvision op is used here).

Usage:
    nice -n 10 python benchmarks/bench_architectures.py [--models swin_t,gpt2] [--out benchmarks/results]
        [--exports DIR]  # keep the exports (for ``onnxprune analyze``) and reuse them
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from onnxprune.pipeline import analyze, prune
from onnxprune.spec import PruneSpec

RATIO = 0.5
TARGET = 0.45
TP_SLACK = 0.03
OPSET = 17
GPT2_SEQ = 32
_TORCHVISION_SHIM: list[Any] = []  # keeps the shim's op library alive


@dataclass(frozen=True)
class Case:
    """One architecture: how to build it, what it eats, and what Torch-Pruning must leave alone."""

    key: str
    title: str
    build: Callable[[], torch.nn.Module]
    example: Callable[[], torch.Tensor]
    input_name: str
    head: Callable[[torch.nn.Module], list[torch.nn.Module]]
    options: tuple[tuple[str, Any], ...] = ()
    """Extra ``PruneSpec`` fields for onnxprune (``prune_lm_hidden``)."""
    export_as: str = ""
    """The export's file stem when another case's export is reused (default: ``key``)."""


def _import_torchvision() -> None:
    """Import torchvision, declaring ``nms``/``qnms`` first if its compiled ops cannot load (see the docstring)."""
    try:
        import torchvision
        return
    except RuntimeError as e:
        if "torchvision::" not in str(e):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    lib = torch.library.Library("torchvision", "DEF")
    for op in ("nms", "qnms"):
        lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _TORCHVISION_SHIM.append(lib)
    import torchvision  # noqa: F401


def _timm(name: str) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        _import_torchvision()
        import timm

        return timm.create_model(name, pretrained=False).eval()

    return build


def _timm_input(name: str) -> Callable[[], torch.Tensor]:
    def example() -> torch.Tensor:
        _import_torchvision()
        import timm

        size = timm.get_pretrained_cfg(name).input_size
        return torch.randn(1, *size)

    return example


def _timm_head(model: torch.nn.Module) -> list[torch.nn.Module]:
    head = model.get_classifier()  # type: ignore[operator]
    return [head] if any(True for _ in head.parameters()) else []


class PlainGPT2(torch.nn.Module):
    """``input_ids -> logits`` without a cache: the plain export style."""

    def __init__(self) -> None:
        super().__init__()
        _import_torchvision()  # transformers imports it too
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(n_layer=2, n_embd=128, n_head=4, vocab_size=1024, n_positions=128, use_cache=False,
                            attn_implementation="eager")
        torch.manual_seed(0)
        self.lm = GPT2LMHeadModel(config).eval()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # An explicit all-ones mask: without one, transformers 5 looks for packed sequences with aten::diff,
        # which the TorchScript exporter cannot write.
        return self.lm(input_ids, attention_mask=torch.ones_like(input_ids), use_cache=False).logits


def _gpt2_input() -> torch.Tensor:
    return torch.randint(0, 1024, (1, GPT2_SEQ))


CASES: dict[str, Case] = {
    c.key: c
    for c in (
        Case("swin_t", "Swin-T", _timm("swin_tiny_patch4_window7_224"), _timm_input("swin_tiny_patch4_window7_224"),
             "input", _timm_head),
        Case("coat_lite", "CoaT-Lite-Tiny", _timm("coat_lite_tiny"), _timm_input("coat_lite_tiny"), "input",
             _timm_head),
        Case("poolformer", "PoolFormer-S12", _timm("poolformer_s12"), _timm_input("poolformer_s12"), "input",
             _timm_head),
        Case("convnextv2", "ConvNeXt-V2-Atto", _timm("convnextv2_atto"), _timm_input("convnextv2_atto"), "input",
             _timm_head),
        Case("mobilevit", "MobileViT-XXS", _timm("mobilevit_xxs"), _timm_input("mobilevit_xxs"), "input",
             _timm_head),
        Case("gpt2", "GPT-2 (2 layers, 128 wide, 4 heads, vocab 1024)", PlainGPT2, _gpt2_input, "input_ids",
             lambda m: [m.lm.lm_head]),  # type: ignore[union-attr]
        Case("gpt2_hidden", "GPT-2, --prune-lm-hidden", PlainGPT2, _gpt2_input, "input_ids",
             lambda m: [m.lm.lm_head], (("prune_lm_hidden", True),), "gpt2"),  # type: ignore[union-attr]
    )
}


def export(model: torch.nn.Module, x: torch.Tensor, name: str, path: Path) -> None:
    """TorchScript export at opset 17 with a symbolic batch (and sequence, for token inputs)."""
    axes = {0: "batch", 1: "seq"} if x.dtype == torch.int64 else {0: "batch"}
    with torch.no_grad():
        torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=OPSET, input_names=[name],
                          output_names=["output"], dynamic_axes={name: axes, "output": axes})


def runs_in_onnxruntime(original: Path, pruned: Path, x: np.ndarray, name: str) -> str:
    """'yes' when the pruned model runs and gives finite outputs of the original's shape, else why not."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    try:
        want = ort.InferenceSession(str(original), opts, providers=["CPUExecutionProvider"]).run(None, {name: x})[0]
        got = ort.InferenceSession(str(pruned), opts, providers=["CPUExecutionProvider"]).run(None, {name: x})[0]
    except Exception as e:  # noqa: BLE001 - the failure is the measurement
        return f"no: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
    if got.shape != want.shape:
        return f"no: output shape {got.shape} != {want.shape}"
    return "yes" if np.isfinite(got).all() else "no: non-finite outputs"


def run_onnxprune(path: Path, x: torch.Tensor, case: Case, work: Path) -> dict[str, Any]:
    """Prune the export at ratio 0.5 (l2, --shape at batch 1); params/MACs kept, groups and wall time."""
    name = case.input_name
    shapes = {name: list(x.shape)}
    out = work / "pruned.onnx"
    spec = PruneSpec(ratio=RATIO, criterion="l2", shapes=shapes, device="cpu", fidelity_samples=2,
                     **dict(case.options))
    t0 = time.perf_counter()
    try:
        report = prune(path, out, spec).report
    except Exception as e:  # noqa: BLE001 - the failure is the measurement
        return {"error": f"{type(e).__name__}: {e}", "seconds": time.perf_counter() - t0}
    seconds = time.perf_counter() - t0
    orig, new = report["original"], report["pruned"]
    groups = report.get("groups", [])
    macs_known = bool(orig.get("macs")) and "macs_unknown_reason" not in orig and "macs_unknown_reason" not in new
    return {
        "params_before": orig["params"], "params_after": new["params"],
        "params_kept": new["params"] / orig["params"],
        "macs_known": macs_known,
        "macs_kept": new["macs"] / orig["macs"] if macs_known else None,
        "macs_unknown_reason": orig.get("macs_unknown_reason") or new.get("macs_unknown_reason"),
        "prunable_groups": sum(1 for g in groups if g.get("prunable")), "groups": len(groups),
        "ort": runs_in_onnxruntime(path, out, x.numpy(), name),
        "seconds": seconds,
    }


def _attention_heads(model: torch.nn.Module) -> dict[torch.nn.Module, int]:
    """``{qkv projection: heads}`` for timm attention blocks and GPT-2's ``c_attn``, as Torch-Pruning's examples pass."""
    heads: dict[torch.nn.Module, int] = {}
    for m in model.modules():
        qkv = getattr(m, "qkv", None) or getattr(m, "c_attn", None)
        n = getattr(m, "num_heads", None)
        if isinstance(qkv, torch.nn.Module) and isinstance(n, int):
            heads[qkv] = n
    return heads


def _sync_attributes(model: torch.nn.Module, pruner: Any) -> None:
    """After the cut, update the widths modules keep as attributes, as Torch-Pruning's examples do by hand.

    Attention reads ``num_heads``/``head_dim`` (TP's ViT example); MetaFormer's ``Scale`` views its vector to a
    stored ``shape``.
    """
    for m in model.modules():
        scale, shape = getattr(m, "scale", None), getattr(m, "shape", None)
        if isinstance(scale, torch.nn.Parameter) and isinstance(shape, tuple) and shape:
            m.shape = (scale.numel(), *shape[1:])
        qkv = getattr(m, "qkv", None)
        if isinstance(qkv, torch.nn.Linear) and qkv in pruner.num_heads:
            m.num_heads = pruner.num_heads[qkv]
            if hasattr(m, "head_dim"):
                m.head_dim = qkv.out_features // (3 * m.num_heads)
            if hasattr(m, "scale") and isinstance(m.scale, float) and hasattr(m, "head_dim"):
                m.scale = m.head_dim ** -0.5


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def run_torch_pruning(case: Case) -> dict[str, Any]:
    """Torch-Pruning 1.6.1 at ratio 0.5 on a fresh module; params kept, or the failure, and whether it still runs."""
    import torch_pruning as tp

    model, x = case.build(), case.example()
    for m in model.modules():  # TP's timm example sets TIMM_FUSED_ATTN=0: SDPA hides the head layout from its trace
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    before = _params(model)
    with torch.no_grad():
        want = model(x).shape
    t0 = time.perf_counter()
    try:
        pruner = tp.pruner.MetaPruner(
            model, x, importance=tp.importance.GroupMagnitudeImportance(p=2), pruning_ratio=RATIO,
            global_pruning=False, ignored_layers=case.head(model), num_heads=_attention_heads(model),
            prune_num_heads=False, prune_head_dims=True)
        pruner.step()
        _sync_attributes(model, pruner)
    except Exception as e:  # noqa: BLE001 - the failure is the measurement
        return {"error": f"prune: {type(e).__name__}: {str(e).splitlines()[0][:200]}",
                "seconds": time.perf_counter() - t0}
    seconds = time.perf_counter() - t0
    after = _params(model)
    try:
        with torch.no_grad():
            got = model(x).shape
        runs = "yes" if got == want else f"no: output shape {tuple(got)} != {tuple(want)}"
    except Exception as e:  # noqa: BLE001
        runs = f"no: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
    return {"params_before": before, "params_after": after, "params_kept": after / before, "runs": runs,
            "seconds": seconds}


def blockers(path: Path, shapes: dict[str, list[int]]) -> list[dict[str, Any]]:
    """The groups ``onnxprune analyze`` leaves unprunable (or partly), with the reasons it states, largest first."""
    result = analyze(path, shapes=shapes)
    out = [{"id": g["id"], "channels": g["channels"], "blocked_channels": g["blocked_channels"],
            "producers": g["producers"][:4], "blocked": g["blocked"], "reasons": g["reasons"][:6]}
           for g in result["groups"] if g["blocked_channels"]]
    return sorted(out, key=lambda g: -g["blocked_channels"])


def misses(row: dict[str, Any]) -> bool:
    """Whether onnxprune misses the issue's target (<= 0.45 and <= TP + 0.03 where TP's result runs)."""
    op = row["onnxprune"]
    if "error" in op or not op["macs_known"]:
        return True
    tp_ = row["torch_pruning"]
    tp_ok = "error" not in tp_ and tp_.get("runs") == "yes"
    return op["params_kept"] > TARGET or (tp_ok and op["params_kept"] > tp_["params_kept"] + TP_SLACK)


def bench(case: Case, exports: Path | None) -> dict[str, Any]:
    """Export (or reuse the export in ``exports``), prune with both tools, and collect blockers when onnxprune misses."""
    torch.manual_seed(0)
    x = case.example()
    with tempfile.TemporaryDirectory() as tmp:
        path = (exports or Path(tmp)) / f"{case.export_as or case.key}.onnx"
        if not path.exists():
            export(case.build(), x, case.input_name, path)
        row: dict[str, Any] = {"key": case.key, "model": case.title, "shape": list(x.shape)}
        row["onnxprune"] = run_onnxprune(path, x, case, Path(tmp))
        try:
            row["torch_pruning"] = run_torch_pruning(case)
        except Exception as e:  # noqa: BLE001
            row["torch_pruning"] = {"error": f"{type(e).__name__}: {e}"}
        row["meets_target"] = not misses(row)
        if not row["meets_target"] and not case.options:  # analyze takes no prune options
            row["blockers"] = blockers(path, {case.input_name: list(x.shape)})
    return row


def _cell_tp(tp_: dict[str, Any]) -> str:
    if "error" in tp_:
        return f"fails ({tp_['error'][:90]})"
    kept = f"{tp_['params_kept']:.3f}"
    if tp_["runs"] != "yes":
        return f"{kept}, pruned module does not run ({tp_['runs'][4:90]})"
    return kept if tp_["params_after"] < tp_["params_before"] else f"{kept} (prunes nothing)"


def _versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for name in ("onnxprune", "torch", "timm", "torch-pruning", "transformers", "onnxruntime-gpu", "onnxruntime"):
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            continue
    return ", ".join(found)


def markdown(rows: list[dict[str, Any]]) -> str:
    """The side-by-side table plus one line per blocker kind for the models that miss."""
    lines = [f"# onnxprune vs Torch-Pruning 1.6.1 at ratio {RATIO} (random weights, batch 1)", "",
             (f"Target: params kept <= {TARGET} and <= Torch-Pruning + {TP_SLACK} where it handles the model; "
             "MACs known with --shape."), "",
             (f"Versions: {_versions()}. onnxprune: l2, --shape at batch 1, export by torch.onnx (TorchScript, "
              f"opset {OPSET}, dynamic batch). Torch-Pruning: MetaPruner, GroupMagnitudeImportance(p=2), per layer, "
              "head ignored, num_heads given, head dims pruned; its result counts only if the pruned module runs. "
              "onnxprune counts the export's initializers (GPT-2's tied lm_head is a second copy there), "
              "Torch-Pruning the module's parameters."), "",
             ("| model | input | onnxprune params kept | MACs kept | runs in ORT | prunable groups | onnxprune s "
             "| Torch-Pruning params kept | TP s | meets |"),
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        op, tp_ = r["onnxprune"], r["torch_pruning"]
        shape = "x".join(map(str, r["shape"]))
        if "error" in op:
            cells = [f"fails ({op['error'][:90]})", "-", "-", "-", f"{op['seconds']:.0f}"]
        else:
            macs = f"{op['macs_kept']:.3f}" if op["macs_known"] else f"unknown ({op['macs_unknown_reason']})"
            cells = [f"{op['params_kept']:.3f}", macs, op["ort"], f"{op['prunable_groups']}/{op['groups']}",
                     f"{op['seconds']:.0f}"]
        tps = f"{tp_['seconds']:.0f}" if "seconds" in tp_ else "-"
        lines.append(f"| {r['model']} | {shape} | " + " | ".join(cells) + f" | {_cell_tp(tp_)} | {tps} | "
                     + ("yes" if r["meets_target"] else "**no**") + " |")
    for r in rows:
        if r.get("blockers"):
            lines += ["", f"## {r['model']}: what onnxprune's analysis blocks (largest groups first)", ""]
            for g in r["blockers"][:8]:
                reason = g["blocked"] or "; ".join(g["reasons"][:2]) or "?"
                lines.append(f"- group {g['id']} ({g['blocked_channels']}/{g['channels']} ch, from "
                             f"{', '.join(g['producers'][:2])}): {reason}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--exports", default=None, help="keep the ONNX exports here and reuse them on later runs")
    args = parser.parse_args(argv)
    keys = [k.strip() for k in args.models.split(",") if k.strip()]
    unknown = [k for k in keys if k not in CASES]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
    torch.set_num_threads(1)
    import onnxruntime

    onnxruntime.set_default_logger_severity(3)  # the pruned graphs' Unsqueeze notices drown the results
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    exports = Path(args.exports) if args.exports else None
    if exports:
        exports.mkdir(parents=True, exist_ok=True)
    json_path = out / "architectures.json"
    previous = {r["key"]: r for r in json.loads(json_path.read_text())} if json_path.exists() else {}
    for key in keys:
        print(f"== {key}", flush=True)
        try:
            previous[key] = bench(CASES[key], exports)
        except Exception:  # noqa: BLE001 - report and go on to the next model
            traceback.print_exc()
            continue
        print(json.dumps({k: v for k, v in previous[key].items() if k != "blockers"}, default=str), flush=True)
        rows = [previous[k] for k in CASES if k in previous]
        json_path.write_text(json.dumps(rows, indent=1, default=str) + "\n")
        (out / "architectures.md").write_text(markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
