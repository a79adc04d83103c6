"""Prediction on photos and videos: face detection, FER-style crops, CLI, errors, weights I/O.

No real face photo ships with the repo, so `draw_face` paints a cartoon face with OpenCV
(head ellipse with shading, hair, eye sockets, eyes, eyebrows, nose bridge, nostrils, mouth):
the Haar cascade finds it at every size and seed tried. The real-data test pastes a FER2013
face into a noise canvas instead and also checks the crop framing against the original.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import fer_lib
from fer_lib import predict, weights_io
from fer_lib.__main__ import EXIT_ERROR, EXIT_NO_FACE, EXIT_OK, main
from fer_lib.data import CLASS_NAMES
from fer_lib.models import create_model
from fer_lib.predict import (
    FacePredictor,
    ImageReadError,
    MissingWeightsError,
    NoFaceError,
    annotate,
    crop_face,
    detect_faces,
    iter_video,
    load_predictor,
    read_image,
)

MODEL_NAME = "exp3_cnn"


# --------------------------------------------------------------------------- helpers

def draw_face(size: int, seed: int = 0) -> np.ndarray:
    """A uint8 (size, size) frontal cartoon face that the Haar cascade detects."""
    rng = np.random.default_rng(seed)
    s = size / 200
    img = np.full((size, size), 60, np.float32) + np.linspace(0, 30, size)[None, :]
    cx = cy = size / 2
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    r = ((xx - cx) / (62 * s)) ** 2 + ((yy - cy) / (80 * s)) ** 2
    head = r <= 1
    img[head] = 190 - 50 * r[head]                     # shaded skin, darker at the rim
    img[head & (yy < cy - 55 * s)] = 50                 # hair

    def ellipse(centre, axes, value):
        mask = np.zeros((size, size), np.uint8)
        cv2.ellipse(mask, (int(centre[0]), int(centre[1])), (int(axes[0]), int(axes[1])),
                    0, 0, 360, 255, -1)
        img[mask > 0] = value

    ex, ey = 24 * s, -12 * s
    for side in (-1, 1):
        ellipse((cx + side * ex, cy + ey), (17 * s, 10 * s), 110)            # eye socket
        ellipse((cx + side * ex, cy + ey), (10 * s, 5 * s), 40)              # eye
        ellipse((cx + side * ex, cy + ey - 16 * s), (16 * s, 4 * s), 45)     # eyebrow
    ellipse((cx, cy + 10 * s), (6 * s, 18 * s), 205)                         # nose bridge
    for side in (-1, 1):
        ellipse((cx + side * 7 * s, cy + 26 * s), (4 * s, 3 * s), 70)        # nostril
    ellipse((cx, cy + 45 * s), (22 * s, 7 * s), 70)                          # mouth
    img = cv2.GaussianBlur(img, (0, 0), 2 * s) + rng.normal(0, 4, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def background(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Smooth shaded background with mild noise (no face-like structure)."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(70, 140, width, dtype=np.float32)[None, :] + \
        np.linspace(0, 30, height, dtype=np.float32)[:, None]
    return np.clip(ramp + rng.normal(0, 3, (height, width)), 0, 255).astype(np.uint8)


def photo_with_face(height=360, width=480, face_size=160, x=150, y=80, seed=0) -> np.ndarray:
    canvas = background(height, width, seed)
    canvas[y:y + face_size, x:x + face_size] = draw_face(face_size, seed)
    return canvas


def iou(a, b) -> float:
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    ix = max(0, min(ax + aw, bx + bw) - max(ax, bx))
    iy = max(0, min(ay + ah, by + bh) - max(ay, by))
    inter = ix * iy
    return inter / (aw * ah + bw * bh - inter)


def _child_env() -> dict[str, str]:
    """Environment for a child Python that imports the same fer_lib as this test."""
    repo = str(Path(fer_lib.__file__).resolve().parents[1])
    return dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (repo, os.environ.get("PYTHONPATH")) if p))


def random_model(name: str = MODEL_NAME, seed: int = 0) -> torch.nn.Module:
    """A registry model with perturbed weights, so its 7 probabilities differ clearly."""
    torch.manual_seed(seed)
    model = create_model(name)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return model.eval()


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("weights")
    return weights_io.save_weights(
        folder, random_model(), model_name=MODEL_NAME, model_kwargs={},
        class_names=CLASS_NAMES, mean=0.5, std=0.25,
        metrics={"accuracy": 0.0, "how": "untrained test weights"}, notes="test")


@pytest.fixture(scope="module")
def predictor(weights_file) -> FacePredictor:
    return load_predictor(weights_file)


# --------------------------------------------------------------------------- detection

@pytest.mark.parametrize("face_size,x,y,seed", [(120, 40, 30, 0), (160, 150, 80, 1),
                                                 (220, 230, 100, 2)])
def test_haar_cascade_finds_the_drawn_face(face_size, x, y, seed):
    image = photo_with_face(360, 480, face_size, x, y, seed)
    boxes = detect_faces(image)
    assert len(boxes) == 1, boxes
    assert iou(boxes[0], (x, y, face_size, face_size)) > 0.5
    # BGR input gives the same boxes as gray.
    assert detect_faces(cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)) == boxes


def test_no_face_on_a_plain_background():
    assert detect_faces(background(360, 480)) == []


def test_large_image_is_searched_downscaled_and_boxes_map_back():
    image = background(1800, 3200)
    image[600:1000, 1200:1600] = draw_face(400)
    boxes = detect_faces(image, max_side=800)
    assert len(boxes) == 1
    assert iou(boxes[0], (1200, 600, 400, 400)) > 0.5


@pytest.mark.realdata
def test_cascade_finds_a_real_fer2013_face_and_crop_matches_fer_framing(real_fer2013_path):
    pandas = pytest.importorskip("pandas")
    if not str(real_fer2013_path).endswith((".csv", ".csv.gz")):
        pytest.skip("FER2013_PATH is not a fer2013.csv(.gz) file")
    rows = pandas.read_csv(real_fer2013_path, nrows=400)
    happy = rows[rows["emotion"] == CLASS_NAMES.index("Happy")]
    rng = np.random.default_rng(0)
    found, fer_framing, wide_framing = 0, [], []
    for pixels in happy["pixels"].head(20):
        face48 = np.array(pixels.split(), np.uint8).reshape(48, 48)
        canvas = cv2.GaussianBlur(rng.integers(0, 256, (400, 500), dtype=np.uint8), (0, 0), 2)
        canvas[100:292, 150:342] = cv2.resize(face48, (192, 192), interpolation=cv2.INTER_CUBIC)
        hits = [b for b in detect_faces(canvas) if iou(b, (150, 100, 192, 192)) > 0.5]
        if not hits:
            continue
        found += 1
        original = face48.astype(np.float32).ravel()
        for margin, scores in ((predict.DEFAULT_MARGIN, fer_framing), (0.15, wide_framing)):
            crop = crop_face(canvas, hits[0], margin).astype(np.float32).ravel()
            scores.append(np.corrcoef(crop, original)[0, 1])
    # The default crop reproduces the FER2013 framing: it looks like the original 48x48 face,
    # much more than a crop with a 15% margin does.
    assert np.median(fer_framing) > 0.6
    assert np.median(fer_framing) > np.median(wide_framing) + 0.2
    assert found >= 10  # the cascade finds ~75% of upscaled FER2013 faces


# --------------------------------------------------------------------------- cropping

def test_crop_face_is_square_48_and_pads_outside_the_image():
    image = np.tile(np.arange(100, dtype=np.uint8), (80, 1))  # brightness = column index
    crop = crop_face(image, (0, 10, 40, 40), margin=0.25)
    assert crop.shape == (48, 48) and crop.dtype == np.uint8
    # The box reaches 10 px past the left edge: those columns repeat the edge value 0.
    assert crop[:, :4].max() == 0 and crop[:, -1].min() > 30
    whole = crop_face(image[:48, :48], (0, 0, 48, 48), margin=0.0)
    np.testing.assert_array_equal(whole, image[:48, :48])


def test_non_square_box_is_made_square_around_its_centre():
    image = np.zeros((200, 200), np.uint8)
    image[50:150, 80:120] = 255  # a 40x100 bright bar
    crop = crop_face(image, (80, 50, 40, 100), margin=0.0)
    # Square 100x100 centred on the bar: the bar fills the middle 40% (columns 14.4-33.6).
    bright = np.flatnonzero(crop.mean(axis=0) > 128)
    assert 13 <= bright.min() <= 15 and 32 <= bright.max() <= 34


# --------------------------------------------------------------------------- predictor

def test_predict_image_returns_one_dict_per_face(predictor):
    image = np.concatenate([photo_with_face(seed=0), photo_with_face(seed=1)], axis=1)
    results = predictor.predict_image(image)
    assert len(results) == 2
    assert results[0]["box"][0] < results[1]["box"][0]  # left to right
    for face in results:
        assert set(face) == {"box", "label", "probabilities"}
        assert list(face["probabilities"]) == list(CLASS_NAMES)
        assert sum(face["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
        assert face["label"] == max(face["probabilities"], key=face["probabilities"].get)


def test_flip_tta_averages_the_mirrored_face(weights_file):
    crops = np.stack([draw_face(48, 0), draw_face(48, 1)[:, ::-1]])
    with_tta = load_predictor(weights_file, tta="flip").predict_crops(crops)
    no_tta = load_predictor(weights_file, tta="none")
    expected = (no_tta.predict_crops(crops) + no_tta.predict_crops(crops[:, :, ::-1])) / 2
    np.testing.assert_allclose(with_tta, expected, atol=1e-6)


def test_no_detect_uses_the_whole_image_as_the_face(predictor, tmp_path):
    face48 = cv2.resize(draw_face(200), (48, 48), interpolation=cv2.INTER_AREA)
    path = tmp_path / "face48.png"
    cv2.imwrite(str(path), face48)
    results = predictor.predict_image(path, detect=False)
    assert len(results) == 1 and results[0]["box"] == [0, 0, 48, 48]
    probs = predictor.predict_crops(face48[None])[0]
    assert list(results[0]["probabilities"].values()) == pytest.approx(probs.tolist(), abs=1e-5)


def test_no_face_raises_a_clear_error(predictor, tmp_path):
    path = tmp_path / "wall.png"
    cv2.imwrite(str(path), background(300, 400))
    with pytest.raises(NoFaceError, match="wall.png: no face found.*--no-detect"):
        predictor.predict_image(path)
    assert predictor.predict_array(background(300, 400)) == []


@pytest.mark.parametrize("name,content", [("missing.jpg", None), ("notes.jpg", b"not an image"),
                                          ("empty.png", b"")])
def test_unreadable_files_raise_errors_naming_the_file(predictor, tmp_path, name, content):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ImageReadError, match=name):
        predictor.predict_image(path)


def test_exif_orientation_is_applied(tmp_path):
    from PIL import Image

    pixels = np.zeros((60, 90), np.uint8)
    pixels[:, :10] = 255  # bright stripe on the left of the stored pixels
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif)
    gray, scale = read_image(path)
    assert gray.shape == (90, 60) and scale == 1.0
    assert gray[:10].mean() > 200 and gray[-10:].mean() < 50  # the stripe is now on top


def test_missing_shipped_weights_explain_how_to_pass_weights(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(predict, "shipped_weights_path", lambda: tmp_path / "default.safetensors")
    with pytest.raises(MissingWeightsError, match="no shipped weights.*--weights"):
        load_predictor()
    photo = tmp_path / "p.png"
    cv2.imwrite(str(photo), photo_with_face())
    assert main(["predict", str(photo)]) == EXIT_ERROR
    assert "--weights" in capsys.readouterr().err


def test_very_large_photo_keeps_memory_bounded(weights_file, tmp_path):
    height, width = 6000, 8000
    image = np.empty((height, width), np.uint8)
    image[:] = np.linspace(70, 140, width).astype(np.uint8)  # noise-free: fast to build
    image[2000:3200, 3000:4200] = draw_face(1200)
    big = tmp_path / "big.jpg"
    assert cv2.imwrite(str(big), image, [cv2.IMWRITE_JPEG_QUALITY, 85])
    del image
    small = tmp_path / "small.png"
    cv2.imwrite(str(small), photo_with_face())
    # Measured in a fresh process, from its own peak RSS (VmHWM, reset after the warm-up via
    # /proc/self/clear_refs; ru_maxrss would be inherited from this big pytest process).
    script = f"""
