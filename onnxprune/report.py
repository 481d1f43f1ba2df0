"""The report: JSON built from the stages' results, and the terminal table."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
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
    fid = report.get("fidelity")
    if fid:
        parts = [f"{fid['samples']} samples", f"cosine {fid['cosine']:.6f}", f"max abs err {fid['max_abs_err']:.3g}"]
        if fid.get("top1_agreement") is not None:
            parts.append(f"top-1 agreement {100 * fid['top1_agreement']:.1f}%")
        if fid.get("kl") is not None:
            parts.append(f"KL {fid['kl']:.3g}")
        lines.append("fidelity: " + ", ".join(parts))
    changed = [
        r for r in report.get("layers", [])
        if r["params_before"] != r["params_after"] or r["macs_before"] != r["macs_after"]
    ]
    groups = report.get("groups") or []
    blocked = sum(1 for g in groups if g.get("blocked") or g.get("blocked_reason"))
    if groups:
        lines.append(f"groups: {len(groups)} ({blocked} blocked)")
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


def _pct(before: int | None, after: int | None) -> str:
    if not before or after is None:
        return ""
    return f"{100.0 * (after - before) / before:+.0f}%"
