"""onnxprune: structured pruning of ONNX models.

The public API is small: ``prune`` (the whole pipeline), ``analyze`` (dependency groups),
``PruneSpec`` (its options) and ``Client`` (the gRPC client). Everything else may change.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["PruneSpec", "prune", "analyze", "finetune", "Client", "__version__"]

if TYPE_CHECKING:
    from onnxprune.client import Client
    from onnxprune.pipeline import analyze, prune
    from onnxprune.spec import PruneSpec
    from onnxprune.training import finetune

_LAZY = {
    "PruneSpec": "onnxprune.spec",
    "prune": "onnxprune.pipeline",
    "analyze": "onnxprune.pipeline",
    "finetune": "onnxprune.training",
    "Client": "onnxprune.client",
}


def __getattr__(name: str) -> Any:
    # Lazy so that `import onnxprune` does not pull in grpc or onnxruntime.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'onnxprune' has no attribute {name!r}")
