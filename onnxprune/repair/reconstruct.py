"""Least-squares reconstruction: refit the layers after a cut so they reproduce the original outputs.

After channels are removed, each layer that read them (Conv, Gemm, MatMul) sees fewer inputs. As in
He et al. 2017 (the "W-step"), its weights and bias are refit by least squares so that, on calibration
data, its output from the *pruned* model's inputs matches its output in the *original* model:

    min_{W', b'} ‖[A_p 1]·[W'; b'] − (A_o W + b)‖² + λ‖[W'; b'] − [W_s; b]‖²

``A_o``/``A_p`` are the feature rows (Conv: im2col patches at sampled output positions) of the same
samples and positions in the original and the pruned model, ``W_s`` the sliced weight. Using the
pruned model's inputs lets each layer also absorb the error of the layers before it, so layers are
refit in waves, upstream first.

Nearly all the cost is onnxruntime (on PP-OCRv4 rec, 97% of the time went to ``session.run``: two full
passes over the data per wave, 19 waves), so this module economises on runs:

* **both models in segments**: per wave, each model runs only the nodes between the tensors earlier
  waves kept (those that nodes still to run read, all batches, at most ``cache_bytes`` per model) and
  the wave's layer inputs, so all waves together cost about one pass per model instead of two passes
  per wave. Kept tensors stay valid: a wave only changes layers that nothing kept depends on (see
  :func:`waves`), and one session is alive at a time;
* the original's segment samples the wave's positions and keeps the target rows ``A_o W + b``
  (float32, at most ``max_rows`` rows per layer) until the pruned segment has been accumulated;
* **normal equations by BLAS**: per batch, ``AᵀA`` and ``AᵀT`` as float64 matrix products over the
  sampled rows (memory ``8·(K+1)·(K+1+Cout)`` bytes per layer of the wave; layers with
  ``K > max_features`` are skipped); Conv rows are gathered without padding the batch;
* layers whose sliced weights already fit within ``tolerance`` keep them (nothing to gain, only
  sampling noise to fit).

The ridge ``λ`` (relative to the Gram's mean diagonal) pulls toward the sliced weights and the solve is
float64, which keeps it stable when inputs are collinear or dead. A refit that would fit the sample
worse than the sliced weights is discarded (noted).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper

from onnxprune.analysis.core import Analysis, Site, SiteRole
from onnxprune.analysis.index_mapping import keep_positions
from onnxprune.data import DataSource
from onnxprune.errors import InvariantError
from onnxprune.repair.calibration import (
    LinearView,
    ProgressCallback,
    linear_view,
    progress_bar,
    stream,
)

if TYPE_CHECKING:
    from onnxprune.runtime.device import DeviceChoice

log = logging.getLogger(__name__)

RIDGE = 1e-5
"""Default ridge relative to mean diag of the Gram: negligible on well-posed layers, decisive on singular ones."""
MAX_FEATURES = 8192
"""Layers reading more features after the cut are not refit: their float64 Gram would exceed 512 MiB."""
TOLERANCE = 1e-4
"""Layers whose sliced weights already have a relative squared output error below this keep them."""
MAX_ROWS = 16384
"""Sampled rows per layer at most (fewer positions per sample with many samples): bounds the kept targets at
``4·MAX_ROWS·Cout`` bytes per layer, while still over-determining the widest layers that are refit."""
CACHE_BYTES = 2**30
"""Activations kept between waves at most, per model (original and pruned); above it each wave re-runs that
model from its inputs (correct, but one pass per wave again)."""


@dataclass
class Sampled:
    """One batch of one layer: sampled positions, the original input's shape and the target rows there."""

    pos: np.ndarray
    shape: tuple[int, ...]
    target: np.ndarray


@dataclass
class LayerFit:
    """One consumer to refit: how to read it in both models, which features/outputs survive, its sums."""

    node: str
    original: LinearView
    pruned: LinearView
    keep_in: np.ndarray
    keep_out: np.ndarray
    gram: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    cross: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    target_sq: float = 0.0
    rows: int = 0
    samples: list[Sampled] = field(default_factory=list)


