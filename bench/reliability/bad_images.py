"""The image corpus: broken, truncated, bomb, foreign-format and odd-but-legitimate images, built
here (Pillow, numpy, struct and zlib; nothing downloaded). `bench.reliability.corpus` offers them
to the serving app, ingest and training."""


from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ["fu", "not_fu"]  # what the corpus's colour model answers
RED, GREEN, BLUE = (250, 0, 0), (0, 250, 0), (0, 0, 250)



@dataclass(frozen=True)
class BadImage:
    """One kind of image body, and what the serving app must answer for it.

    Attributes:
        kind: its name in the report.
        body: the bytes.
        suffix: its file name's suffix where it is written to disk (ingest, training).
        content_type: the Content-Type it is posted with.
        status: the serving app's answer (200 for the legitimate ones).
        names: a word the 4xx message must hold (what is wrong); "" for a 200.
        reference: for a legitimate one, a plain RGB PNG of what it shows: both must decode alike.
        broken: the bytes are not a whole image (ingest and training must refuse them).
    """

    kind: str
    body: bytes
    suffix: str = ".png"
    content_type: str = "image/png"
    status: int = 422
    names: str = "not an image"
    reference: bytes | None = None
    broken: bool = False

    @property
    def legit(self) -> bool:
        return self.status == 200


def encoded(im: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes, crc: int | None = None) -> bytes:
    crc = zlib.crc32(kind + data) if crc is None else crc
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc & 0xFFFFFFFF)


def _png(width: int, height: int, idat: bytes | None = None, before_idat: bytes = b"", ihdr_crc: int | None = None,
         ) -> bytes:
    """A grey 8-bit PNG built by hand, so its header can say what its data is not."""
    if idat is None:
        idat = zlib.compress(b"".join(b"\x00" + b"\x80" * width for _ in range(height)))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header, ihdr_crc) + before_idat + _chunk(b"IDAT", idat)
            + _chunk(b"IEND", b""))


def _noise(side: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8))


