"""Hostile input and faults: huge photos, lying weights metadata, broken checkpoints, CLI misuse.

Every case must end in a result or in one clear error naming the file, within bounded memory,
without overwriting anything. Large images are built cheaply: mostly uniform pixels compress
to a few MB as JPEG, and `png_uniform` streams a 30000x30000 PNG of under 1 MB without ever
holding its 900 MB of pixels.
"""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from test_predict import _child_env, draw_face, iou, photo_with_face, random_model  # tests/ is on sys.path

from fer_lib import checkpoint, predict, weights_io
from fer_lib.__main__ import EXIT_ERROR, EXIT_NO_FACE, EXIT_OK, EXIT_USAGE, main
from fer_lib.data import CLASS_NAMES
from fer_lib.export import export_onnx
from fer_lib.models import create_model
from fer_lib.predict import ImageReadError, ImageTooLargeError, read_header, read_image

MODEL_NAME = "exp3_cnn"


# --------------------------------------------------------------------------- helpers

def png_uniform(path: Path, width: int, height: int, value: int = 128) -> Path:
    """A width x height 8-bit gray PNG of one value, written without holding its pixels.

    One block of rows is deflated once with a full flush (so it does not depend on what came
    before) and repeated; the zlib frame and its Adler-32 are written by hand.
    """
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    row = b"\0" + bytes([value]) * width  # filter byte "none" + the pixels
    rows = max(1, min(height, (1 << 22) // len(row)))
    count, rest = divmod(height, rows)
    block, tail_rows = row * rows, row * rest
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    packed = deflate.compress(block) + deflate.flush(zlib.Z_FULL_FLUSH)
    tail = deflate.compress(tail_rows) + deflate.flush()
    adler = 1
    for _ in range(count):
        adler = zlib.adler32(block, adler)
    adler = zlib.adler32(tail_rows, adler)
    stream = b"\x78\xda" + packed * count + tail + struct.pack(">I", adler)
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", stream)
                     + chunk(b"IEND", b""))
    return path


def jpeg_with_face(path: Path, height: int, width: int, face_box: tuple[int, int, int],
                   orientation: int = 1, progressive: bool = False) -> Path:
    """A mostly uniform gray JPEG (a few MB even at 200 MP) with one drawn face.

    face_box: (x, y, size) in STORED pixels; orientation 6 stores the face turned 90 degrees
    counter-clockwise, so that it is upright once the EXIF rotation is applied.
    """
    from PIL import Image

    pixels = np.full((height, width), 110, np.uint8)
    x, y, size = face_box
    face = draw_face(size)
    pixels[y:y + size, x:x + size] = np.rot90(face) if orientation == 6 else face
    image = Image.fromarray(pixels)
    del pixels
    exif = image.getexif()
    exif[0x0112] = orientation
    image.save(path, quality=85, exif=exif, progressive=progressive)
    return path


_PEAK_RSS = """
import json, resource, subprocess, sys
run = subprocess.run(sys.argv[1:], capture_output=True, text=True)
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({"rc": run.returncode, "out": run.stdout, "err": run.stderr,
                  "peak_mb": peak / (2**20 if sys.platform == "darwin" else 1024)}))
"""


def run_measured(args: list[str]) -> dict:
    """Run `python -m fer_lib ARGS` and return its exit code, output and peak RSS in MB.

    The peak comes from resource.getrusage(RUSAGE_CHILDREN) in a small intermediate Python:
    Linux starts a child's ru_maxrss at its parent's size, so measured straight from this
    (large) pytest process the figure would be pytest's.
    """
    pytest.importorskip("resource")
    run = subprocess.run([sys.executable, "-c", _PEAK_RSS, sys.executable, "-m", "fer_lib", *args],
                         capture_output=True, text=True, env=_child_env(), timeout=300)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("weights")
    return weights_io.save_weights(
        folder, random_model(), model_name=MODEL_NAME, model_kwargs={},
        class_names=CLASS_NAMES, mean=0.5, std=0.25, metrics={"accuracy": 0.0}, notes="test")


@pytest.fixture(scope="module")
def predictor(weights_file):
    return predict.load_predictor(weights_file)


# --------------------------------------------------------------------------- very large photos

def test_200_mp_portrait_phone_photo_is_decoded_reduced_upright_and_its_face_found(
        predictor, tmp_path):
    # 16320x12256 stored landscape, EXIF 6: displayed 12256 wide, 16320 high (portrait).
    # PIL refuses to even open files above ~179 MP, which used to drop the reduced decode
    # and the orientation: the sideways face at full size was "no face found".
    photo = jpeg_with_face(tmp_path / "phone.jpg", 12256, 16320, (9000, 4000, 1600),
                           orientation=6)
    header = read_header(photo)
    assert (header.width, header.height, header.orientation) == (16320, 12256, 6)
    gray, scale = read_image(photo)
    assert gray.shape == (2040, 1532) and scale == 8.0  # JPEG decoded straight at 1/8, upright
    faces = predictor.predict_image(photo)
    assert len(faces) == 1
    # stored (x 9000-10600, y 4000-5600) -> displayed x = 12256 - stored y, y = stored x
    assert iou(faces[0]["box"], (12256 - 5600, 9000, 1600, 1600)) > 0.5


def test_decode_size_limit_counts_what_each_decoder_holds(tmp_path, monkeypatch):
    monkeypatch.setattr(predict, "MAX_DECODE_PIXELS", 1000)
    image = np.full((100, 100), 90, np.uint8)
    baseline, progressive, png = tmp_path / "b.jpg", tmp_path / "p.jpg", tmp_path / "i.png"
    cv2.imwrite(str(baseline), image)
    cv2.imwrite(str(progressive), image, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])
    cv2.imwrite(str(png), image)
    assert read_header(progressive).progressive and not read_header(baseline).progressive
    # a baseline JPEG decodes straight at 1/8: 13x13 = 169 pixels held, under the limit
    assert read_image(baseline, max_side=10)[0].shape == (13, 13)
    # progressive JPEGs and PNGs are decoded at full size (10,000 pixels) before reduction
    for path, kind in ((progressive, "progressive JPEG"), (png, "PNG")):
        with pytest.raises(ImageTooLargeError, match=rf"{path.name}: 100x100 {kind}.*at most 0 MP"):
            read_image(path, max_side=10)
    with pytest.raises(ImageTooLargeError):  # no reduction asked: the full size counts
        read_image(baseline, max_side=None)


