"""Use a trained model on photos and videos: find faces, crop them like FER2013, classify.

Pipeline: decode the photo (large JPEGs are decoded at 1/2, 1/4 or 1/8 scale directly, so an
8000x6000 photo never exists in memory at full size; limits below) -> grayscale -> OpenCV
Haar cascade `haarcascade_frontalface_default.xml` (shipped inside opencv-python-headless 4.x as
`cv2.data.haarcascades`; nothing is downloaded; opencv 5 dropped the cascades) on a copy whose
longest side is at most 1600 px -> square crop of each box (no margin: see below) -> 48x48
(cv2.INTER_AREA) -> normalise with the mean/std stored next to the weights -> model, averaging
the softmax of the image and of its mirror image (flip TTA) -> boxes mapped back to the
pixel coordinates of the original (EXIF-rotated) photo.

Why no margin (DEFAULT_MARGIN = 0.0): FER2013 faces were cropped by a face detector and
registered, and the Haar frontal-face box already matches that framing. Measured on FER2013
Training images upscaled 4x and pasted into a canvas: the cascade's box covered a median
0.96-0.97 of the 48x48 crop side, centred (interquartile range 0.88-1.05; 1,500 images, three
ways of pasting), and re-cropping the detected box gave the highest median pixel correlation
with the original 48x48 face at margin 0 (0.76 at margin 0, 0.71 at 0.02, 0.62 at 0.05, 0.42
at 0.10, 0.30 at 0.15 per side; ~730 faces, two canvases). A 10-20% margin would show more
hair, ears and background than the network saw in training. `margin` stays a parameter.

Limits, so that any file (a 200 MP phone photo, a 1 MB PNG claiming 30000x30000 pixels)
is either predicted or refused with one error, within 1 GB of memory:
- The header is read first (PIL, size/format/EXIF orientation only; PIL's decompression-bomb
  limit is lifted for that read alone), for any image size. Files PIL cannot identify are
  refused: their size cannot be known before decoding.
- MAX_DECODE_PIXELS (50 MP): the most pixels a decoder may hold for one photo. Baseline JPEGs
  count at the size they are decoded at (1/2, 1/4 or 1/8 of the original, so a JPEG up to
  ~3,200 MP is fine); PNG, WebP, TIFF, BMP, GIF and progressive JPEGs count at full size,
  because their decoders fill the full image before it is reduced. Beyond it:
  ImageTooLargeError naming the file, its size and what to do. Measured peak RSS of a whole
  `python -m fer_lib predict --out` (tests/test_hostile.py): 0.68 GB for a small photo
  (`import torch` alone: 0.52 GB), 0.74 GB for 200 MP + 108 MP JPEGs plus a refused
  30000x30000 PNG, 0.88 GB for a 50 MP PNG (the worst accepted case).
- Annotated photos and video frames are written at most ANNOTATED_MAX_SIDE (2048) px on the
  longest side; smaller ones at their own size.

Results are plain lists of dicts, ready for JSON:
    [{"box": [x, y, w, h], "label": "Happy", "probabilities": {"Angry": 0.01, ...}}, ...]
"""
from __future__ import annotations

import contextlib
import functools
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import cv2
import numpy as np
import torch
from torch import nn

from fer_lib.fileio import atomic_path, atomic_write_bytes
from fer_lib.inference import predict_probs
from fer_lib.weights_io import shipped_weights_path

CASCADE_FILE = "haarcascade_frontalface_default.xml"
DEFAULT_MARGIN = 0.0
DETECT_MAX_SIDE = 1600
DEFAULT_MIN_FACE_SIZE = 30
CROP_SIZE = 48
# The most pixels a decoder may hold for one photo (about 50 MB gray, 150 MB BGR): with torch
# and OpenCV loaded (~0.7 GB) a prediction stays under 1 GB of memory whatever the file.
MAX_DECODE_PIXELS = 50_000_000
# Annotated photos and video frames are written at most this many pixels on the longest side.
ANNOTATED_MAX_SIDE = 2048

Box = tuple[int, int, int, int]
# A file path, a uint8 gray/BGR array, or a PIL image (PIL is not imported for the hint).
ImageInput = Union[str, os.PathLike, np.ndarray, Any]


