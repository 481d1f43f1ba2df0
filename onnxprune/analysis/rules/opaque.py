"""Ops whose channel flow is not followed (recurrent layers, control flow): they block what they read."""

from __future__ import annotations

import onnx_graphsurgeon as gs

from onnxprune.analysis.analyzer import Analyzer

RECURRENT = ("LSTM", "GRU", "RNN")


CONTROL_FLOW = ("If", "Loop", "Scan")


def recurrent(az: Analyzer, node: gs.Node) -> None:
    """LSTM/GRU/RNN pack every gate's hidden units into one weight: not pruned, their inputs blocked."""
    az.block_inputs(node, f"{node.op} {node.name} not understood: recurrent layers are not pruned (gates pack the hidden units)")


def control_flow(az: Analyzer, node: gs.Node) -> None:
    """If/Loop/Scan bodies are not analyzed: every channel tensor they read (inputs or outer scope) stays."""
    az.block_inputs(node, f"{node.op} {node.name} not understood: control-flow bodies are not analyzed")
