"""The serving app decodes only what a camera sends, checks it first, and off its event loop (issue 15, hole 3).

Before: every format Pillow knows was opened (an ICO announcing 256x256 decoded its embedded
9,400x9,400 PNG before the 413; EPS runs Ghostscript where installed), a JPEG was decoded at full
size, EXIF orientation was ignored, and decoding ran on the event loop, so `/healthz` waited
behind any large image. Now: PNG, JPEG and WebP only (415 naming them otherwise), the pixel count
from the header first, JPEG draft mode, EXIF orientation applied as training applies it, and a
bounded decode pool (503 at once when its queue is full).

The model is an untrained colour graph served from a static source (no MLflow store): what is
tested is the app in front of it.
"""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import threading
import zlib

import httpx
import numpy as np
import pytest
from PIL import Image, JpegImagePlugin

import deploy.app as app_module
from deploy.app import ServeConfig
from deploy.model_source import ModelSet, load_model
from tests.deploy.test_canary_classes import CHAMPION_W, TWO, colour_model, png
from tests.deploy.test_serving import StaticSource, running

RED, BLUE = (250, 0, 0), (0, 0, 250)
ACCEPTED = "PNG, JPEG or WebP"


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> StaticSource:
    path = colour_model(tmp_path_factory.mktemp("decode") / "colour.onnx", TWO, CHAMPION_W)
    return StaticSource(ModelSet(load_model(path, "decode-test", "1")))


def _config(**kwargs) -> ServeConfig:
    return ServeConfig(model_name="decode-test", tracking_uri="sqlite:///unused.db", **kwargs)


def post(client: httpx.Client, body: bytes, content_type: str = "image/png") -> httpx.Response:
    return client.post("/predict", content=body, headers={"content-type": content_type})


def png_bomb(side: int) -> bytes:
    """A grey PNG of side x side pixels, all black: ~90 KB for 9,400 (88 MB once decoded)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" * (side + 1)  # filter byte, then the pixels
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row * min(1000, side - done)) for done in range(0, side, 1000)) + z.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def ico_around(embedded_png: bytes) -> bytes:
    """An ICO whose directory says 256x256 (width and height 0) and whose only image is `embedded_png`."""
    return struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, len(embedded_png), 22) \
        + embedded_png


@pytest.fixture(scope="module")
def bombs() -> dict[str, bytes]:
    big = png_bomb(9400)
    return {"png": big, "ico": ico_around(big)}


# A fresh interpreter, so its peak RSS before the bomb is only the import's: the growth is the decode's.
_MEASURE = """
import json, resource, sys
from deploy.app import Rejected, decode_image
body = open(sys.argv[1], "rb").read()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    decode_image(body, 8, 4096 * 4096)
    status = 200
except Rejected as exc:
    status = exc.status
grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(json.dumps({"status": status, "grown_mb": grown / 1024}))
"""


@pytest.mark.timeout(180)
def test_an_ico_or_png_bomb_is_refused_from_its_header_with_little_memory(source, bombs, tmp_path):
    with running(_config(), source) as url, httpx.Client(base_url=url, timeout=30) as client:
        ico = post(client, bombs["ico"], "image/x-icon")
        big = post(client, bombs["png"])
        assert post(client, png(RED)).status_code == 200
    # The ICO is never parsed: its format is refused before Pillow's ICO plugin reads the 9,400^2 PNG.
    assert (ico.status_code, ico.json()["reason"]) == (415, "format"), ico.text
    assert "ICO" in ico.json()["error"] and ACCEPTED in ico.json()["error"]
    assert (big.status_code, big.json()["reason"]) == (413, "too_large"), big.text
    assert "9400x9400 pixels" in big.json()["error"]

    for kind, body in bombs.items():
        (tmp_path / kind).write_bytes(body)
        done = subprocess.run([sys.executable, "-c", _MEASURE, str(tmp_path / kind)], capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        measured = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{kind} bomb: status {measured['status']}, peak RSS grew {measured['grown_mb']:.1f} MB")
        assert measured["status"] in (413, 415)
        # Decoding it would cost 88 MB (grey) and more once converted to RGB.
        assert measured["grown_mb"] < 24, measured


def _saved(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), RED).save(buf, fmt)
    return buf.getvalue()


@pytest.mark.timeout(120)
def test_formats_other_than_png_jpeg_webp_get_415_naming_the_accepted_ones(source):
    with running(_config(), source) as url, httpx.Client(base_url=url, timeout=30) as client:
        refused = {fmt: post(client, _saved(fmt), f"image/{fmt.lower()}") for fmt in ("EPS", "GIF", "BMP", "TIFF")}
        accepted = {fmt: post(client, _saved(fmt), f"image/{fmt.lower()}") for fmt in ("PNG", "JPEG", "WEBP")}
        garbage = post(client, b"hello, I am not a picture", "application/octet-stream")
        metrics = client.get("/metrics").text
    for fmt, answer in refused.items():
        assert answer.status_code == 415, (fmt, answer.text)
        assert answer.json()["reason"] == "format"
        assert fmt in answer.json()["error"] and ACCEPTED in answer.json()["error"], answer.json()
    for fmt, answer in accepted.items():
        assert answer.status_code == 200, (fmt, answer.text)
        assert answer.json()["top_class"] == "fu"
    assert garbage.status_code == 422 and "not an image" in garbage.json()["error"]
    assert 'saofu_rejected_requests_total{reason="format"} 4.0' in metrics


# ----------------------------------------------------------------------------------- EXIF, draft

# EXIF orientation -> the transposition that makes the stored pixels upright (ImageOps.exif_transpose).
_T = Image.Transpose
_UPRIGHT = {3: _T.ROTATE_180, 6: _T.ROTATE_270, 8: _T.ROTATE_90}
_INVERSE = {_T.ROTATE_180: _T.ROTATE_180, _T.ROTATE_270: _T.ROTATE_90, _T.ROTATE_90: _T.ROTATE_270}


def _halves(width: int, height: int) -> Image.Image:
    """Red left half, blue right half: any rotation or flip changes it."""
    im = Image.new("RGB", (width, height), BLUE)
    im.paste(RED, (0, 0, width // 2, height))
    return im


def _jpeg(im: Image.Image, orientation: int | None = None) -> bytes:
    buf = io.BytesIO()
    kwargs = {}
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kwargs["exif"] = exif.tobytes()
    im.save(buf, "JPEG", quality=95, subsampling=0, **kwargs)
    return buf.getvalue()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("orientation", sorted(_UPRIGHT))
def test_a_jpeg_stored_sideways_with_exif_decodes_as_the_upright_image_in_serving_and_training(orientation, tmp_path):
    from tasks.data.loading import _decode as training_decode

    upright = _halves(256, 128)
    stored = upright.transpose(_INVERSE[_UPRIGHT[orientation]])  # what the phone wrote, sideways
    body = _jpeg(stored, orientation)
    served, meta = app_module.decode_image(body, 16, 4096 * 4096)
    expected, _ = app_module.decode_image(_jpeg(upright), 16, 4096 * 4096)
    ignored, _ = app_module.decode_image(_jpeg(stored), 16, 4096 * 4096)  # no EXIF: as stored
    assert meta["format"] == "JPEG"
    diff = np.abs(served.astype(int) - expected.astype(int))
    assert diff.max() <= 12, diff.max()  # JPEG noise only
    assert np.abs(ignored.astype(int) - expected.astype(int)).max() > 100  # orientation does matter here
    assert served[0, 8, 2].argmax() == 0 and served[0, 8, 13].argmax() == 2  # red left, blue right

    (tmp_path / "photo.jpg").write_bytes(body)
    trained = training_decode(tmp_path / "photo.jpg", 16)
    assert trained[8, 2].argmax() == 0 and trained[8, 13].argmax() == 2  # training sees it upright too
    assert np.abs(trained.astype(int) - served[0].astype(int)).max() <= 24


@pytest.mark.timeout(60)
def test_a_large_jpeg_is_decoded_in_draft_mode_at_about_twice_the_model_input(monkeypatch):
    loaded_sizes = []
    real_load = JpegImagePlugin.JpegImageFile.load

    def spy(self):
        loaded_sizes.append(self.size)
        return real_load(self)

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "load", spy)
    pixels, meta = app_module.decode_image(_jpeg(_halves(1024, 1024)), 32, 4096 * 4096)
    assert pixels.shape == (1, 32, 32, 3)
    assert (meta["width"], meta["height"]) == (1024, 1024)  # the image as sent
    assert loaded_sizes and max(w * h for w, h in loaded_sizes) <= 128 * 128  # libjpeg scaled 1/8, not 1024^2


# ----------------------------------------------------------------------------------- the decode pool


def _noise_png(side: int) -> bytes:
    """A PNG too big to decode inline (incompressible noise: ~3 bytes a pixel)."""
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(side).integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


class BlockingDecode:
    """A decode_image stand-in that holds bodies over `min_bytes` until released (then decodes them)."""

    def __init__(self, real, min_bytes: int):
        self.real, self.min_bytes = real, min_bytes
        self.entered, self.release = threading.Event(), threading.Event()

    def __call__(self, body, *args, **kwargs):
        if len(body) > self.min_bytes:
            self.entered.set()
            assert self.release.wait(60), "never released"
        return self.real(body, *args, **kwargs)


@pytest.mark.timeout(120)
def test_healthz_answers_while_a_decode_is_in_flight(source, monkeypatch):
    big = _noise_png(128)
    assert len(big) > 32 * 1024
    blocking = BlockingDecode(app_module.decode_image, min_bytes=32 * 1024)
    monkeypatch.setattr(app_module, "decode_image", blocking)
    answers: list[httpx.Response] = []
    with running(_config(), source) as url, httpx.Client(base_url=url, timeout=60) as client:
        poster = threading.Thread(target=lambda: answers.append(post(client, big)), daemon=True)
        poster.start()
        try:
            assert blocking.entered.wait(30), "the decode never started"
            with httpx.Client(base_url=url, timeout=5) as other:  # a blocked event loop would time out here
                health = other.get("/healthz")
                small = post(other, png(RED))
        finally:
            blocking.release.set()
            poster.join(timeout=60)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert small.status_code == 200  # a small image does not wait behind the big one either
    assert len(answers) == 1 and answers[0].status_code == 200, answers


@pytest.mark.timeout(120)
def test_a_full_decode_queue_answers_503_at_once_instead_of_queueing(source, monkeypatch):
    big = _noise_png(128)
    blocking = BlockingDecode(app_module.decode_image, min_bytes=32 * 1024)
    monkeypatch.setattr(app_module, "decode_image", blocking)
    answers: list[httpx.Response] = []
    with running(_config(decode_threads=1, decode_queue=0), source) as url, \
            httpx.Client(base_url=url, timeout=60) as client:
        poster = threading.Thread(target=lambda: answers.append(post(client, big)), daemon=True)
        poster.start()
        try:
            assert blocking.entered.wait(30), "the decode never started"
            with httpx.Client(base_url=url, timeout=5) as other:
                busy = post(other, big)
                health = other.get("/healthz").json()
        finally:
            blocking.release.set()
            poster.join(timeout=60)
    assert busy.status_code == 503 and busy.json()["reason"] == "busy", busy.text
    assert health["decode"] == {"pending": 1, "refused": 1}
    assert len(answers) == 1 and answers[0].status_code == 200
