"""The report: JSON built from the stages' results, and the terminal table."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from onnxprune import __version__
from onnxprune.errors import BadInputError
from onnxprune.measure.fidelity import Fidelity
from onnxprune.measure.stats import ModelStats


def _totals(stats: ModelStats, latency_ms: Any | None) -> dict[str, Any]:
    out: dict[str, Any] = {"params": stats.params, "macs": stats.macs, "bytes": stats.bytes}
    if stats.macs_unknown_reason:
        out["macs_unknown_reason"] = stats.macs_unknown_reason
    if latency_ms is not None:
        out["latency_ms"] = latency_ms
    return out


def _layer_rows(original: ModelStats, pruned: ModelStats) -> list[dict[str, Any]]:
    after = {layer.node: layer for layer in pruned.layers}
    rows = []
    for layer in original.layers:
        new = after.pop(layer.node, None)
        rows.append(
            {
                "node": layer.node,
                "op": layer.op,
                "params_before": layer.params,
                "params_after": new.params if new else 0,
                "macs_before": layer.macs,
                "macs_after": new.macs if new else 0,
            }
        )
    for layer in after.values():  # nodes only the pruned model has (rare: surgery keeps names)
        rows.append(
            {
                "node": layer.node,
                "op": layer.op,
                "params_before": 0,
                "params_after": layer.params,
                "macs_before": 0,
                "macs_after": layer.macs,
            }
        )
    return rows


def build_report(
    original: ModelStats,
    pruned: ModelStats,
    groups: list[dict[str, Any]],
    fidelity: Fidelity | None,
    criterion: str,
    device: str,
    latency: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The JSON report (the contract the README's "Report" paragraph describes).

    Args:
        original: stats of the input model.
        pruned: stats of the pruned model.
        groups: the groups as JSON-able dicts (id, channels, kept, members, blocked reason), passed through.
        fidelity: output comparison, or None when not measured.
        criterion: the importance criterion used.
        device: the device that ran (``cuda`` or ``cpu``).
        latency: ``{"original": ..., "pruned": ...}`` latency in ms (a number or a dict such as
            ``{"p50": ..., "p90": ...}``), stored as each side's ``latency_ms``.
        extra: more top-level keys (e.g. plan details); they may not overwrite the standard ones.

    Returns:
        A JSON-serializable dict.

    Raises:
        BadInputError: ``extra`` tries to overwrite a standard key.
    """
    latency = latency or {}
    report: dict[str, Any] = {
        "original": _totals(original, latency.get("original")),
        "pruned": _totals(pruned, latency.get("pruned")),
        "groups": list(groups),
        "layers": _layer_rows(original, pruned),
        "fidelity": fidelity.to_dict() if fidelity else None,
        "criterion": criterion,
        "device": device,
        "onnxprune_version": __version__,
    }
    for key, value in (extra or {}).items():
        if key in report:
            raise BadInputError(f"report: extra key {key!r} would overwrite a standard key", field="extra")
        report[key] = value
    return report


def metric_report(label: str, name: str, data: str, original: float, pruned: float,
                  stages: Sequence[tuple[str, float]], points: float = 100.0,
                  shown: tuple[str, Callable[[float], float]] | None = None) -> dict[str, Any]:
    """The ``metric`` section: the task metric of the original, after each model-changing stage, and of the result.

    Args:
        label: how the value is named (``accuracy``, ``top1_agreement``, ``negative_kl``, ``cosine``, ``python:…``).
        name: the ``--metric`` value it came from.
        data: the evaluation data, as the report names it.
        original: the original model's value.
        pruned: the written model's value.
        stages: ``(stage, value)`` after each stage that changed the model, in order.
        points: points per unit of value (drops are in points).
        shown: ``(label, convert)`` when users read the metric in another form (``perplexity`` from
            ``-ln perplexity``): the section then also has ``shown`` with that label and the converted
            ``original``, ``pruned``, ``ratio`` (pruned / original) and per-stage ``stages``.

    Returns:
        JSON-able data; every value is higher-is-better and ``drop_points`` is ``points × (original - pruned)``.
    """
    section: dict[str, Any] = {
        "name": name, "label": label, "data": data, "higher_is_better": True, "points_per_unit": points,
        "original": original, "pruned": pruned, "drop_points": round((original - pruned) * points, 6),
        "stages": [{"stage": stage, "value": value, "drop_points": round((original - value) * points, 6)}
                   for stage, value in stages],
    }
    if shown is not None:
        what, convert = shown
        before, after = convert(original), convert(pruned)
        section["shown"] = {"label": what, "original": before, "pruned": after,
                            "ratio": after / before if before else None,
                            "stages": [{"stage": stage, "value": convert(value)} for stage, value in stages]}
    return section


