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

CRITERIA = ("l1", "l2", "bn-scale", "apoz", "activation", "regression", "taylor", "obd", "wanda", "flap",
            "flap-std", "random")
DEVICES = ("auto", "cuda", "cpu")
LOSSES = ("ce", "distill", "mse")
OPTIMIZERS = ("sgd", "adamw")
HEADS = ("whole", "dims")
"""Attention heads go as units (``whole``) or every head loses the same dims (``dims``)."""
DEPTH_METHODS = ("ratio", "fidelity")
"""Block importance: ‖f(x)‖/‖x‖ on calibration inputs, or the output change when the block is removed."""
ALLOCATIONS = ("auto", "uniform", "global", "measured")
"""``--allocation``: how a budget (``--target-*``, ``--max-drop``) spreads the cut over the groups."""
METRICS = ("top1", "agreement", "kl", "cosine", "ctc", "perplexity")
"""Built-in task metrics (``--metric``); ``python:MODULE:FUNC`` names a user function besides these."""
PYTHON_METRIC = "python:"
QUANTIZE_MODES = ("none", "int8", "int8-dynamic", "fp16")
"""``--quantize``: the final stage (after fine-tuning, before verify); ``none`` leaves the model in float32."""
QUANT_CALIBRATIONS = ("minmax", "entropy", "percentile")
"""``--quant-calibration``: how static INT8 turns calibration activations into ranges (onnxruntime's methods)."""
DATA_OPTIONS = ("calib", "train_data", "eval_data")
"""Options naming a DATA path: clients upload these files with the job and the service places them."""
_NM = re.compile(r"^(\d+):(\d+)$")
_DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class MetricChoice:
    """A parsed ``--metric``: a built-in name, or ``python`` with the user's module and function."""

    name: str
    module: str | None = None
    function: str | None = None

    @property
    def is_python(self) -> bool:
        return self.name == "python"

    def __str__(self) -> str:
        return f"{PYTHON_METRIC}{self.module}:{self.function}" if self.is_python else self.name


def is_module_name(text: str) -> bool:
    """Whether ``text`` is a dotted Python module name (``mymetrics``, ``pkg.metrics``)."""
    return bool(_DOTTED.match(text))


