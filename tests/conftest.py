"""Shared fixtures: the digits data, the example model, real models from installed wheels, the ``gpu`` marker.

The repository root is put on ``sys.path`` so tests can ``from tests.models import build_vgg`` (and the example
training script shares ``tests.data``) without ``tests`` being an installed package.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from tests.cluster import postgres, ray_cluster  # noqa: E402,F401 - session fixtures of the scale-out tests
from tests.lms.fixtures import lm_export, lm_tokens_npz  # noqa: E402,F401 - the trained tiny LMs
from tests.data import (  # noqa: E402
    RAPIDOCR_INSTALL,
    digits_split,
    light_model_dir,
    light_model_names,
    rapidocr_model_dir,
    write_npz,
)


@pytest.fixture(scope="session")
def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(x_train, y_train, x_test, y_test)`` of scikit-learn's digits, float32 [N, 1, 8, 8] (see tests/data.py)."""
    return digits_split(seed=0)


@pytest.fixture(scope="module")
def digits_eval(digits, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The held-out digits as an ``--eval-data`` file (labels included)."""
    _, _, x_test, y_test = digits
    return write_npz(tmp_path_factory.mktemp("eval") / "digits_test.npz", x_test, y_test)



@pytest.fixture(scope="session")
def digits_model_path() -> Path:
    """The trained example model ``examples/digits_cnn.onnx`` (99.1 % on ``digits``' test split)."""
    path = REPO_ROOT / "examples" / "digits_cnn.onnx"
    if not path.is_file():
        pytest.fail(f"{path} is missing; regenerate it with `python3 examples/train_digits_cnn.py` (needs torch)")
    return path


@pytest.fixture(scope="session")
def light_model() -> Callable[[str], Path]:
    """``light_model("resnet50")`` -> path of ``light_resnet50.onnx`` from the onnx wheel.

    All are IR version 3, opset 9, batch fixed at 1 (input [1, 3, 224, 224]), with every initializer also listed
    as a graph input, and weights produced by ``ConstantOfShape`` nodes filled with 0.02 (use
    ``light_model_random`` for distinct weights). Names: bvlc_alexnet, densenet121, inception_v1, inception_v2,
    resnet50, shufflenet, squeezenet, vgg19, zfnet512.
    """

    def find(name: str) -> Path:
        path = light_model_dir() / f"light_{name}.onnx"
        if not path.is_file():
            pytest.fail(f"onnx wheel has no {path.name} in {path.parent}; available: {', '.join(light_model_names())}")
        return path

    return find


@pytest.fixture(scope="session")
def light_model_random(light_model: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory
                       ) -> Callable[[str], Path]:
    """``light_model_random("resnet50")`` -> path of that model with realistic random weights (cached per session).

    The wheel's light models fill every weight with 0.02 (all channels tie on importance, outputs are constant);
    see ``tests.models.randomize_light_weights``. Note vgg19/zfnet512/alexnet become 240-570 MB when materialized.
    """
    import onnx

    from tests.models import randomize_light_weights

    directory = tmp_path_factory.mktemp("light_random")
    cache: dict[str, Path] = {}

    def make(name: str, seed: int = 0) -> Path:
        key = f"{name}-{seed}"
        if key not in cache:
            model = randomize_light_weights(onnx.load(str(light_model(name))), seed=seed)
            path = directory / f"light_{name}_random{seed}.onnx"
            onnx.save(model, str(path))
            cache[key] = path
        return cache[key]

    return make


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
def cuda_probe() -> tuple[bool, str]:
    """(usable, reason): can onnxruntime really create a CUDA session here (listing the provider is not enough)?

    Uses ``onnxprune.runtime.probe_cuda`` (one definition of "usable" for the library and the tests), with a
    local fallback so a broken import in the package under test does not take the whole suite down.
    ``ONNXPRUNE_NO_GPU=1`` forces "no".
    """
    if os.environ.get("ONNXPRUNE_NO_GPU"):
        return False, "ONNXPRUNE_NO_GPU is set"
    try:
        from onnxprune.runtime.device import probe_cuda
    except ImportError:
        return _local_cuda_probe()
    info = probe_cuda()
    return info.cuda_usable, info.reason or ""


def _local_cuda_probe() -> tuple[bool, str]:
    try:
        import onnxruntime as ort
        from onnx import TensorProto, helper

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            return False, "this onnxruntime build has no CUDA provider"
        graph = helper.make_graph(
            [helper.make_node("Relu", ["x"], ["y"])], "probe",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
        opts = ort.SessionOptions()
        opts.log_severity_level = 4
        sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CUDAExecutionProvider"])
        if "CUDAExecutionProvider" in sess.get_providers():
            return True, ""
        return False, "onnxruntime could not load the CUDA provider"
    except Exception as e:  # noqa: BLE001 - any failure to create the session means: no usable GPU
        return False, f"creating a CUDA session failed: {e}"


def pytest_configure(config: pytest.Config) -> None:
    # Also declared in pyproject.toml; repeated so the markers exist when pytest runs without that config.
    config.addinivalue_line("markers", "slow: real-model tests that take more than a few seconds")
    config.addinivalue_line("markers", "gpu: needs a usable CUDA execution provider")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip ``gpu`` tests unless a CUDA session can be created (checked once, only if such tests exist)."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    usable, why = cuda_probe()
    if usable:
        return
    skip = pytest.mark.skip(reason=f"needs a usable CUDA execution provider: {why}")
    for item in gpu_items:
        item.add_marker(skip)