import json
from fer_lib import predict

cascade, detected_shapes = predict._cascade(), []

class Spy:
    def detectMultiScale(self, image, **kwargs):
        detected_shapes.append(list(image.shape))
        return cascade.detectMultiScale(image, **kwargs)

predict._cascade = Spy
def status_mb(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) / 1024 for l in f if l.startswith(key))

predictor = predict.load_predictor({str(weights_file)!r})
predictor.predict_image({str(small)!r})  # warm up: everything loaded once
detected_shapes.clear()
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS counter
    before = status_mb("VmRSS")
except OSError:  # not Linux: no memory figure, the shape checks still run
    before = None
faces = predictor.predict_image({str(big)!r})
grown = None if before is None else status_mb("VmHWM") - before
gray, scale = predict.read_image({str(big)!r})
print(json.dumps({{"faces": faces, "grown_mb": grown, "decoded": list(gray.shape),
                  "scale": scale, "detected": detected_shapes}}))
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=_child_env(), timeout=120)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout.strip().splitlines()[-1])
    # JPEG decoded straight at 1/4 scale (2000x1500; full size would be 48 MB gray), the
    # cascade ran on a copy <= 1600 px: the pipeline's memory does not grow with the photo.
    assert report["decoded"] == [1500, 2000] and report["scale"] == 4.0
    assert report["detected"] == [[1200, 1600]]
    if report["grown_mb"] is not None:
        # ~100 MB, mostly the cascade's integral images for 1600x1200; at full resolution
        # the cascade alone would need gigabytes.
        assert report["grown_mb"] < 200, report["grown_mb"]
    assert len(report["faces"]) == 1
    assert iou(report["faces"][0]["box"], (3000, 2000, 1200, 1200)) > 0.5  # original pixels


