"""Version limits shared by loading, saving, training artifacts and onnxruntime sessions: one value each."""

from __future__ import annotations

import onnx

MIN_OPSET = 13
"""Older models are converted to this opset so per-op handlers see inputs (not attributes) for axes and sizes."""

MAX_IR_VERSION = 10
"""The IR version every onnxruntime this project supports (1.20 and later) reads; onnx 1.23 writes 14 by
default, which onnxruntime 1.31 refuses. 10 covers opsets up to 22; newer opsets raise it to their minimum."""

EXTERNAL_THRESHOLD = 1800 * 2**20
"""Initializer bytes above which saving switches to external data (protobuf caps one message at 2 GiB)."""


def default_opset(model: onnx.ModelProto) -> int:
    """The default-domain opset a model imports, 0 when it declares none."""
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return 0


def readable_ir_version(model: onnx.ModelProto) -> int:
    """The model's IR version capped at :data:`MAX_IR_VERSION`, but never below what its opsets need."""
    floor = onnx.helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
    return max(min(model.ir_version or MAX_IR_VERSION, MAX_IR_VERSION), floor)
