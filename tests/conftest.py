"""Shared fixtures: the digits data, the example model, real models from installed wheels, the ``gpu`` marker.

The repository root is put on ``sys.path`` so tests can ``from tests.models import build_vgg`` (and the example
training script shares ``tests.data``) without ``tests`` being an installed package.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from tests.data import digits_split  # noqa: E402

RAPIDOCR_INSTALL = "python3 -m pip install --no-deps rapidocr-onnxruntime==1.4.4"
LIGHT_DIR = Path("onnx") / "backend" / "test" / "data" / "light"


@pytest.fixture(scope="session")
def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(x_train, y_train, x_test, y_test)`` of scikit-learn's digits, float32 [N, 1, 8, 8] (see tests/data.py)."""
    return digits_split(seed=0)


@pytest.fixture(scope="session")
def digits_model_path() -> Path:
    """The trained example model ``examples/digits_cnn.onnx`` (99.1 % on ``digits``' test split)."""
    path = REPO_ROOT / "examples" / "digits_cnn.onnx"
    if not path.is_file():
        pytest.fail(f"{path} is missing; regenerate it with `python3 examples/train_digits_cnn.py` (needs torch)")
    return path


def light_model_dir() -> Path:
    """``onnx/backend/test/data/light`` inside the installed onnx wheel (real architectures, stand-in weights)."""
    spec = importlib.util.find_spec("onnx")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the onnx package is not installed: python3 -m pip install onnx")
    return Path(next(iter(spec.submodule_search_locations))).parent / LIGHT_DIR


def light_model_names() -> list[str]:
    """Names ``X`` of every ``light_X.onnx`` in the onnx wheel (resnet50, densenet121, shufflenet, vgg19, ...)."""
    return sorted(p.stem[len("light_"):] for p in light_model_dir().glob("light_*.onnx"))


@pytest.fixture(scope="session")
def light_model() -> Callable[[str], Path]:
    """``light_model("resnet50")`` -> path of ``light_resnet50.onnx`` from the onnx wheel (opset 9 models)."""

    def find(name: str) -> Path:
        path = light_model_dir() / f"light_{name}.onnx"
        if not path.is_file():
            pytest.fail(f"onnx wheel has no {path.name} in {path.parent}; available: {', '.join(light_model_names())}")
        return path

    return find


def rapidocr_model_dir() -> Path:
    """``models/`` of the installed rapidocr_onnxruntime package, located without importing it (it imports cv2)."""
    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"rapidocr_onnxruntime is not installed; install its models with: {RAPIDOCR_INSTALL}")
    return Path(next(iter(spec.submodule_search_locations))) / "models"


@pytest.fixture(scope="session")
def rapidocr_model() -> Callable[[str], Path]:
    """``rapidocr_model("ch_PP-OCRv4_det_infer")`` -> path of that ``.onnx`` inside rapidocr-onnxruntime==1.4.4.

    Models: ch_ppocr_mobile_v2.0_cls_infer, ch_PP-OCRv4_det_infer, ch_PP-OCRv4_rec_infer (``.onnx`` optional).
    """

    def find(name: str) -> Path:
        try:
            directory = rapidocr_model_dir()
        except FileNotFoundError as e:
            pytest.fail(str(e))
        path = directory / (name if name.endswith(".onnx") else f"{name}.onnx")
        if not path.is_file():
            have = ", ".join(sorted(p.name for p in directory.glob("*.onnx"))) or "none"
            pytest.fail(f"{path.name} not in {directory} (have: {have}); reinstall with: {RAPIDOCR_INSTALL}")
        return path

    return find


@functools.cache
def cuda_available() -> bool:
    """True only if onnxruntime can really create a session on the CUDA provider (not just list it)."""
    if os.environ.get("ONNXPRUNE_NO_GPU"):
        return False
    try:
        import onnxruntime as ort
        from onnx import TensorProto, helper

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            return False
        graph = helper.make_graph(
            [helper.make_node("Relu", ["x"], ["y"])], "probe",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
        opts = ort.SessionOptions()
        opts.log_severity_level = 4
        sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CUDAExecutionProvider"])
        return "CUDAExecutionProvider" in sess.get_providers()
    except Exception:  # any failure to create the session means: no usable GPU
        return False


def pytest_configure(config: pytest.Config) -> None:
    # Also declared in pyproject.toml; repeated so the markers exist when pytest runs without that config.
    config.addinivalue_line("markers", "slow: real-model tests that take more than a few seconds")
    config.addinivalue_line("markers", "gpu: needs a usable CUDA execution provider")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip ``gpu`` tests unless a CUDA session can be created (checked once, only if such tests exist)."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items or cuda_available():
        return
    skip = pytest.mark.skip(reason="needs a usable CUDA execution provider (onnxruntime-gpu with CUDA 13 + cuDNN 9)")
    for item in gpu_items:
        item.add_marker(skip)
