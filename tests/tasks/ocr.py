"""PP-OCR as a real task: rendered text lines with known ground truth, rapidocr's preprocessing, the task metrics.

Why: a pruned recognizer is only good if it still reads text; cosine similarity on noise says little. The trained
models ship in the ``rapidocr-onnxruntime==1.4.4`` wheel; the data is rendered here with PIL and the TTF fonts inside
matplotlib's wheel, so there is ground truth without downloads.

Everything rapidocr does is re-implemented after its 1.4.4 source, because its package imports ``cv2`` (not a
dependency here) and so cannot be imported:

* ``ch_ppocr_rec/text_recognize.py`` ``resize_norm_img``: height 48, width ``ceil(48 * w / h)`` capped at the batch
  width (at least 320, ``rec_img_shape: [3, 48, 320]``), ``cv2.resize`` (bilinear, half-pixel centres, no
  antialiasing), ``x / 255``, ``(x - 0.5) / 0.5``, zero padding on the right (0 after normalisation = mid grey).
* ``ch_ppocr_rec/utils.py`` ``CTCLabelDecode``: the character list is the session metadata ``character`` split with
  ``str.splitlines()``, then ``" "`` appended and ``"blank"`` inserted at index 0 (unconditionally, there is no
  ``use_space_char`` switch); greedy argmax, repeats collapsed, index 0 dropped.
* ``ch_ppocr_cls/text_cls.py``: ``cls_image_shape: [3, 48, 192]``, the same normalisation, lines wider than 4:1
  squashed to 192; ``label_list: ['0', '180']`` so class 1 means "rotated 180 degrees".

Example:
    >>> from tests.tasks import ocr
    >>> images, texts = ocr.make_rec_dataset(8, seed=0)
    >>> ocr.evaluate_rec(ocr.rec_model_path(), images, texts)["char_acc"] > 0.9
    True
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
import string
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx

from tests.data import rapidocr_model_dir, write_npz

REC_MODEL = "ch_PP-OCRv4_rec_infer.onnx"
CLS_MODEL = "ch_ppocr_mobile_v2.0_cls_infer.onnx"
INPUT_NAME = "x"  # both models' only input, NCHW float32
REC_HEIGHT = 48
REC_WIDTH = 320  # rapidocr's rec_img_shape[2]: the narrowest batch it builds; the output has REC_WIDTH / 8 steps
CLS_SHAPE = (3, 48, 192)
CLS_MIN_RATIO = 3.0  # classifier lines are at least 3:1 (see make_cls_dataset)
CLS_LABELS = ("0", "180")  # rapidocr's label_list: class index 1 = rotated 180 degrees
BLANK = "blank"  # rapidocr's placeholder at index 0 (the CTC blank); never emitted by decoding
CHARSET_KEY = "character"
DICT_FILE = "ppocr_keys_v1.txt"

ModelLike = str | os.PathLike | bytes | onnx.ModelProto

FONT_FILES = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf",
    "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf",
    "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf",
    "STIXGeneral.ttf", "STIXGeneralBol.ttf",
)
PUNCTUATION = ".,:;-/()%$#&+=@!?*"  # ASCII marks that the ch recognizer returns as ASCII (see _mixed)
LOOKALIKES = "O0Il1"  # left out of context-free random strings (codes, mixes); words and numbers keep them
WORDS = (  # noqa: SIM905 - one readable block of words, not 350 quoted items
    "about after again air all also and animal another answer any are around ask away back base because been before "
    "began being below best better between big black blue board body book both box boy bring build but call came can "
    "car carry case cat center change check city class clear close cold color come common control could country "
    "course cover cross cut dark data day deep did different direction does dog done door down draw during each early "
    "earth east easy end enough even every example eye face fact family far farm fast father feel few field figure "
    "file find fire first fish five follow food foot force form found four free friend from front full game gave "
    "general get girl give good government great green ground group grow had half hand hard have head hear heat help "
    "here high hold home horse hot hour house how however idea important inch input island just keep kind king know "
    "land language large last late learn leave left less letter life light line list little live long look low machine "
    "made main make man many map mark matter may mean measure men might mile mind minute model money moon more morning "
    "most mother mountain move much music must name near need never new next night north note nothing notice number "
    "object ocean office often old once only open order other out output over own page paper part pass people person "
    "picture piece place plan plant play point power press problem product program pull question quick rain ran read "
    "real record red remember rest right river road rock room round rule run same saw say school science sea second "
    "section see sentence set several shape ship short should show side simple since size small snow some song sound "
    "south space special stand star start state stay step still stone stood stop story street strong study such summer "
    "sun sure system table take tail talk test text than that their them then there these thing think three through "
    "time together took top toward town travel tree true try turn under unit until upon use usual value very voice "
    "walk wall want warm watch water way weather week weight well went west what wheel where which while white whole "
    "why wind window winter with within without wood word work world would write year yellow young"
).split()


# --------------------------------------------------------------------------------------------------------------
# Models and the character list
# --------------------------------------------------------------------------------------------------------------
def model_path(name: str) -> Path:
    """Path of one model inside the installed rapidocr wheel (located without importing the package: it needs cv2).

    Raises:
        FileNotFoundError: rapidocr_onnxruntime is not installed or lacks the model (the message says how to install).
    """
    path = rapidocr_model_dir() / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; the rapidocr_onnxruntime wheel lacks {name}")
    return path


def rec_model_path() -> Path:
    """The PP-OCRv4 recognizer: input x [N, 3, 48, W], output Softmax probabilities [N, W / 8, 6625]."""
    return model_path(REC_MODEL)


def cls_model_path() -> Path:
    """The mobile v2.0 direction classifier: input x [N, 3, 48, 192], output Softmax [N, 2] (1 = rotated 180)."""
    return model_path(CLS_MODEL)


def charset_from_text(characters: str) -> list[str]:
    """rapidocr's decoding table from the metadata text: blank, the characters (``splitlines``), then a space."""
    return [BLANK, *characters.splitlines(), " "]