def _halves(width: int, height: int) -> Image.Image:
    """Red left half, blue right half: a rotation or a flip changes it."""
    im = Image.new("RGB", (width, height), BLUE)
    im.paste(RED, (0, 0, width // 2, height))
    return im


def _jpeg_with_size(width: int, height: int) -> bytes:
    """A small JPEG whose frame header (SOF0) is rewritten to announce width x height."""
    body = bytearray(encoded(Image.new("RGB", (16, 16), RED), "JPEG"))
    sof = body.index(b"\xff\xc0")
    struct.pack_into(">HH", body, sof + 5, height, width)
    return bytes(body)


def _ico(embedded: bytes) -> bytes:
    """An ICO whose directory says 256x256 around `embedded` (a PNG)."""
    return struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, len(embedded), 22) + embedded


def _exif_rotated() -> tuple[bytes, bytes]:
    """A JPEG stored sideways with EXIF orientation 6 (as phones write it), and the upright image."""
    upright = _halves(64, 32)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    return encoded(stored, "JPEG", quality=95, subsampling=0, exif=exif.tobytes()), encoded(upright, "PNG")


def image_corpus() -> list[BadImage]:
    """Every image kind, built in memory (a few hundred KiB in all)."""
    good_png = encoded(_noise(64), "PNG")
    good_jpeg = encoded(_noise(64), "JPEG", quality=90)
    good_webp = encoded(_noise(64), "WEBP", quality=90)
    frames = [Image.new("RGB", (16, 16), c) for c in (RED, GREEN, BLUE)]
    animated = io.BytesIO()
    frames[0].save(animated, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    grey16 = Image.fromarray(np.full((16, 16), 32896, np.uint16))  # 32896 = 128 * 257: grey 128 in 8 bits
    palette = Image.new("P", (16, 16), 1)
    palette.putpalette([0, 0, 0, *RED] + [0, 0, 0] * 254)
    exif_body, exif_upright = _exif_rotated()
    # 64 MiB of text in a zTXt chunk: ~65 KiB compressed; Pillow inflates it while reading the header.
    text_bomb = _chunk(b"zTXt", b"Comment\x00\x00" + zlib.compress(b"A" * (64 * 2**20), 9))
    svg = (b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="16" height="16">'
           b'<rect width="16" height="16" fill="red"/></svg>\n')
    refused = dict(status=415, broken=False)
    return [
        BadImage("empty body", b"", status=400, names="empty", broken=True),
        BadImage("random bytes", np.random.default_rng(1).bytes(4096), content_type="application/octet-stream",
                 broken=True),
        BadImage("text file named .png", b"this is a shopping list, not a picture\n", broken=True),
        BadImage("truncated PNG", good_png[: len(good_png) * 3 // 5], names="could not be decoded", broken=True),
        BadImage("truncated JPEG", good_jpeg[: len(good_jpeg) // 2], ".jpg", "image/jpeg",
                 names="could not be decoded", broken=True),
        BadImage("truncated WebP", good_webp[: len(good_webp) // 2], ".webp", "image/webp", broken=True),
        BadImage("PNG with a bad header CRC", _png(16, 16, ihdr_crc=0xDEADBEEF), broken=True),
        BadImage("PNG with a corrupt data stream", _png(16, 16, idat=b"\x78\x9c" + b"\xff" * 40),
                 names="could not be decoded", broken=True),
        BadImage("PNG decompression bomb (30000x30000 header)", _png(30000, 30000, idat=zlib.compress(b"\0" * 4096)),
                 status=413, names="pixels", broken=True),
        BadImage("JPEG announcing 65000x65000", _jpeg_with_size(65000, 65000), ".jpg", "image/jpeg", status=413,
                 names="pixels", broken=True),
        BadImage("JPEG over the pixel limit (5000x4000 header)", _jpeg_with_size(5000, 4000), ".jpg", "image/jpeg",
                 status=413, names="5000x4000 pixels", broken=True),
        BadImage("PNG text-chunk bomb (64 MiB zTXt)", _png(8, 8, before_idat=text_bomb), status=413,
                 names="decompress", broken=True),
        BadImage("ICO around a 256x256 PNG", _ico(encoded(_noise(256), "PNG")), ".ico", "image/x-icon", names="ICO",
                 **refused),
        BadImage("BMP", encoded(Image.new("RGB", (16, 16), RED), "BMP"), ".bmp", "image/bmp", names="BMP", **refused),
        BadImage("TIFF", encoded(Image.new("RGB", (16, 16), RED), "TIFF"), ".tiff", "image/tiff", names="TIFF",
                 **refused),
        BadImage("GIF", encoded(Image.new("RGB", (16, 16), RED), "GIF"), ".gif", "image/gif", names="GIF", **refused),
        BadImage("animated GIF", animated.getvalue(), ".gif", "image/gif", names="GIF", **refused),
        BadImage("EPS", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\nshowpage\n", ".eps",
                 "application/octet-stream", names="EPS", **refused),
        BadImage("SVG", svg, ".svg", "image/svg+xml", names="SVG", **refused),
        BadImage("HEIC header", b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64, ".heic",
                 "image/heic", names="HEIF", **refused),
        BadImage("1x1 PNG", encoded(Image.new("RGB", (1, 1), RED), "PNG"), status=200, names="",
                 reference=encoded(Image.new("RGB", (1, 1), RED), "PNG")),
        BadImage("1x5000 PNG (extreme aspect ratio)", encoded(Image.new("RGB", (1, 5000), GREEN), "PNG"), status=200,
                 names="", reference=encoded(Image.new("RGB", (8, 8), GREEN), "PNG")),
        BadImage("16-bit grey PNG", encoded(grey16, "PNG"), status=200, names="",
                 reference=encoded(Image.new("RGB", (16, 16), (128, 128, 128)), "PNG")),
        BadImage("CMYK JPEG", encoded(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95), ".jpg",
                 "image/jpeg", status=200, names="", reference=encoded(Image.new("RGB", (16, 16), (255, 0, 0)), "PNG")),
        BadImage("palette PNG with transparency", encoded(palette, "PNG", transparency=0), status=200, names="",
                 reference=encoded(Image.new("RGB", (16, 16), RED), "PNG")),
        BadImage("EXIF-rotated JPEG", exif_body, ".jpg", "image/jpeg", status=200, names="", reference=exif_upright),
        BadImage("JPEG sent as image/png", encoded(Image.new("RGB", (16, 16), BLUE), "JPEG", quality=95), ".jpg",
                 "image/png", status=200, names="", reference=encoded(Image.new("RGB", (16, 16), BLUE), "PNG")),
    ]


def good_images(folder: Path, n: int = 3) -> None:
    for label, colour in (("fu", RED), ("not_fu", GREEN)):
        (folder / label).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.new("RGB", (16, 16), tuple(max(0, c - 10 * i) for c in colour)).save(folder / label / f"good{i}.png")