def _fmt_int(n: int | None) -> str:
    if n is None:
        return "?"
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _fmt_change(before: float | None, after: float | None, word: str = "smaller") -> str:
    if before is None or after is None or before == 0:
        return ""
    pct = 100.0 * (after - before) / before
    ratio = f"{before / after:.2f}x" if after else "inf"
    return f"{pct:+.1f}%  ({ratio} {word})"


def _latency_value(value: Any) -> float | None:
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, Mapping):
        for key in ("p50", "p50_ms", "mean", "mean_ms"):
            if isinstance(value.get(key), (int, float)):
                return float(value[key])
    return None


def _table(rows: Iterable[Sequence[str]], align: str) -> list[str]:
    rows = [list(r) for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for r in rows:
        cells = [c.ljust(w) if a == "<" else c.rjust(w) for c, w, a in zip(r, widths, align, strict=True)]
        lines.append("  ".join(cells).rstrip())
    return lines


def render_table(report: Mapping[str, Any], max_layers: int = 40) -> str:
    """A terminal summary: totals before/after, fidelity, and the layers that changed.

    Args:
        report: what :func:`build_report` returned.
        max_layers: at most this many changed layers are listed (the rest are counted).

    Returns:
        Multi-line text.
    """
    orig, pruned = report["original"], report["pruned"]
    rows = [("", "original", "pruned", "change")]
    for key, label in (("params", "params"), ("macs", "MACs"), ("bytes", "bytes")):
        before, after = orig.get(key), pruned.get(key)
        rows.append((label, _fmt_int(before), _fmt_int(after), _fmt_change(before, after)))
    lat_a, lat_b = _latency_value(orig.get("latency_ms")), _latency_value(pruned.get("latency_ms"))
    if lat_a is not None or lat_b is not None:
        fmt = lambda v: "?" if v is None else f"{v:.3f} ms"  # noqa: E731
        rows.append(("latency", fmt(lat_a), fmt(lat_b), _fmt_change(lat_a, lat_b, "faster")))
    lines = [f"onnxprune {report.get('onnxprune_version', '')}: criterion {report.get('criterion')}, "
             f"device {report.get('device')}"]
    lines += _table(rows, "<>><")
    if orig.get("macs_unknown_reason"):
        lines.append(f"MACs unknown: {orig['macs_unknown_reason']}")
    lines += _metric_lines(report.get("metric"))
    lines += _fidelity_lines(report)
    lines += _max_drop_lines(report.get("max_drop"))
    lines += _quantize_lines(report.get("quantize"))
    changed = [
        r for r in report.get("layers", [])
        if r["params_before"] != r["params_after"] or r["macs_before"] != r["macs_after"]
    ]
    groups = report.get("groups") or []
    blocked = sum(1 for g in groups if g.get("blocked") or g.get("blocked_reason"))
    if groups:
        lines.append(f"groups: {len(groups)} ({blocked} blocked)")
    lines += _approximate_lines(groups)
    if changed:
        lines.append(f"layers changed: {len(changed)} of {len(report.get('layers', []))}")
        table = [("node", "op", "params", "", "MACs", "")]
        for r in changed[:max_layers]:
            table.append((
                r["node"], r["op"],
                f"{_fmt_int(r['params_before'])} -> {_fmt_int(r['params_after'])}",
                _pct(r["params_before"], r["params_after"]),
                f"{_fmt_int(r['macs_before'])} -> {_fmt_int(r['macs_after'])}",
                _pct(r["macs_before"], r["macs_after"]),
            ))
        lines += ["  " + line for line in _table(table, "<<>>>>")]
        if len(changed) > max_layers:
            lines.append(f"  ... and {len(changed) - max_layers} more")
    else:
        lines.append("layers changed: none")
    return "\n".join(lines)


def _approximate_lines(groups: Sequence[Mapping[str, Any]]) -> list[str]:
    """Groups cut although the cut changes what the kept channels compute (statistics over the channel axis)."""
    cut = [g for g in groups if g.get("approximate") and g.get("kept", g["channels"]) < g["channels"]]
    return [f"approximate cut: group {g['id']} ({g['channels']} -> {g['kept']}): {g['approximate'][0]}" for g in cut]


def _metric_lines(metric: Mapping[str, Any] | None) -> list[str]:
    """``metric accuracy on DATA: original 0.9911, pruned 0.9844 (drop 0.67 points); after cut 0.91, …``."""
    if not metric:
        return []
    line = (f"metric {metric['label']} on {metric['data']}: original {metric['original']:.4f}, "
            f"pruned {metric['pruned']:.4f} (drop {metric['drop_points']:.2f} points)")
    stages = metric.get("stages") or []
    if stages:
        line += "; " + ", ".join(f"after {s['stage']} {s['value']:.4f}" for s in stages)
    shown = metric.get("shown")
    if not shown:
        return [line]
    ratio = f" ({shown['ratio']:.3f}x)" if shown.get("ratio") is not None else ""
    extra = f"  {shown['label']}: original {shown['original']:.4g}, pruned {shown['pruned']:.4g}{ratio}"
    if shown.get("stages"):
        extra += "; " + ", ".join(f"after {s['stage']} {s['value']:.4g}" for s in shown["stages"])
    return [line, extra]


def _fidelity_lines(report: Mapping[str, Any]) -> list[str]:
    """The output comparison, saying where its inputs came from; random inputs are flagged as such."""
    fid = report.get("fidelity")
    if not fid:
        return []
    parts = [f"{fid['samples']} samples", f"cosine {fid['cosine']:.6f}", f"max abs err {fid['max_abs_err']:.3g}"]
    if fid.get("top1_agreement") is not None:
        parts.append(f"top-1 agreement {100 * fid['top1_agreement']:.1f}%")
    if fid.get("kl") is not None:
        parts.append(f"KL {fid['kl']:.3g}")
    where = report.get("fidelity_data")
    lines = [f"fidelity{f' on {where}' if where else ''}: " + ", ".join(parts)]
    if report.get("fidelity_from_random"):
        lines.append("  (random inputs, not task data: this says nothing about accuracy; pass --calib or "
                     "--eval-data to measure on real samples)")
    return lines


def _max_drop_lines(search: Mapping[str, Any] | None) -> list[str]:
    """The ``--max-drop`` probes and the choice, one row per probe."""
    if not search:
        return []
    dim = search["dimension"]
    lines = [f"max-drop {search['max_drop_points']} points of {search['metric']} (original "
             f"{search['original']:.4f}); probes repaired with {search['probe_repair']}:"]
    table = [("target", dim, search["metric"], "drop", "")]
    for p in search["probes"]:
        table.append((f"{p['target']:.3f}", f"{p['achieved']:.3f}", f"{p['value']:.4f}",
                      f"{p['drop_points']:.2f}", "pass" if p["passed"] else "fail"))
    lines += ["  " + line for line in _table(table, ">>>><")]
    chosen, final = search.get("chosen"), search.get("final") or {}
    if chosen:
        how = (f"the passing probe (full repair, {search['final_repair']}, fell to {final['full_repair_value']:.4f})"
               if final.get("stepped_back_to_probe") else f"repair: {search['final_repair']}")
        lines.append(f"  chosen {dim} {chosen['achieved']:.3f}: {search['metric']} {final.get('value', 0.0):.4f} "
                     f"(drop {final.get('drop_points', 0.0):.2f} points), {how}")
    return lines


def _quantize_lines(q: Mapping[str, Any] | None) -> list[str]:
    """``--quantize``: size and metric of the original, the pruned FP32 and the quantized model; the layers left
    in float and why; the guard's choice; the latency of FP32 against quantized."""
    if not q:
        return []
    how = q["mode"] + (f", {q['calibration']} calibration on {q['calibration_data']}" if q.get("calibration") else "")
    lines = [f"quantize {how}:"]
    stages = q.get("stages") or []
    if stages:
        table = [("", "bytes", "metric", "p50 latency")]
        table += [(s["stage"], _fmt_int(s["bytes"]), "" if s["metric"] is None else f"{s['metric']:.4f}",
                   f"{s['latency_p50_ms']:.3f} ms" if s.get("latency_p50_ms") is not None else "") for s in stages]
        lines += ["  " + line for line in _table(table, "<>>>")]
    metric = q.get("metric")
    if metric:
        lines.append(f"  {metric['label']} on {metric['data']}: {metric['before']:.4f} -> {metric['after']:.4f} "
                     f"(drop {metric['drop_points']:.2f} points" + (f", limit {q['max_drop_points']}" if
                                                                   q.get("max_drop_points") is not None else "") + ")")
    guard = q.get("guard")
    if guard:
        lines.append(f"  accuracy guard: all quantized {guard['all_quantized']:.4f}, {len(guard['ranking'])} "
                     f"candidates ranked by sensitivity, {len(guard['steps'])} float sets measured"
                     + ("; no quantized model within the limit, FP32 kept" if guard["fell_back"] else ""))
    floats = q.get("nodes_kept_float") or []
    for f in floats[:20]:
        lines.append(f"  float: {f['node']} ({f['op']}): {f['reason']}")
    if len(floats) > 20:
        lines.append(f"  ... and {len(floats) - 20} more float layers")
    lat = q.get("latency")
    if lat:
        lines.append(f"  latency batch {lat['batch']} on {lat['provider']}: FP32 {lat['fp32_p50_ms']:.3f} ms, "
                     f"quantized {lat['quantized_p50_ms']:.3f} ms ({lat['speedup']:.2f}x)")
    return lines


def _pct(before: int | None, after: int | None) -> str:
    if not before or after is None:
        return ""
    return f"{100.0 * (after - before) / before:+.0f}%"
