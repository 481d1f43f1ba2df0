"""onnxruntime sessions: device choice (CUDA with a logged CPU fallback), inputs, intermediate capture.

onnxruntime is imported only under ``onnxprune/runtime/``, so the format and runtime stay at the edges. Everything else passes models
(``onnx.ModelProto`` or a path) and numpy arrays in and gets numpy arrays back.

Device choice is resolved once into a :class:`DeviceChoice` the caller holds and passes on, so the
probe (a tiny CUDA session) runs and logs once per job rather than once per session. Passing the plain
strings ``"auto"``, ``"cuda"`` or ``"cpu"`` works too; it just re-probes each time.

Example:
    >>> choice = select_device("auto")            # probes CUDA once, logs the fallback once
    >>> with make_session(model, choice, threads=1) as sess:
    ...     feeds = random_inputs(sess, {"x": [1, 3, 224, 224]}, batch=1, seed=0)
    ...     outputs = sess.run(feeds)
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper

from onnxprune.errors import BadInputError, InvariantError
from onnxprune.io.limits import MAX_IR_VERSION, readable_ir_version
from onnxprune.io.weightless import without_initializers
from onnxprune.runtime.device import DeviceChoice, as_choice, ort_module

logger = logging.getLogger(__name__)




# Protobuf cannot serialize a message of 2 GiB or more; above this we go through a temp dir.
_PROTO_LIMIT = 2**31 - 2**24


# Initializers at least this big go to the external-data file when writing a large model.
_EXTERNAL_MIN_BYTES = 1024


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output as onnxruntime sees it.

    Attributes:
        name: tensor name.
        shape: one entry per axis: an int, or a str for a symbolic (``"batch"``) or unknown (``"?"``) dim.
        dtype: numpy dtype of the elements.
    """

    name: str
    shape: tuple[int | str, ...]
    dtype: np.dtype


_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int8)": np.int8,
    "tensor(int16)": np.int16,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
    "tensor(uint8)": np.uint8,
    "tensor(uint16)": np.uint16,
    "tensor(uint32)": np.uint32,
    "tensor(uint64)": np.uint64,
    "tensor(bool)": np.bool_,
}


def _ort_spec(arg: Any) -> TensorSpec:
    dtype = _ORT_TYPES.get(arg.type)
    if dtype is None:
        raise BadInputError(f"input {arg.name!r} has type {arg.type}, which onnxprune cannot feed", field="model")
    # Paddle writes -1 for dynamic dims: treat any non-positive int as unknown.
    shape = tuple(
        d if isinstance(d, int) and d > 0 else (d if isinstance(d, str) and d else "?") for d in (arg.shape or [])
    )
    return TensorSpec(arg.name, shape, np.dtype(dtype))


def _proto_spec(vi: onnx.ValueInfoProto) -> TensorSpec:
    t = vi.type.tensor_type
    try:
        dtype = helper.tensor_dtype_to_np_dtype(t.elem_type)
    except KeyError as e:
        raise BadInputError(f"input {vi.name!r} has an element type onnxprune cannot feed", field="model") from e
    shape: list[int | str] = []
    for d in t.shape.dim:
        shape.append(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or "?"))
    return TensorSpec(vi.name, tuple(shape), np.dtype(dtype))


def model_input_specs(model: onnx.ModelProto) -> list[TensorSpec]:
    """The inputs a caller must feed (graph inputs that are not initializers), read from the proto.

    Raises:
        BadInputError: an input has an element type numpy cannot represent.
    """
    inits = {t.name for t in model.graph.initializer}
    return [_proto_spec(vi) for vi in model.graph.input if vi.name not in inits]


