"""Quantization, the final compression stage: INT8 (static QDQ, dynamic) and FP16 by the maintained converters.

:mod:`.convert` runs onnxruntime's quantizer and float16 converter (onnxprune writes no quantizer of its own),
:mod:`.guard` keeps the most sensitive layers in float when INT8 costs more task metric than allowed, and
:mod:`.detect` recognises quantized graphs (fine-tuning refuses them). This ``__init__`` imports only
:mod:`.detect`, so training can ask "is this model quantized?" without loading onnxruntime's quantizer.
"""

from __future__ import annotations

from onnxprune.quantize.detect import QUANTIZED_OPS, quantized_nodes

__all__ = ["QUANTIZED_OPS", "quantized_nodes"]
