"""Defensive image decoding shared by training and the embed service (reliability.md rows 19-23).

One function turns untrusted bytes into an RGB ``PIL.Image`` or raises :class:`ImageDecodeError` with a
stable code and the HTTP status a service should answer. The order of checks is what makes it safe:
byte cap -> header-only open restricted to an allow-list of formats -> pixel cap from the header ->
full decode of frame 0 inside the ``try`` -> EXIF orientation -> explicit mode normalisation.

Nothing here touches process-wide state: Pillow's ``MAX_IMAGE_PIXELS``, ``LOAD_TRUNCATED_IMAGES`` and
the ``warnings`` filters stay as they are (changing them is not thread-safe in a server). Pillow's
``DecompressionBombWarning`` threshold is instead enforced by our own header check, so an image above it
is an error here even though Pillow would only warn.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

DEFAULT_MAX_BYTES = 20_000_000
DEFAULT_MAX_PIXELS = 40_000_000
DEFAULT_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF")

# code -> HTTP status a service answers with.
ERROR_STATUS: dict[str, int] = {
    "too_large": 413,
    "too_many_pixels": 413,
    "unsupported_format": 415,
    "empty": 422,
    "truncated": 422,
    "corrupt": 422,
    "unreadable": 422,
}

_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_WHITE = (255, 255, 255)
_ORIENTATION_TAG = 0x0112


class ImageDecodeError(ValueError):
    """An image that cannot be used; ``code`` is stable, ``http_status`` is what a service returns."""

    def __init__(self, code: str, message: str, http_status: int | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.http_status = http_status if http_status is not None else ERROR_STATUS.get(code, 422)


def _pixel_cap(max_pixels: int) -> int:
    """Our cap, never above Pillow's warning threshold (the warning becomes an error)."""
    pillow_warn = Image.MAX_IMAGE_PIXELS
    return min(max_pixels, pillow_warn) if pillow_warn else max_pixels


def _check_pixels(im: Image.Image, max_pixels: int) -> None:
    """Reject from header data alone: image size and every tile's extents (frame-extent bombs)."""
    cap = _pixel_cap(max_pixels)
    width, height = im.size
    if width <= 0 or height <= 0:
        raise ImageDecodeError("corrupt", f"image has invalid dimensions {width}x{height}")
    if width * height > cap:
        raise ImageDecodeError("too_many_pixels", f"image is {width}x{height} = {width * height} pixels; "
                                                  f"the limit is {cap}")
    for tile in getattr(im, "tile", None) or ():
        x0, y0, x1, y1 = tile[1]
        if (x1 - x0) * (y1 - y0) > cap:
            raise ImageDecodeError("too_many_pixels", f"an image tile spans {x1 - x0}x{y1 - y0} pixels; "
                                                      f"the limit is {cap}")


def _open_header(data: bytes, formats: tuple[str, ...]) -> Image.Image:
    """Lazy open (header only), restricted to ``formats``; Pillow's own bomb guards map to 413."""
    try:
        return Image.open(io.BytesIO(data), formats=list(formats))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError("too_many_pixels", str(exc)) from exc
    except UnidentifiedImageError as exc:
        raise ImageDecodeError("unsupported_format",
                               f"not a recognised image of an allowed format ({', '.join(formats)})") from exc
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, IndexError) as exc:
        raise ImageDecodeError("corrupt", f"cannot read image header: {exc}") from exc