def test_files_whose_size_cannot_be_read_first_are_refused(tmp_path):
    fake = tmp_path / "photo.jpg"
    fake.write_bytes(b"\xff\xd8\xff" + b"\0" * 50)  # a JPEG signature, then nothing
    with pytest.raises(ImageReadError, match="photo.jpg: not an image"):
        read_image(fake)


def test_huge_photos_cli_memory_output_size_and_one_error(weights_file, tmp_path):
    """The reviewer's three cases in one process: a 200 MP JPEG and a 108 MP one are predicted
    with annotated copies of at most 2048 px; a sub-1 MB 30000x30000 PNG is refused with one
    line; the peak memory of the whole command stays under 1 GB."""
    big = jpeg_with_face(tmp_path / "p200.jpg", 12256, 16320, (6000, 4000, 1600))
    mid = jpeg_with_face(tmp_path / "p108.jpg", 9000, 12000, (5000, 3000, 1200))
    bomb = png_uniform(tmp_path / "bomb.png", 30000, 30000)
    assert bomb.stat().st_size < 2**20
    out = tmp_path / "annotated"
    report = run_measured(["predict", str(big), str(mid), str(bomb), "--weights",
                           str(weights_file), "--json", "--out", str(out)])
    assert report["rc"] == EXIT_ERROR, report["err"]
    errors = [line for line in report["err"].splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "bomb.png: 30000x30000 PNG (900 MP)" in errors[0]
    assert "Traceback" not in report["err"]
    records = json.loads(report["out"])
    assert [len(r["faces"]) for r in records] == [1, 1, 0] and "error" in records[2]
    for photo, record in zip((big, mid), records):
        written = cv2.imread(str(out / f"{photo.stem}_annotated.png"))
        assert max(written.shape[:2]) == predict.ANNOTATED_MAX_SIDE, written.shape
        assert record["annotated"] == str(out / f"{photo.stem}_annotated.png")
    assert not (out / "bomb_annotated.png").exists()
    print(f"peak RSS of the command: {report['peak_mb']:.0f} MB")
    assert report["peak_mb"] < 1024, report["peak_mb"]


def test_largest_accepted_png_stays_under_1_gb(weights_file, tmp_path):
    # PNG is decoded at full size, so the worst accepted case is a PNG just under the limit,
    # decoded twice (gray for detection, BGR for the annotated copy).
    side = int(predict.MAX_DECODE_PIXELS ** 0.5)
    photo = png_uniform(tmp_path / "wide.png", side, side, value=90)
    out = tmp_path / "wide_annotated.jpg"
    report = run_measured(["predict", str(photo), "--weights", str(weights_file), "--out",
                           str(out)])
    assert report["rc"] == EXIT_NO_FACE, report["err"]
    assert max(cv2.imread(str(out)).shape[:2]) == predict.ANNOTATED_MAX_SIDE
    print(f"peak RSS for a {side}x{side} PNG: {report['peak_mb']:.0f} MB")
    assert report["peak_mb"] < 1024, report["peak_mb"]


# --------------------------------------------------------------------------- weights metadata

def _drop(key):
    def edit(meta):
        *parents, last = key.split(".")
        target = meta
        for part in parents:
            target = target[part]
        del target[last]
    return edit


def _set(key, value):
    def edit(meta):
        *parents, last = key.split(".")
        target = meta
        for part in parents:
            target = target[part]
        target[last] = value
    return edit


def _with_metadata(weights_file: Path, path: Path, edit) -> Path:
    """A copy of `weights_file` at `path` whose .json sidecar `edit(meta)` changed (json writes NaN as NaN)."""
    path.write_bytes(weights_file.read_bytes())
    meta = json.loads(weights_file.with_suffix(".json").read_text())
    edit(meta)
    path.with_suffix(".json").write_text(json.dumps(meta))
    return path


@pytest.mark.parametrize("edit,field,problem", [
    (_set("normalization.std", 0), "normalization.std", "must be positive"),
    (_set("normalization.std", [0.2, -1.0]), "normalization.std", "must be positive"),
    (_set("normalization.std", float("nan")), "normalization.std", "must be finite"),
    (_set("normalization.mean", "0.5"), "normalization.mean", "number or a list"),
    (_drop("normalization.mean"), "normalization.mean", "is missing"),
    (_set("class_names", "ADFHSSN"), "class_names", "must be a list"),
    (_set("class_names", ["a", "b", "c"]), "model.kwargs.num_classes", "is 7 but 'class_names' has 3"),
    (_set("class_names", ["a", "a", "b", "c", "d", "e", "f"]), "class_names", "repeats"),
    (_drop("model.name"), "model.name", "missing"),
    (_set("model.name", "no_such_net"), "model.name", "not a registry model"),
    (_set("model.kwargs.num_classes", 10**12), "model.kwargs.num_classes", "1-1000"),
    (_set("model.kwargs.in_chans", 2), "model.kwargs.in_chans", "must be 1 or 3"),
    (_set("input_size", 0), "input_size", "8-512"),
    (_set("input_size", 48.5), "input_size", "whole number"),
    (_set("model", "exp3_cnn"), "model", "must be an object"),
])
def test_lying_metadata_is_one_error_naming_file_and_field(weights_file, tmp_path, edit, field,
                                                            problem):
    bad = _with_metadata(weights_file, tmp_path / "bad.safetensors", edit)
    with pytest.raises(weights_io.WeightsError) as info:
        weights_io.load_weights(bad)
    message = str(info.value)
    assert message.startswith(f"{bad.with_suffix('.json')}: ") and "\n" not in message
    assert f"'{field}'" in message and problem in message


def test_metadata_in_a_lone_safetensors_header_is_validated_too(tmp_path):
    from safetensors.torch import load_file, save_file

    model = random_model()
    path = weights_io.save_weights(tmp_path, model, model_name=MODEL_NAME, model_kwargs={},
                                   class_names=CLASS_NAMES, mean=0.5, std=0.25, metrics={},
                                   notes="")
    meta = json.loads(path.with_suffix(".json").read_text())
    meta["normalization"]["std"] = 0
    path.with_suffix(".json").unlink()
    save_file(load_file(str(path)), str(path),
              metadata={"format": "pt", weights_io.HEADER_KEY: json.dumps(meta)})
    with pytest.raises(weights_io.WeightsError, match=rf"{path.name}: .*'normalization.std'"):
        weights_io.load_weights(path)


def test_outputs_must_match_class_names_and_weights_must_be_finite(weights_file, tmp_path):
    def edit(meta):
        meta["class_names"] = ["a", "b", "c"]
        del meta["model"]["kwargs"]["num_classes"]  # the registry default (7) is built

    bad = _with_metadata(weights_file, tmp_path / "three.safetensors", edit)
    with pytest.raises(weights_io.WeightsError, match=r"three.safetensors: .*shape \(1, 7\).*3 names"):
        weights_io.load_weights(bad)

    model = random_model()
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] = float("nan")  # a diverged training
    nan_path = weights_io.save_weights(tmp_path / "nan", model, model_name=MODEL_NAME,
                                       model_kwargs={}, class_names=CLASS_NAMES, mean=0.5,
                                       std=0.25, metrics={}, notes="")
    with pytest.raises(weights_io.WeightsError, match=r"exp3_cnn.safetensors: tensor .* NaN"):
        weights_io.load_weights(nan_path)