def _metadata_characters(model: ModelLike) -> str | None:
    """The ``character`` metadata value of a model, or None (pruned models may have lost it)."""
    if isinstance(model, onnx.ModelProto):
        proto = model
    elif isinstance(model, bytes):
        proto = onnx.load_from_string(model)
    else:
        proto = onnx.load(os.fspath(model), load_external_data=False)
    return next((p.value for p in proto.metadata_props if p.key == CHARSET_KEY), None)


def _dict_file() -> Path | None:
    """rapidocr's character dictionary file, if this version of the wheel ships one (1.4.4 does not)."""
    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        return None
    return next(Path(next(iter(spec.submodule_search_locations))).rglob(DICT_FILE), None)


@functools.cache
def _original_charset() -> tuple[str, ...]:
    """The original recognizer's table: its metadata, else the wheel's dictionary read as rapidocr reads it."""
    characters = _metadata_characters(rec_model_path())
    if characters is not None:
        return tuple(charset_from_text(characters))
    dict_file = _dict_file()
    if dict_file is None:
        raise FileNotFoundError(f"{REC_MODEL} carries no {CHARSET_KEY!r} metadata and no {DICT_FILE} was found")
    # rapidocr's read_character_file: one character per line, '\n' / '\r\n' stripped
    with dict_file.open("rb") as f:
        lines = [line.decode("utf-8").strip("\n").strip("\r\n") for line in f.readlines()]
    return (BLANK, *lines, " ")


def load_charset(model: ModelLike | None = None) -> list[str]:
    """The decoding table (index = class) of ``model``, else of the original recognizer.

    The character list lives in the model's metadata; a pruned model keeps the class axis but may have dropped the
    metadata, so the original recognizer's list (or the wheel's dictionary file) is the fallback.
    """
    characters = _metadata_characters(model) if model is not None else None
    return charset_from_text(characters) if characters is not None else list(_original_charset())


# --------------------------------------------------------------------------------------------------------------
# Rendering text lines
# --------------------------------------------------------------------------------------------------------------
def font_dir() -> Path:
    """``matplotlib/mpl-data/fonts/ttf`` of the installed matplotlib wheel (found without importing matplotlib)."""
    spec = importlib.util.find_spec("matplotlib")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("matplotlib is not installed; its wheel ships the fonts used to render text lines")
    return Path(next(iter(spec.submodule_search_locations))) / "mpl-data" / "fonts" / "ttf"