class Session:
    """An onnxruntime session with numpy in and out, and the temp files it needs kept alive.

    Build it with :func:`make_session`. Use as a context manager or call :meth:`close`.

    Attributes:
        input_specs: the inputs to feed.
        output_names: the outputs :meth:`run` returns by default, in graph order.
        provider: the provider onnxruntime actually uses (``CUDAExecutionProvider`` or ``CPUExecutionProvider``).
        device: the resolved device choice.
    """

    def __init__(self, ort_session: Any, device: DeviceChoice, tmpdir: tempfile.TemporaryDirectory[str] | None) -> None:
        self._sess = ort_session
        self._tmpdir = tmpdir
        self.device = device
        self.input_specs = [_ort_spec(a) for a in ort_session.get_inputs()]
        self.output_names = [o.name for o in ort_session.get_outputs()]
        self.provider: str = ort_session.get_providers()[0]

    def run(self, feeds: Mapping[str, np.ndarray], output_names: list[str] | None = None) -> dict[str, np.ndarray]:
        """Run the model once.

        Args:
            feeds: input name → array; every input in :attr:`input_specs` must be present.
            output_names: which outputs to return; all by default.

        Returns:
            Output name → array.

        Raises:
            BadInputError: an input is missing or unknown, or has a shape/dtype the model rejects.
            InvariantError: onnxruntime failed while running the model.
        """
        names = {s.name for s in self.input_specs}
        missing = sorted(names - set(feeds))
        extra = sorted(set(feeds) - names)
        if missing or extra:
            raise BadInputError(
                f"inputs do not match the model: missing {missing or 'none'}, unknown {extra or 'none'}; "
                f"the model takes {sorted(names)}",
                field="inputs",
            )
        if self._sess is None:
            raise InvariantError("this session was closed; make a new one with make_session")
        wanted = output_names or self.output_names
        try:
            values = self._sess.run(wanted, dict(feeds))
        except Exception as e:  # onnxruntime raises its own exception types
            shapes = {k: list(np.shape(v)) for k, v in feeds.items()}
            if type(e).__name__ == "InvalidArgument":  # wrong shape or dtype fed: the caller's data
                raise BadInputError(f"the model rejects inputs with shapes {shapes}: {e}", field="inputs") from e
            raise InvariantError(f"onnxruntime failed to run the model with input shapes {shapes}: {e}") from e
        return dict(zip(wanted, values, strict=True))

    def close(self) -> None:
        """Release the session and delete its temp files."""
        self._sess = None
        if self._tmpdir is not None:
            self._tmpdir.cleanup()
            self._tmpdir = None

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def light_copy(model: onnx.ModelProto, extra_outputs: list[onnx.ValueInfoProto]) -> onnx.ModelProto:
    """A copy of everything but the graph's initializers (which the caller adds), IR capped, outputs added."""
    light = without_initializers(model)
    light.ir_version = readable_ir_version(model)
    light.graph.output.extend(extra_outputs)
    return light


def _has_unloaded_external_data(model: onnx.ModelProto) -> bool:
    return any(
        t.data_location == onnx.TensorProto.EXTERNAL and not t.raw_data for t in model.graph.initializer
    )


def _write_external(model: onnx.ModelProto, extra_outputs: list[onnx.ValueInfoProto], directory: str) -> str:
    """Write ``model`` to ``directory`` with big initializers in one external file, never serializing >2 GB."""
    light = light_copy(model, extra_outputs)
    data_name = "weights.bin"
    offset = 0
    with open(os.path.join(directory, data_name), "wb") as f:
        for t in model.graph.initializer:
            data = t.raw_data  # one copy of the bytes at a time
            if len(data) < _EXTERNAL_MIN_BYTES:
                light.graph.initializer.append(t)
                continue
            ref = light.graph.initializer.add()
            ref.name = t.name
            ref.data_type = t.data_type
            ref.dims.extend(t.dims)
            f.write(data)
            ref.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(len(data)))):
                entry = ref.external_data.add()
                entry.key, entry.value = key, value
            offset += len(data)
            del data
    path = os.path.join(directory, "model.onnx")
    with open(path, "wb") as f:
        f.write(light.SerializeToString())
    return path


def _too_big_to_serialize(model: onnx.ModelProto) -> bool:
    try:
        return model.ByteSize() >= _PROTO_LIMIT
    except Exception:  # protobuf raises EncodeError from ByteSize itself at 2 GB and above
        return True


def _file_ir_version(path: Path) -> int | None:
    """``ir_version`` from the file's first bytes (protobuf writes field 1 first), or None if not there."""
    with open(path, "rb") as f:
        head = f.read(11)
    if not head or head[0] != 0x08:  # field 1, varint
        return None
    value, shift = 0, 0
    for byte in head[1:]:
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value
        shift += 7
    return None


