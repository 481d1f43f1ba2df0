"""Which execution provider runs: CUDA only where a session really gets it, else CPU (one log line)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import onnx
from onnx import helper

from onnxprune.errors import BadInputError

logger = logging.getLogger(__name__)


CUDA = "CUDAExecutionProvider"


CPU = "CPUExecutionProvider"


DEVICES = ("auto", "cuda", "cpu")


@dataclass(frozen=True)
class DeviceInfo:
    """What a CUDA probe found.

    Attributes:
        cuda_usable: a session asked for CUDA actually got the CUDA provider.
        reason: why not, when ``cuda_usable`` is false.
    """

    cuda_usable: bool
    reason: str | None = None


@dataclass(frozen=True)
class DeviceChoice:
    """A resolved device: the providers to ask onnxruntime for, in order.

    Attributes:
        requested: what the user asked for (``auto``, ``cuda`` or ``cpu``).
        providers: onnxruntime provider names, most preferred first.
        note: why CUDA is not used, when ``auto`` fell back to CPU.
    """

    requested: str
    providers: tuple[str, ...]
    note: str | None = None

    @property
    def name(self) -> str:
        """``"cuda"`` or ``"cpu"``: the device sessions will be created for."""
        return "cuda" if self.providers and self.providers[0] == CUDA else "cpu"


ProbeFn = Callable[[], DeviceInfo]


def ort_module() -> Any:
    import onnxruntime

    return onnxruntime


def _tiny_model() -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "onnxprune_probe", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def probe_cuda() -> DeviceInfo:
    """Check whether onnxruntime's CUDA provider really works here.

    ``onnxruntime-gpu`` lists ``CUDAExecutionProvider`` as available even when the CUDA/cuDNN
    libraries or the GPU are missing; a session then silently runs on CPU. So this creates a tiny
    session asking for CUDA and looks at the provider it actually got. onnxruntime's own error for the
    failed library load is silenced during the probe (its default logger is set back to WARNING after);
    the caller logs one clear line instead.

    Returns:
        The probe's finding; never raises.
    """
    ort = ort_module()
    available = ort.get_available_providers()
    if CUDA not in available:
        return DeviceInfo(False, f"this onnxruntime build has no CUDA provider (available: {', '.join(available)})")
    options = ort.SessionOptions()
    options.log_severity_level = 4
    ort.set_default_logger_severity(4)
    try:
        sess = ort.InferenceSession(_tiny_model().SerializeToString(), options, providers=[CUDA, CPU])
        got = sess.get_providers()
    except Exception as e:  # noqa: BLE001 - any failure means "not usable"; the reason is kept
        return DeviceInfo(False, f"creating a CUDA session failed: {e}")
    finally:
        ort.set_default_logger_severity(2)
    if got and got[0] == CUDA:
        return DeviceInfo(True)
    return DeviceInfo(
        False,
        "onnxruntime could not load it; it needs an NVIDIA GPU and the CUDA/cuDNN libraries that match "
        "onnxruntime-gpu, e.g. from onnxruntime-gpu[cuda,cudnn]",
    )


def select_device(device: str = "auto", probe: ProbeFn | None = None) -> DeviceChoice:
    """Resolve ``auto|cuda|cpu`` to the providers that will really run, probing CUDA when needed.

    ``auto`` uses CUDA when usable and otherwise falls back to CPU with one INFO line saying why.
    Hold on to the result and pass it to :func:`make_session` to avoid probing again.

    Args:
        device: ``"auto"``, ``"cuda"`` or ``"cpu"``.
        probe: how to check CUDA; defaults to :func:`probe_cuda` (tests pass a fake).

    Returns:
        The resolved choice.

    Raises:
        BadInputError: ``device`` is not one of the three, or ``cuda`` was asked for and is not usable.

    Example:
        >>> select_device("cpu").providers
        ('CPUExecutionProvider',)
    """
    if device not in DEVICES:
        raise BadInputError(f"--device must be one of {', '.join(DEVICES)}, got {device!r}", field="device")
    if device == "cpu":
        return DeviceChoice("cpu", (CPU,))
    info = (probe or probe_cuda)()
    if info.cuda_usable:
        logger.info("running on onnxruntime's CUDA provider")
        return DeviceChoice(device, (CUDA, CPU))
    if device == "cuda":
        raise BadInputError(
            f"--device cuda: the CUDA provider is not usable ({info.reason}); "
            "install onnxruntime-gpu[cuda,cudnn] on a machine with an NVIDIA GPU, or use --device auto|cpu",
            field="device",
        )
    logger.info("CUDA provider not usable (%s); running on CPU", info.reason)
    return DeviceChoice("auto", (CPU,), note=info.reason)


def resolve_providers(device: str, probe: ProbeFn | None = None) -> list[str]:
    """The onnxruntime providers for ``device`` (see :func:`select_device`).

    Raises:
        BadInputError: as :func:`select_device`.
    """
    return list(select_device(device, probe).providers)


def as_choice(device: str | DeviceChoice) -> DeviceChoice:
    return device if isinstance(device, DeviceChoice) else select_device(device)