def font_paths() -> list[Path]:
    """The fonts lines are rendered with (those of FONT_FILES present in the wheel, at least one)."""
    paths = [font_dir() / name for name in FONT_FILES if (font_dir() / name).is_file()]
    if not paths:
        raise FileNotFoundError(f"none of {FONT_FILES} in {font_dir()}")
    return paths


@functools.lru_cache(maxsize=256)
def _font(path: str, size: int):  # -> PIL.ImageFont.FreeTypeFont
    from PIL import ImageFont

    return ImageFont.truetype(path, size)


def _strip_lookalikes(alphabet: str) -> str:
    """Drop LOOKALIKES: without words around them, O/0 and I/l/1 are the same glyph in several fonts."""
    return "".join(c for c in alphabet if c not in LOOKALIKES)


def _word(rng: np.random.Generator) -> str:
    word = WORDS[int(rng.integers(len(WORDS)))]
    case = rng.random()
    return word.upper() if case < 0.15 else word.title() if case < 0.45 else word


def _number(rng: np.random.Generator) -> str:
    kind = int(rng.integers(6))
    if kind == 0:
        return str(int(rng.integers(0, 10 ** int(rng.integers(1, 8)))))
    if kind == 1:
        return f"{rng.uniform(0, 1000):.{int(rng.integers(1, 4))}f}"
    if kind == 2:
        return f"{int(rng.integers(1990, 2031))}-{int(rng.integers(1, 13)):02d}-{int(rng.integers(1, 29)):02d}"
    if kind == 3:
        return f"{int(rng.integers(0, 24)):02d}:{int(rng.integers(0, 60)):02d}"
    if kind == 4:
        return f"${rng.uniform(0, 500):.2f}"
    return f"{int(rng.integers(0, 101))}%"


def _code(rng: np.random.Generator) -> str:
    alphabet = _strip_lookalikes(string.ascii_uppercase + string.digits)
    parts = ["".join(rng.choice(list(alphabet), size=int(rng.integers(2, 5)))) for _ in range(int(rng.integers(1, 3)))]
    return "-".join(parts)


def _mixed(rng: np.random.Generator) -> str:
    """Letters, digits and punctuation with no dictionary help (the hardest lines)."""
    alphabet = _strip_lookalikes(string.ascii_letters + string.digits + PUNCTUATION)
    return "".join(rng.choice(list(alphabet), size=int(rng.integers(3, 11))))


def random_text(rng: np.random.Generator) -> str:
    """One short line: words, numbers (dates, prices, times), codes, or a random mix of letters/digits/marks."""
    style = rng.random()
    if style < 0.35:
        return " ".join(_word(rng) for _ in range(int(rng.integers(1, 3))))
    if style < 0.55:
        return _number(rng)
    if style < 0.65:
        return _code(rng)
    if style < 0.8:
        return f"{_word(rng)}{rng.choice([': ', ' ', ' #', ', '])}{_number(rng)}"
    return _mixed(rng)