def _load_frame0(im: Image.Image) -> None:
    """Decode frame 0 fully so truncation shows up here and not later inside a transform."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # Someone switched Pillow to silently grey-pad truncated files; refuse to decode under that.
        raise ImageDecodeError("truncated", "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True in this process; "
                                            "refusing to decode possibly truncated data")
    try:
        im.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError("too_many_pixels", str(exc)) from exc
    except OSError as exc:
        text = str(exc)
        code = "truncated" if "truncated" in text or "broken data stream" in text else "corrupt"
        raise ImageDecodeError(code, f"cannot decode image data: {text}") from exc
    except (SyntaxError, ValueError, EOFError, struct.error, zlib.error, IndexError, MemoryError) as exc:
        raise ImageDecodeError("corrupt", f"cannot decode image data: {exc}") from exc


def _apply_exif_orientation(im: Image.Image) -> Image.Image:
    """Rotate/flip per the EXIF Orientation tag; a damaged EXIF block leaves the pixels as stored."""
    try:
        if im.getexif().get(_ORIENTATION_TAG, 1) in (0, 1):
            return im  # the common case: no copy
        return ImageOps.exif_transpose(im)
    except (OSError, SyntaxError, ValueError, TypeError, KeyError, struct.error, IndexError):
        return im


def _sixteen_bit_to_l(im: Image.Image) -> Image.Image:
    """Scale 16-bit grey to 8 bits (divide by 257, rounded) instead of Pillow's clipping at 255."""
    arr = np.asarray(im).astype(np.uint32)
    return Image.fromarray(((arr + 128) // 257).astype(np.uint8), mode="L")


def _int32_to_l(im: Image.Image) -> Image.Image:
    """'I' images from 16-bit sources hold 0..65535: clip to that range, then scale like 16-bit."""
    arr = np.clip(np.asarray(im, dtype=np.int64), 0, 65535)
    return Image.fromarray(((arr + 128) // 257).astype(np.uint8), mode="L")


def _float_to_l(im: Image.Image) -> Image.Image:
    """Float images: [0, 1] data is scaled to 0..255, anything else is clipped to 0..255."""
    arr = np.nan_to_num(np.asarray(im, dtype=np.float64), nan=0.0, posinf=255.0, neginf=0.0)
    if arr.size and arr.min() >= 0.0 and arr.max() <= 1.0:
        arr = arr * 255.0
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")


def _composite_on_white(im: Image.Image) -> Image.Image:
    """Alpha -> RGB over a fixed white background, so transparent pixels never carry garbage colours."""
    rgba = im.convert("RGBA")
    background = Image.new("RGBA", rgba.size, _WHITE + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB")


def to_rgb(im: Image.Image) -> Image.Image:
    """Normalise any decoded mode to 8-bit RGB explicitly (16-bit, float, palette+alpha, CMYK, ...)."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in _SIXTEEN_BIT_MODES:
        return _sixteen_bit_to_l(im).convert("RGB")
    if mode == "I":
        return _int32_to_l(im).convert("RGB")
    if mode == "F":
        return _float_to_l(im).convert("RGB")
    if mode == "P":
        has_alpha = "transparency" in im.info or (im.palette is not None and im.palette.mode == "RGBA")
        return _composite_on_white(im) if has_alpha else im.convert("RGB")
    if mode in _ALPHA_MODES:
        return _composite_on_white(im)
    if mode in ("L", "1") and "transparency" in im.info:
        return _composite_on_white(im)
    try:
        return im.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ImageDecodeError("unsupported_format", f"cannot convert image mode {mode!r} to RGB") from exc


def _draft_jpeg(im: Image.Image, min_side: int) -> None:
    """Let the JPEG decoder scale by 1/2, 1/4 or 1/8 in the DCT while the short side stays >= ``min_side``.

    Why: a served model sees 28-224 px, and a phone photo is 12 MP. Decoding it whole and then resizing costs
    most of a request's CPU and memory; decoding at 1/8 does the first factor of the resize inside the decoder
    (RESULTS.md, "JPEG draft decoding"). Nothing happens for other formats or for images already small."""
    if im.format != "JPEG" or min_side <= 0:
        return
    width, height = im.size
    scale = min(width, height) // min_side
    if scale < 2:
        return
    try:  # Pillow picks the largest of 8, 4, 2 with both sides >= the size asked for
        im.draft(im.mode, (max(1, width // scale), max(1, height // scale)))
    except (OSError, ValueError) as exc:
        raise ImageDecodeError("corrupt", f"cannot set up the JPEG decoder: {exc}") from exc


def header_pixels(data: bytes, allowed_formats: Iterable[str] = DEFAULT_FORMATS, min_side: int = 0) -> int:
    """Width x height from the header alone (nothing decoded): what a decode of ``data`` is about to cost,
    so a service can budget concurrent decodes before starting one. With ``min_side`` it is the size a drafted
    JPEG decodes to (the same :func:`_draft_jpeg`, which only reconfigures the decoder). Bad input raises
    ImageDecodeError."""
    im = _open_header(bytes(data), tuple(f.upper() for f in allowed_formats))
    try:
        _draft_jpeg(im, min_side)
        return int(im.width) * int(im.height)
    finally:
        im.close()


def decode_image(data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES, max_pixels: int = DEFAULT_MAX_PIXELS,
                 allowed_formats: Iterable[str] = DEFAULT_FORMATS, min_side: int = 0) -> Image.Image:
    """Decode untrusted bytes into an RGB image (frame 0 only) or raise :class:`ImageDecodeError`.

    ``min_side`` > 0 (inference, where the image is about to be shrunk): a JPEG may come back smaller, by a
    power of two, with its short side still at least ``min_side``; see :func:`_draft_jpeg`."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"decode_image expects bytes, got {type(data).__name__}")
    size = len(data)
    if size == 0:
        raise ImageDecodeError("empty", "the image is empty (0 bytes)")
    if size > max_bytes:
        raise ImageDecodeError("too_large", f"the image is {size} bytes; the limit is {max_bytes}")
    formats = tuple(f.upper() for f in allowed_formats)
    im = _open_header(bytes(data), formats)
    _check_pixels(im, max_pixels)
    _draft_jpeg(im, min_side)
    _load_frame0(im)
    _check_pixels(im, max_pixels)  # some decoders only learn the true size while loading
    rgb = to_rgb(_apply_exif_orientation(im))
    return rgb if rgb.mode == "RGB" else rgb.convert("RGB")


def load_image(path: str | os.PathLike[str], *, max_bytes: int = DEFAULT_MAX_BYTES,
               max_pixels: int = DEFAULT_MAX_PIXELS,
               allowed_formats: Iterable[str] = DEFAULT_FORMATS, min_side: int = 0) -> Image.Image:
    """Read a file and decode it with the same checks; the byte cap is checked before reading."""
    p = Path(path)
    try:
        size = p.stat().st_size
    except OSError as exc:
        raise ImageDecodeError("unreadable", f"cannot read {p}: {exc.strerror or exc}") from exc
    if size > max_bytes:
        raise ImageDecodeError("too_large", f"{p} is {size} bytes; the limit is {max_bytes}")
    try:
        with p.open("rb") as fh:
            data = fh.read(max_bytes + 1)
    except OSError as exc:
        raise ImageDecodeError("unreadable", f"cannot read {p}: {exc.strerror or exc}") from exc
    return decode_image(data, max_bytes=max_bytes, max_pixels=max_pixels, allowed_formats=allowed_formats,
                        min_side=min_side)
