"""Version limits shared by loading, saving and onnxruntime sessions (one place, one value each)."""

from __future__ import annotations

import logging

import onnx

log = logging.getLogger(__name__)



MIN_OPSET = 13


"""Older models are converted to this opset so per-op handlers see inputs (not attributes) for axes and sizes."""


MAX_IR_VERSION = 10


"""onnxruntime 1.31 reads IR <= 13; onnx 1.23 writes 14 by default. 10 covers opsets up to 22."""


PROTO_LIMIT = 2**31 - 1


EXTERNAL_THRESHOLD = 1800 * 2**20


"""Initializer bytes above which saving switches to external data (protobuf caps one message at 2 GiB)."""


def default_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return 0
