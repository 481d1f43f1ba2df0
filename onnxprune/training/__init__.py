"""Fine-tuning on stock onnxruntime: autodiff into standard ONNX ops, in-graph losses and optimizers.

Public entry points: :func:`finetune` (train a model, get a model back), :func:`export_artifacts` /
:func:`apply_checkpoint` (a directory with training and eval graphs, a checkpoint and a manifest, for any
onnxruntime training loop), :func:`accumulate_gradients` (gradient statistics for Taylor/OBD importance).
The backward pass is built by :mod:`onnxprune.training.grad`: a driver, the context rules emit through,
and one module of VJP rules per op family in :mod:`onnxprune.training.grad.rules`.
"""

from __future__ import annotations

from onnxprune.training.artifacts import TrainingArtifacts, apply_checkpoint, export_artifacts, select_trainable
from onnxprune.training.data import TrainData
from onnxprune.training.grad.context import VJPRegistry
from onnxprune.training.grad.driver import GradientResult, build_gradients
from onnxprune.training.grad.rules import default_registry
from onnxprune.training.grads import GradStats, accumulate_gradients
from onnxprune.training.losses import LossSpec
from onnxprune.training.optimizers import OptimizerSpec
from onnxprune.training.trainer import FinetuneConfig, FinetuneResult, finetune

__all__ = [
    "FinetuneConfig", "FinetuneResult", "GradStats", "GradientResult", "LossSpec", "OptimizerSpec", "TrainData",
    "TrainingArtifacts", "VJPRegistry", "accumulate_gradients", "apply_checkpoint", "build_gradients",
    "default_registry", "export_artifacts", "finetune", "select_trainable",
]
