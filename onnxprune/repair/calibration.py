"""Calibration: run the model on real (or random) inputs and keep only running statistics.

Data-driven criteria need to know what the model does, not just its weights: APoZ needs the share
of zeros after each ReLU, ``activation`` the mean |x| the next layer sees, ``wanda`` and ``flap`` the
norm and variance of every weighted layer's input features, ``regression`` (LASSO, He et al. 2017) and
``--reconstruct`` the second moments of the next layer's inputs at sampled output positions. All of
these are *sums*, so calibration streams batches through onnxruntime (intermediate
tensors added as outputs in a copy of the model, see :func:`onnxprune.runtime.iter_capture`) and folds
each batch into fixed-size accumulators before reading the next one.

Memory bound (independent of the number of samples):

* per captured activation tensor with ``P`` positions on its channel axis: 4 float64 arrays of ``P``
  (sum, |x| sum, x² sum, zero count) → ``32·P`` bytes;
* per linear consumer (Conv via im2col patches, Gemm, MatMul) reading ``K`` input features
  (Conv: ``Cin·kh·kw``): one float64 Gram matrix ``K×K`` → ``8·K²`` bytes; consumers with
  ``K > max_features`` are skipped (noted), so this term is at most ``8·max_features²`` each;
* transient, per batch: the captured tensors of one batch plus ``batch_size·positions`` patch rows of
  ``K`` float64 each.

:meth:`CalibrationStats.nbytes` reports the accumulators' size and :func:`memory_bound` the formula's
value; tests check that the first does not grow with the sample count and stays under the second.

Token data (LMs): when the feeds carry an ``attention_mask [N, S]``, a captured ``[N, T, C]`` tensor
counts only the positions whose token is attended (the last ``T`` columns of the mask: a KV-cache
model's mask also covers the past), so padding never enters a statistic.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxprune.analysis.core import Analysis, PruningGroup, Site, SiteRole
from onnxprune.data import DataSource, model_inputs, open_data
from onnxprune.errors import BadInputError
from onnxprune.importance.base import Need

if TYPE_CHECKING:
    from onnxprune.runtime.device import DeviceChoice

log = logging.getLogger(__name__)

ACTIVATIONS = Need.ACTIVATIONS
FEATURES = Need.FEATURES
LAYER_INPUTS = Need.LAYER_INPUTS

ATTENTION_MASK = "attention_mask"
"""The feed whose zeros mark padding tokens (the name Hugging Face exports and ``--metric perplexity`` use)."""

RELU_LIKE = ("Relu", "Clip")
"""Ops whose output is exactly zero on a whole half-line (Clip only with min 0): where APoZ means something."""

ProgressCallback = Callable[[float, str], None]


# ----------------------------------------------------------------------------------------------
# Linear consumers read as rows @ matrix


@dataclass(frozen=True)
class LinearView:
    """A consumer layer seen as ``rows @ matrix (+ bias)``, so one solver serves Conv, Gemm and MatMul.

    Conv rows are im2col patches at sampled output positions (features ordered ``(cin, kh, kw)``, as
    the weight's rows flatten); Gemm rows are the input rows; MatMul rows are the last axis' vectors.
    """

    node: str
    op: str
    input: str
    weight: str
    bias: str | None = None
    kernel: tuple[int, int] = (1, 1)
    strides: tuple[int, int] = (1, 1)
    dilations: tuple[int, int] = (1, 1)
    pads: tuple[int, int, int, int] | str = (0, 0, 0, 0)
    trans_b: bool = False
    alpha: float = 1.0
    beta: float = 1.0

    @property
    def channel_axis(self) -> int:
        """The input axis holding the features (the rest index samples and positions)."""
        return -1 if self.op == "MatMul" else 1

    @property
    def can_bias(self) -> bool:
        """Whether a bias can be set or added without new nodes (MatMul has none)."""
        return self.op in ("Conv", "Gemm")

    def matrix(self, w: np.ndarray) -> np.ndarray:
        """The weight as a float64 ``K × Cout`` matrix (Gemm's alpha folded in)."""
        w = np.asarray(w, dtype=np.float64)
        if self.op == "Conv":
            return w.reshape(w.shape[0], -1).T
        if self.op == "Gemm":
            return self.alpha * (w.T if self.trans_b else w)
        return w

    def weight_from(self, m: np.ndarray, like: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`matrix`: a ``K × Cout`` matrix back in the stored layout and dtype."""
        if self.op == "Conv":
            out = m.T.reshape(m.shape[1], -1, *self.kernel)
        elif self.op == "Gemm":
            out = (m.T if self.trans_b else m) / self.alpha
        else:
            out = m
        return np.ascontiguousarray(out.astype(like.dtype))

    @property
    def input_axis(self) -> int:
        """The axis of the stored weight that reads the input channels (Conv's Cin, Gemm's K, MatMul's rows)."""
        if self.op == "Conv":
            return 1
        return 1 if self.op == "Gemm" and self.trans_b else 0

    def per_channel(self) -> int:
        """Features per input channel (kh·kw for Conv, 1 otherwise)."""
        return self.kernel[0] * self.kernel[1] if self.op == "Conv" else 1

    def positions(self, shape: tuple[int, ...], per_sample: int, rng: np.random.Generator) -> np.ndarray:
        """Sampled output positions ``(R, 3)`` as (sample, i, j); all of them when few. Depends only on the shape."""
        n = shape[0]
        if self.op == "Conv":
            ho, wo = self._out_hw(shape[2], shape[3])
        elif self.op == "MatMul":
            ho, wo = int(np.prod(shape[1:-1], dtype=np.int64)), 1
        else:
            ho, wo = 1, 1
        total = ho * wo
        if total <= per_sample:
            flat = np.tile(np.arange(total), n)
            sample = np.repeat(np.arange(n), total)
        else:
            flat = rng.integers(0, total, size=n * per_sample)
            sample = np.repeat(np.arange(n), per_sample)
        return np.stack([sample, flat // wo, flat % wo], axis=1)

    def rows(self, x: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """Feature rows ``(R, K)`` float64 at ``pos`` (from :meth:`positions` on the same shape)."""
        if self.op == "Gemm":
            return np.asarray(x, dtype=np.float64).reshape(x.shape[0], -1)[pos[:, 0]]
        if self.op == "MatMul":
            flat = np.asarray(x).reshape(x.shape[0], -1, x.shape[-1])
            return flat[pos[:, 0], pos[:, 1]].astype(np.float64)
        (pt, pl, pb, pr) = self._pads(x.shape[2], x.shape[3])
        xp = np.pad(np.asarray(x), ((0, 0), (0, 0), (pt, pb), (pl, pr)))
        kh, kw = self.kernel
        hh = pos[:, 1, None] * self.strides[0] + np.arange(kh) * self.dilations[0]
        ww = pos[:, 2, None] * self.strides[1] + np.arange(kw) * self.dilations[1]
        c = np.arange(x.shape[1])
        patches = xp[pos[:, 0, None, None, None], c[None, :, None, None], hh[:, None, :, None], ww[:, None, None, :]]
        return patches.reshape(len(pos), -1).astype(np.float64)

    def _pads(self, h: int, w: int) -> tuple[int, int, int, int]:
        if not isinstance(self.pads, str):
            return self.pads
        if self.pads == "VALID":
            return (0, 0, 0, 0)
        out = []
        for size, k, s, d in zip((h, w), self.kernel, self.strides, self.dilations):
            total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
            small, big = total // 2, total - total // 2
            out.append((small, big) if self.pads == "SAME_UPPER" else (big, small))
        return (out[0][0], out[1][0], out[0][1], out[1][1])

    def _out_hw(self, h: int, w: int) -> tuple[int, int]:
        pt, pl, pb, pr = self._pads(h, w)
        (kh, kw), (sh, sw), (dh, dw) = self.kernel, self.strides, self.dilations
        return (h + pt + pb - dh * (kh - 1) - 1) // sh + 1, (w + pl + pr - dw * (kw - 1) - 1) // sw + 1


def linear_view(node: gs.Node) -> LinearView | str:
    """Describe ``node`` as a :class:`LinearView`, or return why it cannot be (a reason for the report)."""
    inputs = node.inputs
    if len(inputs) < 2 or not isinstance(inputs[1], gs.Constant) or isinstance(inputs[0], gs.Constant):
        return f"{node.op} {node.name} has no constant weight"
    bias = inputs[2] if len(inputs) > 2 and isinstance(inputs[2], gs.Constant) else None
    if len(inputs) > 2 and inputs[2].name and bias is None:
        return f"{node.op} {node.name} adds a computed bias"
    w = inputs[1]
    if node.op == "Conv":
        if len(w.shape) != 4:
            return f"Conv {node.name} is not 2-D"
        if int(node.attrs.get("group", 1)) != 1:
            return f"Conv {node.name} is grouped"
        auto_pad = node.attrs.get("auto_pad", "NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
        p = list(node.attrs.get("pads", [0, 0, 0, 0]))
        pads: tuple[int, int, int, int] | str = auto_pad if auto_pad != "NOTSET" else (p[0], p[1], p[2], p[3])
        return LinearView(
            node.name, "Conv", inputs[0].name, w.name, bias.name if bias is not None else None,
            kernel=(int(w.shape[2]), int(w.shape[3])),
            strides=tuple(int(s) for s in node.attrs.get("strides", [1, 1])),  # type: ignore[arg-type]
            dilations=tuple(int(d) for d in node.attrs.get("dilations", [1, 1])),  # type: ignore[arg-type]
            pads=pads,
        )
    if node.op == "Gemm":
        if int(node.attrs.get("transA", 0)):
            return f"Gemm {node.name} transposes its input"
        if bias is not None and np.asarray(bias.values).size not in (1, int(w.shape[0 if node.attrs.get("transB", 0) else 1])):
            return f"Gemm {node.name} has a 2-D bias"
        return LinearView(
            node.name, "Gemm", inputs[0].name, w.name, bias.name if bias is not None else None,
            trans_b=bool(node.attrs.get("transB", 0)),
            alpha=float(node.attrs.get("alpha", 1.0)), beta=float(node.attrs.get("beta", 1.0)),
        )
    if node.op == "MatMul":
        if len(w.shape) != 2:
            return f"MatMul {node.name} has a {len(w.shape)}-D weight"
        return LinearView(node.name, "MatMul", inputs[0].name, w.name)
    return f"{node.op} {node.name} is not a Conv, Gemm or MatMul"


# ----------------------------------------------------------------------------------------------
# Accumulators


@dataclass
class TensorStats:
    """Running per-position statistics of one tensor along its channel axis (float64 sums)."""

    axis: int
    size: int
    count: int = 0
    sum: np.ndarray = field(default_factory=lambda: np.zeros(0))
    abs_sum: np.ndarray = field(default_factory=lambda: np.zeros(0))
    sq_sum: np.ndarray = field(default_factory=lambda: np.zeros(0))
    zeros: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def __post_init__(self) -> None:
        if not len(self.sum):
            self.sum, self.abs_sum, self.sq_sum, self.zeros = (np.zeros(self.size) for _ in range(4))

    def update(self, x: np.ndarray, keep: np.ndarray | None = None) -> None:
        """Add one batch; ``keep`` (over the non-channel positions, in order) drops the positions that are False."""
        if x.shape[self.axis] != self.size:
            raise BadInputError(f"a captured tensor has {x.shape[self.axis]} channels on axis {self.axis}, "
                                f"the analysis expected {self.size}", field="calib")
        flat = np.moveaxis(np.asarray(x), self.axis, 0).reshape(self.size, -1)
        if keep is not None:
            flat = flat[:, keep.reshape(-1)]
        self.count += flat.shape[1]
        self.sum += flat.sum(axis=1, dtype=np.float64)
        self.abs_sum += np.abs(flat).sum(axis=1, dtype=np.float64)
        self.sq_sum += np.einsum("ij,ij->i", flat, flat, dtype=np.float64)
        self.zeros += (flat == 0).sum(axis=1)

    @property
    def zero_fraction(self) -> np.ndarray:
        return self.zeros / max(self.count, 1)

    @property
    def mean_abs(self) -> np.ndarray:
        return self.abs_sum / max(self.count, 1)

    @property
    def l2_norm(self) -> np.ndarray:
        """‖x‖₂ per channel over every counted position (Wanda's input-feature norm)."""
        return np.sqrt(self.sq_sum)

    @property
    def variance(self) -> np.ndarray:
        """Sample variance per channel over the counted positions (FLAP's fluctuation); 0 below two positions."""
        if self.count < 2:
            return np.zeros(self.size)
        return np.maximum(self.sq_sum - self.sum ** 2 / self.count, 0.0) / (self.count - 1)

    @property
    def nbytes(self) -> int:
        return int(self.sum.nbytes + self.abs_sum.nbytes + self.sq_sum.nbytes + self.zeros.nbytes)


@dataclass
class FeatureGram:
    """``Σ rowsᵀ rows`` over sampled rows of one consumer's input features (float64)."""

    view: LinearView
    gram: np.ndarray
    rows: int = 0

    @property
    def nbytes(self) -> int:
        return int(self.gram.nbytes)


@dataclass
class CalibrationStats:
    """What calibration kept: per-tensor activation statistics and per-consumer feature Grams."""

    samples: int
    source: str
    device: str
    tensors: dict[str, TensorStats] = field(default_factory=dict)
    grams: dict[str, FeatureGram] = field(default_factory=dict)
    layers: dict[str, LinearView] = field(default_factory=dict)
    """Weighted layers whose input features were measured (``tensors[view.input]``), by node name."""
    notes: list[str] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        """Bytes held by the accumulators (the part of memory that could grow with the model, never with the data)."""
        return sum(t.nbytes for t in self.tensors.values()) + sum(g.nbytes for g in self.grams.values())


def memory_bound(tensor_sizes: Iterable[int], feature_counts: Iterable[int]) -> int:
    """The module docstring's bound on accumulator bytes: ``Σ 32·P + Σ 8·K²``."""
    return sum(32 * p for p in tensor_sizes) + sum(8 * k * k for k in feature_counts)


# ----------------------------------------------------------------------------------------------
# What to capture


def _touches(analysis: Analysis, group: PruningGroup, ids: np.ndarray) -> bool:
    return bool(set(group.classes.tolist()).intersection(analysis.classes_of(ids).tolist()))


def relu_like(node: gs.Node) -> bool:
    """Relu, or Clip with a constant lower bound of 0 (ReLU6 and friends)."""
    if node.op not in RELU_LIKE:
        return False
    if node.op == "Relu":
        return True
    if "min" in node.attrs:
        return float(node.attrs["min"]) == 0.0
    low = node.inputs[1] if len(node.inputs) > 1 else None
    return isinstance(low, gs.Constant) and float(np.asarray(low.values).reshape(-1)[0]) == 0.0


def activation_tensors(graph: gs.Graph, analysis: Analysis, group: PruningGroup) -> list[str]:
    """Outputs of ReLU-like nodes that carry ``group``'s channels (where APoZ is measured)."""
    out = []
    for node in graph.nodes:
        if relu_like(node) and node.outputs and node.outputs[0].name in analysis.maps:
            name = node.outputs[0].name
            if _touches(analysis, group, analysis.maps[name].ids):
                out.append(name)
    return out


def consumer_sites(analysis: Analysis, group: PruningGroup | None = None) -> list[Site]:
    """``in`` sites (consumer input columns) of ``group``, or of every prunable group."""
    groups = [group] if group is not None else [g for g in analysis.groups if g.prunable]
    classes = set(np.concatenate([g.classes for g in groups]).tolist()) if groups else set()
    return [s for s in analysis.sites if s.role == SiteRole.IN and classes.intersection(analysis.classes_of(s.ids).tolist())]


def consumer_inputs(graph: gs.Graph, analysis: Analysis, group: PruningGroup) -> list[str]:
    """Input tensors of the layers that read ``group``'s channels (what ``activation`` measures)."""
    nodes = {n.name: n for n in graph.nodes}
    names = []
    for site in consumer_sites(analysis, group):
        node = nodes.get(site.node)
        if node is not None and node.inputs and node.inputs[0].name in analysis.maps and node.inputs[0].name not in names:
            names.append(node.inputs[0].name)
    return names


def weighted_layers(graph: gs.Graph, analysis: Analysis) -> tuple[dict[str, LinearView], list[str]]:
    """The Conv/Gemm/MatMul layers whose weights hold a prunable group's rows or columns (what ``wanda`` and
    ``flap`` weigh by their input features), and why any other such layer is left out."""
    nodes = {n.name: n for n in graph.nodes}
    free = {int(c) for g in analysis.groups if g.prunable for c in g.classes}
    layers: dict[str, LinearView] = {}
    notes: list[str] = []
    for site in analysis.sites:
        node = nodes.get(site.node)
        if (site.role not in (SiteRole.OUT, SiteRole.IN) or node is None or site.node in layers
                or not free.intersection(analysis.classes_of(site.ids).tolist())):
            continue
        view = linear_view(node)
        if isinstance(view, str):
            note = f"calibration: {view}; its input features are not measured"
            if note not in notes:
                notes.append(note)
        elif view.weight == site.tensor:
            layers[site.node] = view
    return layers, notes


@dataclass
class CapturePlan:
    """Tensors to collect statistics for and consumers to accumulate Grams for."""

    tensors: dict[str, int] = field(default_factory=dict)
    views: dict[str, LinearView] = field(default_factory=dict)
    features: dict[str, int] = field(default_factory=dict)
    layers: dict[str, LinearView] = field(default_factory=dict)
    inputs: dict[str, tuple[int, int]] = field(default_factory=dict)
    """Input tensors of ``layers`` not already in ``tensors``: name → (channel axis, channels)."""
    notes: list[str] = field(default_factory=list)

    @property
    def capture_names(self) -> list[str]:
        names = list(self.tensors) + [n for n in self.inputs if n not in self.tensors]
        for v in self.views.values():
            if v.input not in names:
                names.append(v.input)
        return names

    def bound(self) -> int:
        """The accumulators' size by the module docstring's formula."""
        sizes = [*self.tensors.values(), *(size for _, size in self.inputs.values())]
        return memory_bound(sizes, self.features.values())


def plan_capture(graph: gs.Graph, analysis: Analysis, needs: set[str], max_features: int = 2304) -> CapturePlan:
    """Decide what to capture for ``needs`` (``activations`` and/or ``features``) over prunable groups."""
    plan = CapturePlan()
    groups = [g for g in analysis.groups if g.prunable]
    if ACTIVATIONS in needs:
        for g in groups:
            for name in activation_tensors(graph, analysis, g) + consumer_inputs(graph, analysis, g):
                plan.tensors.setdefault(name, len(analysis.maps[name].ids))
    if FEATURES in needs:
        nodes = {n.name: n for n in graph.nodes}
        for site in consumer_sites(analysis):
            node = nodes.get(site.node)
            if node is None or site.node in plan.views:
                continue
            view = linear_view(node)
            if isinstance(view, str):
                plan.notes.append(f"calibration: {view}; its inputs are not sampled")
                continue
            k = len(site.ids) * view.per_channel()
            if k > max_features:
                plan.notes.append(f"calibration: {node.op} {node.name} reads {k} features (> {max_features}); not sampled")
                continue
            plan.views[site.node] = view
            plan.features[site.node] = k
    if LAYER_INPUTS in needs:
        plan.layers, notes = weighted_layers(graph, analysis)
        plan.notes.extend(notes)
        weights = graph.tensors()
        for view in plan.layers.values():
            if view.input not in plan.tensors:
                size = int(weights[view.weight].shape[view.input_axis])
                plan.inputs.setdefault(view.input, (view.channel_axis, size))
    return plan


def token_keep(mask: np.ndarray | None, shape: tuple[int, ...], axis: int) -> np.ndarray | None:
    """Which non-channel positions of a captured ``[N, T, C]`` tensor hold attended tokens, from the feeds'
    ``attention_mask [N, S]`` (its last ``T`` columns: the current tokens after any past); None to keep all
    (no mask, or a tensor whose positions are not tokens)."""
    if mask is None or len(shape) != 3 or axis % 3 != 2:
        return None
    m = np.asarray(mask)
    n, t = shape[0], shape[1]
    if m.ndim != 2 or m.shape[0] != n or m.shape[1] < t:
        return None
    return m[:, m.shape[1] - t:] != 0


# ----------------------------------------------------------------------------------------------
# Running


def open_calibration(model: onnx.ModelProto, calib: str | None, samples: int, shapes: dict[str, list[int]],
                     seed: int = 0) -> tuple[DataSource, str]:
    """The calibration stream (``calib`` or random inputs) and a description for the report.

    Raises:
        BadInputError: the data cannot be opened.
    """
    source = open_data(calib or "random", model_inputs(model), limit=samples, shapes=shapes, seed=seed)
    what = f"random inputs ({source.count()} samples)" if source.is_random else f"{calib} ({source.count()} samples)"
    return source, what


def stream(source: DataSource, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """``source``'s batches, sized for the model: models whose inputs fix the batch dim (often to 1, in
    exported files) get exactly that many samples per run, and an incomplete last batch is dropped.

    Raises:
        BadInputError: the inputs fix different batch sizes.
    """
    fixed = {s.shape[0] for s in source.inputs if s.shape and isinstance(s.shape[0], int) and s.shape[0] > 0}
    if len(fixed) > 1:
        raise BadInputError(f"the model's inputs fix different batch sizes {sorted(fixed)}", field="calib")
    if not fixed:
        yield from source.batches(batch_size)
        return
    size = fixed.pop()
    for feeds in source.batches(size):
        if len(next(iter(feeds.values()))) == size:
            yield feeds


def progress_bar(total: int, desc: str, unit: str, enabled: bool | None) -> Any:
    """A tqdm bar on stderr, by default only when stderr is a terminal (never in services or logs); else None."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False)


def calibrate(
    model: onnx.ModelProto,
    graph: gs.Graph,
    analysis: Analysis,
    source: DataSource,
    *,
    needs: set[str],
    device: str | DeviceChoice = "auto",
    batch_size: int = 32,
    positions: int = 16,
    max_features: int = 2304,
    seed: int = 0,
    progress: ProgressCallback | None = None,
    bar: bool | None = None,
    description: str = "",
) -> CalibrationStats:
    """Stream ``source`` through ``model`` and accumulate the statistics ``needs`` asks for.

    Args:
        model: the original model (with weights); a copy gets the extra outputs.
        graph: the same model imported by graphsurgeon (read-only here).
        analysis: its dependency analysis (which tensors carry which channels).
        source: the batches (see :func:`open_calibration`).
        needs: ``{"activations", "features"}`` or a subset.
        device: ``auto|cuda|cpu`` or a resolved :class:`onnxprune.runtime.DeviceChoice`.
        batch_size: samples per onnxruntime run (memory per batch scales with it).
        positions: output positions sampled per sample for Conv/MatMul rows (He et al. use 10).
        max_features: consumers with more input features are skipped (bounds the Gram at 8·K² bytes).
        seed: position sampling seed.
        progress: called with (fraction done, message) after every batch; it may raise to cancel.
        bar: show a tqdm bar on stderr; ``None``: only when stderr is a terminal.

    Returns:
        The accumulated statistics.

    Raises:
        BadInputError: the data does not fit the model or the device is not usable.

    Example:
        >>> src, what = open_calibration(model, "calib.npz", 256, {})
        >>> stats = calibrate(model, graph, analysis, src, needs={"activations"}, device="cpu")
        >>> stats.tensors["relu_0_out"].zero_fraction
    """
    from onnxprune.runtime.capture import iter_capture
    from onnxprune.runtime.device import select_device

    choice = select_device(device) if isinstance(device, str) else device
    plan = plan_capture(graph, analysis, needs, max_features)
    stats = CalibrationStats(0, description, choice.name, notes=list(plan.notes))
    stats.tensors = {name: TensorStats(analysis.maps[name].axis, size) for name, size in plan.tensors.items()}
    for name, (axis, size) in plan.inputs.items():
        stats.tensors.setdefault(name, TensorStats(axis, size))
    stats.layers = dict(plan.layers)
    stats.grams = {node: FeatureGram(v, np.zeros((plan.features[node],) * 2)) for node, v in plan.views.items()}
    names = plan.capture_names
    if not names:
        return stats
    total = source.count()
    progress_bar_ = progress_bar(total, "calibrate", "sample", bar)
    rng = np.random.default_rng(seed)
    try:
        sizes: list[int] = []
        masks: list[np.ndarray | None] = []

        def counted() -> Iterator[dict[str, np.ndarray]]:
            for feeds in stream(source, batch_size):
                sizes.append(len(next(iter(feeds.values()))))
                masks.append(feeds.get(ATTENTION_MASK))
                yield feeds

        for captured in iter_capture(model, names, counted(), choice):
            for name, ts in stats.tensors.items():
                x = captured[name]
                ts.update(x, token_keep(masks[-1], x.shape, ts.axis))
            for fg in stats.grams.values():
                x = captured[fg.view.input]
                rows = fg.view.rows(x, fg.view.positions(x.shape, positions, rng))
                fg.gram += rows.T @ rows
                fg.rows += len(rows)
            n = sizes[-1]
            stats.samples += n
            if progress_bar_ is not None:
                progress_bar_.update(n)
            if progress is not None:
                progress(stats.samples / max(total, 1), f"calibrated {stats.samples}/{total} samples")
    finally:
        if progress_bar_ is not None:
            progress_bar_.close()
    log.info("calibration: %d samples on %s, %d tensors, %d consumers, %d bytes of statistics",
             stats.samples, choice.name, len(stats.tensors), len(stats.grams), stats.nbytes)
    return stats


def channel_values(analysis: Analysis, group: PruningGroup, ids: np.ndarray, values: np.ndarray,
                   weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Average per-position ``values`` into the group's channels (weighted by ``weights``, default 1).

    Returns (per-channel mean, mask of channels the positions touch).
    """
    index = analysis.group_channel_index(group)
    weights = np.ones(len(values)) if weights is None else weights
    sums, norm = np.zeros(group.size), np.zeros(group.size)
    for pos, cls in enumerate(analysis.classes_of(ids).tolist()):
        ch = index.get(cls)
        if ch is not None:
            sums[ch] += values[pos] * weights[pos]
            norm[ch] += weights[pos]
    touched = norm > 0
    return np.divide(sums, norm, out=np.zeros(group.size), where=touched), touched
