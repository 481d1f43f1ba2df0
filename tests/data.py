"""Test data that ships inside installed wheels, and the DATA file format.

The digits images (1797 8x8 grey-scale digits, 10 classes) are read from the CSV bundled in the
scikit-learn wheel, so tests and the example model need no network and no downloads. Real models come
from the onnx wheel (``backend/test/data/light``) and from rapidocr-onnxruntime's ``models/``; they are
located here, never copied into the repository (importable by benchmarks too: ``from tests.data import ...``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

DIGITS_CLASSES = 10
TEST_FRACTION = 0.25
RAPIDOCR_INSTALL = "python3 -m pip install --no-deps rapidocr-onnxruntime==1.4.4"
RAPIDOCR_MODELS = ("ch_ppocr_mobile_v2.0_cls_infer", "ch_PP-OCRv4_det_infer", "ch_PP-OCRv4_rec_infer")


def digits_split(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return a fixed stratified 75/25 split of scikit-learn's digits as float32 NCHW.

    The split is a pure function of ``seed`` so the example model's reported accuracy can be
    reproduced by any test (the example was trained on ``seed=0``).

    Args:
        seed: random state of the stratified split.

    Returns:
        ``(x_train, y_train, x_test, y_test)``: x float32 of shape (N, 1, 8, 8) scaled to [0, 1]
        (pixel values divided by 16), y int64 class labels in [0, 10).

    Example:
        >>> x_train, y_train, x_test, y_test = digits_split()
        >>> x_train.shape, x_test.shape
        ((1347, 1, 8, 8), (450, 1, 8, 8))
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = (bunch.data.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    y = bunch.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=TEST_FRACTION, stratify=y, random_state=seed
    )
    return (
        np.ascontiguousarray(x_train),
        np.ascontiguousarray(y_train),
        np.ascontiguousarray(x_test),
        np.ascontiguousarray(y_test),
    )


def write_npz(path: str | Path, x: np.ndarray, y: np.ndarray | None = None, input_name: str = "input") -> Path:
    """Write arrays in the DATA format (input name -> batch-first array, ``labels``).

    Args:
        path: destination ``.npz`` file.
        x: model input, batch on axis 0.
        y: optional labels (stored under ``labels``, for training / fine-tuning).
        input_name: the graph input the array feeds.

    Returns:
        The path written.

    Raises:
        ValueError: if ``y`` is given with a batch size different from ``x``'s, or the input is
            named ``labels`` (that key is reserved).
    """
    if input_name == "labels":
        raise ValueError("input_name 'labels' is reserved for the labels array in the DATA format")
    arrays = {input_name: np.asarray(x)}
    if y is not None:
        y = np.asarray(y)
        if y.shape[0] != arrays[input_name].shape[0]:
            raise ValueError(f"labels batch {y.shape[0]} != input batch {arrays[input_name].shape[0]}")
        arrays["labels"] = y
    path = Path(path)
    with path.open("wb") as f:  # np.savez appends '.npz' to a str path without it; a file object keeps the name
        np.savez(f, **arrays)
    return path


def _package_dir(name: str) -> Path | None:
    """Directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def light_model_dir() -> Path:
    """``onnx/backend/test/data/light`` inside the installed onnx wheel (real architectures, stand-in weights).

    Raises:
        FileNotFoundError: onnx is not installed or its wheel lacks the light test data.
    """
    onnx_dir = _package_dir("onnx")
    path = onnx_dir / "backend" / "test" / "data" / "light" if onnx_dir else None
    if path is None or not path.is_dir():
        raise FileNotFoundError("onnx's backend/test/data/light is missing: python3 -m pip install 'onnx>=1.17,<1.24'")
    return path


def light_model_names() -> list[str]:
    """Names ``X`` of every ``light_X.onnx`` in the onnx wheel (resnet50, densenet121, shufflenet, vgg19, ...)."""
    return sorted(p.stem[len("light_"):] for p in light_model_dir().glob("light_*.onnx"))


def rapidocr_model_dir() -> Path:
    """``models/`` of the installed rapidocr_onnxruntime package, found WITHOUT importing it (it imports cv2).

    Raises:
        FileNotFoundError: the package is not installed (the message gives the install command).
    """
    package = _package_dir("rapidocr_onnxruntime")
    if package is None or not (package / "models").is_dir():
        raise FileNotFoundError(f"rapidocr_onnxruntime is not installed; install its models with: {RAPIDOCR_INSTALL}")
    return package / "models"


def held_out_accuracy(model: str | Path, digits: tuple[np.ndarray, ...]) -> float:
    """Held-out digits accuracy computed with onnxruntime alone, to check onnxprune's own metric against."""
    import onnxruntime as ort

    _, _, x_test, y_test = digits
    scores = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"input": x_test})[0]
    return float(np.mean(scores.argmax(axis=1) == y_test))
