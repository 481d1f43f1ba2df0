"""The PP-OCR task harness (tests/tasks/ocr.py): decoding, metrics, rendered data, and the original models' scores.

Fast tests use hand-made arrays; ``slow`` ones run the trained models from the rapidocr wheel on rendered lines
(skipped when the wheel is absent).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxprune.data import InputSpec, open_data
from tests.tasks import ocr

TOY = ["blank", "a", "b", " "]


def _probs(indices: list[list[int]], classes: int = len(TOY)) -> np.ndarray:
    """One-hot-ish probabilities [N, T, C] whose argmax is ``indices``."""
    idx = np.asarray(indices)
    probs = np.full((*idx.shape, classes), 0.1 / classes, dtype=np.float32)
    np.put_along_axis(probs, idx[..., None], 0.9, axis=2)
    return probs


def _model_or_skip(find: Callable[[], Path]) -> Path:
    """The model ``find`` locates, or a skip when the rapidocr wheel is absent."""
    try:
        return find()
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def rec_path() -> Path:
    return _model_or_skip(ocr.rec_model_path)


@pytest.fixture(scope="module")
def cls_path() -> Path:
    return _model_or_skip(ocr.cls_model_path)


# ---------------------------------------------------------------------------------------------- decoding, metrics
def test_ctc_collapses_repeats_then_drops_blank() -> None:
    probs = _probs([[1, 1, 0, 1, 2, 2, 3, 0], [0, 0, 0, 0, 0, 0, 0, 0], [2, 0, 2, 2, 0, 0, 3, 3]])
    assert ocr.ctc_greedy_decode(probs, TOY) == ["aab ", "", "bb "]


def test_ctc_rejects_a_charset_of_another_size() -> None:
    with pytest.raises(ValueError, match="expected"):
        ocr.ctc_greedy_decode(_probs([[1, 2]], classes=5), TOY)


def test_ctc_decoding_matches_rapidocr() -> None:
    """rapidocr's CTCLabelDecode (its utils.py needs only numpy, unlike the package) agrees on random indices."""
    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("rapidocr_onnxruntime is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "ch_ppocr_rec" / "utils.py"
    module_spec = importlib.util.spec_from_file_location("_rapidocr_rec_utils", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    decoder = module.CTCLabelDecode(character=list("abcdefg"))
    assert decoder.character == ocr.charset_from_text("a\nb\nc\nd\ne\nf\ng")
    rng = np.random.default_rng(0)
    probs = rng.random((16, 12, len(decoder.character))).astype(np.float32)
    probs[rng.random((16, 12)) < 0.4, 0] = 2.0  # plenty of blanks and repeats
    assert ocr.ctc_greedy_decode(probs, decoder.character) == [text for text, _ in decoder(probs)]


def test_edit_distance() -> None:
    assert ocr.edit_distance("kitten", "sitting") == 3
    assert ocr.edit_distance("", "abc") == ocr.edit_distance("abc", "") == 3
    assert ocr.edit_distance("flaw", "lawn") == ocr.edit_distance("lawn", "flaw") == 2
    assert ocr.edit_distance("same", "same") == 0


def test_char_and_line_accuracy() -> None:
    assert ocr.char_accuracy(["abcd", "xy"], ["abce", "xy"]) == pytest.approx(1 - 1 / 6)
    assert ocr.char_accuracy(["a very long wrong line"], ["ab"]) == 0.0  # clipped, not negative
    assert ocr.char_accuracy([""], [""]) == 1.0 and ocr.char_accuracy(["x"], [""]) == 0.0
    assert ocr.line_accuracy(["abcd", "xy", "z"], ["abce", "xy", "z"]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        ocr.char_accuracy(["a"], ["a", "b"])


def test_cls_accuracy_takes_scores_or_classes() -> None:
    labels = np.array([0, 1, 1, 0])
    assert ocr.cls_accuracy(np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.7, 0.3]]), labels) == 0.75
    assert ocr.cls_accuracy(np.array([0, 1, 1, 1]), labels) == 0.75


# ---------------------------------------------------------------------------------------------- preprocessing
def test_resize_linear_is_opencv_bilinear() -> None:
    """Half-pixel centres with clamped edges: cv2.resize of [0, 255] to 4 wide gives [0, 64, 191, 255]."""
    row = np.array([[[0], [255]]], dtype=np.uint8)
    assert ocr.resize_linear(row, 4, 1)[0, :, 0].tolist() == [0, 64, 191, 255]
    image = np.random.default_rng(0).integers(0, 256, (7, 9, 3)).astype(np.uint8)
    np.testing.assert_array_equal(ocr.resize_linear(image, 9, 7), image)
    assert ocr.resize_linear(image, 2, 1).shape == (1, 2, 3)


def test_rec_preprocess_keeps_aspect_and_pads_with_zero() -> None:
    line = np.full((24, 40, 3), 255, dtype=np.uint8)  # 5:3 -> 80 wide at height 48
    x = ocr.rec_preprocess(line)
    assert x.shape == (3, 48, 320) and x.dtype == np.float32
    assert np.all(x[:, :, :80] == 1.0) and np.all(x[:, :, 80:] == 0.0)
    wide = ocr.cls_preprocess(np.zeros((10, 100, 3), dtype=np.uint8))  # 10:1 is squashed into 192
    assert wide.shape == ocr.CLS_SHAPE and np.all(wide == -1.0)


