"""Latency measurement on onnxruntime: percentiles, throughput, and A/B comparison in one run.

Every measurement uses a fixed intra-op thread count, warm-up runs that are not timed, and the same
random inputs for every run (so only the model differs). :func:`compare` interleaves the two models'
timed runs (A, B, A, B, …) so that machine noise — other processes, frequency scaling — hits both
alike; the ratio is taken between medians.

Example:
    >>> stats = measure_latency("model.onnx", device="cpu", batch=1, runs=50, threads=1)
    >>> stats.p50_ms
    3.21
    >>> compare("model.onnx", "small.onnx", batch=8).speedup
    1.8
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from onnxprune.errors import BadInputError
from onnxprune.runtime.device import DeviceChoice, select_device
from onnxprune.runtime.feeds import random_inputs
from onnxprune.runtime.session import Session, make_session

logger = logging.getLogger(__name__)

ModelLike = onnx.ModelProto | str | os.PathLike[str]


@dataclass
class LatencyStats:
    """Latency of one model at one batch size.

    Attributes:
        p50_ms: median wall time of one run, in milliseconds.
        p90_ms: 90th percentile.
        p99_ms: 99th percentile.
        mean_ms: mean.
        throughput_per_s: samples per second at the median (batch / p50).
        batch: batch size.
        provider: the onnxruntime provider that ran.
        runs: timed runs.
    """

    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    throughput_per_s: float
    batch: int
    provider: str
    runs: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Comparison:
    """Two models measured interleaved in the same run.

    Attributes:
        a: the first model's latency.
        b: the second model's latency.
        speedup: ``a.p50_ms / b.p50_ms`` (above 1 means B is faster).
    """

    a: LatencyStats
    b: LatencyStats
    speedup: float

    def to_dict(self) -> dict[str, Any]:
        return {"a": self.a.to_dict(), "b": self.b.to_dict(), "speedup": self.speedup}


def _check(runs: int, warmup: int, batch: int) -> None:
    if runs < 1:
        raise BadInputError(f"--runs must be >= 1, got {runs}", field="runs")
    if warmup < 0:
        raise BadInputError(f"warmup must be >= 0, got {warmup}", field="warmup")
    if batch < 1:
        raise BadInputError(f"--batch must be >= 1, got {batch}", field="batch")


def fixed_batch(session: Session) -> int | None:
    """The batch size a model is fixed to, or None when it takes any batch.

    A model takes any batch when some input has a symbolic first dim (inputs with a fixed first dim
    are then taken to be unbatched); otherwise its batch is the first input's first dim.
    """
    firsts = [spec.shape[0] for spec in session.input_specs if spec.shape]
    if not firsts or any(not isinstance(d, int) for d in firsts):
        return None
    return int(firsts[0])


def _feeds(session: Session, shapes: Mapping[str, list[int]] | None, batch: int, seed: int) -> dict[str, np.ndarray]:
    fixed = fixed_batch(session)
    if fixed is not None and fixed != batch:
        raise BadInputError(f"the model has a fixed batch of {fixed}; cannot measure batch {batch}", field="batch")
    return random_inputs(session, shapes, batch=batch, seed=seed)


def _timed(session: Session, feeds: Mapping[str, np.ndarray]) -> float:
    start = time.perf_counter()
    session.run(feeds)
    return (time.perf_counter() - start) * 1000.0


def _stats(times_ms: list[float], batch: int, provider: str) -> LatencyStats:
    t = np.asarray(times_ms)
    p50, p90, p99 = (float(v) for v in np.percentile(t, [50, 90, 99]))
    return LatencyStats(
        p50_ms=p50,
        p90_ms=p90,
        p99_ms=p99,
        mean_ms=float(t.mean()),
        throughput_per_s=batch * 1000.0 / p50 if p50 > 0 else float("inf"),
        batch=batch,
        provider=provider,
        runs=len(times_ms),
    )


def measure_latency(
    model: ModelLike | Session,
    device: str | DeviceChoice = "auto",
    batch: int = 1,
    runs: int = 50,
    warmup: int = 5,
    threads: int | None = 1,
    shapes: Mapping[str, list[int]] | None = None,
    seed: int = 0,
) -> LatencyStats:
    """Latency percentiles and throughput of one model on onnxruntime.

    Args:
        model: a model, a path, or an open :class:`~onnxprune.runtime.Session` (then ``device`` and
            ``threads`` are the session's).
        device: ``auto|cuda|cpu`` or a resolved :class:`~onnxprune.runtime.DeviceChoice`.
        batch: batch size (replaces a symbolic first dim, also in ``shapes``).
        runs: timed runs.
        warmup: untimed runs first.
        threads: intra-op threads (fixed so numbers are comparable).
        shapes: input name → full shape, for symbolic dims other than the batch.
        seed: seed of the random inputs.

    Returns:
        The statistics.

    Raises:
        BadInputError: bad ``runs``/``warmup``/``batch``, a fixed batch that differs from ``batch``,
            unresolved symbolic dims, or a model onnxruntime cannot load.
    """
    _check(runs, warmup, batch)
    if isinstance(model, Session):
        return _measure(model, batch, runs, warmup, shapes, seed)
    with make_session(model, device, threads, spinning=False) as session:
        return _measure(session, batch, runs, warmup, shapes, seed)


def _measure(
    session: Session, batch: int, runs: int, warmup: int, shapes: Mapping[str, list[int]] | None, seed: int
) -> LatencyStats:
    feeds = _feeds(session, shapes, batch, seed)
    for _ in range(warmup):
        session.run(feeds)
    times = [_timed(session, feeds) for _ in range(runs)]
    return _stats(times, batch, session.provider)


def compare(
    model_a: ModelLike | Session,
    model_b: ModelLike | Session,
    device: str | DeviceChoice = "auto",
    batch: int = 1,
    runs: int = 50,
    warmup: int = 5,
    threads: int | None = 1,
    shapes: Mapping[str, list[int]] | None = None,
    seed: int = 0,
) -> Comparison:
    """Measure two models interleaved (A, B, A, B, …) in the same run and give the speed-up of B over A.

    Both get the same device, threads and random inputs (when their inputs match; otherwise each
    gets its own from the same seed).

    Args:
        model_a: the reference (e.g. the original model): a model, a path or an open session.
        model_b: the candidate (e.g. the pruned model).
        device: ``auto|cuda|cpu`` or a :class:`~onnxprune.runtime.DeviceChoice` (resolved once for both).
        batch: batch size.
        runs: timed runs of each model.
        warmup: untimed runs of each model first.
        threads: intra-op threads.
        shapes: input name → full shape for symbolic dims other than the batch.
        seed: seed of the random inputs.

    Returns:
        Both latencies and ``speedup = a.p50 / b.p50``.

    Raises:
        BadInputError: as :func:`measure_latency`.
    """
    _check(runs, warmup, batch)
    sessions = [m for m in (model_a, model_b) if isinstance(m, Session)]
    if len(sessions) == 2:
        return _compare(model_a, model_b, batch, runs, warmup, shapes, seed)  # type: ignore[arg-type]
    choice = device if isinstance(device, DeviceChoice) else select_device(device)
    with contextlib.ExitStack() as stack:
        # No spinning: the idle session's busy-waiting threads would slow the measured one.
        sa = model_a if isinstance(model_a, Session) else stack.enter_context(
            make_session(model_a, choice, threads, spinning=False))
        sb = model_b if isinstance(model_b, Session) else stack.enter_context(
            make_session(model_b, choice, threads, spinning=False))
        return _compare(sa, sb, batch, runs, warmup, shapes, seed)


def _compare(
    sa: Session,
    sb: Session,
    batch: int,
    runs: int,
    warmup: int,
    shapes: Mapping[str, list[int]] | None,
    seed: int,
) -> Comparison:
    feeds_a = _feeds(sa, shapes, batch, seed)
    same_inputs = [(s.name, s.dtype) for s in sa.input_specs] == [(s.name, s.dtype) for s in sb.input_specs]
    feeds_b = feeds_a if same_inputs else _feeds(sb, shapes, batch, seed)
    for _ in range(warmup):
        sa.run(feeds_a)
        sb.run(feeds_b)
    times_a: list[float] = []
    times_b: list[float] = []
    for i in range(runs):
        # Alternate which goes first so neither always runs right after the other warmed the caches.
        if i % 2 == 0:
            times_a.append(_timed(sa, feeds_a))
            times_b.append(_timed(sb, feeds_b))
        else:
            times_b.append(_timed(sb, feeds_b))
            times_a.append(_timed(sa, feeds_a))
    a = _stats(times_a, batch, sa.provider)
    b = _stats(times_b, batch, sb.provider)
    return Comparison(a, b, a.p50_ms / b.p50_ms if b.p50_ms > 0 else float("inf"))