class PredictionError(ValueError):
    """A photo, video or weights file cannot be used for prediction (message names it)."""


class ImageReadError(PredictionError):
    """The file is missing, not an image, or cannot be decoded."""


class ImageTooLargeError(ImageReadError):
    """Decoding the image would hold more than MAX_DECODE_PIXELS pixels at once."""


class NoFaceError(PredictionError):
    """The face detector found no face in the image."""


class MissingWeightsError(PredictionError):
    """No weights were given and fer_lib ships no default model yet."""


# --------------------------------------------------------------------------- image input

_EXIF_ORIENTATION = 0x0112
# Formats OpenCV decodes straight at 1/2, 1/4 or 1/8 size (libjpeg's scaled decoding) when they
# are baseline JPEGs. A progressive JPEG keeps every DCT coefficient of the full image while
# decoding, and PNG, WebP, TIFF, BMP and GIF are decoded at full size before OpenCV reduces
# them, so for those the full size is what the decoder holds.
_SCALED_DECODE_FORMATS = ("JPEG", "MPO")
# PIL's "decompression bomb" limit guards PIL's own decoding; fer_lib lifts it only while PIL
# reads a header (its own limit, MAX_DECODE_PIXELS, applies before any pixel is decoded). The
# lock keeps two threads of this module from restoring each other's value.
_PIL_LIMIT_LOCK = threading.Lock()


