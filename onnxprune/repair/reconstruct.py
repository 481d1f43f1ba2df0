"""Least-squares reconstruction: refit the layers after a cut so they reproduce the original outputs.

After channels are removed, each layer that read them (Conv, Gemm, MatMul) sees fewer inputs. As in
He et al. 2017 (the "W-step"), its weights and bias are refit by least squares so that, on calibration
data, its output from the *pruned* model's inputs matches its output in the *original* model:

    min_{W', b'} ‖[A_p 1]·[W'; b'] − (A_o W + b)‖² + λ‖[W'; b'] − [W_s; b]‖²

``A_o``/``A_p`` are the feature rows (Conv: im2col patches at sampled output positions) of the same
samples and positions in the original and the pruned model, ``W_s`` the sliced weight. Using the
pruned model's inputs lets each layer also absorb the error of the layers before it, so layers are
refit in waves, upstream first, re-running the pruned model between waves (cost: two passes over the
calibration data per wave). The normal equations are accumulated in float64 over the stream (memory
``8·(K+1)·(K+1+Cout)`` bytes per layer, never the rows; layers with ``K > max_features`` are skipped), and the ridge ``λ`` (relative to the Gram's mean diagonal) pulls toward the sliced weights,
which keeps the solve stable when inputs are collinear or dead. A refit that would fit the sample
worse than the sliced weights is discarded (noted).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxprune.repair.calibration import LinearView, ProgressCallback, linear_view, progress_bar, stream
from onnxprune.data import DataSource
from onnxprune.errors import InvariantError
from onnxprune.analysis.core import Analysis, Site
from onnxprune.analysis.index_mapping import keep_positions

if TYPE_CHECKING:
    from onnxprune.runtime.device import DeviceChoice

log = logging.getLogger(__name__)

RIDGE = 1e-5
"""Default ridge relative to mean diag of the Gram: negligible on well-posed layers, decisive on singular ones."""
MAX_FEATURES = 8192
"""Layers reading more features after the cut are not refit: their float64 Gram would exceed 512 MiB."""


@dataclass
class LayerFit:
    """One consumer to refit: how to read it in both models and which of its features/outputs survive."""

    node: str
    original: LinearView
    pruned: LinearView
    keep_in: np.ndarray
    keep_out: np.ndarray
    gram: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    cross: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    target_sq: float = 0.0
    rows: int = 0


@dataclass
class ReconstructResult:
    """Per refit layer, ``(before, after)``: the relative squared output error ‖Ŷ − Y‖²/‖Y‖² on the sampled rows."""

    layers: dict[str, tuple[float, float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _sites_by_node(analysis: Analysis, role: str) -> dict[str, Site]:
    return {s.node: s for s in analysis.sites if s.role == role}


def plan_fits(original: gs.Graph, pruned: gs.Graph, analysis: Analysis, removed: np.ndarray,
              notes: list[str], max_features: int = MAX_FEATURES) -> list[LayerFit]:
    """The consumers whose input channels were cut, read as :class:`LinearView` in both graphs."""
    orig_nodes = {n.name: n for n in original.nodes}
    new_nodes = {n.name: n for n in pruned.nodes}
    outs = _sites_by_node(analysis, "out")
    fits: list[LayerFit] = []
    seen: set[str] = set()
    for site in analysis.sites:
        if site.role != "in":
            continue
        keep_in = keep_positions(site.ids, removed, analysis.class_of)
        if keep_in.all() or site.node not in new_nodes or site.node not in orig_nodes or site.node in seen:
            continue
        seen.add(site.node)
        vo, vp = linear_view(orig_nodes[site.node]), linear_view(new_nodes[site.node])
        if isinstance(vo, str) or isinstance(vp, str) or vo.weight != site.tensor:
            notes.append(f"reconstruct: skipped {vo if isinstance(vo, str) else vp}")
            continue
        k = int(keep_in.sum()) * vp.per_channel()
        if k > max_features:
            notes.append(f"reconstruct: skipped {site.node}: {k} input features (> {max_features}) would need a "
                         f"{8 * k * k / 2**30:.1f} GiB Gram")
            continue
        out = outs.get(site.node)
        n_out = vo.matrix(np.asarray(orig_nodes[site.node].inputs[1].values)).shape[1]
        keep_out = keep_positions(out.ids, removed, analysis.class_of) if out is not None else np.ones(n_out, bool)
        fits.append(LayerFit(site.node, vo, vp, np.repeat(keep_in, vo.per_channel()), keep_out))
    return fits


def _ancestors(graph: gs.Graph, names: set[str]) -> dict[str, set[str]]:
    producer = {o.name: n for n in graph.nodes for o in n.outputs}
    result = {}
    for name in names:
        node = next(n for n in graph.nodes if n.name == name)
        seen: set[str] = set()
        stack = [t.name for t in node.inputs]
        while stack:
            p = producer.get(stack.pop())
            if p is not None and p.name not in seen:
                seen.add(p.name)
                stack.extend(t.name for t in p.inputs)
        result[name] = seen
    return result


def waves(graph: gs.Graph, fits: list[LayerFit]) -> list[list[LayerFit]]:
    """Group fits so no layer is refit before one upstream of it."""
    anc = _ancestors(graph, {f.node for f in fits})
    pending, out = list(fits), []
    while pending:
        names = {f.node for f in pending}
        wave = [f for f in pending if not (anc[f.node] & (names - {f.node}))]
        if not wave:
            raise InvariantError(f"reconstruct: no layer order for {sorted(names)} (a cycle in the graph?)")
        out.append(wave)
        pending = [f for f in pending if f not in wave]
    return out


def _bias(node: gs.Node, view: LinearView, n_out: int) -> np.ndarray:
    """The layer's effective bias per output (Gemm's beta folded in; zeros when it has none)."""
    if view.bias is None:
        return np.zeros(n_out)
    b = np.asarray(node.inputs[2].values, dtype=np.float64).reshape(-1)
    b = np.broadcast_to(b, (n_out,)) if b.size == 1 else b
    return view.beta * b if view.op == "Gemm" else b


def _accumulate(fit: LayerFit, w_o: np.ndarray, b_o: np.ndarray, x_o: np.ndarray, x_p: np.ndarray,
                positions: int, rng: np.random.Generator) -> None:
    axis = fit.original.channel_axis % x_o.ndim
    if x_o.ndim != x_p.ndim or np.delete(x_o.shape, axis).tolist() != np.delete(x_p.shape, axis).tolist():
        raise InvariantError(f"reconstruct {fit.node}: original input {x_o.shape} and pruned input {x_p.shape} "
                             "differ off the channel axis")
    pos = fit.original.positions(x_o.shape, positions, rng)
    target = (fit.original.rows(x_o, pos) @ w_o + b_o)[:, fit.keep_out]
    a = fit.pruned.rows(x_p, pos)
    if a.shape[1] != int(fit.keep_in.sum()):
        raise InvariantError(f"reconstruct {fit.node}: the pruned layer reads {a.shape[1]} features, "
                             f"the cut should have left {int(fit.keep_in.sum())}")
    if fit.pruned.can_bias:
        a = np.hstack([a, np.ones((len(a), 1))])
    if not fit.gram.size:
        fit.gram = np.zeros((a.shape[1], a.shape[1]))
        fit.cross = np.zeros((a.shape[1], target.shape[1]))
    fit.gram += a.T @ a
    fit.cross += a.T @ target
    fit.target_sq += float((target**2).sum())
    fit.rows += len(a)


def _error(fit: LayerFit, w: np.ndarray) -> float:
    sq = fit.target_sq - 2 * float((w * fit.cross).sum()) + float((w * (fit.gram @ w)).sum())
    return max(sq, 0.0) / fit.target_sq if fit.target_sq > 0 else 0.0


def _write(graph: gs.Graph, node: gs.Node, view: LinearView, w: np.ndarray, bias: np.ndarray | None) -> None:
    weight = node.inputs[1]
    weight.values = view.weight_from(w, np.asarray(weight.values))
    if bias is None:
        return
    if view.op == "Gemm":
        bias = bias / view.beta if view.bias is not None else bias
        if view.bias is None:
            node.attrs["beta"] = 1.0
    if view.bias is not None:
        old = np.asarray(node.inputs[2].values)
        shape = old.shape if old.size == bias.size else (bias.size,)
        node.inputs[2].values = np.ascontiguousarray(bias.reshape(shape).astype(old.dtype))
    else:
        dtype = np.asarray(weight.values).dtype
        const = gs.Constant(f"{node.name}.reconstructed_bias", np.ascontiguousarray(bias.astype(dtype)))
        while len(node.inputs) < 2:
            node.inputs.append(gs.Variable.empty())
        if len(node.inputs) == 2:
            node.inputs.append(const)
        else:
            node.inputs[2] = const


def _solve(fit: LayerFit, w_s: np.ndarray, b_s: np.ndarray | None, ridge: float) -> np.ndarray:
    w0 = np.vstack([w_s, b_s[None, :]]) if b_s is not None else w_s
    k = fit.gram.shape[0]
    lam = ridge * max(float(np.trace(fit.gram)) / k, 1e-12)
    return np.linalg.solve(fit.gram + lam * np.eye(k), fit.cross + lam * w0)


def reconstruct(
    original: onnx.ModelProto,
    graph: gs.Graph,
    analysis: Analysis,
    removed_classes: np.ndarray,
    source: DataSource,
    *,
    device: str | DeviceChoice = "auto",
    batch_size: int = 32,
    positions: int = 16,
    ridge: float = RIDGE,
    seed: int = 0,
    progress: ProgressCallback | None = None,
    show_bar: bool | None = None,
    export: Callable[[gs.Graph], onnx.ModelProto] | None = None,
    max_features: int = MAX_FEATURES,
) -> ReconstructResult:
    """Refit, in place in ``graph`` (already cut), every Conv/Gemm/MatMul whose input channels were removed.

    Args:
        original: the model before the cut (with weights): targets come from it.
        graph: the cut graph; its consumer weights and biases are replaced.
        analysis: the analysis the cut used; ``removed_classes`` what it removed.
        source: calibration batches (read once per wave, in the same order for both models).
        device: ``auto|cuda|cpu`` or a resolved :class:`onnxprune.runtime.DeviceChoice`.
        positions: output positions sampled per sample for Conv/MatMul rows.
        ridge: pull toward the sliced weights, relative to the Gram's mean diagonal.
        progress: called with (fraction, message) after each wave; it may raise to cancel.
        show_bar: a tqdm bar on stderr; ``None``: only when stderr is a terminal.
        export: graph → runnable model for capturing the pruned model's inputs.
        max_features: layers reading more features are skipped (noted); bounds the Gram at 8·K² bytes.

    Returns:
        Per refit layer, the relative squared output error on the sampled rows with the sliced weights
        and after the refit.

    Raises:
        BadInputError: the data does not fit the model or the device is not usable.

    Example:
        >>> result = reconstruct(model, cut_graph, analysis, removed, source, device="cpu")
        >>> result.layers["conv2"]   # (error before, error after)
        (0.41, 0.03)
    """
    from onnxprune.runtime.device import select_device

    choice = select_device(device) if isinstance(device, str) else device
    export = export or (lambda g: gs.export_onnx(g, do_type_check=False))
    result = ReconstructResult()
    orig_graph = gs.import_onnx(original)
    orig_nodes = {n.name: n for n in orig_graph.nodes}
    removed = np.asarray(removed_classes, dtype=np.int64)
    fits = plan_fits(orig_graph, graph, analysis, removed, result.notes, max_features)
    if not fits:
        return result
    plan = waves(graph, fits)
    log.info("reconstruct: refitting %d layers in %d waves on %s", len(fits), len(plan), choice.name)
    bar = progress_bar(len(fits), "reconstruct", "layer", show_bar)
    try:
        for k, wave in enumerate(plan):
            _refit_wave(k, wave, original, graph, orig_nodes, source, choice, export, result,
                        batch_size=batch_size, positions=positions, ridge=ridge, seed=seed)
            if bar is not None:
                bar.update(len(wave))
            if progress is not None:
                progress((k + 1) / len(plan), f"refit {sum(len(w) for w in plan[: k + 1])}/{len(fits)} layers")
    finally:
        if bar is not None:
            bar.close()
    return result


def _refit_wave(k: int, wave: list[LayerFit], original: onnx.ModelProto, graph: gs.Graph,
                orig_nodes: dict[str, gs.Node], source: DataSource, choice: DeviceChoice,
                export: Callable[[gs.Graph], onnx.ModelProto], result: ReconstructResult, *,
                batch_size: int, positions: int, ridge: float, seed: int) -> None:
    """Accumulate one wave's normal equations over the stream, solve, and write the weights that improve."""
    from onnxprune.runtime.capture import iter_capture

    nodes = {n.name: n for n in graph.nodes}
    names = sorted({f.original.input for f in wave})
    pruned_model = export(graph)
    weights = {}
    for f in wave:
        w_o = f.original.matrix(np.asarray(orig_nodes[f.node].inputs[1].values))
        weights[f.node] = (w_o, _bias(orig_nodes[f.node], f.original, w_o.shape[1]))
    rng = np.random.default_rng((seed, k))
    pairs = zip(iter_capture(original, names, stream(source, batch_size), choice),
                iter_capture(pruned_model, names, stream(source, batch_size), choice))
    for got_o, got_p in pairs:
        for f in wave:
            _accumulate(f, *weights[f.node], got_o[f.original.input], got_p[f.pruned.input], positions, rng)
    for f in wave:
        _finish(f, graph, nodes[f.node], ridge, result)