def render_line(text: str, rng: np.random.Generator, fonts: Sequence[Path] | None = None) -> np.ndarray:
    """Render ``text`` as a tight text-line crop, like a detector box: uint8 [H, W, 3], dark text on a light ground.

    Varies the font, size (26-40 px), margins, grey levels and adds mild Gaussian noise; deterministic given rng.
    The vertical extent is the font's ``Hg`` box (so lines of one font and size share a height), widened by the text.
    """
    from PIL import Image, ImageDraw

    fonts = list(fonts) if fonts is not None else font_paths()
    font = _font(str(fonts[int(rng.integers(len(fonts)))]), int(rng.integers(26, 41)))
    ref, box = font.getbbox("Hg"), font.getbbox(text)
    left, top, right, bottom = box[0], min(ref[1], box[1]), box[2], max(ref[3], box[3])
    height = bottom - top
    m_top, m_bottom = (int(v) for v in rng.integers(1, max(2, height // 6) + 1, size=2))
    m_left, m_right = (int(v) for v in rng.integers(1, max(2, height // 3) + 1, size=2))
    background, ink = int(rng.integers(185, 256)), int(rng.integers(0, 80))
    image = Image.new("L", (right - left + m_left + m_right, height + m_top + m_bottom), background)
    ImageDraw.Draw(image).text((m_left - left, m_top - top), text, font=font, fill=ink)
    pixels = np.asarray(image, dtype=np.float32)
    pixels = pixels + rng.normal(0.0, rng.uniform(0.0, 6.0), pixels.shape)
    gray = np.clip(np.floor(pixels + 0.5), 0, 255).astype(np.uint8)
    return np.repeat(gray[:, :, None], 3, axis=2)  # BGR as rapidocr's loader gives; grey so the order is moot


# --------------------------------------------------------------------------------------------------------------
# rapidocr's preprocessing
# --------------------------------------------------------------------------------------------------------------
def _linear_taps(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights of OpenCV's INTER_LINEAR along one axis (half-pixel centres, edges clamped)."""
    pos = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    i0 = np.floor(pos).astype(np.int64)
    frac = pos - i0
    frac[i0 < 0] = 0.0
    i0 = np.clip(i0, 0, n_in - 1)
    i1 = np.clip(i0 + 1, 0, n_in - 1)
    return i0, i1, frac


def resize_linear(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """``cv2.resize(image, (width, height))`` for uint8 [H, W, C]: bilinear without antialiasing (within 1 level).

    PIL's BILINEAR widens its kernel when shrinking, so it would not match what the models were trained with.
    """
    y0, y1, fy = _linear_taps(height, image.shape[0])
    x0, x1, fx = _linear_taps(width, image.shape[1])
    src = image.astype(np.float64)
    fy = fy[:, None, None] if src.ndim == 3 else fy[:, None]
    rows = src[y0] * (1.0 - fy) + src[y1] * fy
    fx = fx[None, :, None] if src.ndim == 3 else fx[None, :]
    out = rows[:, x0] * (1.0 - fx) + rows[:, x1] * fx
    return np.clip(np.floor(out + 0.5), 0, 255).astype(np.uint8)


def resize_norm(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """rapidocr's ``resize_norm_img``: keep the aspect ratio at ``height`` (squash to ``width`` if wider), map to
    [-1, 1], zero-pad on the right. uint8 [H, W, 3] -> float32 [3, height, width]."""
    h, w = image.shape[:2]
    resized_w = min(width, math.ceil(height * w / float(h)))
    resized = resize_linear(image, resized_w, height).astype(np.float32).transpose(2, 0, 1) / 255
    out = np.zeros((image.shape[2], height, width), dtype=np.float32)
    out[:, :, :resized_w] = (resized - 0.5) / 0.5
    return out


def rec_preprocess(image: np.ndarray, width: int = REC_WIDTH) -> np.ndarray:
    """Recognizer input for one line, as rapidocr builds it in a batch whose widest line fits ``width``."""
    return resize_norm(image, REC_HEIGHT, width)


def cls_preprocess(image: np.ndarray) -> np.ndarray:
    """Classifier input for one line: [3, 48, 192] (lines wider than 4:1 are squashed, as rapidocr does)."""
    return resize_norm(image, CLS_SHAPE[1], CLS_SHAPE[2])


# --------------------------------------------------------------------------------------------------------------
# Data sets
# --------------------------------------------------------------------------------------------------------------
def make_lines(n: int, rng: np.random.Generator, max_ratio: float, min_ratio: float = 0.0, tries: int = 50
               ) -> list[tuple[np.ndarray, str]]:
    """``n`` rendered lines ``(image, text)`` with width/height ratio in [min_ratio, max_ratio] (max: none squashed).

    A line out of range is redrawn with a new text; after ``tries`` a too-wide one is shortened a character at a time
    (a too-narrow one is kept).
    """
    fonts = font_paths()
    lines = []
    for _ in range(n):
        for _ in range(tries):
            text = random_text(rng)
            image = render_line(text, rng, fonts)
            if min_ratio * image.shape[0] <= image.shape[1] <= max_ratio * image.shape[0]:
                break
        while image.shape[1] > max_ratio * image.shape[0] and len(text) > 1:
            text = text[:-1].rstrip()
            image = render_line(text, rng, fonts)
        lines.append((image, text))
    return lines


def make_rec_dataset(n: int, seed: int = 0, width: int = REC_WIDTH) -> tuple[np.ndarray, list[str]]:
    """``n`` recognizer inputs float32 [N, 3, 48, width] and their texts; deterministic given ``seed``.

    Every line fits ``width`` at height 48 unsquashed, so a batch is exactly what rapidocr feeds for such lines.
    """
    rng = np.random.default_rng([seed, 0])
    lines = make_lines(n, rng, max_ratio=width / REC_HEIGHT)
    images = np.zeros((n, 3, REC_HEIGHT, width), dtype=np.float32)
    for i, (image, _) in enumerate(lines):
        images[i] = rec_preprocess(image, width)
    return images, [text for _, text in lines]


def make_cls_dataset(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` classifier inputs float32 [N, 3, 48, 192] and labels int64 [N] (0 upright, 1 rotated 180 degrees).

    Half the lines (a seeded permutation) are rotated. Lines are 3:1 to 320:48 wide (some squashed to 192, as
    rapidocr does): one to three glyphs ("9", "HOW", "SOS") often look the same upside down, so they have no truth.
    """
    rng = np.random.default_rng([seed, 1])
    lines = make_lines(n, rng, max_ratio=REC_WIDTH / REC_HEIGHT, min_ratio=CLS_MIN_RATIO)
    labels = rng.permutation(np.arange(n) % 2).astype(np.int64)
    images = np.zeros((n, *CLS_SHAPE), dtype=np.float32)
    for i, ((image, _), label) in enumerate(zip(lines, labels)):
        images[i] = cls_preprocess(image[::-1, ::-1] if label else image)
    return images, labels


def save_npz(path: str | os.PathLike, input_name: str, images: np.ndarray, labels: np.ndarray | None = None) -> Path:
    """Write the project's DATA format: ``{input_name: images, "labels": labels}``, batch on axis 0.

    Raises:
        ValueError: labels are text (the DATA reader casts labels to int64; keep recognizer texts elsewhere),
            their batch differs from the images', or ``input_name`` is ``labels``.
    """
    if labels is not None:
        labels = np.asarray(labels)
        if labels.dtype.kind not in "biu":
            raise ValueError(f"labels must be integers (got dtype {labels.dtype}); the DATA format casts them to int64")
    return write_npz(path, images, labels, input_name=input_name)


# --------------------------------------------------------------------------------------------------------------
# Decoding and metrics
# --------------------------------------------------------------------------------------------------------------
def text_labels(texts: Sequence[str], charset: Sequence[str]) -> np.ndarray:
    """Texts as ``--metric ctc`` labels: int64 [N, L] indices into ``charset`` (0 is the blank), padded with -1.

    Raises:
        ValueError: a character the table does not have (the model could never read it).
    """
    index = {c: i for i, c in enumerate(charset) if i}
    width = max((len(t) for t in texts), default=0)
    labels = np.full((len(texts), max(width, 1)), -1, dtype=np.int64)
    for row, text in enumerate(texts):
        missing = sorted(set(text) - set(index))
        if missing:
            raise ValueError(f"characters {missing} of {text!r} are not in the model's table")
        labels[row, :len(text)] = [index[c] for c in text]
    return labels


def ctc_decode_indices(indices: np.ndarray, charset: Sequence[str]) -> list[str]:
    """Greedy CTC on argmax indices [N, T]: collapse repeats, then drop the blank (index 0), as rapidocr does."""
    indices = np.asarray(indices)
    keep = np.ones(indices.shape, dtype=bool)
    keep[:, 1:] = indices[:, 1:] != indices[:, :-1]
    keep &= indices != 0
    return ["".join(charset[i] for i in row[mask]) for row, mask in zip(indices, keep)]


def ctc_greedy_decode(probs: np.ndarray, charset: Sequence[str]) -> list[str]:
    """Texts of [N, T, C] class scores (probabilities or logits: only the argmax matters).

    Raises:
        ValueError: ``C`` differs from the charset's length (a model and a table that do not belong together).
    """
    probs = np.asarray(probs)
    if probs.ndim != 3 or probs.shape[2] != len(charset):
        raise ValueError(f"expected [N, T, {len(charset)}] scores, got shape {list(probs.shape)}")
    return ctc_decode_indices(probs.argmax(axis=2), charset)


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (unit insert, delete, substitute), two-row dynamic programme."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def char_accuracy(preds: Sequence[str], truths: Sequence[str]) -> float:
    """``1 - sum(edit distance) / sum(len(truth))``, clipped at 0 (all-empty truths: 1 iff all preds are empty)."""
    if len(preds) != len(truths):
        raise ValueError(f"{len(preds)} predictions for {len(truths)} truths")
    total = sum(len(t) for t in truths)
    errors = sum(edit_distance(p, t) for p, t in zip(preds, truths))
    if total == 0:
        return 1.0 if errors == 0 else 0.0
    return max(0.0, 1.0 - errors / total)


def line_accuracy(preds: Sequence[str], truths: Sequence[str]) -> float:
    """Fraction of lines read exactly."""
    if len(preds) != len(truths):
        raise ValueError(f"{len(preds)} predictions for {len(truths)} truths")
    return float(np.mean([p == t for p, t in zip(preds, truths)])) if truths else 1.0


def cls_accuracy(scores: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of [N, C] scores (or [N] predicted classes) against int labels [N]."""
    scores, labels = np.asarray(scores), np.asarray(labels)
    predicted = scores.argmax(axis=1) if scores.ndim == 2 else scores
    if predicted.shape != labels.shape:
        raise ValueError(f"{predicted.shape[0]} predictions for {labels.shape[0]} labels")
    return float(np.mean(predicted == labels)) if labels.size else 1.0


# --------------------------------------------------------------------------------------------------------------
# Running the models
# --------------------------------------------------------------------------------------------------------------
def session(model: ModelLike):  # -> onnxruntime.InferenceSession
    """A CPU onnxruntime session for a path, serialized bytes or a ModelProto."""
    import onnxruntime as ort

    if isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    source = model if isinstance(model, bytes) else os.fspath(model)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def run_batches(model: ModelLike, images: np.ndarray, batch: int = 32) -> Iterator[np.ndarray]:
    """The first output for consecutive batches of ``images`` (bounded memory: one batch's output at a time)."""
    if batch < 1:
        raise ValueError("batch must be >= 1")
    sess = session(model)
    name = sess.get_inputs()[0].name
    for start in range(0, len(images), batch):
        yield sess.run(None, {name: np.ascontiguousarray(images[start : start + batch], dtype=np.float32)})[0]


def predict_rec(model: ModelLike, images: np.ndarray, batch: int = 32,
                charset: Sequence[str] | None = None) -> list[str]:
    """Texts the recognizer reads from preprocessed ``images`` (charset: the model's own, else the original's)."""
    charset = list(charset) if charset is not None else load_charset(model)
    texts: list[str] = []
    for probs in run_batches(model, images, batch):
        texts.extend(ctc_greedy_decode(probs, charset))
    return texts


def evaluate_rec(model: ModelLike, images: np.ndarray, texts: Sequence[str], batch: int = 32,
                 charset: Sequence[str] | None = None) -> dict[str, float]:
    """``{"char_acc", "line_acc"}`` of a recognizer on preprocessed ``images`` with ground-truth ``texts``.

    Predictions are stripped first: the crop's margins make the model emit edge spaces now and then (truths have
    none), which no consumer of a text line counts as an error. Spaces inside the line are scored.
    """
    preds = [text.strip() for text in predict_rec(model, images, batch, charset)]
    return {"char_acc": char_accuracy(preds, texts), "line_acc": line_accuracy(preds, texts)}


def evaluate_cls(model: ModelLike, images: np.ndarray, labels: np.ndarray, batch: int = 32) -> dict[str, float]:
    """``{"top1"}`` of a direction classifier on preprocessed ``images`` (labels: 0 upright, 1 rotated 180)."""
    predicted = np.concatenate([out.argmax(axis=1) for out in run_batches(model, images, batch)])
    return {"top1": cls_accuracy(predicted, labels)}