# --------------------------------------------------------------------------- drawing

def test_annotate_draws_boxes_and_keeps_the_input(predictor):
    image = photo_with_face()
    results = predictor.predict_image(image)
    drawn = annotate(image, results)
    assert drawn.shape == (*image.shape, 3) and drawn.dtype == np.uint8
    x, y, w, h = results[0]["box"]
    as_bgr = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    assert not np.array_equal(drawn[y:y + h, x:x + w], as_bgr[y:y + h, x:x + w])
    assert image.ndim == 2  # input untouched
    half = annotate(cv2.resize(image, None, fx=0.5, fy=0.5), results, scale=0.5)
    assert half.shape[:2] == (image.shape[0] // 2, image.shape[1] // 2)


# --------------------------------------------------------------------------- CLI

def test_cli_json_for_one_photo_is_the_list_of_faces(weights_file, tmp_path, capsys):
    photo = tmp_path / "photo.png"
    cv2.imwrite(str(photo), photo_with_face())
    out = tmp_path / "annotated.jpg"
    assert main(["predict", str(photo), "--weights", str(weights_file), "--json",
                 "--out", str(out)]) == EXIT_OK
    assert cv2.imread(str(out)).shape == (360, 480, 3)
    faces = json.loads(capsys.readouterr().out)  # stdout holds the JSON only
    assert isinstance(faces, list) and len(faces) == 1
    face = faces[0]
    assert set(face) == {"box", "label", "probabilities"}
    assert len(face["box"]) == 4 and all(isinstance(v, int) for v in face["box"])
    assert face["label"] in CLASS_NAMES
    assert set(face["probabilities"]) == set(CLASS_NAMES)
    assert all(isinstance(p, float) and 0 <= p <= 1 for p in face["probabilities"].values())


def test_cli_several_photos_json_and_annotated_outputs(weights_file, tmp_path, capsys):
    photos = []
    for seed in (0, 1):
        photos.append(tmp_path / f"p{seed}.jpg")
        cv2.imwrite(str(photos[-1]), photo_with_face(seed=seed))
    out = tmp_path / "annotated"
    code = main(["predict", *map(str, photos), "--weights", str(weights_file), "--json",
                 "--out", str(out)])
    assert code == EXIT_OK
    records = json.loads(capsys.readouterr().out)
    assert [r["file"] for r in records] == [str(p) for p in photos]
    assert all(len(r["faces"]) == 1 for r in records)
    for photo in photos:
        written = cv2.imread(str(out / f"{photo.stem}_annotated.png"))
        assert written is not None and written.shape[:2] == (360, 480)


def test_cli_no_face_exit_code_and_errors_naming_files(weights_file, tmp_path, capsys):
    wall = tmp_path / "wall.png"
    cv2.imwrite(str(wall), background(200, 300))
    assert main(["predict", str(wall), "--weights", str(weights_file), "--json"]) == EXIT_NO_FACE
    captured = capsys.readouterr()
    assert json.loads(captured.out) == [] and "wall.png: no face found" in captured.err

    text = tmp_path / "readme.png"
    text.write_text("hello")
    assert main(["predict", str(text), "--weights", str(weights_file)]) == EXIT_ERROR
    assert "readme.png: not an image" in capsys.readouterr().err
    gone = tmp_path / "gone.jpg"
    assert main(["predict", str(gone), "--weights", str(weights_file)]) == EXIT_ERROR
    assert "gone.jpg: file not found" in capsys.readouterr().err
    # An unreadable file wins over a photo without faces.
    assert main(["predict", str(wall), str(text), "--weights", str(weights_file)]) == EXIT_ERROR


def test_python_dash_m_exit_code_for_no_face(weights_file, tmp_path):
    wall = tmp_path / "wall.png"
    cv2.imwrite(str(wall), background(200, 300))
    run = subprocess.run([sys.executable, "-m", "fer_lib", "predict", str(wall), "--weights",
                          str(weights_file)], capture_output=True, text=True,
                         env=_child_env(), timeout=120)
    assert run.returncode == EXIT_NO_FACE and "wall.png: no face found" in run.stderr


def test_cli_no_detect_and_usage_errors(weights_file, tmp_path, capsys):
    face48 = tmp_path / "fer.png"
    cv2.imwrite(str(face48), cv2.resize(draw_face(200), (48, 48), interpolation=cv2.INTER_AREA))
    assert main(["predict", str(face48), "--weights", str(weights_file), "--no-detect",
                 "--json"]) == EXIT_OK
    assert json.loads(capsys.readouterr().out)[0]["box"] == [0, 0, 48, 48]
    assert main(["predict", "--weights", str(weights_file)]) == 2
    with pytest.raises(SystemExit) as exit_info:
        main(["no-such-command"])
    assert exit_info.value.code == 2


# --------------------------------------------------------------------------- video

@pytest.fixture(scope="module")
def video_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("video") / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (320, 240))
    assert writer.isOpened()
    for i in range(12):
        gray = photo_with_face(240, 320, face_size=140, x=60 + 4 * i, y=50, seed=i)
        writer.write(cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR))
    writer.release()
    return path