@dataclass(frozen=True)
class ImageHeader:
    """What an image file's header says, read without decoding pixels."""

    width: int
    height: int
    format: str  # PIL's format name: "JPEG", "PNG", "WEBP", ...
    orientation: int  # EXIF orientation 1-8 (1 = as stored)
    progressive: bool  # a progressive JPEG (decoded at full size, see decode_pixels)

    def decode_pixels(self, reduction: int) -> int:
        """Pixels the decoder holds at once when asked for 1/reduction size."""
        if self.format in _SCALED_DECODE_FORMATS and not self.progressive:
            return -(-self.width // reduction) * -(-self.height // reduction)
        return self.width * self.height


def _apply_orientation(image: np.ndarray, orientation: int) -> np.ndarray:
    """Rotate/flip decoded pixels the way the EXIF orientation tag asks (values 1-8).

    Done by hand because OpenCV applies the tag for full-size decodes but not for its
    reduced-size (IMREAD_REDUCED_*) decodes; decoding with IMREAD_IGNORE_ORIENTATION and
    rotating here gives the same picture whatever the reduction.
    """
    if orientation == 2:
        return cv2.flip(image, 1)
    if orientation == 3:
        return cv2.rotate(image, cv2.ROTATE_180)
    if orientation == 4:
        return cv2.flip(image, 0)
    if orientation == 5:
        return cv2.transpose(image)
    if orientation == 6:
        return cv2.rotate(image, cv2.ROTATE_90_CLOCKWISE)
    if orientation == 7:
        return cv2.rotate(cv2.transpose(image), cv2.ROTATE_180)
    if orientation == 8:
        return cv2.rotate(image, cv2.ROTATE_90_COUNTERCLOCKWISE)
    return image


@contextlib.contextmanager
def _pil_header_only() -> Iterator[None]:
    """Lift PIL's decompression-bomb limit for a header read (PIL decodes no pixels here)."""
    from PIL import Image

    with _PIL_LIMIT_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _exif_orientation(image: Any) -> int:
    """EXIF orientation 1-8 of an opened (not loaded) PIL image; 1 when absent or broken."""
    # Pillow's PngImageFile.getexif() decodes the whole image to look for an eXIf chunk after
    # the pixel data; only an eXIf chunk the header already gave is read.
    if image.format == "PNG" and "exif" not in image.info:
        return 1
    try:
        orientation = int(image.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # noqa: BLE001 - a broken EXIF block must not stop prediction
        return 1
    return orientation if 1 <= orientation <= 8 else 1


def read_header(path: str | os.PathLike) -> ImageHeader:
    """Size, format and EXIF orientation of an image file, from its header, for any size.

    Raises ImageReadError naming the file when PIL does not recognise it as an image (fer_lib
    decodes only what it can size first, so that memory stays bounded).
    """
    path = Path(path)
    try:
        from PIL import Image

        with _pil_header_only(), Image.open(path) as image:
            width, height = image.size
            fmt = (image.format or "").upper()
            progressive = bool(image.info.get("progressive") or image.info.get("progression"))
            orientation = _exif_orientation(image)
    except Exception as exc:  # noqa: BLE001 - hostile headers raise many types; all mean this
        raise ImageReadError(f"{path}: not an image, or a corrupt/unsupported image file "
                             f"({type(exc).__name__})") from exc
    return ImageHeader(width, height, fmt, orientation, progressive)


def _choose_reduction(header: ImageHeader, max_side: int | None) -> int:
    """The largest of 8, 4, 2 that keeps the longest side >= max_side, else 1."""
    if max_side is None:
        return 1
    for factor in (8, 4, 2):
        if max(header.width, header.height) / factor >= max_side:
            return factor
    return 1


def _check_decode_size(path: Path, header: ImageHeader, reduction: int) -> None:
    held = header.decode_pixels(reduction)
    if held <= MAX_DECODE_PIXELS:
        return
    kind = f"progressive {header.format}" if header.progressive else header.format
    how = ("decoded at reduced size" if held < header.width * header.height
           else f"a {kind} is decoded at full size")
    raise ImageTooLargeError(
        f"{path}: {header.width}x{header.height} {kind} ({header.width * header.height / 1e6:.0f} "
        f"MP) would need {held / 1e6:.0f} MP in memory ({how}); fer_lib decodes at most "
        f"{MAX_DECODE_PIXELS / 1e6:.0f} MP. Downscale it first, or save it as a baseline JPEG "
        "(decoded straight at 1/8 size)")


def read_image(path: str | os.PathLike, *, grayscale: bool = True,
               max_side: int | None = DETECT_MAX_SIDE) -> tuple[np.ndarray, float]:
    """Decode an image file; return (pixels, scale) with scale = original px per returned px.

    With `max_side`, large images are decoded at the largest reduction 1/2, 1/4 or 1/8 that
    still keeps the longest side >= max_side (baseline JPEGs decode straight at that size;
    other formats are reduced right after a full-size decode). The EXIF orientation is applied.
    Returns uint8 (H, W) when grayscale, else BGR (H, W, 3). Raises ImageReadError naming the
    file, ImageTooLargeError when the decoder would hold more than MAX_DECODE_PIXELS.
    """
    path = Path(path)
    if not path.exists():
        raise ImageReadError(f"{path}: file not found")
    if path.is_dir():
        raise ImageReadError(f"{path}: is a folder, not an image file")
    header = read_header(path)
    reduction = _choose_reduction(header, max_side)
    _check_decode_size(path, header, reduction)
    flags = {
        (True, 1): cv2.IMREAD_GRAYSCALE, (True, 2): cv2.IMREAD_REDUCED_GRAYSCALE_2,
        (True, 4): cv2.IMREAD_REDUCED_GRAYSCALE_4, (True, 8): cv2.IMREAD_REDUCED_GRAYSCALE_8,
        (False, 1): cv2.IMREAD_COLOR, (False, 2): cv2.IMREAD_REDUCED_COLOR_2,
        (False, 4): cv2.IMREAD_REDUCED_COLOR_4, (False, 8): cv2.IMREAD_REDUCED_COLOR_8,
    }[(grayscale, reduction)] | cv2.IMREAD_IGNORE_ORIENTATION
    try:
        # np.fromfile + imdecode instead of cv2.imread: imread cannot open non-ASCII paths on
        # Windows and says nothing about why it failed.
        data = np.fromfile(path, dtype=np.uint8)
        image = cv2.imdecode(data, flags) if data.size else None
        del data
    except (OSError, cv2.error) as exc:
        raise ImageReadError(f"{path}: cannot read image: {exc}") from exc
    if image is None:
        raise ImageReadError(f"{path}: not an image, or a corrupt/unsupported image file")
    image = _apply_orientation(image, header.orientation)
    scale = max(header.width, header.height) / max(image.shape[:2])
    return np.ascontiguousarray(image), float(scale)


def to_gray(image: np.ndarray | Any) -> np.ndarray:
    """uint8 (H, W) from a gray (H, W) / (H, W, 1), BGR (H, W, 3) or BGRA array, or a PIL image."""
    if not isinstance(image, np.ndarray):
        try:
            from PIL import Image
        except ImportError:  # pragma: no cover
            Image = None
        if Image is not None and isinstance(image, Image.Image):
            return np.asarray(image.convert("L"))
        raise PredictionError(f"expected an image array, a PIL image or a path, got "
                              f"{type(image).__name__}")
    if image.dtype != np.uint8:
        raise PredictionError(f"expected a uint8 image array, got dtype {image.dtype}")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 2:
        return image
    if image.ndim == 3 and image.shape[2] == 3:
        return cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    if image.ndim == 3 and image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2GRAY)
    raise PredictionError(f"expected an image of shape (H, W), (H, W, 3) or (H, W, 4), "
                          f"got {image.shape}")


# --------------------------------------------------------------------------- detection

@functools.lru_cache(maxsize=1)
def _cascade() -> cv2.CascadeClassifier:
    haar_dir = getattr(getattr(cv2, "data", None), "haarcascades", None)
    if not haar_dir or not hasattr(cv2, "CascadeClassifier"):
        raise PredictionError("this OpenCV build ships no Haar cascades (opencv 5 dropped "
                              "them); install opencv-python-headless 4.x as pinned in "
                              "requirements.txt")
    path = os.path.join(haar_dir, CASCADE_FILE)
    cascade = cv2.CascadeClassifier(path)
    if cascade.empty():
        raise PredictionError(f"{path}: Haar cascade missing or unreadable")
    return cascade


def _drop_nested(boxes: list[Box], max_inside: float = 0.6) -> list[Box]:
    """Drop boxes lying mostly (> max_inside of their area) inside a larger kept box.

    The cascade's neighbour grouping sometimes keeps a small box on an eye/mouth region inside
    a real face; one face should give one prediction.
    """
    kept: list[Box] = []
    for box in sorted(boxes, key=lambda b: b[2] * b[3], reverse=True):
        x, y, w, h = box
        inside = False
        for kx, ky, kw, kh in kept:
            ix = max(0, min(x + w, kx + kw) - max(x, kx))
            iy = max(0, min(y + h, ky + kh) - max(y, ky))
            if ix * iy > max_inside * w * h:
                inside = True
                break
        if not inside:
            kept.append(box)
    return kept


def detect_faces(image: np.ndarray, *, min_size: int = DEFAULT_MIN_FACE_SIZE,
                 scale_factor: float = 1.1, min_neighbors: int = 5,
                 max_side: int = DETECT_MAX_SIDE) -> list[Box]:
    """Face boxes (x, y, w, h) in `image` pixel coordinates, left to right.

    image: uint8 gray or BGR array. Images whose longest side exceeds `max_side` are searched
    on a downscaled copy (time and memory stay bounded; faces smaller than ~24 px in that copy
    are missed) and the boxes are mapped back. min_size: smallest face side in image pixels.
    """
    gray = to_gray(image)
    height, width = gray.shape
    scale = 1.0
    if max(height, width) > max_side:
        scale = max_side / max(height, width)
        gray = cv2.resize(gray, (max(1, round(width * scale)), max(1, round(height * scale))),
                          interpolation=cv2.INTER_AREA)
    # No cv2.equalizeHist first (the OpenCV tutorials' habit): the cascade already normalises
    # each window by its own contrast, and on FER2013 faces pasted into a canvas equalising
    # lowered the hit rate from 73% to 55% (600 faces).
    min_side = max(1, int(round(min_size * scale)))
    found = _cascade().detectMultiScale(gray, scaleFactor=scale_factor, minNeighbors=min_neighbors,
                                        minSize=(min_side, min_side))
    boxes: list[Box] = []
    for x, y, w, h in (found if len(found) else []):
        x0, y0 = int(round(x / scale)), int(round(y / scale))
        x1 = min(width, int(round((x + w) / scale)))
        y1 = min(height, int(round((y + h) / scale)))
        boxes.append((x0, y0, x1 - x0, y1 - y0))
    return sorted(_drop_nested(boxes), key=lambda b: (b[0], b[1]))


def crop_face(gray: np.ndarray, box: Sequence[int], margin: float = DEFAULT_MARGIN,
              size: int = CROP_SIZE) -> np.ndarray:
    """The face in `box` framed like FER2013, as uint8 (size, size).

    The box is made square (on its longer side, same centre), grown by `margin` x side on
    each side (0 matches FER2013, see the module docstring), padded by repeating the edge
    pixels where it leaves the image, and resized with cv2.INTER_AREA.
    """
    gray = to_gray(gray)
    x, y, w, h = (int(v) for v in box)
    if w <= 0 or h <= 0:
        raise PredictionError(f"face box {list(box)} has no area")
    side = max(w, h) * (1 + 2 * margin)
    cx, cy = x + w / 2, y + h / 2
    x0, y0 = int(round(cx - side / 2)), int(round(cy - side / 2))
    x1, y1 = x0 + int(round(side)), y0 + int(round(side))
    height, width = gray.shape
    # Cut the part inside the image first, then pad only that small crop: padding the
    # whole photo would copy it.
    region = gray[max(0, y0):min(height, y1), max(0, x0):min(width, x1)]
    if region.size == 0:
        raise PredictionError(f"face box {list(box)} lies outside the {width}x{height} image")
    pads = (max(0, -y0), max(0, y1 - height), max(0, -x0), max(0, x1 - width))
    if any(pads):
        region = cv2.copyMakeBorder(region, *pads, cv2.BORDER_REPLICATE)
    return cv2.resize(region, (size, size), interpolation=cv2.INTER_AREA)


# --------------------------------------------------------------------------- prediction

class FacePredictor:
    """A model plus everything needed to apply it to photos (from `load_weights` metadata).

    metadata needs "class_names", "normalization" {"mean", "std"} (on the 0..1 scale),
    "input_size" and optionally "model" {"kwargs": {"in_chans"}}. tta: "flip" averages the
    softmax of each face and its mirror image; "none" uses the face only.
    """

    def __init__(self, model: nn.Module, metadata: dict[str, Any], *,
                 device: str | torch.device = "cpu", tta: str = "flip",
                 margin: float = DEFAULT_MARGIN, min_face_size: int = DEFAULT_MIN_FACE_SIZE,
                 detect_max_side: int = DETECT_MAX_SIDE, batch_size: int = 256,
                 source: str = "model") -> None:
        if tta not in ("flip", "none"):
            raise ValueError(f"tta must be 'flip' or 'none', got {tta!r}")
        self.source = source  # the weights file, for error messages
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.metadata = metadata
        self.class_names: tuple[str, ...] = tuple(metadata["class_names"])
        self.input_size = int(metadata.get("input_size", CROP_SIZE))
        self.in_chans = int(metadata.get("model", {}).get("kwargs", {}).get("in_chans", 1))
        norm = metadata["normalization"]
        self.mean, self.std = norm["mean"], norm["std"]
        self.tta = tta
        self.margin = margin
        self.min_face_size = min_face_size
        self.detect_max_side = detect_max_side
        self.batch_size = batch_size

    @torch.no_grad()
    def predict_crops(self, crops: np.ndarray) -> np.ndarray:
        """Class probabilities float32 (N, num_classes) for uint8 face crops (N, 48, 48).

        Through `fer_lib.inference.predict_probs`, the path every reported accuracy is measured
        with: the training normalisation, then the model on the face (and, with tta "flip",
        its mirror image: softmax probabilities averaged).
        """
        crops = np.asarray(crops)
        if crops.dtype != np.uint8 or crops.ndim not in (3, 4):
            raise PredictionError(f"expected uint8 crops (N, 48, 48), got {crops.dtype} "
                                  f"{crops.shape}")
        if len(crops) == 0:
            return np.zeros((0, len(self.class_names)), np.float32)
        probs = predict_probs(self.model, crops, tta=self.tta, batch_size=self.batch_size, device=self.device,
                              mean=self.mean, std=self.std, input_size=self.input_size,
                              in_chans=self.in_chans).numpy()
        if not np.isfinite(probs).all():
            # NaN weights (a diverged training) would otherwise print "NaN" as a probability
            raise PredictionError(f"{self.source}: the model gives non-finite probabilities "
                                  "(NaN/inf weights?); these weights cannot be used")
        return probs

    def _results(self, boxes: list[Box], probs: np.ndarray) -> list[dict[str, Any]]:
        return [{"box": [int(v) for v in box],
                 "label": self.class_names[int(p.argmax())],
                 "probabilities": {name: round(float(v), 6)
                                   for name, v in zip(self.class_names, p)}}
                for box, p in zip(boxes, probs)]

    def predict_array(self, image: np.ndarray | Any, *, detect: bool = True,
                      scale: float = 1.0, full_size: tuple[int, int] | None = None
                      ) -> list[dict[str, Any]]:
        """Faces in an image array (gray/BGR uint8 or PIL); [] when none is found.

        detect=False treats the whole image as one face crop (e.g. a 48x48 FER2013 image).
        scale / full_size: the array is a reduced copy of a (width, height) original, scale
        original px per array px; boxes are returned in original pixels.
        """
        gray = to_gray(image)
        height, width = gray.shape
        if full_size is None:
            full_size = (int(round(width * scale)), int(round(height * scale)))
        if detect:
            boxes = detect_faces(gray, min_size=max(1, int(round(self.min_face_size / scale))),
                                 max_side=self.detect_max_side)
            crops = [crop_face(gray, box, self.margin) for box in boxes]
        else:
            boxes = [(0, 0, width, height)]
            crops = [crop_face(gray, boxes[0], margin=0.0)]
        if not boxes:
            return []
        probs = self.predict_crops(np.stack(crops))
        full_w, full_h = full_size
        mapped = []
        for x, y, w, h in boxes:
            x0, y0 = min(full_w, int(round(x * scale))), min(full_h, int(round(y * scale)))
            x1 = min(full_w, int(round((x + w) * scale)))
            y1 = min(full_h, int(round((y + h) * scale)))
            mapped.append((x0, y0, x1 - x0, y1 - y0))
        return self._results(mapped, probs)

    def predict_image(self, image: ImageInput, *, detect: bool = True) -> list[dict[str, Any]]:
        """One dict per face: {"box": [x, y, w, h], "label", "probabilities": {class: p}}.

        image: a file path, a uint8 gray/BGR array, or a PIL image. Raises ImageReadError for
        unreadable files and NoFaceError when detection finds no face (use detect=False for
        images that already are face crops).
        """
        if isinstance(image, (str, os.PathLike)):
            name = os.fspath(image)
            gray, scale = read_image(image, grayscale=True, max_side=self.detect_max_side)
        else:
            name = "image"
            gray, scale = to_gray(image), 1.0
        results = self.predict_array(gray, detect=detect, scale=scale)
        if not results:
            raise NoFaceError(
                f"{name}: no face found (Haar cascade, faces >= {self.min_face_size} px). "
                "If the image already is a face crop (e.g. a 48x48 FER2013 image), use "
                "--no-detect (detect=False); small faces need a lower --min-face-size.")
        return results


def load_predictor(weights: str | os.PathLike | None = None, *,
                   device: str | torch.device = "cpu", **predictor_kwargs: Any) -> FacePredictor:
    """FacePredictor from a weights file written by `fer_lib.weights_io.save_weights`.

    weights=None uses the packaged default model (`fer_lib/weights/default.safetensors`);
    MissingWeightsError says how to pass a file when none is shipped.
    """
    from fer_lib.weights_io import load_weights

    if weights is None:
        path = shipped_weights_path()
        if not path.exists():
            raise MissingWeightsError(
                f"no shipped weights: this fer_lib has no trained default model ({path.name} is "
                "not in fer_lib/weights/). Train a model, save it with "
                "`python -m fer_lib save-weights RUN_FOLDER --out DIR`, and pass the file: "
                "`python -m fer_lib predict photo.jpg --weights model.safetensors` or "
                "load_predictor(weights='model.safetensors').")
        weights = path
    model, metadata = load_weights(weights, device=device)
    predictor_kwargs.setdefault("source", os.fspath(weights))
    return FacePredictor(model, metadata, device=device, **predictor_kwargs)


# --------------------------------------------------------------------------- drawing

_CLASS_COLOURS_BGR = {
    "Angry": (40, 40, 220), "Disgust": (40, 150, 40), "Fear": (170, 60, 170),
    "Happy": (0, 210, 255), "Sad": (200, 110, 30), "Surprise": (0, 140, 255),
    "Neutral": (170, 170, 170),
}
_FALLBACK_COLOURS_BGR = [(255, 180, 0), (80, 200, 120), (200, 200, 0), (120, 80, 255)]


def _colour(label: str) -> tuple[int, int, int]:
    if label in _CLASS_COLOURS_BGR:
        return _CLASS_COLOURS_BGR[label]
    return _FALLBACK_COLOURS_BGR[sum(map(ord, label)) % len(_FALLBACK_COLOURS_BGR)]


def annotate(image: np.ndarray, results: Sequence[dict[str, Any]], *,
             scale: float = 1.0) -> np.ndarray:
    """A BGR copy of `image` with each face's box and "Label 87%" drawn on it.

    scale: image px per box unit, e.g. 0.25 when drawing on a copy decoded at quarter size
    (read_image returns the inverse, original px per decoded px).
    """
    canvas = image.copy() if image.ndim == 3 and image.shape[2] == 3 else \
        cv2.cvtColor(to_gray(image), cv2.COLOR_GRAY2BGR)
    height, width = canvas.shape[:2]
    thickness = max(1, round(max(height, width) / 500))
    for face in results:
        x, y, w, h = (int(round(v * scale)) for v in face["box"])
        label = face["label"]
        prob = face["probabilities"].get(label, float("nan"))
        colour = _colour(label)
        cv2.rectangle(canvas, (x, y), (x + w, y + h), colour, thickness)
        text = f"{label} {prob:.0%}"
        font_scale = max(0.35, min(2.0, w / 160))
        (tw, th), baseline = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, font_scale,
                                              thickness)
        # Above the box when there is room, otherwise inside its top edge.
        top = y - th - baseline - 2 if y - th - baseline - 2 >= 0 else y
        cv2.rectangle(canvas, (x, top), (x + tw + 4, top + th + baseline + 2), colour, -1)
        cv2.putText(canvas, text, (x + 2, top + th + 1), cv2.FONT_HERSHEY_SIMPLEX, font_scale,
                    (0, 0, 0), thickness, cv2.LINE_AA)
    return canvas