def test_absurd_model_kwargs_fail_on_shapes_without_allocating(weights_file, tmp_path):
    def edit(meta):
        meta["model"]["kwargs"]["hidden_dim"] = 10**9  # an 18 TB first linear layer if built

    bad = _with_metadata(weights_file, tmp_path / "huge.safetensors", edit)
    with pytest.raises(weights_io.WeightsError, match="huge.safetensors: tensors do not match"):
        weights_io.load_weights(bad)


def test_a_checkpoint_or_onnx_file_given_as_weights_says_what_it_is(tmp_path, capsys):
    best = tmp_path / "best.pt"
    checkpoint.save_checkpoint(best, random_model())
    with pytest.raises(weights_io.WeightsError,
                       match=r"best.pt: not a .safetensors weights file \(a training checkpoint"):
        weights_io.load_weights(best)
    (tmp_path / "m.onnx").write_bytes(b"onnx")
    with pytest.raises(weights_io.WeightsError, match=r"m.onnx: not a .safetensors.*ONNX"):
        weights_io.load_weights(tmp_path / "m.onnx")
    with pytest.raises(weights_io.WeightsError, match=r"gone.pt: weights file not found"):
        weights_io.load_weights(tmp_path / "gone.pt")
    photo = tmp_path / "p.png"
    cv2.imwrite(str(photo), photo_with_face())
    assert main(["predict", str(photo), "--weights", str(best)]) == EXIT_ERROR
    line = one_error_line(capsys.readouterr().err)
    assert "best.pt: not a .safetensors weights file" in line and "best.pt.safetensors" not in line