def parse_metric(text: str) -> MetricChoice:
    """Parse ``top1|agreement|kl|cosine|ctc|perplexity|python:MODULE:FUNC``.

    Raises:
        BadInputError: an unknown name, or a ``python:`` value that is not ``python:dotted.module:function``.

    Example:
        >>> parse_metric("python:mymetrics:char_accuracy").module
        'mymetrics'
    """
    if text in METRICS:
        return MetricChoice(text)
    if text.startswith(PYTHON_METRIC):
        module, sep, function = text[len(PYTHON_METRIC):].rpartition(":")
        if sep and _DOTTED.match(module) and _NAME.match(function):
            return MetricChoice("python", module, function)
        raise BadInputError(f"--metric {text!r}: a user metric is python:MODULE:FUNC, e.g. python:mymetrics:accuracy",
                            field="metric")
    raise BadInputError(f"unknown metric {text!r}; choose one of {', '.join(METRICS)} or python:MODULE:FUNC",
                        field="metric")


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
    eval_data: str | None = None
    """DATA the task metric is measured on (the original, every stage, the result; ``--max-drop``'s probes)."""
    metric: str | None = None
    """``--metric``; None: ``top1`` when the evaluation data has labels, else ``agreement``."""
    max_drop: float | None = None
    """Metric points (100 × the metric's value) the result may lose against the original; chooses the budget."""
    prune_lm_hidden: bool = False
    """``--prune-lm-hidden``: also cut a language model's hidden size (the residual stream its token embedding
    starts, read by every layer). Off: only heads, KV groups and MLP width are cut, as the quality cost of the
    stream is far higher."""
    allocation: str = "auto"
    """How a budget (``--target-*``, ``--max-drop``) spreads the cut: ``uniform`` (the same share of every group),
    ``global`` (the importance scores ranked across groups), ``measured`` (greedy, each step measured on the
    planning data), ``auto`` (see :func:`onnxprune.pipeline.allocation_for`)."""
    feature_distill: bool = True
    """Distillation (fine-tuning without labels) also matches block/stage outputs of the original, not only its
    outputs (``--no-feature-distill`` turns it off)."""
    quantize: str = "none"
    """``none|int8|int8-dynamic|fp16``: quantize the pruned (and fine-tuned) model as the last stage."""
    quant_calibration: str = "minmax"
    quant_exclude: list[str] = field(default_factory=list)
    """Node-name globs left in float by quantization."""
    keep_io_types: bool = True
    """``fp16``: keep float32 graph inputs and outputs (Casts inside the graph)."""
    quant_max_drop: float | None = None
    """The accuracy guard: metric points quantization may lose against its FP32 input (with ``--max-drop``, the
    result also stays within that of the original); the most sensitive layers stay float until it holds."""

    @property
    def real_calib(self) -> bool:
        """``--calib`` names real samples (not ``random``, which can calibrate shapes and ranges but rank nothing)."""
        return bool(self.calib) and self.calib != "random"

    @property
    def planning_data(self) -> str | None:
        """The data channels are ranked on by measurement: ``--eval-data``, else ``--calib DATA``; None for random
        or no data (then the importance scores alone decide: a ranking measured on noise would follow the noise)."""
        if self.eval_data:
            return self.eval_data
        return self.calib if self.real_calib else None

    @property
    def uses_budget(self) -> bool:
        """A ``--target-macs/params/latency`` budget chooses how much goes."""
        return any(v is not None for v in (self.target_macs, self.target_params, self.target_latency))

    @property
    def metric_choice(self) -> MetricChoice | None:
        """``--metric`` parsed (None when not given)."""
        return parse_metric(self.metric) if self.metric is not None else None

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
            check_shape_dims(name, dims)
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
        self._validate_allocation()
        self._validate_metric()
        self._validate_quantize()
        return self

    def _validate_allocation(self) -> None:
        """``--allocation`` names a known rule, applies to budgets, and ``measured`` has real data to measure on."""
        if self.allocation not in ALLOCATIONS:
            raise BadInputError(f"--allocation must be one of {', '.join(ALLOCATIONS)}, got {self.allocation!r}",
                                field="allocation")
        if self.allocation == "auto":
            return
        if not self.uses_budget and self.max_drop is None:
            raise BadInputError("--allocation applies to a budget: add --target-macs, --target-params, "
                                "--target-latency or --max-drop (--ratio cuts every group alike; --global ranks "
                                "across groups)", field="allocation")
        if self.allocation == "measured" and self.planning_data is None:
            raise BadInputError("--allocation measured needs real data to measure on: --calib DATA or --eval-data",
                                field="allocation")

    def _validate_quantize(self) -> None:
        """``--quantize`` and its options; static INT8 calibrates on real samples only."""
        if self.quantize not in QUANTIZE_MODES:
            raise BadInputError(f"--quantize must be one of {', '.join(QUANTIZE_MODES)}, got {self.quantize!r}",
                                field="quantize")
        if self.quant_calibration not in QUANT_CALIBRATIONS:
            raise BadInputError(f"--quant-calibration must be one of {', '.join(QUANT_CALIBRATIONS)}, got "
                                f"{self.quant_calibration!r}", field="quant_calibration")
        if self.quant_max_drop is not None and not self.quant_max_drop >= 0.0:
            raise BadInputError(f"--quant-max-drop must be >= 0 metric points, got {self.quant_max_drop}",
                                field="quant_max_drop")
        if self.quantize == "none":
            return
        if self.quantize == "int8" and not self.real_calib:
            raise BadInputError("--quantize int8 is calibrated on real samples: pass --calib DATA (an .npz or a "
                                "directory of .npz, not random), or use --quantize int8-dynamic", field="quantize")
        if self.quant_max_drop is not None and self.planning_data is None:
            raise BadInputError("--quant-max-drop measures the quantized model: pass --eval-data DATA or --calib DATA",
                                field="quant_max_drop")
        if self.iterations > 1 or self.granularity != "channel":
            raise BadInputError("--quantize applies to channel pruning in one pass: it takes neither --iterations "
                                "nor --granularity element|N:M", field="quantize")

    def _validate_metric(self) -> None:
        """``--metric`` needs data to measure on; ``--max-drop`` needs ``--eval-data`` and owns the budget."""
        if self.eval_data == "random":
            raise BadInputError("--eval-data needs real samples (.npz or a directory of .npz), not random inputs",
                                field="eval_data")
        if self.metric is not None:
            parse_metric(self.metric)
            if self.planning_data is None:
                raise BadInputError("--metric needs --eval-data DATA (or --calib DATA, not random) to measure on",
                                    field="metric")
        if self.max_drop is None:
            return
        if not self.max_drop >= 0.0:
            raise BadInputError(f"--max-drop must be >= 0 metric points, got {self.max_drop}", field="max_drop")
        if not self.eval_data:
            raise BadInputError("--max-drop needs --eval-data DATA: the drop is measured on it", field="max_drop")
        clash = [f"--{n.replace('_', '-')}" for n in ("target_macs", "target_params", "target_latency")
                 if getattr(self, n) is not None]
        if clash:
            raise BadInputError(f"--max-drop chooses the MACs budget itself; leave out {', '.join(clash)}",
                                field="max_drop")
        if self.iterations > 1 or self.granularity != "channel":
            raise BadInputError("--max-drop searches channel budgets in one pass: it takes neither --iterations "
                                "nor --granularity element|N:M", field="max_drop")

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


