"""Request bodies -> model pixels: only what a camera sends, checked before it is decoded, off the event loop.

What a request may cost is decided from the header, before any pixel is decompressed:

- Only PNG, JPEG and WebP are opened (`Image.open(..., formats=...)`). Any other format Pillow
  knows is never parsed: an ICO can announce 256x256 and embed a 9,400x9,400 PNG, an EPS runs
  Ghostscript where it is installed. A body that looks like another image format (SVG included) is
  answered 415 naming the accepted ones; anything else 422. A PNG whose text chunk would inflate past
  Pillow's limit is a bomb: 413.
- The pixel count from the header is checked against the limit (413) before decoding. A JPEG is
  decoded in draft mode (libjpeg's DCT scaling) at no less than `DRAFT_FACTOR` x the model's input
  size, and that size is checked again before it is loaded.
- EXIF orientation is applied as phones send it (`ImageOps.exif_transpose`), as training decodes
  (tasks/data/loading.py), a 16-bit grey PNG is scaled to 8 bits (not clipped to white), then the
  image is resized bilinearly to the model's input.

`DecodePool` runs decodes on a few threads (`anyio.to_thread` under a CapacityLimiter) so that
`/healthz` and small requests never wait behind a large decode, and answers 503 at once when more
requests are waiting than its queue holds, instead of queueing without bound. A small body whose
header announces few pixels is decoded inline: a thread hop costs more than its decode (measured
on the 2-core bench box: ~0.17 ms for the hop, ~0.08 ms to decode the bench's 64 px PNG).
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import TypeVar

import anyio
import numpy as np
from PIL import ExifTags, Image, ImageOps, PngImagePlugin, UnidentifiedImageError

from saofu.pixels import to_rgb8

ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP")
ACCEPTED_NAMES = "PNG, JPEG or WebP"
DRAFT_FACTOR = 2  # a JPEG is decoded at >= 2x the model's input size, then resized bilinearly
# PNG chunks Pillow inflates while reading the header (text, ICC profile): up to 64 MB for a body of
# a few KiB, so a body holding them is never opened on the event loop.
_INFLATED_PNG_CHUNKS = (b"zTXt", b"iTXt", b"iCCP")
# Leading bytes of image formats that are not accepted, to answer 415 (not 422) naming them.
# Matched as bytes only: their Pillow plugins are never run.
_OTHER_FORMATS = (
    (b"GIF87a", "GIF"), (b"GIF89a", "GIF"), (b"BM", "BMP"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"),
    (b"%!PS", "EPS"), (b"\xc5\xd0\xd3\xc6", "EPS"), (b"\x00\x00\x01\x00", "ICO"), (b"\x00\x00\x02\x00", "CUR"),
    (b"8BPS", "PSD"), (b"%PDF", "PDF"), (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG 2000"),
    (b"\xff\x4f\xff\x51", "JPEG 2000"), (b"qoif", "QOI"), (b"DDS ", "DDS"), (b"icns", "ICNS"),
    (b"\x76\x2f\x31\x01", "OpenEXR"), (b"gimp xcf", "XCF"),
)
_ORIENTATION = ExifTags.Base.Orientation

T = TypeVar("T")


class Rejected(Exception):
    """A request the app will not run the model on; becomes a 4xx (or 503) JSON answer."""

    def __init__(self, status: int, reason: str, message: str):
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message


def other_image_format(body: bytes) -> str | None:
    """The name of a non-accepted image format `body` starts like, from its leading bytes alone."""
    for magic, name in _OTHER_FORMATS:
        if body.startswith(magic):
            return name
    if body[4:8] == b"ftyp" and body[8:12] in (b"heic", b"heix", b"mif1", b"avif", b"avis", b"msf1"):
        return "HEIF/AVIF"
    head = body[:256].lstrip(b"\xef\xbb\xbf \t\r\n").lower()  # an SVG is XML text, maybe after a BOM
    if head.startswith(b"<svg") or (head.startswith(b"<?xml") and b"<svg" in body[:1024].lower()):
        return "SVG"
    return None


def _check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise Rejected(413, "too_large", f"image is {width}x{height} pixels; at most {max_pixels:,} pixels "
                       "are accepted: send the crop, not the whole photo")


def open_image(body: bytes, max_pixels: int) -> Image.Image:
    """Read the header of a PNG, JPEG or WebP body (no pixels decoded) and check its pixel count.

    Raises:
        Rejected: 415 another image format, 422 not an image, 413 too many pixels.
    """
    try:
        im = Image.open(io.BytesIO(body), formats=ACCEPTED_FORMATS)
    except Image.DecompressionBombError as exc:
        raise Rejected(413, "too_large", f"image too large: {exc}") from None
    except ValueError as exc:
        # Pillow refuses a zTXt, iTXt or iCCP chunk that would inflate past MAX_TEXT_CHUNK: a bomb, not a broken file.
        if "Decompressed" in str(exc):
            raise Rejected(413, "too_large", "a compressed text or ICC chunk of the PNG would decompress to more "
                           f"than {PngImagePlugin.MAX_TEXT_CHUNK:,} bytes: a decompression bomb") from None
        raise Rejected(422, "not_an_image", f"the body ({len(body)} bytes) is not an image {ACCEPTED_NAMES} "
                       "can be read from") from None
    except UnidentifiedImageError:
        other = other_image_format(body)
        if other is not None:
            raise Rejected(415, "format", f"{other} images are not accepted: send {ACCEPTED_NAMES}") from None
        raise Rejected(422, "not_an_image", f"the body ({len(body)} bytes) is not an image: send "
                       f"{ACCEPTED_NAMES}") from None
    except (OSError, SyntaxError):
        raise Rejected(422, "not_an_image", f"the body ({len(body)} bytes) is not an image {ACCEPTED_NAMES} "
                       "can be read from") from None
    _check_pixels(*im.size, max_pixels)
    return im


def decode_image(body: bytes, size: int, max_pixels: int, opened: Image.Image | None = None,
                 ) -> tuple[np.ndarray, dict]:
    """Image bytes -> uint8 pixels [1,size,size,3]: upright (EXIF), RGB, bilinear, as training decodes.

    Args:
        body: the request body.
        size: the model's input size.
        max_pixels: the most pixels accepted, checked from the header before decoding.
        opened: `open_image(body, max_pixels)` when the caller has it already.

    Raises:
        Rejected: 413 too many pixels, 415 not PNG/JPEG/WebP, 422 not an image or a broken one.
    """
    im = opened if opened is not None else open_image(body, max_pixels)
    width, height = im.size
    try:
        if im.format in ("JPEG", "MPO"):
            im.draft("RGB", (size * DRAFT_FACTOR, size * DRAFT_FACTOR))
            _check_pixels(*im.size, max_pixels)  # what will really be decoded
        im.load()
        if im.getexif().get(_ORIENTATION, 1) != 1:
            ImageOps.exif_transpose(im, in_place=True)  # only then: it copies an upright image
        rgb = to_rgb8(im)
        if rgb.size != (size, size):
            rgb = rgb.resize((size, size), Image.BILINEAR)  # as tasks.data.loading decodes training images
        pixels = np.asarray(rgb, dtype=np.uint8)[None]
    except Rejected:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise Rejected(422, "not_an_image", f"the {im.format or 'image'} body could not be decoded: {exc}") from None
    return pixels, {"bytes": len(body), "format": im.format, "width": width, "height": height}


class DecodePool:
    """Where decodes run: inline when small, else on `threads` threads with at most `queue` waiting.

    Args:
        threads: decodes running at once off the event loop.
        queue: requests allowed to wait for a thread; one more is answered 503 at once.
        inline_bytes: bodies up to this size may be decoded on the event loop...
        inline_pixels: ...when their header announces at most this many pixels (and, for a PNG,
            no chunk Pillow inflates while reading the header). 0 sends every body to the threads.
    """

    def __init__(self, threads: int = 2, queue: int = 32, inline_bytes: int = 16 * 1024,
                 inline_pixels: int = 128 * 128):
        self.threads, self.queue = threads, queue
        self.inline_bytes, self.inline_pixels = inline_bytes, inline_pixels
        self._limiter: anyio.CapacityLimiter | None = None  # made on the event loop that uses it
        self.pending = 0  # decodes running or waiting; read and written on the event loop only
        self.refused = 0

    def opened_inline(self, body: bytes, max_pixels: int) -> Image.Image | None:
        """The opened image when `body` is cheap enough to decode on the event loop; None otherwise.

        Raises:
            Rejected: what `open_image` raises.
        """
        if len(body) > self.inline_bytes or self.inline_pixels <= 0:
            return None
        if body.startswith(b"\x89PNG") and any(tag in body for tag in _INFLATED_PNG_CHUNKS):
            return None
        im = open_image(body, max_pixels)
        return im if im.size[0] * im.size[1] <= self.inline_pixels else None

    async def run(self, fn: Callable[..., T], *args) -> T:
        """`fn(*args)` on a decode thread; 503 at once when the queue is full.

        Raises:
            Rejected: 503 when `threads + queue` decodes are running or waiting already.
        """
        if self.pending >= self.threads + self.queue:
            self.refused += 1
            raise Rejected(503, "busy", f"{self.pending} images are being decoded or waiting: try again shortly")
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(self.threads)
        self.pending += 1
        try:
            return await anyio.to_thread.run_sync(fn, *args, limiter=self._limiter)
        finally:
            self.pending -= 1
