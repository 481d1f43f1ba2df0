"""Gradient statistics over calibration batches, for Taylor (|g·w|) and OBD (½·E[g²]·w²) importance.

The same gradient graph the trainer uses, without the optimizer: loss and one gradient per weight.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper

from onnxprune.errors import BadInputError
from onnxprune.io.limits import readable_ir_version
from onnxprune.training.artifacts import build_gradient_model
from onnxprune.training.data import LABELS_KEY
from onnxprune.training.losses import LossSpec, teacher_plan


@dataclass
class GradStats:
    """Per-initializer Σg and Σg² over ``count`` batches (batch-mean gradients, i.e. the empirical Fisher
    at batch granularity). ``mean``/``fisher`` give E[g] and E[g²]."""

    grad_sum: dict[str, np.ndarray] = field(default_factory=dict)
    grad_sq_sum: dict[str, np.ndarray] = field(default_factory=dict)
    count: int = 0
    loss_sum: float = 0.0

    def mean(self, name: str) -> np.ndarray:
        return self.grad_sum[name] / max(self.count, 1)

    def fisher(self, name: str) -> np.ndarray:
        return self.grad_sq_sum[name] / max(self.count, 1)

    def taylor(self, name: str, weight: np.ndarray) -> np.ndarray:
        """Elementwise first-order saliency |E[g]·w| (sum it over a channel's weights)."""
        return np.abs(self.mean(name) * weight)

    def obd(self, name: str, weight: np.ndarray) -> np.ndarray:
        """Elementwise Optimal Brain Damage saliency ½·E[g²]·w² (Hessian diagonal ≈ empirical Fisher)."""
        return 0.5 * self.fisher(name) * np.square(weight, dtype=np.float64)


def accumulate_gradients(
    model: onnx.ModelProto,
    batches: Iterable[Mapping[str, np.ndarray]],
    *,
    loss: str = "ce",
    teacher: onnx.ModelProto | None = None,
    device: object = "auto",
    trainable: Sequence[str] | None = None,
    temperature: float = 2.0,
    reporter: object | None = None,
    on_batch: Callable[[dict[str, np.ndarray]], None] | None = None,
    shapes: Mapping[str, Sequence[int]] | None = None,
) -> GradStats:
    """Sum gradients and squared gradients of the loss w.r.t. the model's weights over ``batches``.

    Each batch maps input names to arrays, plus ``labels`` for ``loss="ce"``. For ``loss="distill"``
    the teacher (default: ``model`` itself, whose gradient at its own outputs is then zero for KL, so pass
    the original model when scoring a modified one) provides the targets, one run per batch.
    Gradients are batch means; pass batches of one sample for a per-sample Fisher. ``on_batch`` sees
    each batch's gradients (name → array), for statistics other than Σg and Σg² (e.g. per-batch
    per-channel (Σ g·w)² as in Molchanov et al.'s Taylor criterion). ``shapes`` fixes input dims
    (name → full shape) for ops whose gradients need static shapes; every batch must then match.

    Raises:
        BadInputError: unknown loss or a batch without labels for ``ce``.
        UnsupportedOpError: an op on the path has no gradient rule.

    Example:
        >>> stats = accumulate_gradients(model, [{"input": x, "labels": y}])  # doctest: +SKIP
        >>> taylor = np.abs(stats.mean("conv1.weight") * w)  # doctest: +SKIP
    """
    from onnxprune.runtime.device import select_device
    from onnxprune.runtime.session import make_session
    from onnxprune.training.trainer import training_session

    if loss not in ("ce", "distill"):
        raise BadInputError(f"gradient loss must be ce or distill, got {loss!r}", field="loss")
    choice = device if not isinstance(device, str) else select_device(device)
    gm = build_gradient_model(model, LossSpec(loss, temperature=temperature), trainable=trainable, shapes=shapes)
    stats = GradStats({n: np.zeros_like(v, np.float64) for n, v in gm.params.items()},
                      {n: np.zeros_like(v, np.float64) for n, v in gm.params.items()})
    grads = gm.result.grads
    plan = teacher_plan(teacher if teacher is not None else model, gm.loss.loss_terms,
                        [o.name for o in gm.base.graph.output]) if loss == "distill" else None
    teacher_sess = make_session(plan.model, choice) if plan is not None else None
    # the trainer's session options: no memory pattern, buffer reuse or CSE (each would keep activations)
    model_g = gm.result.model
    model_g.ir_version = readable_ir_version(model_g)
    sess = training_session(model_g, list(choice.providers), None)  # type: ignore[attr-defined]
    dtypes = {i.name: np.dtype(helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type))
              for i in model_g.graph.input}
    fetch = [gm.loss.loss] + [grads[n] for n in gm.params]
    try:
        for i, batch in enumerate(batches):
            if reporter is not None:
                reporter("gradients", 0.0, f"batch {i}")  # type: ignore[operator]
            feeds = {k: np.asarray(v, dtypes.get(k)) for k, v in batch.items() if k in gm.batch_inputs}
            if loss == "ce":
                if LABELS_KEY not in batch:
                    raise BadInputError("loss 'ce' needs 'labels' in every batch", field="calib")
                feeds[LABELS_KEY] = np.asarray(batch[LABELS_KEY], np.int64)
            else:
                assert teacher_sess is not None and plan is not None
                values = plan.values(teacher_sess.run({k: feeds[k] for k in gm.batch_inputs}, plan.tensors))
                for out, name in gm.loss.teacher.items():
                    feeds[name] = values[out]  # the teacher's logits for KL terms
            feeds.update(gm.params)
            res = dict(zip(fetch, sess.run(fetch, feeds)))
            stats.loss_sum += float(res[gm.loss.loss])
            batch_grads = {n: res[grads[n]].astype(np.float64) for n in gm.params}
            for n, g in batch_grads.items():
                stats.grad_sum[n] += g
                stats.grad_sq_sum[n] += g * g
            stats.count += 1
            if on_batch is not None:
                on_batch(batch_grads)
    finally:
        if teacher_sess is not None:
            teacher_sess.close()
    return stats
