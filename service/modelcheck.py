"""Safety checks on an uploaded ONNX model before any loader touches it.

The file is read through :func:`onnxprune.io.scan.scan_tensors` (its wire format, through an mmap, no tensor
data materialised), so the check costs almost no memory even for a 2 GB model. It refuses:

- files that are not a ModelProto (random bytes) or end mid-field (truncated);
- external-data locations the library's one path rule refuses (:func:`onnxprune.io.safety.locate_in_files`:
  absolute, ``..``, or naming a file that was not uploaded with the model); offset/length outside that file;
- tensors whose declared size (product of dims × element size) exceeds a limit (a 1 KB model can declare a
  petabyte tensor and make a loader allocate it).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from onnxprune.errors import BadInputError
from onnxprune.io.safety import locate_in_files
from onnxprune.io.scan import TensorInfo, scan_tensors


def check_model(
    path: Path,
    *,
    model_path: str,
    files: Mapping[str, int],
    max_tensor_bytes: int,
) -> list[TensorInfo]:
    """Validate the model file at ``path`` without loading tensor data; return what its tensors declare.

    Args:
        path: the model file on disk.
        model_path: its relative path in the job's input directory (external locations resolve against it).
        files: relative path → size of every file uploaded with the model.
        max_tensor_bytes: the largest declared tensor accepted.

    Raises:
        BadInputError: (field ``model``) for anything listed in the module docstring.
    """
    tensors = scan_tensors(path)
    for t in tensors:
        _check_declared_size(t, max_tensor_bytes)
        if t.is_external:
            target = locate_in_files(t.external.get("location", ""), model_path, files, tensor=t.name)
            _check_extent(t, target, files[target])
    return tensors


def _check_declared_size(t: TensorInfo, max_tensor_bytes: int) -> None:
    if any(d < 0 for d in t.dims):
        raise BadInputError(f"tensor {t.name!r} declares negative dimensions {t.dims}", field="model")
    if t.declared_bytes > max_tensor_bytes:
        raise BadInputError(
            f"tensor {t.name!r} declares {t.declared_bytes} bytes (dims {t.dims}), over the limit of "
            f"{max_tensor_bytes}",
            field="model",
        )


def _check_extent(t: TensorInfo, target: str, size: int) -> None:
    """The external data's [offset, offset + length) must lie inside the uploaded file."""
    try:
        offset = int(t.external.get("offset", "0") or 0)
        length = int(t.external["length"]) if t.external.get("length") else t.declared_bytes
    except ValueError as e:
        raise BadInputError(f"tensor {t.name!r}: external data offset/length are not integers", field="model") from e
    if offset < 0 or length < 0 or offset + length > size:
        raise BadInputError(
            f"tensor {t.name!r}: external data [{offset}, {offset + length}) lies outside {target!r} ({size} bytes)",
            field="model",
        )