def test_std_zero_is_exit_1_not_nan_probabilities(weights_file, tmp_path, capsys):
    def edit(meta):
        meta["normalization"]["std"] = 0

    bad = _with_metadata(weights_file, tmp_path / "std0.safetensors", edit)
    photo = tmp_path / "p.png"
    cv2.imwrite(str(photo), photo_with_face())
    assert main(["predict", str(photo), "--weights", str(bad), "--json"]) == EXIT_ERROR
    captured = capsys.readouterr()
    assert captured.out == "" and "'normalization.std'" in one_error_line(captured.err)


def test_non_finite_probabilities_are_an_error_not_nan_in_json(predictor, monkeypatch):
    class NanModel(torch.nn.Module):  # what diverged weights compute
        def forward(self, x):
            return torch.full((len(x), 7), float("nan"))

    monkeypatch.setattr(predictor, "model", NanModel())
    with pytest.raises(predict.PredictionError, match="non-finite probabilities"):
        predictor.predict_crops(np.zeros((1, 48, 48), np.uint8))


# --------------------------------------------------------------------------- command line

def _strict_json(text: str):
    def refuse(constant):
        raise ValueError(f"invalid JSON constant {constant}")
    return json.loads(text, parse_constant=refuse)


@pytest.fixture
def photo(tmp_path) -> Path:
    path = tmp_path / "photo.png"
    cv2.imwrite(str(path), photo_with_face())
    return path