# ---------------------------------------------------------------------------------------------- data sets
def test_rec_dataset_is_deterministic() -> None:
    images, texts = ocr.make_rec_dataset(12, seed=3)
    again, texts_again = ocr.make_rec_dataset(12, seed=3)
    _, texts_other = ocr.make_rec_dataset(12, seed=4)
    assert images.shape == (12, 3, 48, ocr.REC_WIDTH) and images.dtype == np.float32
    assert images.min() >= -1.0 and images.max() <= 1.0
    np.testing.assert_array_equal(images, again)
    assert texts == texts_again and texts != texts_other
    assert all(t and t == t.strip() for t in texts)


def test_rec_dataset_texts_are_in_the_charset() -> None:
    _, texts = ocr.make_rec_dataset(32, seed=0)
    try:
        charset = set(ocr.load_charset())
    except FileNotFoundError as e:
        pytest.skip(str(e))
    assert set("".join(texts)) <= charset


def test_cls_dataset_is_balanced_and_deterministic() -> None:
    images, labels = ocr.make_cls_dataset(10, seed=1)
    again, labels_again = ocr.make_cls_dataset(10, seed=1)
    assert images.shape == (10, *ocr.CLS_SHAPE) and images.dtype == np.float32
    assert labels.dtype == np.int64 and sorted(labels.tolist()) == [0] * 5 + [1] * 5
    np.testing.assert_array_equal(images, again)
    np.testing.assert_array_equal(labels, labels_again)


def test_save_npz_round_trips_through_the_data_reader(tmp_path: Path) -> None:
    images, labels = ocr.make_cls_dataset(6, seed=0)
    path = ocr.save_npz(tmp_path / "cls.npz", ocr.INPUT_NAME, images, labels)
    source = open_data(path, [InputSpec(ocr.INPUT_NAME, ("N", 3, 48, 192), np.dtype(np.float32))])
    got = source.load_all(with_labels=True)
    np.testing.assert_array_equal(got[ocr.INPUT_NAME], images)
    np.testing.assert_array_equal(got["labels"], labels)
    with pytest.raises(ValueError, match="integers"):
        ocr.save_npz(tmp_path / "rec.npz", ocr.INPUT_NAME, images, np.array(["text"] * 6))


# ---------------------------------------------------------------------------------------------- the trained models
def test_charset_comes_from_the_model_metadata(rec_path: Path) -> None:
    charset = ocr.load_charset(rec_path)
    assert len(charset) == 6625 and charset[0] == ocr.BLANK and charset[-1] == " "
    assert set("0123456789abcXYZ.,:-") <= set(charset)
    stripped = onnx.load(str(rec_path))
    del stripped.metadata_props[:]
    assert ocr.load_charset(stripped) == charset  # a pruned model without metadata decodes with the original's


@pytest.mark.slow
def test_original_recognizer_reads_rendered_lines(rec_path: Path) -> None:
    images, texts = ocr.make_rec_dataset(64, seed=0)
    scores = ocr.evaluate_rec(rec_path, images, texts, batch=32)
    assert scores["char_acc"] >= 0.95
    assert scores["line_acc"] >= 0.8


@pytest.mark.slow
def test_recognizer_from_bytes_without_metadata_scores_the_same(rec_path: Path) -> None:
    images, texts = ocr.make_rec_dataset(8, seed=5)
    model = onnx.load(str(rec_path))
    del model.metadata_props[:]
    assert ocr.evaluate_rec(model.SerializeToString(), images, texts, batch=4) == ocr.evaluate_rec(
        rec_path, images, texts)


@pytest.mark.slow
def test_original_classifier_tells_upright_from_rotated(cls_path: Path) -> None:
    images, labels = ocr.make_cls_dataset(64, seed=0)
    assert ocr.evaluate_cls(cls_path, images, labels, batch=32)["top1"] >= 0.95


def test_text_labels_index_the_models_table() -> None:
    labels = ocr.text_labels(["ab", "b a", ""], TOY)
    assert labels.tolist() == [[1, 2, -1], [2, 3, 1], [-1, -1, -1]]
    with pytest.raises(ValueError, match="not in the model's table"):
        ocr.text_labels(["abc"], TOY)


@pytest.mark.slow
def test_metric_ctc_is_the_recognizers_character_accuracy(rec_path: Path, tmp_path: Path) -> None:
    """``--metric ctc`` through the CLI, on rendered lines labelled through the model's table, gives the same
    character accuracy as this module's independent decoding, for the original and for a damaged cut."""
    import json

    from onnxprune import cli

    images, texts = ocr.make_rec_dataset(48, seed=11)
    data = ocr.save_npz(tmp_path / "lines.npz", ocr.INPUT_NAME, images, ocr.text_labels(texts, ocr.load_charset()))
    out, report = tmp_path / "small.onnx", tmp_path / "report.json"
    assert cli.main(["prune", str(rec_path), "-o", str(out), "--ratio", "0.15", "--eval-data", str(data),
                     "--metric", "ctc", "--report", str(report)]) == 0
    metric = json.loads(report.read_text())["metric"]
    assert (metric["name"], metric["label"]) == ("ctc", "char_accuracy")
    # unstripped readings: the metric knows no characters, so an edge space the model emits counts as an error
    original = ocr.char_accuracy(ocr.predict_rec(rec_path, images), texts)
    pruned = ocr.char_accuracy(ocr.predict_rec(out, images, charset=ocr.load_charset()), texts)
    assert metric["original"] == pytest.approx(original, abs=1e-9) and original > 0.95
    assert metric["pruned"] == pytest.approx(pruned, abs=1e-9) and pruned < original - 0.05