def _finish(f: LayerFit, graph: gs.Graph, node: gs.Node, ridge: float, result: ReconstructResult) -> None:
    """Solve one layer's normal equations and write the refit when it is determined and fits better."""
    w_s = f.pruned.matrix(np.asarray(node.inputs[1].values))
    b_s = _bias(node, f.pruned, w_s.shape[1]) if f.pruned.can_bias else None
    before = _error(f, np.vstack([w_s, b_s[None, :]]) if b_s is not None else w_s)
    if f.rows < f.gram.shape[0]:
        result.notes.append(f"reconstruct: kept the sliced weights of {f.node}: {f.rows} sampled rows for "
                            f"{f.gram.shape[0]} unknowns per output (pass more --calib-samples)")
        result.layers[f.node] = (before, before)
        return
    sol = _solve(f, w_s, b_s, ridge)
    after = _error(f, sol)
    if after > before:
        result.notes.append(f"reconstruct: kept the sliced weights of {f.node} (the refit fit the sample worse)")
        after = before
    else:
        _write(graph, node, f.pruned, sol[: w_s.shape[0]], sol[-1] if b_s is not None else None)
    result.layers[f.node] = (before, after)
    log.debug("reconstruct %s: relative squared error %.4g -> %.4g on %d rows", f.node, before, after, f.rows)
