"""Gradient-based criteria: first-order Taylor and second-order Optimal Brain Damage.

``taylor`` (Molchanov et al. 2019): removing a channel changes the loss by about ``Σ g·w`` over its
weights, so a channel scores ``|Σ_i E[g_i]·w_i|`` per tensor that follows it, each tensor normalised
by its mean channel score as in the magnitude criteria, averaged over the group's tensors.
``obd`` (LeCun et al. 1990): the loss rises by ``½·h_ii·w_i²`` per removed weight at a minimum;
``h_ii`` is approximated by the empirical Fisher ``E[g_i²]`` over calibration batches, and a channel
scores the sum over its weights, normalised and averaged the same way.

Both use the training graph's gradients (``training.accumulate_gradients``). With labels in the
calibration data the loss is cross-entropy; without, the original model's own top-1 predictions are
the labels (hard distillation: soft distillation against itself has zero gradient at the start).
"""

from __future__ import annotations

import numpy as np
import onnx

from onnxprune.analysis.core import PruningGroup, SiteRole
from onnxprune.data import DataSource
from onnxprune.errors import BadInputError
from onnxprune.importance.base import (
    CriterionRegistry,
    Need,
    ScoringContext,
    group_sites,
    per_channel,
)

GRADIENTS = Need.GRADIENTS
ROLES = (SiteRole.OUT, SiteRole.IN, SiteRole.PARAM)


def collect_gradients(model: onnx.ModelProto, source: DataSource, *, device: object = "auto",
                      batch_size: int = 16, reporter: object | None = None) -> object:
    """Gradient statistics (Σg, Σg²) of the loss over the calibration stream.

    The gradient graph gets static input shapes (some VJPs, e.g. Resize and pooling, need them): the
    batch is ``min(batch_size, samples)`` and a last, smaller batch is left out.

    Raises:
        BadInputError: no labels, and an output that is not class scores [N, K]; or symbolic input
            dims other than the batch that ``--shape`` does not fix.
    """
    from onnxprune.runtime.session import make_session
    from onnxprune.training import accumulate_gradients
    from onnxprune.training.outputs import output_semantics

    labelled = source.has_labels
    sem = output_semantics(model)[model.graph.output[0].name]
    if not labelled and not _has_classes(model.graph.output[0], sem.class_axis):
        raise BadInputError(
            f"taylor/obd need labels in --calib data unless the model's first output has class scores "
            f"({sem.note or 'its class axis is unknown'})",
            field="calib",
        )

    size = max(1, min(batch_size, source.count()))
    shapes = {spec.name: _static_shape(spec, source.shapes, size) for spec in source.inputs}

    def full(stream):
        return (b for b in stream if len(next(iter(b.values()))) == size)

    def batches():
        if labelled:
            yield from full(source.batches(size, with_labels=True))
            return
        with make_session(model, device) as sess:
            for feeds in full(source.batches(size)):
                scores = sess.run(feeds)[sem.output]
                # the model's own top-1 over its class axis: [N] labels for [N, K], [N, T] for [N, T, K]
                yield {**feeds, "labels": np.argmax(scores, axis=sem.class_axis).astype(np.int64)}

    return accumulate_gradients(model, batches(), loss="ce", device=device, reporter=reporter, shapes=shapes)


def _has_classes(output: onnx.ValueInfoProto, axis: int | None) -> bool:
    """Whether the model's own top-1 over ``axis`` makes sense as a label: two or more classes there."""
    dims = output.type.tensor_type.shape.dim
    if axis is None or axis >= len(dims):
        return False
    d = dims[axis]
    return not d.HasField("dim_value") or d.dim_value >= 2


def _static_shape(spec, fixed: dict[str, list[int]], batch: int) -> list[int]:
    dims = list(fixed.get(spec.name, spec.shape))
    if dims:
        dims[0] = batch
    if not all(isinstance(d, int) and d > 0 for d in dims):
        raise BadInputError(f"input {spec.name!r} has symbolic dims {dims}; pass --shape {spec.name}=1x...",
                            field="shapes")
    return [int(d) for d in dims]


def _stats(ctx: ScoringContext):
    return ctx.evidence.require_gradients("taylor/obd")


def _score(ctx: ScoringContext, group: PruningGroup, per_weight) -> np.ndarray:
    stats = _stats(ctx)
    total, count = np.zeros(group.size), np.zeros(group.size)
    for site in group_sites(ctx, group, ROLES):
        if site.tensor not in stats.grad_sum:
            continue
        w = ctx.weights(site).astype(np.float64)
        values = np.moveaxis(per_weight(stats, site.tensor, w), site.axis, 0).reshape(len(site.ids), -1).sum(axis=1)
        sums, touched = per_channel(ctx, group, site, values)
        sums = np.abs(sums)
        mean = sums[touched].mean() if touched.any() else 0.0
        if mean > 0:
            total[touched] += sums[touched] / mean
            count[touched] += 1
    if not count.any():
        ctx.note(f"group {group.id} ({', '.join(group.producers)}): no trained weights; scores are zero")
    return np.divide(total, count, out=np.zeros_like(total), where=count > 0)


def taylor_scores(ctx: ScoringContext, group: PruningGroup) -> np.ndarray:
    """|Σ E[g]·w| per channel and tensor (first-order Taylor expansion of the loss)."""
    return _score(ctx, group, lambda stats, name, w: stats.mean(name) * w)


def obd_scores(ctx: ScoringContext, group: PruningGroup) -> np.ndarray:
    """Σ ½·E[g²]·w² per channel and tensor (OBD saliency with the empirical-Fisher Hessian diagonal)."""
    return _score(ctx, group, lambda stats, name, w: 0.5 * stats.fisher(name) * w * w)


def register(reg: CriterionRegistry) -> None:
    reg.register("taylor", taylor_scores, needs={GRADIENTS})
    reg.register("obd", obd_scores, needs={GRADIENTS})