def test_cli_video_json_lines_every_kth_frame(weights_file, video_file, capsys):
    code = main(["predict", "--video", str(video_file), "--weights", str(weights_file),
                 "--json", "--every", "4"])
    assert code == EXIT_OK
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["frame"] for line in lines] == [0, 4, 8]
    assert lines[1]["time_s"] == pytest.approx(0.4)
    for line in lines:
        assert len(line["faces"]) == 1
        assert iou(line["faces"][0]["box"], (60 + 4 * line["frame"], 50, 140, 140)) > 0.5


def test_cli_video_writes_an_annotated_video(weights_file, video_file, tmp_path):
    out = tmp_path / "annotated.avi"
    assert main(["predict", "--video", str(video_file), "--weights", str(weights_file),
                 "--out", str(out), "--every", "3"]) == EXIT_OK
    frames, source = read_frames(out), read_frames(video_file)
    assert len(frames) == 12 and frames[0].shape == (240, 320, 3)
    # Every frame carries the box and label of the latest prediction (also frames 1, 2, 4...).
    for index in (0, 1, 5, 11):
        changed = np.abs(frames[index].astype(int) - source[index]).max(axis=2) > 80
        rows, cols = np.nonzero(changed)
        assert changed.sum() > 100
        assert 40 <= cols.min() and rows.max() <= 200  # around the face, not all over


