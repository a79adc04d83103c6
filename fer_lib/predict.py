"""Use a trained model on photos and videos: find faces, crop them like FER2013, classify.

Pipeline: decode the photo (large JPEGs are decoded at 1/2, 1/4 or 1/8 scale directly, so an
8000x6000 photo never exists in memory at full size) -> grayscale -> OpenCV Haar cascade
`haarcascade_frontalface_default.xml` (shipped inside opencv-python-headless 4.x as
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

Results are plain lists of dicts, ready for JSON:
    [{"box": [x, y, w, h], "label": "Happy", "probabilities": {"Angry": 0.01, ...}}, ...]
"""
from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import cv2
import numpy as np
import torch
from torch import nn

from fer_lib.inference import predict_probs
from fer_lib.weights_io import shipped_weights_path

CASCADE_FILE = "haarcascade_frontalface_default.xml"
DEFAULT_MARGIN = 0.0
DETECT_MAX_SIDE = 1600
DEFAULT_MIN_FACE_SIZE = 30
CROP_SIZE = 48

Box = tuple[int, int, int, int]
# A file path, a uint8 gray/BGR array, or a PIL image (PIL is not imported for the hint).
ImageInput = Union[str, os.PathLike, np.ndarray, Any]


class PredictionError(ValueError):
    """A photo, video or weights file cannot be used for prediction (message names it)."""


class ImageReadError(PredictionError):
    """The file is missing, not an image, or cannot be decoded."""


class NoFaceError(PredictionError):
    """The face detector found no face in the image."""


class MissingWeightsError(PredictionError):
    """No weights were given and fer_lib ships no default model yet."""


# --------------------------------------------------------------------------- image input

_EXIF_ORIENTATION = 0x0112


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


def _peek_size_and_orientation(path: Path) -> tuple[tuple[int, int] | None, int]:
    """((width, height), EXIF orientation) from the header only, without decoding pixels."""
    try:
        from PIL import Image
    except ImportError:  # pillow is a dependency, but the size is only an optimisation
        return None, 1
    try:
        with warnings.catch_warnings():
            # PIL warns about "decompression bombs" on huge images; we never decode with PIL.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                size = im.size
                try:
                    orientation = int(im.getexif().get(_EXIF_ORIENTATION, 1))
                except Exception:  # a broken EXIF block must not stop prediction
                    orientation = 1
        return size, orientation if 1 <= orientation <= 8 else 1
    except Exception:  # not a format PIL knows (or too large for it): let OpenCV decide
        return None, 1


def read_image(path: str | os.PathLike, *, grayscale: bool = True,
               max_side: int | None = DETECT_MAX_SIDE) -> tuple[np.ndarray, float]:
    """Decode an image file; return (pixels, scale) with scale = original px per returned px.

    With `max_side`, large images are decoded at the largest reduction 1/2, 1/4 or 1/8 that
    still keeps the longest side >= max_side (JPEG decodes straight at that size, so memory
    stays bounded; other formats are reduced right after decoding). Returns uint8 (H, W) when
    grayscale, else BGR (H, W, 3). Raises ImageReadError naming the file.
    """
    path = Path(path)
    if not path.exists():
        raise ImageReadError(f"{path}: file not found")
    if path.is_dir():
        raise ImageReadError(f"{path}: is a folder, not an image file")
    size, orientation = _peek_size_and_orientation(path)
    reduction = 1
    if max_side is not None and size is not None:
        for factor in (8, 4, 2):
            if max(size) / factor >= max_side:
                reduction = factor
                break
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
    except (OSError, cv2.error) as exc:
        raise ImageReadError(f"{path}: cannot read image: {exc}") from exc
    if image is None:
        raise ImageReadError(f"{path}: not an image, or a corrupt/unsupported image file")
    image = _apply_orientation(image, orientation)
    if size is not None:
        scale = max(size) / max(image.shape[:2])
    else:
        scale = 1.0
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
                 detect_max_side: int = DETECT_MAX_SIDE, batch_size: int = 256) -> None:
        if tta not in ("flip", "none"):
            raise ValueError(f"tta must be 'flip' or 'none', got {tta!r}")
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
                              mean=self.mean, std=self.std, input_size=self.input_size, in_chans=self.in_chans)
        return probs.numpy()

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
                "fer_lib.weights_io.save_weights(...), and pass the file: "
                "`python -m fer_lib predict photo.jpg --weights model.safetensors` or "
                "load_predictor(weights='model.safetensors').")
        weights = path
    model, metadata = load_weights(weights, device=device)
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


def annotate_video(predictor: FacePredictor, source: str | int | os.PathLike,
                   out_path: str | os.PathLike, *, every: int = 5, detect: bool = True,
                   max_frames: int | None = None) -> int:
    """Write `source` with boxes and labels drawn to out_path (.avi: MJPG, .mp4: mp4v).

    Returns the number of frames written.
    """
    out_path = Path(out_path)
    fourcc = _FOURCC_BY_SUFFIX.get(out_path.suffix.lower())
    if fourcc is None:
        raise PredictionError(f"{out_path}: video output must end in "
                              f"{', '.join(_FOURCC_BY_SUFFIX)}")
    writer = None
    count = 0
    try:
        for frame in iter_video(predictor, source, every=every, detect=detect,
                                max_frames=max_frames):
            if writer is None:
                height, width = frame.image.shape[:2]
                out_path.parent.mkdir(parents=True, exist_ok=True)
                writer = cv2.VideoWriter(str(out_path), cv2.VideoWriter_fourcc(*fourcc),
                                         frame.fps, (width, height))
                if not writer.isOpened():
                    raise PredictionError(f"{out_path}: cannot open a {fourcc} video writer")
            writer.write(annotate(frame.image, frame.faces))
            count += 1
    finally:
        if writer is not None:
            writer.release()
    return count