def _fit_side(image: np.ndarray, max_side: int) -> tuple[np.ndarray, float]:
    """(image shrunk so its longest side is <= max_side, factor applied); small ones as is."""
    longest = max(image.shape[:2])
    if longest <= max_side:
        return image, 1.0
    factor = max_side / longest
    size = (max(1, round(image.shape[1] * factor)), max(1, round(image.shape[0] * factor)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA), factor


def annotated_photo(path: str | os.PathLike, results: Sequence[dict[str, Any]], *,
                    max_side: int = ANNOTATED_MAX_SIDE) -> np.ndarray:
    """BGR copy of the photo at `path` with `results` drawn, longest side <= max_side.

    Decoded reduced (like read_image) and shrunk to max_side, so a 200 MP photo gives a
    2048 px picture; boxes in `results` are in original pixels.
    """
    image, scale = read_image(path, grayscale=False, max_side=max_side)
    image, factor = _fit_side(image, max_side)
    return annotate(image, results, scale=factor / scale)


def can_write_image(path: str | os.PathLike) -> bool:
    """Whether OpenCV has an encoder for the file extension of `path` (.png, .jpg, .webp...)."""
    return Path(path).suffix != "" and bool(cv2.haveImageWriter(os.fspath(path)))


def write_image(path: str | os.PathLike, image: np.ndarray) -> Path:
    """Encode `image` by the extension of `path` and write it atomically; return the path."""
    path = Path(path)
    if not can_write_image(path):
        raise PredictionError(f"{path}: unknown image file extension {path.suffix!r}; use .png, "
                              ".jpg, .webp, .bmp or .tiff")
    ok, encoded = cv2.imencode(path.suffix, image)
    if not ok:
        raise PredictionError(f"{path}: OpenCV could not encode the image as {path.suffix}")
    return atomic_write_bytes(path, encoded.tobytes())


# --------------------------------------------------------------------------- video

@dataclass
class VideoFrame:
    """One decoded frame. faces: the latest predictions (fresh=True: computed on this frame;
    False: reused from the last predicted frame, every k-th frame is predicted)."""

    index: int
    time_s: float
    fps: float
    image: np.ndarray
    faces: list[dict[str, Any]]
    fresh: bool


def _open_capture(source: str | int | os.PathLike) -> cv2.VideoCapture:
    if not isinstance(source, int):
        path = Path(source)
        if not path.exists():
            raise ImageReadError(f"{path}: video file not found")
        capture = cv2.VideoCapture(str(path))
    else:
        capture = cv2.VideoCapture(source)
    if not capture.isOpened():
        what = f"camera {source}" if isinstance(source, int) else str(source)
        raise ImageReadError(f"{what}: cannot open as a video (unsupported codec, not a video, "
                             "or no such camera)")
    return capture


def iter_video(predictor: FacePredictor, source: str | int | os.PathLike, *, every: int = 5,
               detect: bool = True, max_frames: int | None = None) -> Iterator[VideoFrame]:
    """Frames of a video file or camera index with face predictions on every `every`-th frame.

    Frames in between reuse the latest predictions: Haar detection plus a forward pass per
    frame would not keep up with a webcam on a CPU, and expressions change slower than 5 fps.
    """
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    capture = _open_capture(source)
    fps = capture.get(cv2.CAP_PROP_FPS) or 0.0
    fps = fps if 0 < fps < 1000 else 25.0
    faces: list[dict[str, Any]] = []
    index = 0
    try:
        while max_frames is None or index < max_frames:
            ok, frame = capture.read()
            if not ok or frame is None:
                break
            fresh = index % every == 0
            if fresh:
                faces = predictor.predict_array(frame, detect=detect)
            yield VideoFrame(index=index, time_s=index / fps, fps=fps, image=frame, faces=faces,
                             fresh=fresh)
            index += 1
    finally:
        capture.release()
    if index == 0:
        raise ImageReadError(f"{source}: no frame could be read from this video")


_FOURCC_BY_SUFFIX = {".avi": "MJPG", ".mp4": "mp4v", ".m4v": "mp4v", ".mov": "mp4v"}
VIDEO_SUFFIXES = tuple(_FOURCC_BY_SUFFIX)  # what annotate_video can write


def annotate_video(predictor: FacePredictor, source: str | int | os.PathLike,
                   out_path: str | os.PathLike, *, every: int = 5, detect: bool = True,
                   max_frames: int | None = None, max_side: int = ANNOTATED_MAX_SIDE) -> int:
    """Write `source` with boxes and labels drawn to out_path (.avi: MJPG, .mp4: mp4v).

    Frames larger than `max_side` on their longest side are written shrunk to it. The file
    appears under its name only once complete (atomic rename). Returns the frames written.
    """
    out_path = Path(out_path)
    fourcc = _FOURCC_BY_SUFFIX.get(out_path.suffix.lower())
    if fourcc is None:
        raise PredictionError(f"{out_path}: video output must end in "
                              f"{', '.join(_FOURCC_BY_SUFFIX)}")
    count = 0
    # keep_suffix: the VideoWriter picks its container from the file name
    with atomic_path(out_path, keep_suffix=True) as tmp:
        writer = None
        try:
            for frame in iter_video(predictor, source, every=every, detect=detect,
                                    max_frames=max_frames):
                image, factor = _fit_side(frame.image, max_side)
                if writer is None:
                    height, width = image.shape[:2]
                    writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*fourcc),
                                             frame.fps, (width, height))
                    if not writer.isOpened():
                        raise PredictionError(f"{out_path}: cannot open a {fourcc} video writer")
                writer.write(annotate(image, frame.faces, scale=factor))
                count += 1
        finally:
            if writer is not None:
                writer.release()
    return count
