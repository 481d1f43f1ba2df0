"""The options of one prune job, shared by the CLI, the Python API and the gRPC service.

A :class:`PruneSpec` is plain data: the CLI builds it from argv, the service from a proto message,
and :func:`onnxprune.pipeline.run` consumes it. ``validate`` is the one place option values are checked.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from onnxprune.errors import BadInputError

CRITERIA = ("l1", "l2", "bn-scale", "apoz", "activation", "regression", "taylor", "obd", "random")
DEVICES = ("auto", "cuda", "cpu")
LOSSES = ("ce", "distill", "mse")
OPTIMIZERS = ("sgd", "adamw")
HEADS = ("whole", "dims")
"""Attention heads go as units (``whole``) or every head loses the same dims (``dims``)."""
DEPTH_METHODS = ("ratio", "fidelity")
"""Block importance: ‖f(x)‖/‖x‖ on calibration inputs, or the output change when the block is removed."""
_NM = re.compile(r"^(\d+):(\d+)$")


@dataclass
class PruneSpec:
    """Every option ``onnxprune prune`` accepts. Defaults match the CLI's."""

    ratio: float = 0.5
    criterion: str = "l2"
    global_ranking: bool = False
    target_macs: float | None = None
    target_params: float | None = None
    target_latency: float | None = None
    round_to: int = 1
    exclude: list[str] = field(default_factory=list)
    granularity: str = "channel"
    sparsity: float | None = None
    depth: int = 0
    shapes: dict[str, list[int]] = field(default_factory=dict)
    calib: str | None = None
    calib_samples: int = 64
    reconstruct: bool = False
    finetune_steps: int = 0
    train_data: str | None = None
    lr: float = 1e-3
    batch_size: int = 32
    iterations: int = 1
    bench: bool = False
    device: str = "auto"
    seed: int = 0
    fidelity_samples: int = 8
    heads: str = "whole"
    depth_method: str = "ratio"

    def validate(self) -> PruneSpec:
        """Check every option; return self so calls can chain.

        Raises:
            BadInputError: naming the offending option (``field``) and the accepted values.
        """
        if not 0.0 <= self.ratio < 1.0:
            raise BadInputError(f"--ratio must be in [0, 1), got {self.ratio}", field="ratio")
        if self.criterion not in CRITERIA:
            raise BadInputError(
                f"unknown criterion {self.criterion!r}; choose one of {', '.join(CRITERIA)}", field="criterion"
            )
        for name in ("target_macs", "target_params", "target_latency"):
            value = getattr(self, name)
            if value is not None and not 0.0 < value <= 1.0:
                raise BadInputError(f"--{name.replace('_', '-')} must be in (0, 1], got {value}", field=name)
        if self.round_to < 1:
            raise BadInputError(f"--round-to must be >= 1, got {self.round_to}", field="round_to")
        if self.granularity not in ("channel", "element"):
            m = _NM.match(self.granularity)
            if not m or not 0 < int(m.group(1)) < int(m.group(2)):
                raise BadInputError(
                    f"--granularity must be channel, element or N:M with 0 < N < M, got {self.granularity!r}",
                    field="granularity",
                )
        if self.sparsity is not None and not 0.0 <= self.sparsity < 1.0:
            raise BadInputError(f"--sparsity must be in [0, 1), got {self.sparsity}", field="sparsity")
        if self.depth < 0:
            raise BadInputError(f"--depth must be >= 0, got {self.depth}", field="depth")
        for name, dims in self.shapes.items():
            if not dims or any(int(d) <= 0 for d in dims):
                raise BadInputError(f"--shape {name}: dimensions must be positive, got {dims}", field="shapes")
        if self.calib_samples < 1:
            raise BadInputError(f"--calib-samples must be >= 1, got {self.calib_samples}", field="calib_samples")
        if self.finetune_steps < 0:
            raise BadInputError("--finetune-steps must be >= 0", field="finetune_steps")
        if self.finetune_steps and not self.train_data:
            raise BadInputError("--finetune-steps needs --train-data", field="train_data")
        if self.lr <= 0:
            raise BadInputError(f"--lr must be > 0, got {self.lr}", field="lr")
        if self.batch_size < 1:
            raise BadInputError(f"--batch-size must be >= 1, got {self.batch_size}", field="batch_size")
        if self.iterations < 1:
            raise BadInputError(f"--iterations must be >= 1, got {self.iterations}", field="iterations")
        if self.device not in DEVICES:
            raise BadInputError(f"--device must be one of {', '.join(DEVICES)}, got {self.device!r}", field="device")
        if self.heads not in HEADS:
            raise BadInputError(f"--heads must be one of {', '.join(HEADS)}, got {self.heads!r}", field="heads")
        if self.depth_method not in DEPTH_METHODS:
            raise BadInputError(f"--depth-method must be one of {', '.join(DEPTH_METHODS)}, got {self.depth_method!r}",
                                field="depth_method")
        if self.fidelity_samples < 1:
            raise BadInputError("fidelity_samples must be >= 1", field="fidelity_samples")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PruneSpec:
        """Build a spec from a mapping, rejecting unknown keys (a typo must not be ignored)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise BadInputError(f"unknown option(s): {', '.join(unknown)}", field=unknown[0])
        return cls(**data)


def parse_shape_args(items: list[str] | None) -> dict[str, list[int]]:
    """Parse ``NAME=1x3x224x224`` strings into ``{NAME: [1, 3, 224, 224]}``.

    Raises:
        BadInputError: on a malformed item.
    """
    shapes: dict[str, list[int]] = {}
    for item in items or []:
        name, sep, dims = item.rpartition("=")
        try:
            parsed = [int(d) for d in dims.lower().split("x")]
        except ValueError:
            parsed = []
        if not sep or not name or not parsed or any(d <= 0 for d in parsed):
            raise BadInputError(f"--shape expects NAME=1x3x224x224, got {item!r}", field="shapes")
        shapes[name] = parsed
    return shapes