@pytest.mark.parametrize("extra,message", [
    (["--device", "cuda:99" if torch.cuda.is_available() else "cuda"], "--device"),
    (["--device", "banana"], "is not a torch device"),
    (["--min-face-size", "0"], "must be 1 or more"),
    (["--out", "annotated.xyz"], "unknown image file extension '.xyz'"),
])
def test_cli_usage_errors_are_one_line_and_exit_2(weights_file, photo, tmp_path, capsys,
                                                   monkeypatch, extra, message):
    monkeypatch.chdir(tmp_path)
    try:
        code = main(["predict", str(photo), "--weights", str(weights_file), *extra])
    except SystemExit as exc:  # argparse's usage errors
        code = exc.code
    assert code == EXIT_USAGE
    assert message in one_error_line(capsys.readouterr().err)
    assert not list(tmp_path.glob("*.xyz"))


def test_cli_video_every_0_is_a_usage_error(weights_file, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["predict", "--video", str(tmp_path / "clip.avi"), "--every", "0",
              "--weights", str(weights_file)])
    assert info.value.code == EXIT_USAGE
    assert "--every: must be 1 or more" in one_error_line(capsys.readouterr().err)


def test_export_onnx_bad_opset_is_a_usage_error(weights_file, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["export-onnx", "--weights", str(weights_file), "--out", str(tmp_path / "m.onnx"),
              "--opset", "5"])
    assert info.value.code == EXIT_USAGE
    assert "ONNX opset must be 7-23, got 5" in one_error_line(capsys.readouterr().err)
    with pytest.raises(ValueError, match="m.onnx: ONNX opset must be 7-23"):
        export_onnx(random_model(), tmp_path / "m.onnx", opset=5)
    assert not (tmp_path / "m.onnx").exists()


