"""Normalisations over the channel axis: per-channel parameters follow the channels."""

from __future__ import annotations

import onnx_graphsurgeon as gs

from onnxprune.analysis.analyzer import Analyzer
from onnxprune.analysis.core import SiteRole
from onnxprune.analysis.rules._common import first_input


def batch_norm(az: Analyzer, node: gs.Node) -> None:
    """BatchNormalization/InstanceNormalization over channels on axis 1: per-channel parameters follow them.
    InstanceNormalization with the channels spread on a normalised axis (GroupNorm(1, C) exported as
    ``[N, 1, C·S]``) takes its statistics over them: the cut is approximate."""
    xm = az.map(first_input(node))
    if xm is None:
        return
    if node.op == "InstanceNormalization" and xm.axis >= 2:
        az.approximate(xm.ids, f"InstanceNormalization {node.name} takes statistics over the channels "
                               "(a GroupNorm with one group): a cut changes them")
        az.set_map(node.outputs[0], xm)
        return
    if xm.axis != 1:
        az.block(xm.ids, f"{node.op} {node.name} normalizes axis 1, channels are on axis {xm.axis}")
        return
    for i, t in enumerate(node.inputs[1:], start=1):
        az.site(t, 0, xm.ids, node, SiteRole.STAT if i >= 3 else SiteRole.PARAM)
        if az.const(t) is None and Analyzer.present(t):
            az.block(xm.ids, f"{node.op} {node.name} has computed parameters")
    az.set_map(node.outputs[0], xm)


def layer_norm(az: Analyzer, node: gs.Node) -> None:
    """LayerNormalization (and onnxruntime's SimplifiedLayerNormalization, RMSNorm with a scale only): over
    axes without the channels it passes them through; over the channel axis alone (a transformer's residual
    stream) it couples its scale and bias and passes them too. Removing channels there changes the
    statistics, so that width is prunable but never exactly."""
    xm, rank = az.map(first_input(node)), az.rank(first_input(node))
    if xm is None:
        return
    axis = int(node.attrs.get("axis", -1))
    axis = axis + rank if rank is not None and axis < 0 else axis
    if rank is None:
        az.block(xm.ids, f"{node.op} {node.name}: rank unknown")
        return
    if xm.axis < axis:
        az.set_map(node.outputs[0], xm)
        return
    if not (xm.axis == axis == rank - 1):
        az.block(xm.ids, f"{node.op} {node.name} normalizes the channels together with other axes")
        return
    for t in node.inputs[1:3]:
        if not Analyzer.present(t):
            continue
        if az.const(t) is None or az.const(t).size != len(xm.ids):
            az.block(xm.ids, f"{node.op} {node.name} has computed or non-per-channel {t.name}")
            return
        az.site(t, az.const(t).ndim - 1, xm.ids, node, SiteRole.PARAM)
    az.approximate(xm.ids, f"{node.op} {node.name} normalizes over the channels: a cut changes its statistics")
    az.set_map(node.outputs[0], xm)
    for extra in node.outputs[1:]:
        if extra.outputs:
            az.block(xm.ids, f"{node.op} {node.name} mean/inv-std outputs are used")