@dataclass
class ReconstructResult:
    """Per refit layer, ``(before, after)``: the relative squared output error ‖Ŷ − Y‖²/‖Y‖² on the sampled rows.

    ``timings`` holds seconds per phase (``targets``: the original's run and the sampling, of which ``run
    original`` in onnxruntime; ``run pruned``: the pruned model's segments; ``accumulate``; ``solve``);
    ``runs`` counts onnxruntime runs (one per batch and segment).
    """

    layers: dict[str, tuple[float, float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    runs: int = 0

    def add_time(self, phase: str, since: float) -> None:
        """Add the seconds elapsed since ``since`` (a ``perf_counter`` value) to ``phase``."""
        self.timings[phase] = round(self.timings.get(phase, 0.0) + time.perf_counter() - since, 4)


def _sites_by_node(analysis: Analysis, role: SiteRole) -> dict[str, Site]:
    return {s.node: s for s in analysis.sites if s.role == role}


def plan_fits(original: gs.Graph, pruned: gs.Graph, analysis: Analysis, removed: np.ndarray,
              notes: list[str], max_features: int = MAX_FEATURES) -> list[LayerFit]:
    """The consumers whose input channels were cut, read as :class:`LinearView` in both graphs."""
    orig_nodes = {n.name: n for n in original.nodes}
    new_nodes = {n.name: n for n in pruned.nodes}
    outs = _sites_by_node(analysis, SiteRole.OUT)
    fits: list[LayerFit] = []
    seen: set[str] = set()
    for site in analysis.sites:
        if site.role != SiteRole.IN:
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
    by_name = {n.name: n for n in graph.nodes}
    result = {}
    for name in names:
        seen: set[str] = set()
        stack = [t.name for t in by_name[name].inputs]
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


# ----------------------------------------------------------------------------------------------
# Running only the part of a model between cached tensors and the wanted ones


def _reads(node: onnx.NodeProto) -> list[str]:
    """Tensors ``node`` reads, including outer-scope names read inside its subgraphs (If, Loop, Scan)."""
    names = [n for n in node.input if n]
    for attr in node.attribute:
        for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
            local = {i.name for i in sub.input} | {t.name for t in sub.initializer}
            local.update(o for inner in sub.node for o in inner.output if o)
            names.extend(n for inner in sub.node for n in _reads(inner) if n not in local)
    return names


@dataclass
class ModelIndex:
    """Who produces and who reads each tensor of a model, and which tensors depend on its fed inputs."""

    model: onnx.ModelProto
    producer: dict[str, int]
    reads: list[list[str]]
    readers: dict[str, list[int]]
    inputs: dict[str, onnx.ValueInfoProto]
    data: set[str]

    @classmethod
    def of(cls, model: onnx.ModelProto) -> ModelIndex:
        nodes = model.graph.node
        inits = {t.name for t in model.graph.initializer}
        inputs = {vi.name: vi for vi in model.graph.input if vi.name not in inits}
        producer = {o: k for k, n in enumerate(nodes) for o in n.output if o}
        reads = [_reads(n) for n in nodes]
        readers: dict[str, list[int]] = {}
        for k, names in enumerate(reads):
            for name in set(names):
                readers.setdefault(name, []).append(k)
        data, stack = set(inputs), list(inputs)
        while stack:  # constants and their folds are recomputed when needed, never cached
            for k in readers.get(stack.pop(), []):
                for out in nodes[k].output:
                    if out and out not in data:
                        data.add(out)
                        stack.append(out)
        return cls(model, producer, reads, readers, inputs, data)

    def key(self, k: int) -> str:
        """A node's identity across re-exports of the same graph: its first output's name."""
        return next((o for o in self.model.graph.node[k].output if o), f"#{k}")

    def needed(self, wanted: list[str], available: set[str]) -> tuple[set[int], set[str]]:
        """Nodes that compute ``wanted`` from ``available`` tensors and initializers, and the available ones read."""
        nodes: set[int] = set()
        used: set[str] = set()
        stack = list(wanted)
        while stack:
            name = stack.pop()
            if name in available:
                used.add(name)
                continue
            k = self.producer.get(name)
            if k is not None and k not in nodes:
                nodes.add(k)
                stack.extend(self.reads[k])
        return nodes, used

    def segment(self, nodes: set[int], feeds: dict[str, onnx.ValueInfoProto]) -> onnx.ModelProto:
        """A model of ``nodes`` (topologically ordered) reading ``feeds``; its outputs are the capture's to add."""
        src = self.model
        graph = helper.make_graph([src.graph.node[k] for k in self._toposort(nodes)], f"{src.graph.name}_segment",
                                  list(feeds.values()), [])
        read = {n for k in nodes for n in self.reads[k]}
        graph.initializer.extend(t for t in src.graph.initializer if t.name in read and t.name not in feeds)
        graph.sparse_initializer.extend(t for t in src.graph.sparse_initializer if t.values.name in read)
        produced = {o for k in nodes for o in src.graph.node[k].output}
        graph.value_info.extend(vi for vi in src.graph.value_info if vi.name in produced)
        seg = helper.make_model(graph, opset_imports=list(src.opset_import), ir_version=src.ir_version)
        seg.functions.extend(src.functions)
        return seg

    def _toposort(self, nodes: set[int]) -> list[int]:
        """``nodes`` ordered so each runs after its producers (an edited graph's order need not be)."""
        done: set[int] = set()
        order: list[int] = []
        for start in sorted(nodes):
            stack = [(start, False)]
            while stack:
                k, expanded = stack.pop()
                if k in done:
                    continue
                if expanded:
                    done.add(k)
                    order.append(k)
                    continue
                stack.append((k, True))
                stack.extend((p, False) for p in (self.producer.get(n) for n in self.reads[k])
                             if p is not None and p in nodes and p not in done)
        return order


def _input_info(name: str, like: np.ndarray) -> onnx.ValueInfoProto:
    """A segment input for a cached tensor: its element type and shape, batch dim symbolic."""
    return helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(like.dtype), ["N", *like.shape[1:]])


class SegmentRunner:
    """Yields a model's tensors wave after wave while running each node about once over the data.

    Between calls it keeps, for all batches, the tensors that nodes still to run will read, so the next
    call starts from them instead of from the model's inputs.
    """

    def __init__(self, source: DataSource, batch_size: int, choice: DeviceChoice, cache_bytes: int,
                 result: ReconstructResult, phase: str) -> None:
        self.source, self.batch_size, self.choice = source, batch_size, choice
        self.cache_bytes, self.result, self.phase = cache_bytes, result, phase
        self.cache: dict[str, list[np.ndarray]] = {}
        self.done: set[str] = set()
        self.over_budget = False

    def run(self, model: onnx.ModelProto, wanted: list[str], later: list[str]) -> Iterator[dict[str, np.ndarray]]:
        """``wanted`` per batch; afterwards keep what the nodes computing ``later`` still read.

        Nodes are matched by their first output's name, so ``model`` may be re-exported (with new weights)
        between calls, as long as the nodes upstream of what is cached did not change.
        """
        from onnxprune.runtime.capture import iter_capture

        index = ModelIndex.of(model)
        nodes, used = index.needed(wanted, set(self.cache) | set(index.inputs))
        ran = {index.key(k) for k in nodes}
        to_run = {k for k in index.needed(later, set())[0] if index.key(k) not in self.done | ran}
        still_read = {n for k in to_run for n in index.reads[k]}
        produced = [o for k in sorted(nodes) for o in index.model.graph.node[k].output]
        keep = [t for t in dict.fromkeys([*self.cache, *produced, *wanted])
                if t in still_read and t in index.data and t not in index.inputs]
        fresh = [t for t in keep if t not in self.cache]
        names = list(dict.fromkeys([*wanted, *fresh]))
        cache = {t: self.cache[t] for t in keep if t in self.cache} | {t: [] for t in fresh}
        batches = self._feeds(sorted(used), [n for n in used if n in index.inputs])
        if nodes:
            feeds = {n: index.inputs[n] if n in index.inputs else _input_info(n, self.cache[n][0]) for n in sorted(used)}
            captured = iter_capture(index.segment(nodes, feeds), names, batches, self.choice)
        else:
            captured = ({n: b[n] for n in names} for b in batches)
        spent = [t for t in self.cache if t not in cache]
        t0 = time.perf_counter()
        for b, got in enumerate(captured):
            self.result.runs += bool(nodes)
            self.result.add_time(self.phase, t0)
            for t in fresh:
                cache[t].append(got[t])
            for t in spent:  # fed and no longer needed: old and new tensors need not all be held at once
                self.cache[t][b] = None  # type: ignore[call-overload]
            yield {n: got[n] for n in wanted}
            t0 = time.perf_counter()
        self.done |= ran
        self.cache = self._within_budget(cache)

    def _within_budget(self, cache: dict[str, list[np.ndarray]]) -> dict[str, list[np.ndarray]]:
        size = sum(a.nbytes for arrays in cache.values() for a in arrays)
        log.debug("reconstruct: %d tensors (%.1f MiB) kept for later waves", len(cache), size / 2**20)
        if size <= self.cache_bytes:
            return cache
        if not self.over_budget:
            self.over_budget = True
            self.result.notes.append(f"reconstruct: the activations later waves read take {size / 2**20:.0f} MiB "
                                     f"(> {self.cache_bytes / 2**20:.0f} MiB kept at most); waves re-ran the "
                                     "model from its inputs instead")
        return {}

    def _feeds(self, used: list[str], from_input: list[str]) -> Iterator[dict[str, np.ndarray]]:
        """Per batch: the cached tensors among ``used``, plus the fed inputs from the stream when needed."""
        cached = [n for n in used if n in self.cache]
        if from_input or not cached:
            for b, feeds in enumerate(stream(self.source, self.batch_size)):
                yield {n: feeds[n] for n in from_input} | {n: self.cache[n][b] for n in cached}
            return
        for b in range(len(self.cache[cached[0]])):
            yield {n: self.cache[n][b] for n in cached}


# ----------------------------------------------------------------------------------------------
# Sampling, accumulating and solving


def _bias(node: gs.Node, view: LinearView, n_out: int) -> np.ndarray:
    """The layer's effective bias per output (Gemm's beta folded in; zeros when it has none)."""
    if view.bias is None:
        return np.zeros(n_out)
    b = np.asarray(node.inputs[2].values, dtype=np.float64).reshape(-1)
    b = np.broadcast_to(b, (n_out,)) if b.size == 1 else b
    return view.beta * b if view.op == "Gemm" else b


def per_sample_positions(positions: int, max_rows: int, samples: int) -> int:
    """Positions to sample per sample: ``positions``, fewer when that would exceed ``max_rows`` per layer."""
    return max(1, min(positions, max_rows // max(samples, 1)))


def feature_rows(view: LinearView, x: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """``view.rows(x, pos)``, faster for Conv: no padded copy of the batch (taps in the padding are zeroed), and
    each tap gathers a channel vector from a channels-last view instead of one element per index (6× less time)."""
    if view.op != "Conv":
        return view.rows(x, pos)
    last = np.moveaxis(np.asarray(x), 1, -1)
    _, h, w, c = last.shape
    pt, pl, _, _ = view._pads(h, w)
    (kh, kw), (sh, sw), (dh, dw) = view.kernel, view.strides, view.dilations
    hh = (pos[:, 1, None] * sh + np.arange(kh) * dh - pt)[:, :, None]
    ww = (pos[:, 2, None] * sw + np.arange(kw) * dw - pl)[:, None, :]
    taps = last[pos[:, 0, None, None], np.clip(hh, 0, h - 1), np.clip(ww, 0, w - 1)].astype(np.float64)
    inside = (hh >= 0) & (hh < h) & (ww >= 0) & (ww < w)
    if not inside.all():
        taps *= inside[..., None]
    return taps.transpose(0, 3, 1, 2).reshape(len(pos), c * kh * kw)  # features ordered (cin, kh, kw)


def sample_targets(original: onnx.ModelProto, wave: list[LayerFit], later: list[str], orig_nodes: dict[str, gs.Node],
                   runner: SegmentRunner, per_sample: int, rng: np.random.Generator) -> None:
    """The original's segment for one wave: sample each layer's positions per batch and keep the target rows there
    (the original runs in segments too, so only one wave's captures and targets are held at a time)."""
    weights = {}
    for f in wave:
        w_o = f.original.matrix(np.asarray(orig_nodes[f.node].inputs[1].values))
        b_o = _bias(orig_nodes[f.node], f.original, w_o.shape[1])
        weights[f.node] = (w_o[:, f.keep_out], b_o[f.keep_out])
    for got in runner.run(original, sorted({f.original.input for f in wave}), later):
        for f in wave:
            x = got[f.original.input]
            pos = f.original.positions(x.shape, per_sample, rng)
            w_o, b_o = weights[f.node]
            target = (feature_rows(f.original, x, pos) @ w_o + b_o).astype(np.float32)
            f.target_sq += float(np.einsum("ij,ij->", target, target, dtype=np.float64))
            f.samples.append(Sampled(pos, tuple(x.shape), target))


def _accumulate(fit: LayerFit, x_p: np.ndarray, s: Sampled) -> None:
    """Add one batch's rows of the pruned layer to its normal equations (two BLAS products)."""
    axis = fit.original.channel_axis % len(s.shape)
    if len(s.shape) != x_p.ndim or np.delete(s.shape, axis).tolist() != np.delete(x_p.shape, axis).tolist():
        raise InvariantError(f"reconstruct {fit.node}: original input {s.shape} and pruned input {x_p.shape} "
                             "differ off the channel axis")
    rows = feature_rows(fit.pruned, x_p, s.pos)
    if rows.shape[1] != int(fit.keep_in.sum()):
        raise InvariantError(f"reconstruct {fit.node}: the pruned layer reads {rows.shape[1]} features, "
                             f"the cut should have left {int(fit.keep_in.sum())}")
    k = rows.shape[1] + int(fit.pruned.can_bias)
    a = rows
    if fit.pruned.can_bias:
        a = np.empty((len(rows), k))
        a[:, :-1], a[:, -1] = rows, 1.0
    if not fit.gram.size:
        fit.gram, fit.cross = np.zeros((k, k)), np.zeros((k, s.target.shape[1]))
    fit.gram += a.T @ a
    fit.cross += a.T @ s.target.astype(np.float64)
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
    tolerance: float = TOLERANCE,
    seed: int = 0,
    progress: ProgressCallback | None = None,
    show_bar: bool | None = None,
    export: Callable[[gs.Graph], onnx.ModelProto] | None = None,
    max_features: int = MAX_FEATURES,
    max_rows: int = MAX_ROWS,
    cache_bytes: int = CACHE_BYTES,
) -> ReconstructResult:
    """Refit, in place in ``graph`` (already cut), every Conv/Gemm/MatMul whose input channels were removed.

    Args:
        original: the model before the cut (with weights): targets come from it.
        graph: the cut graph; its consumer weights and biases are replaced.
        analysis: the analysis the cut used; ``removed_classes`` what it removed.
        source: calibration batches (read in the same order each time it is streamed).
        device: ``auto|cuda|cpu`` or a resolved :class:`onnxprune.runtime.DeviceChoice`.
        positions: output positions sampled per sample for Conv/MatMul rows (fewer above ``max_rows``).
        ridge: pull toward the sliced weights, relative to the Gram's mean diagonal.
        tolerance: layers whose relative squared error with the sliced weights is below it keep them.
        progress: called with (fraction, message) after each wave; it may raise to cancel.
        show_bar: a tqdm bar on stderr; ``None``: only when stderr is a terminal.
        export: graph → runnable model for running the pruned model.
        max_features: layers reading more features are skipped (noted); bounds the Gram at 8·K² bytes.
        max_rows: sampled rows per layer at most; bounds the kept targets at ``4·max_rows·Cout`` bytes.
        cache_bytes: pruned-model activations kept between waves at most (more: re-run from the inputs).

    Returns:
        Per refit layer, the relative squared output error on the sampled rows with the sliced weights
        and after the refit; the time per phase.

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
    per_sample = per_sample_positions(positions, max_rows, source.count())
    rng = np.random.default_rng(seed)
    runners = (SegmentRunner(source, batch_size, choice, cache_bytes, result, "run original"),
               SegmentRunner(source, batch_size, choice, cache_bytes, result, "run pruned"))
    kept: list[str] = []
    bar = progress_bar(len(fits), "reconstruct", "layer", show_bar)
    try:
        for k, wave in enumerate(plan):
            later = [f for w in plan[k + 1:] for f in w]
            t0 = time.perf_counter()
            sample_targets(original, wave, [o.name for f in later for o in orig_nodes[f.node].outputs], orig_nodes,
                           runners[0], per_sample, rng)
            result.add_time("targets", t0)
            _refit_wave(wave, later, graph, runners[1], export, result, ridge=ridge, tolerance=tolerance, kept=kept)
            if bar is not None:
                bar.update(len(wave))
            if progress is not None:
                progress((k + 1) / len(plan), f"refit {sum(len(w) for w in plan[: k + 1])}/{len(fits)} layers")
    finally:
        if bar is not None:
            bar.close()
    if kept:
        result.notes.append(f"reconstruct: kept the sliced weights of {len(kept)} layers already within tolerance "
                            f"(relative squared error < {tolerance:g}): {', '.join(kept)}")
    log.info("reconstruct: %d onnxruntime runs, seconds per phase %s", result.runs, result.timings)
    return result


def _refit_wave(wave: list[LayerFit], later: list[LayerFit], graph: gs.Graph, runner: SegmentRunner,
                export: Callable[[gs.Graph], onnx.ModelProto], result: ReconstructResult, *,
                ridge: float, tolerance: float, kept: list[str]) -> None:
    """Accumulate one wave's normal equations from the pruned model's segment, solve, write what improves."""
    nodes = {n.name: n for n in graph.nodes}
    wanted = sorted({f.pruned.input for f in wave})
    later_outputs = [o.name for f in later for o in nodes[f.node].outputs]
    batches = 0
    for b, got in enumerate(runner.run(export(graph), wanted, later_outputs)):
        t0 = time.perf_counter()
        for f in wave:
            if b >= len(f.samples):
                raise InvariantError(f"reconstruct {f.node}: the calibration stream yielded more batches than "
                                     f"when the targets were sampled ({len(f.samples)})")
            _accumulate(f, got[f.pruned.input], f.samples[b])
        result.add_time("accumulate", t0)
        batches = b + 1
    t0 = time.perf_counter()
    for f in wave:
        if batches != len(f.samples):
            raise InvariantError(f"reconstruct {f.node}: the calibration stream yielded {batches} batches, "
                                 f"{len(f.samples)} when the targets were sampled")
        f.samples = []
        _finish(f, graph, nodes[f.node], ridge, tolerance, result, kept)
        f.gram, f.cross = np.zeros((0, 0)), np.zeros((0, 0))  # up to 8·K² bytes each; the next waves need memory
    result.add_time("solve", t0)


def _finish(f: LayerFit, graph: gs.Graph, node: gs.Node, ridge: float, tolerance: float,
            result: ReconstructResult, kept: list[str]) -> None:
    """Solve one layer's normal equations and write the refit when it is determined, needed and better."""
    w_s = f.pruned.matrix(np.asarray(node.inputs[1].values))
    b_s = _bias(node, f.pruned, w_s.shape[1]) if f.pruned.can_bias else None
    before = _error(f, np.vstack([w_s, b_s[None, :]]) if b_s is not None else w_s)
    result.layers[f.node] = (before, before)
    if f.rows < f.gram.shape[0]:
        result.notes.append(f"reconstruct: kept the sliced weights of {f.node}: {f.rows} sampled rows for "
                            f"{f.gram.shape[0]} unknowns per output (pass more --calib-samples)")
        return
    if before < tolerance:
        kept.append(f.node)
        return
    sol = _solve(f, w_s, b_s, ridge)
    after = _error(f, sol)
    if after > before:
        result.notes.append(f"reconstruct: kept the sliced weights of {f.node} (the refit fit the sample worse)")
        return
    _write(graph, node, f.pruned, sol[: w_s.shape[0]], sol[-1] if b_s is not None else None)
    result.layers[f.node] = (before, after)
    log.debug("reconstruct %s: relative squared error %.4g -> %.4g on %d rows", f.node, before, after, f.rows)