def check_shape_dims(name: str, dims: list[int]) -> None:
    """One ``--shape`` entry's dims: at least one, none negative, not all 0.

    A 0 is allowed for a dim that is empty on purpose, such as the past length of a KV cache at prefill
    (``past_key_values.0.key=1x4x0x16``); a shape whose every dim is 0 is a typo, not an input.

    Raises:
        BadInputError: no dims, a negative or non-integer dim, or every dim 0.
    """
    if not dims or not all(_is_dim(d) for d in dims):
        raise BadInputError(f"--shape {name}: dimensions must be integers >= 0, got {list(dims)}", field="shapes")
    if all(d == 0 for d in dims):
        raise BadInputError(
            f"--shape {name}: every dimension is 0 ({list(dims)}); only some dims may be 0, "
            f"e.g. a KV cache's past length at prefill (NAME=1x4x0x16)",
            field="shapes",
        )


def _is_dim(d: object) -> bool:
    """An integer >= 0 (``1.0`` from JSON counts; ``True``, ``2.5`` and ``"3"`` do not)."""
    try:
        return not isinstance(d, (bool, str)) and int(d) == d and int(d) >= 0  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return False


def parse_shape_args(items: list[str] | None) -> dict[str, list[int]]:
    """Parse ``NAME=1x3x224x224`` strings into ``{NAME: [1, 3, 224, 224]}``.

    A dim may be 0 (``past=1x2x0x4``, an empty KV cache at prefill), never negative, and not every dim 0.

    Raises:
        BadInputError: on a malformed item, a negative dim, or a shape whose every dim is 0.

    Example:
        >>> parse_shape_args(["x=1x5x8", "past=1x2x0x4"])
        {'x': [1, 5, 8], 'past': [1, 2, 0, 4]}
    """
    shapes: dict[str, list[int]] = {}
    for item in items or []:
        name, sep, dims = item.rpartition("=")
        try:
            parsed = [int(d) for d in dims.lower().split("x")]
        except ValueError:
            parsed = []
        if not sep or not name or not parsed:
            raise BadInputError(f"--shape expects NAME=1x3x224x224 (a dim may be 0), got {item!r}", field="shapes")
        check_shape_dims(name, parsed)
        shapes[name] = parsed
    return shapes