def read_model(path: Path, external: bool) -> onnx.ModelProto:
    try:
        return onnx.load(str(path), load_external_data=external)
    except Exception as e:  # protobuf DecodeError, OSError for missing external files, ...
        raise BadInputError(f"{path} is not a readable ONNX model: {e}", field="model") from e


def _session_source(
    model: onnx.ModelProto | str | os.PathLike[str], extra_outputs: list[onnx.ValueInfoProto]
) -> tuple[bytes | str, tempfile.TemporaryDirectory[str] | None]:
    """What to hand onnxruntime: serialized bytes, or a path (with the temp dir that holds it)."""
    if not isinstance(model, onnx.ModelProto):
        path = Path(model)
        if not path.is_file():
            raise BadInputError(f"model file not found: {path}", field="model")
        if not extra_outputs:
            # onnxruntime reads the file and its external data itself; only the IR version is checked.
            ir = _file_ir_version(path)
            if ir is None:
                ir = read_model(path, external=False).ir_version
            if ir <= MAX_IR_VERSION:
                return str(path), None
        return _session_source(read_model(path, external=True), extra_outputs)
    if _has_unloaded_external_data(model):
        raise BadInputError(
            "the model's weights are in external data that was not loaded; pass the model's path, "
            "or load it with onnx.load(path, load_external_data=True)",
            field="model",
        )
    if not _too_big_to_serialize(model):
        if model.ir_version <= MAX_IR_VERSION and not extra_outputs:
            return model.SerializeToString(), None
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        copy.ir_version = readable_ir_version(copy)
        copy.graph.output.extend(extra_outputs)
        return copy.SerializeToString(), None
    tmpdir = tempfile.TemporaryDirectory(prefix="onnxprune-session-")
    logger.debug("model is 2 GB or more; writing it with external data to %s", tmpdir.name)
    return _write_external(model, extra_outputs, tmpdir.name), tmpdir


def build_session(
    model: onnx.ModelProto | str | os.PathLike[str],
    device: str | DeviceChoice,
    threads: int | None,
    extra_outputs: list[onnx.ValueInfoProto],
    spinning: bool = True,
) -> Session:
    ort = ort_module()
    choice = as_choice(device)
    if threads is not None and threads < 1:
        raise BadInputError(f"--threads must be >= 1, got {threads}", field="threads")
    source, tmpdir = _session_source(model, extra_outputs)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if not spinning:
        # Idle worker threads otherwise busy-wait after each run and steal cores from another session.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        sess = ort.InferenceSession(source, options, providers=list(choice.providers))
    except Exception as e:  # onnxruntime raises its own exception types
        if tmpdir is not None:
            tmpdir.cleanup()
        raise BadInputError(f"onnxruntime cannot load the model: {e}", field="model") from e
    return Session(sess, choice, tmpdir)


def make_session(
    model: onnx.ModelProto | str | os.PathLike[str],
    device: str | DeviceChoice = "auto",
    threads: int | None = None,
    *,
    spinning: bool = True,
) -> Session:
    """Create an onnxruntime session for a model in memory or on disk.

    Models of 2 GB or more in memory are written to a temp dir with external data (kept until the
    session is closed); a path is handed to onnxruntime as is, so its external data resolves next to
    it. IR versions above what onnxruntime reads are capped in a copy.

    Args:
        model: a ``ModelProto`` (with its external data loaded) or a path to a ``.onnx`` file.
        device: ``auto|cuda|cpu`` or a :class:`DeviceChoice` from :func:`select_device`.
        threads: intra-op threads; ``None`` lets onnxruntime decide.
        spinning: let idle intra-op threads busy-wait (onnxruntime's default). Turn it off when several
            sessions take turns on the same cores, as interleaved benchmarks do.

    Returns:
        The session; close it (or use ``with``) to delete temp files.

    Raises:
        BadInputError: the file is missing, onnxruntime cannot load the model, the model's external
            data is not loaded, ``threads`` < 1, or the device is not usable.

    Example:
        >>> with make_session("model.onnx", "cpu", threads=1) as s:
        ...     s.provider
        'CPUExecutionProvider'
    """
    return build_session(model, device, threads, [], spinning)