def test_unexpected_errors_are_one_line_unless_debug(weights_file, photo, capsys, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("something broke\nsecond line of detail")

    monkeypatch.setattr(predict, "load_predictor", boom)
    args = ["predict", str(photo), "--weights", str(weights_file)]
    assert main(args) == EXIT_ERROR
    line = one_error_line(capsys.readouterr().err)
    assert line == "error: RuntimeError: something broke second line of detail"
    with pytest.raises(RuntimeError, match="something broke"):
        main(["--debug", *args])


def test_delegated_commands_fail_in_one_line_too(capsys, monkeypatch):
    import fer_lib.model_table

    def broken(argv):
        raise KeyError("registry")

    monkeypatch.setattr(fer_lib.model_table, "main", broken)
    assert main(["model-table"]) == EXIT_ERROR
    assert one_error_line(capsys.readouterr().err) == "error: KeyError: 'registry'"
    with pytest.raises(KeyError):
        main(["--debug", "model-table"])


def test_python_dash_m_prints_no_traceback(weights_file, photo):
    device = "cuda:99" if torch.cuda.is_available() else "cuda"
    run = subprocess.run([sys.executable, "-m", "fer_lib", "predict", str(photo), "--weights",
                          str(weights_file), "--device", device], capture_output=True,
                         text=True, env=_child_env(), timeout=120)
    assert run.returncode == EXIT_USAGE and "not available" in one_error_line(run.stderr)


def test_json_output_is_strict_json(weights_file, photo, capsys):
    assert main(["predict", str(photo), "--weights", str(weights_file), "--json"]) == EXIT_OK
    faces = _strict_json(capsys.readouterr().out)
    assert len(faces) == 1 and set(faces[0]["probabilities"]) == set(CLASS_NAMES)


# --------------------------------------------------------------------------- no silent overwrite

def test_same_stem_photos_get_distinct_annotated_files(weights_file, tmp_path, capsys):
    photos = []
    for seed, folder in enumerate(("a", "b")):
        (tmp_path / folder).mkdir()
        photos.append(tmp_path / folder / "photo.jpg")
        cv2.imwrite(str(photos[-1]), photo_with_face(seed=seed))
    out = tmp_path / "out"
    assert main(["predict", *map(str, photos), "--weights", str(weights_file), "--json",
                 "--out", str(out)]) == EXIT_OK
    records = json.loads(capsys.readouterr().out)
    assert [r["annotated"] for r in records] == [str(out / "photo_annotated.png"),
                                                 str(out / "photo_annotated-2.png")]
    assert sorted(p.name for p in out.iterdir()) == ["photo_annotated-2.png",
                                                     "photo_annotated.png"]


def test_an_input_is_never_an_output(weights_file, tmp_path, capsys):
    photo = tmp_path / "x.png"
    cv2.imwrite(str(photo), photo_with_face())
    before = photo.read_bytes()
    (tmp_path / "link.png").symlink_to(photo)
    for out in (photo, tmp_path / "sub" / ".." / "x.png", tmp_path / "link.png"):
        (tmp_path / "sub").mkdir(exist_ok=True)
        assert main(["predict", str(photo), "--weights", str(weights_file), "--out",
                     str(out)]) == EXIT_USAGE
        assert "refusing to overwrite" in one_error_line(capsys.readouterr().err)
    assert photo.read_bytes() == before
    # a photo already named like another photo's annotated copy is not overwritten either
    taken = tmp_path / "x_annotated.png"
    cv2.imwrite(str(taken), photo_with_face(seed=1))
    taken_bytes = taken.read_bytes()
    assert main(["predict", str(photo), str(taken), "--weights", str(weights_file), "--out",
                 str(tmp_path)]) == EXIT_OK
    assert taken.read_bytes() == taken_bytes and (tmp_path / "x_annotated-2.png").exists()
    assert photo.read_bytes() == before


def test_video_and_onnx_outputs_refuse_their_input(weights_file, tmp_path, capsys):
    clip = tmp_path / "clip.avi"
    clip.write_bytes(b"not really a video")
    assert main(["predict", "--video", str(clip), "--out", str(clip), "--weights",
                 str(weights_file)]) == EXIT_USAGE
    assert "is the input video" in one_error_line(capsys.readouterr().err)
    assert main(["predict", "--video", str(clip), "--out", str(tmp_path / "c.gif"),
                 "--weights", str(weights_file)]) == EXIT_USAGE
    capsys.readouterr()
    before = weights_file.read_bytes()
    assert main(["export-onnx", "--weights", str(weights_file), "--out",
                 str(weights_file)]) == EXIT_USAGE
    assert "is the weights file" in one_error_line(capsys.readouterr().err)
    assert weights_file.read_bytes() == before


def test_a_failed_annotated_video_leaves_no_file(predictor, tmp_path):
    bogus = tmp_path / "bogus.avi"
    bogus.write_bytes(b"\0" * 100)
    out = tmp_path / "out.avi"
    with pytest.raises(ImageReadError):
        predict.annotate_video(predictor, bogus, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bogus.avi"]


def test_annotated_video_frames_are_bounded(predictor, tmp_path):
    clip = tmp_path / "wide.avi"
    writer = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (320, 240))
    for seed in range(3):
        writer.write(cv2.cvtColor(photo_with_face(240, 320, 140, 60, 50, seed), cv2.COLOR_GRAY2BGR))
    writer.release()
    out = tmp_path / "small.avi"
    assert predict.annotate_video(predictor, clip, out, max_side=160) == 3
    capture = cv2.VideoCapture(str(out))
    ok, frame = capture.read()
    capture.release()
    assert ok and frame.shape == (120, 160, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small.avi", "wide.avi"]


# --------------------------------------------------------------------------- checkpoints

@pytest.mark.parametrize("name,content,message", [
    ("last.pt", b"", "last.pt: empty file"),
    ("best.pt", bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)),
     "best.pt: not a fer_lib checkpoint (not a PyTorch zip archive)"),
])
def test_empty_or_random_checkpoints_name_the_file(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(checkpoint.CheckpointError) as info:
        checkpoint.load_checkpoint(path)
    assert str(info.value).startswith(f"{path}: ") and message in str(info.value)


def test_truncated_and_code_carrying_checkpoints_say_why(tmp_path):
    whole = checkpoint.save_checkpoint(tmp_path / "whole.pt", random_model())
    cut = tmp_path / "last.pt"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(checkpoint.CheckpointError, match="last.pt: not a fer_lib checkpoint, or truncated"):
        checkpoint.load_checkpoint(cut)
    pickled = tmp_path / "model.pt"
    torch.save({"model_state": {}, "extra": Path("x")}, pickled)  # a pickled Python object
    with pytest.raises(checkpoint.CheckpointError) as info:
        checkpoint.load_checkpoint(pickled)
    assert "model.pt: not a fer_lib checkpoint: it holds pickled Python objects" in str(info.value)
    assert "weights_only=False" not in str(info.value)  # never advise running the file's code


def test_loading_into_another_model_names_the_file_and_both_models(tmp_path):
    path = checkpoint.save_checkpoint(tmp_path / "best.pt", create_model(MODEL_NAME))
    other = create_model("fernet_small")
    with pytest.raises(checkpoint.CheckpointError) as info:
        checkpoint.load_checkpoint_into(other, path)
    message = str(info.value)
    assert message.startswith(f"{path}: weights of model 'exp3_cnn") and "fernet_small" in message
    assert "missing" in message and "\n" not in message
    # a checkpoint whose recorded kwargs do not fit its weights: load_model says so
    payload = torch.load(path, weights_only=True)
    payload["model_kwargs"]["hidden_dim"] = 64
    torch.save(payload, tmp_path / "edited.pt")
    with pytest.raises(checkpoint.CheckpointError, match=r"edited.pt: weights of model 'exp3_cnn.*shape"):
        checkpoint.load_model(tmp_path / "edited.pt")


# --------------------------------------------------------------------------- file permissions

def test_weights_and_onnx_files_are_readable_by_others(tmp_path):
    pytest.importorskip("onnx")
    old = os.umask(0o022)
    try:
        path = weights_io.save_weights(tmp_path, random_model(), model_name=MODEL_NAME,
                                       model_kwargs={}, class_names=CLASS_NAMES, mean=0.5,
                                       std=0.25, metrics={}, notes="")
        onnx_path = export_onnx(random_model(), tmp_path / "m.onnx")
    finally:
        os.umask(old)
    for written in (path, path.with_suffix(".json"), onnx_path):
        assert written.stat().st_mode & 0o777 == 0o644, written
