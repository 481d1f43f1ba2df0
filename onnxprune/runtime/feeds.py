"""Random feeds drawn from a model's declared inputs (random calibration, fidelity without data)."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import onnx

from onnxprune.errors import BadInputError
from onnxprune.runtime.session import Session, TensorSpec, model_input_specs

logger = logging.getLogger(__name__)


def _resolve_shape(spec: TensorSpec, shapes: Mapping[str, list[int]], batch: int | None) -> list[int]:
    if spec.name in shapes:
        dims = [int(d) for d in shapes[spec.name]]
        if len(dims) != len(spec.shape):
            raise BadInputError(
                f"--shape {spec.name}: the model's input has {len(spec.shape)} dims {list(spec.shape)}, got {dims}",
                field="shapes",
            )
        for axis, (want, got) in enumerate(zip(spec.shape, dims, strict=True)):
            if isinstance(want, int) and want != got:
                raise BadInputError(
                    f"--shape {spec.name}: axis {axis} is fixed to {want} in the model, got {got}", field="shapes"
                )
        if batch is not None and dims and not isinstance(spec.shape[0], int):
            dims[0] = batch
        return dims
    dims = []
    for axis, d in enumerate(spec.shape):
        if isinstance(d, int):
            dims.append(d)
        elif axis == 0:
            dims.append(1 if batch is None else batch)
        else:
            example = "x".join(
                str(x) if isinstance(x, int) else ("1" if i == 0 else "N") for i, x in enumerate(spec.shape)
            )
            raise BadInputError(
                f"input {spec.name!r} has symbolic dim {d!r} on axis {axis} (shape {list(spec.shape)}); "
                f"fix it with --shape {spec.name}={example}",
                field="shapes",
            )
    return dims


def random_inputs(
    model_or_session: onnx.ModelProto | Session,
    shapes: Mapping[str, list[int]] | None = None,
    batch: int | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Random feeds for every input: normal floats, ints in {0, 1} (valid as indices), bools; an integer or bool
    input named like a mask (``attention_mask``) is all ones, since kernels such as GroupQueryAttention refuse
    masks with holes (a row's attended length is read from it).

    Shapes come from ``shapes`` (input name → full shape) when given, else from the model. A symbolic
    first dim is the batch: ``batch`` when given (it wins over the first dim in ``shapes``, which
    then only fixes the other dims), else the first dim in ``shapes``, else 1. The same ``seed`` gives
    the same arrays.

    Args:
        model_or_session: where to read the inputs from.
        shapes: input name → full shape, as parsed from ``--shape NAME=1x3x224x224``.
        batch: size of a symbolic first dim (see above); ``None`` leaves it to ``shapes`` or 1.
        seed: random seed.

    Returns:
        Input name → array.

    Raises:
        BadInputError: an input has a symbolic dim other than the first that ``shapes`` does not fix,
            ``shapes`` contradicts the model or names an unknown input, or ``batch`` < 1.
    """
    if batch is not None and batch < 1:
        raise BadInputError(f"batch must be >= 1, got {batch}", field="batch")
    if isinstance(model_or_session, Session):
        specs = model_or_session.input_specs
    else:
        specs = model_input_specs(model_or_session)
    shapes = dict(shapes or {})
    unknown = sorted(set(shapes) - {s.name for s in specs})
    if unknown:
        raise BadInputError(
            f"--shape names unknown input(s) {unknown}; the model's inputs are {[s.name for s in specs]}",
            field="shapes",
        )
    rng = np.random.default_rng(seed)
    return {spec.name: random_array(spec, shapes, batch, rng) for spec in specs}


def random_array(spec: TensorSpec, shapes: Mapping[str, list[int]], batch: int | None,
                 rng: np.random.Generator) -> np.ndarray:
    """One input's random feed (see :func:`random_inputs` for shapes and values); ``spec`` needs
    ``name``, ``shape`` and ``dtype``, so the DATA reader's input specs work too.

    Raises:
        BadInputError: as :func:`random_inputs`.
    """
    dims = _resolve_shape(spec, shapes, batch)
    if "mask" in spec.name.lower() and (spec.dtype == np.bool_ or np.issubdtype(spec.dtype, np.integer)):
        return np.ones(dims, dtype=spec.dtype)
    if spec.dtype == np.bool_:
        return rng.integers(0, 2, size=dims).astype(np.bool_)
    if np.issubdtype(spec.dtype, np.integer):
        return rng.integers(0, 2, size=dims).astype(spec.dtype)
    return rng.standard_normal(size=dims).astype(spec.dtype)
