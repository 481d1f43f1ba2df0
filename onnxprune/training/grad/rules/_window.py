"""Sliding-window geometry shared by the convolution and pooling rules (pads, strides, output sizes)."""

from __future__ import annotations

import onnx

from onnxprune.errors import UnsupportedOpError
from onnxprune.training.grad.context import GradContext
from onnxprune.training.grad.rules._common import attr_int, attr_ints, attr_str


def conv_geometry(
    ctx: GradContext, node: onnx.NodeProto, in_sp: list[int], kernel: list[int]
) -> tuple[list[int], list[int], list[int], list[int], list[int]]:
    """strides, dilations, pads_begin, pads_end, output spatial size; auto_pad made explicit."""
    n = len(in_sp)
    strides = attr_ints(node, "strides", [1] * n)
    dil = attr_ints(node, "dilations", [1] * n)
    pads = attr_ints(node, "pads", [0] * 2 * n)
    auto = attr_str(node, "auto_pad", "NOTSET")
    eff = [(k - 1) * d + 1 for k, d in zip(kernel, dil)]
    pb, pe = pads[:n], pads[n:]
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        pb, pe = [], []
        for size, s, e in zip(in_sp, strides, eff):
            out = -(-size // s)
            total = max(0, (out - 1) * s + e - size)
            small, big = total // 2, total - total // 2
            pb.append(small if auto == "SAME_UPPER" else big)
            pe.append(big if auto == "SAME_UPPER" else small)
    elif auto == "VALID":
        pb, pe = [0] * n, [0] * n
    ceil = attr_int(node, "ceil_mode", 0)
    out_sp = []
    for size, s, e, b, en in zip(in_sp, strides, eff, pb, pe):
        span = size + b + en - e
        o = (-(-span // s) if ceil else span // s) + 1
        if ceil and (o - 1) * s >= size + b:  # the last window must start inside the input or left pad
            o -= 1
        out_sp.append(o)
    return strides, dil, pb, pe, out_sp


def transpose_pads(
    in_sp: list[int], out_sp: list[int], strides: list[int], eff: list[int], pb: list[int]
) -> tuple[list[int], list[int]]:
    """End pads and output_padding that make ConvTranspose return exactly ``in_sp``."""
    pe_new, opad = [], []
    for size, o, s, e, b in zip(in_sp, out_sp, strides, eff, pb):
        end = s * (o - 1) + e - b - size
        pe_new.append(max(end, 0))
        opad.append(max(-end, 0))
    return pe_new, opad


def spatial_dims(ctx: GradContext, x: str, node: onnx.NodeProto) -> list[int]:
    """Static spatial dims of ``x`` (the batch may stay symbolic)."""
    shape = ctx.shape(x)
    if shape is None or not all(isinstance(d, int) for d in shape[2:]):
        raise UnsupportedOpError(
            f"gradient of {node.op_type} {node.name!r} needs static spatial dims for {x!r}, got {shape}; "
            f"fix input shapes with --shape",
            op_type=node.op_type, node=node.name,
        )
    return [int(d) for d in shape[2:]]  # type: ignore[arg-type]