def read_frames(path: Path) -> list[np.ndarray]:
    capture = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame)
    capture.release()
    return frames


def test_video_errors_name_the_source(predictor, tmp_path):
    with pytest.raises(ImageReadError, match="nothing.avi: video file not found"):
        next(iter_video(predictor, tmp_path / "nothing.avi"))
    bogus = tmp_path / "bogus.avi"
    bogus.write_bytes(b"\0" * 100)
    with pytest.raises(ImageReadError, match="bogus.avi"):
        list(iter_video(predictor, bogus))


# --------------------------------------------------------------------------- weights I/O

def test_weights_round_trip_without_pickle(tmp_path, monkeypatch):
    import pickle

    model = random_model("fernet_small", seed=3)
    path = weights_io.save_weights(
        tmp_path / "fernet_small.safetensors", model, model_name="fernet_small",
        model_kwargs={}, class_names=CLASS_NAMES, mean=0.507, std=0.255,
        metrics={"accuracy": np.float64(0.65), "split": "PrivateTest", "tta": "flip"},
        notes="round trip")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fernet_small.json",
                                                          "fernet_small.safetensors"]

    def forbidden(*args, **kwargs):
        raise AssertionError("load_weights must not unpickle")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    loaded, metadata = weights_io.load_weights(path)
    assert not loaded.training
    x = torch.randn(3, 1, 48, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert metadata["model"] == {"name": "fernet_small",
                                 "kwargs": {"num_classes": 7, "in_chans": 1}}
    assert metadata["class_names"] == list(CLASS_NAMES)
    assert metadata["normalization"]["mean"] == 0.507 and metadata["normalization"]["std"] == 0.255
    assert metadata["metrics"] == {"accuracy": 0.65, "split": "PrivateTest", "tta": "flip"}
    assert metadata["input_size"] == 48 and metadata["notes"] == "round trip"
    # The .json path and a lone .safetensors (metadata from its header) load too.
    assert weights_io.load_weights(path.with_suffix(".json"))[1]["notes"] == "round trip"
    path.with_suffix(".json").unlink()
    assert weights_io.load_weights(path)[1]["class_names"] == list(CLASS_NAMES)


def test_save_weights_command_ships_a_finished_run_that_predict_can_load(fer2013_csv, tmp_path, capsys):
    from fer_lib.augment import MEAN, STD
    from fer_lib.checkpoint import load_model
    from fer_lib.data import load_fer2013
    from fer_lib.experiment import run_experiment
    from fer_lib.training import TrainConfig

    data = load_fer2013(fer2013_csv((70, 21, 21)))
    config = TrainConfig(epochs=2, batch_size=16, max_steps_per_epoch=2, progress=False, seed=5, tta="flip")
    run_dir = tmp_path / "seed5"
    run = run_experiment("r", data, "fernet_small", config, run_dir=run_dir, wandb_mode="disabled",
                         extra={"recipe": "fast_cpu"})
    assert main(["save-weights", str(run_dir), "--out", str(tmp_path / "shipped")]) == EXIT_OK
    assert "PublicTest" in capsys.readouterr().out
    model, metadata = weights_io.load_weights(tmp_path / "shipped" / "fernet_small.safetensors")
    x = torch.randn(4, 1, 48, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # the best checkpoint's weights, exactly
        assert torch.equal(model(x), load_model(run_dir / "best.pt")(x))
    assert metadata["metrics"]["val_accuracy"] == pytest.approx(run.val["accuracy"])
    assert metadata["metrics"]["test_accuracy"] == pytest.approx(run.test["accuracy"])
    assert metadata["metrics"]["tta"] == "flip"
    assert metadata["normalization"]["mean"] == pytest.approx(MEAN)
    assert metadata["normalization"]["std"] == pytest.approx(STD)
    assert "recipe fast_cpu (seed 5, optimizer adam)" in metadata["notes"]
    load_predictor(tmp_path / "shipped" / "fernet_small.safetensors")
    # a folder that is no finished run: one line naming the missing file, nothing written
    (tmp_path / "empty").mkdir()
    assert main(["save-weights", str(tmp_path / "empty"), "--out", str(tmp_path / "nothing")]) == EXIT_ERROR
    assert "best.pt: not found" in capsys.readouterr().err
    assert not (tmp_path / "nothing").exists()


def test_weights_errors_are_clear(tmp_path):
    model = random_model("fernet_small")
    kwargs = dict(model_name="fernet_small", class_names=CLASS_NAMES, mean=0.5, std=0.25,
                  metrics={}, notes="")
    with pytest.raises(weights_io.WeightsError, match="do not match registry model 'exp3_cnn'"):
        weights_io.save_weights(tmp_path, model, **{**kwargs, "model_name": "exp3_cnn"},
                                model_kwargs={})
    path = weights_io.save_weights(tmp_path, model, model_kwargs={}, **kwargs)
    other = weights_io.save_weights(tmp_path / "other", random_model("fernet_small", seed=1),
                                    model_kwargs={}, **kwargs)
    path.write_bytes(other.read_bytes())  # weights from another save than the .json
    with pytest.raises(weights_io.WeightsError, match="sha256 differs"):
        weights_io.load_weights(path)
    with pytest.raises(weights_io.WeightsError, match="nowhere.safetensors: weights file not"):
        weights_io.load_weights(tmp_path / "nowhere.safetensors")
    with pytest.raises(ValueError, match="num_classes=5 but 7 class_names"):
        weights_io.save_weights(tmp_path, model, model_kwargs={"num_classes": 5}, **kwargs)
    assert not list(tmp_path.glob(".tmp-*"))  # failed saves leave no temporary files


def test_shipped_weights_path_points_into_the_package():
    path = weights_io.shipped_weights_path()
    assert path.parent == Path(fer_lib.__file__).resolve().parent / "weights"
    assert path.suffix == ".safetensors"


def test_shipped_default_weights_load_without_pickle_and_predict():
    """The repo ships a small trained model so `predict` works right after install."""
    path = weights_io.shipped_weights_path()
    assert path.exists() and path.stat().st_size < 10 * 2**20
    model, meta = weights_io.load_weights(path)
    assert meta["metrics"]["test_accuracy"] > 0.5 and len(meta["class_names"]) == 7
    predictor = predict.load_predictor()
    probs = predictor.predict_crops(np.full((2, 48, 48), 128, np.uint8))
    assert np.allclose(np.asarray(probs).sum(axis=1), 1.0, atol=1e-4)


def _agreement(model, metadata, images, labels):
    from fer_lib.training import evaluate

    predictor = FacePredictor(model, metadata, tta="flip")
    probs = predictor.predict_crops(images)
    reported = evaluate(model, (images, labels), tta="flip")
    return probs, reported


def test_the_predictor_on_fer2013_crops_agrees_with_evaluate(tmp_path):
    """The accuracy evaluate reports is measured exactly the way `predict` predicts."""
    from fer_lib.augment import MEAN, STD
    from fer_lib.synthetic import make_images
    from fer_lib.weights_io import load_weights

    # saved the way training saves weights: with the training normalisation
    path = weights_io.save_weights(tmp_path, random_model(), model_name=MODEL_NAME, model_kwargs={},
                                   class_names=CLASS_NAMES, mean=MEAN, std=STD, metrics={}, notes="test")
    model, metadata = load_weights(path)
    images, labels = make_images(64, seed=3)
    probs, reported = _agreement(model, metadata, images, labels)
    np.testing.assert_allclose(probs, reported["logits"].softmax(1).numpy(), atol=1e-6)
    assert (probs.argmax(1) == reported["preds"].numpy()).all()


@pytest.mark.realdata
def test_the_shipped_model_on_real_publictest_faces_agrees_with_evaluate(real_fer2013_path):
    from fer_lib.data import load_fer2013
    from fer_lib.weights_io import load_weights

    val = load_fer2013(real_fer2013_path).val
    model, metadata = load_weights(predict.shipped_weights_path())
    probs, reported = _agreement(model, metadata, val.images[:512], val.labels[:512])
    assert (probs.argmax(1) == reported["preds"].numpy()).all()
    assert float((probs.argmax(1) == val.labels[:512]).mean()) == pytest.approx(reported["accuracy"])
