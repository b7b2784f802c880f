"""Bad-image corpus for excb.data.decode (reliability.md rows 19-23), generated in the test."""

from __future__ import annotations

import io
import struct
import time
import warnings
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile

from excb.data.decode import ImageDecodeError, decode_image, load_image, to_rgb


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _noise(w: int = 64, h: int = 48, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png_header_only(width: int, height: int) -> bytes:
    """A valid-looking greyscale PNG that claims width x height but carries one row (never allocated)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    row = zlib.compress(b"\x00" * (width + 1))
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", row) + _chunk(b"IEND", b"")


def _code(data: bytes, **kw) -> ImageDecodeError:
    with pytest.raises(ImageDecodeError) as info:
        decode_image(data, **kw)
    return info.value


def test_plain_jpeg_and_png_decode_to_rgb():
    src = _noise()
    for fmt in ("JPEG", "PNG", "WEBP", "BMP", "TIFF"):
        im = decode_image(_encode(src, fmt))
        assert im.mode == "RGB" and im.size == (64, 48), fmt
    assert np.array_equal(np.asarray(decode_image(_encode(src, "PNG"))), np.asarray(src))


def test_empty_and_oversize_bytes():
    err = _code(b"")
    assert (err.code, err.http_status) == ("empty", 422)
    err = _code(_encode(_noise(), "PNG"), max_bytes=100)
    assert (err.code, err.http_status) == ("too_large", 413)


def test_text_renamed_jpg_and_disallowed_format(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is not an image\n" * 10)
    with pytest.raises(ImageDecodeError) as info:
        load_image(path)
    assert (info.value.code, info.value.http_status) == ("unsupported_format", 415)
    err = _code(_encode(_noise(), "JPEG"), allowed_formats=("PNG",))
    assert (err.code, err.http_status) == ("unsupported_format", 415)


def test_polyglots():
    jpeg = _encode(_noise(), "JPEG")
    err = _code(b"<html><script>alert(1)</script></html>\n" + jpeg)
    assert err.code == "unsupported_format"
    # A PNG with a ZIP archive appended: the image part is what gets decoded, the tail is ignored.
    png = _encode(_noise(), "PNG")
    zip_tail = b"PK\x03\x04" + b"\x00" * 26 + b"payload.txt" + b"A" * 64 + b"PK\x05\x06" + b"\x00" * 18
    im = decode_image(png + zip_tail)
    assert np.array_equal(np.asarray(im), np.asarray(_noise()))


def test_truncated_jpeg_and_png():
    jpeg = _encode(_noise(256, 256), "JPEG", quality=95)
    err = _code(jpeg[: len(jpeg) // 2])
    assert (err.code, err.http_status) == ("truncated", 422)
    png = _encode(_noise(256, 256), "PNG")
    err = _code(png[: len(png) // 2])
    assert err.code in ("truncated", "corrupt") and err.http_status == 422
    err = _code(png[:20])
    assert err.http_status in (415, 422)


def test_load_truncated_images_flag_left_alone():
    before = ImageFile.LOAD_TRUNCATED_IMAGES
    jpeg = _encode(_noise(128, 128), "JPEG")
    _code(jpeg[:300])
    assert ImageFile.LOAD_TRUNCATED_IMAGES is before is False


def test_decompression_bombs_rejected_from_header():
    filters_before = list(warnings.filters)
    t0 = time.perf_counter()
    err = _code(_png_header_only(20000, 20000))  # above Pillow's hard limit
    assert (err.code, err.http_status) == ("too_many_pixels", 413)
    err = _code(_png_header_only(7000, 7000))  # 49 M px: below Pillow's limits, above ours
    assert err.code == "too_many_pixels"
    # 90 M px: Pillow would only warn; with a generous cap of our own it is still an error.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        err = _code(_png_header_only(10000, 9000), max_pixels=10**9)
    assert err.code == "too_many_pixels"
    err = _code(_png_header_only(200, 200), max_pixels=10_000)
    assert err.code == "too_many_pixels"
    assert time.perf_counter() - t0 < 2.0
    assert warnings.filters == filters_before


def test_gif_frame_extent_bomb():
    frames = [Image.new("P", (10, 10), i) for i in range(2)]
    gif = bytearray(_encode(frames[0], "GIF", save_all=True, append_images=frames[1:]))
    pos = gif.index(b"\x2c\x00\x00\x00\x00\x0a\x00\x0a\x00")  # first image descriptor: 0,0,10,10
    gif[pos + 5 : pos + 9] = struct.pack("<HH", 7000, 7000)
    err = _code(bytes(gif))
    assert (err.code, err.http_status) == ("too_many_pixels", 413)


def test_sixteen_bit_ramp_keeps_256_levels():
    ramp = (np.arange(1024, dtype=np.uint32) * 65535 // 1023).astype(np.uint16)
    img = np.tile(ramp, (4, 1))
    im = decode_image(_encode(Image.fromarray(img), "PNG"))
    arr = np.asarray(im)
    assert im.mode == "RGB" and len(np.unique(arr[..., 0])) == 256
    assert arr[0, 0, 0] == 0 and arr[0, -1, 0] == 255
    assert np.abs(arr[0, :, 0].astype(int) - np.rint(ramp / 257.0).astype(int)).max() <= 1
    i32 = to_rgb(Image.fromarray(np.tile(ramp.astype(np.int32), (2, 1))))
    assert len(np.unique(np.asarray(i32)[..., 0])) == 256


def test_cmyk_palette_alpha_modes():
    cmyk = decode_image(_encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95))
    r, g, b = np.asarray(cmyk).reshape(-1, 3).mean(0)
    assert r > 200 and g < 60 and b < 60
    pal = Image.new("P", (8, 8), 0)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.paste(1, (0, 0, 4, 8))
    im = np.asarray(decode_image(_encode(pal, "PNG", transparency=0)))
    assert (im[:, 4:] == 255).all() and (im[:, :4] == (255, 0, 0)).all()
    la = Image.fromarray(np.stack([np.zeros((4, 4), np.uint8), np.tile([0, 255], (4, 2)).astype(np.uint8)], -1), "LA")
    arr = np.asarray(decode_image(_encode(la, "PNG")))
    assert (arr[:, 0::2] == 255).all() and (arr[:, 1::2] == 0).all()
    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    assert (np.asarray(decode_image(_encode(rgba, "PNG"))) == 255).all()


def test_animated_gif_frame_zero_only_and_fast():
    frames = [Image.new("P", (8, 8), i % 256) for i in range(1500)]
    for i, f in enumerate(frames):
        f.putpalette([(i * 7 + c) % 256 for c in range(3)] * 256)
    gif = _encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert Image.open(io.BytesIO(gif)).n_frames > 1000
    t0 = time.perf_counter()
    im = decode_image(gif)
    assert time.perf_counter() - t0 < 1.0
    assert tuple(np.asarray(im)[0, 0]) == (0, 1, 2)
    # Cut off in the middle of the later frames: iterating them would fail, frame 0 alone is fine.
    assert tuple(np.asarray(decode_image(gif[: len(gif) * 3 // 5]))[0, 0]) == (0, 1, 2)


# EXIF orientation -> how the stored pixels relate to the upright picture (inverse of the display fix).
_STORED = {
    1: lambda im: im,
    2: lambda im: im.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
    3: lambda im: im.transpose(Image.Transpose.ROTATE_180),
    4: lambda im: im.transpose(Image.Transpose.FLIP_TOP_BOTTOM),
    5: lambda im: im.transpose(Image.Transpose.TRANSPOSE),
    6: lambda im: im.transpose(Image.Transpose.ROTATE_90),
    7: lambda im: im.transpose(Image.Transpose.TRANSVERSE),
    8: lambda im: im.transpose(Image.Transpose.ROTATE_270),
}


def test_exif_orientations_give_the_upright_image():
    yy, xx = np.mgrid[0:48, 0:64]
    upright = np.stack([xx * 4, yy * 5, (xx < 20) * 200 + (yy < 10) * 50], -1).astype(np.uint8)
    up = Image.fromarray(upright)
    ref = upright.astype(np.float64).ravel() - upright.mean()
    for orientation, stored_fn in _STORED.items():
        exif = Image.Exif()
        exif[0x0112] = orientation
        data = _encode(stored_fn(up), "JPEG", quality=95, exif=exif.tobytes())
        arr = np.asarray(decode_image(data))
        assert arr.shape == upright.shape, orientation
        v = arr.astype(np.float64).ravel() - arr.mean()
        assert v @ ref / (np.linalg.norm(v) * np.linalg.norm(ref)) > 0.99, orientation


def test_load_image_missing_and_oversize(tmp_path):
    with pytest.raises(ImageDecodeError) as info:
        load_image(tmp_path / "nope.png")
    assert info.value.code == "unreadable"
    path = tmp_path / "a.png"
    path.write_bytes(_encode(_noise(), "PNG"))
    assert load_image(path).size == (64, 48)
    with pytest.raises(ImageDecodeError) as info:
        load_image(path, max_bytes=10)
    assert info.value.code == "too_large"


_SEEDS = {"jpeg": _encode(_noise(32, 32), "JPEG"), "png": _encode(_noise(32, 32), "PNG"),
          "gif": _encode(_noise(32, 32).convert("P"), "GIF")}


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(sorted(_SEEDS)),
       edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=8),
       cut=st.one_of(st.none(), st.integers(0, 10**6)))
def test_byte_mutations_only_give_rgb_or_decode_errors(kind, edits, cut):
    data = bytearray(_SEEDS[kind])
    for pos, value in edits:
        data[pos % len(data)] = value
    if cut is not None:
        data = data[: cut % len(data)]
    try:
        im = decode_image(bytes(data))
    except ImageDecodeError as exc:
        assert 400 <= exc.http_status < 500
    else:
        assert im.mode == "RGB" and im.size[0] * im.size[1] > 0


def test_refuses_to_decode_when_someone_enabled_load_truncated_images():
    data = _encode(_noise(), "PNG")
    # Deliberately unsafe for the duration of this test only: proves the decoder refuses to run under it.
    ImageFile.LOAD_TRUNCATED_IMAGES = True
    try:
        err = _code(data)
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = False
    assert err.code == "truncated" and "LOAD_TRUNCATED_IMAGES" in err.message
    assert decode_image(data).size == (64, 48)


def _smooth(w: int, h: int) -> Image.Image:
    yy, xx = np.mgrid[0:h, 0:w]
    return Image.fromarray(np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) % 200], -1).astype(np.uint8))


def test_min_side_drafts_a_large_jpeg_by_a_power_of_two_and_keeps_the_short_side():
    src = _smooth(800, 600)
    data = _encode(src, "JPEG", quality=95)
    assert decode_image(data).size == (800, 600)
    assert decode_image(data, min_side=64).size == (100, 75)     # 1/8: 75 >= 64
    assert decode_image(data, min_side=100).size == (200, 150)   # 1/4: 1/8 would give 75 < 100
    assert decode_image(data, min_side=300).size == (400, 300)   # 1/2
    assert decode_image(data, min_side=301).size == (800, 600)   # no scale keeps 301: full decode
    small = decode_image(data, min_side=64)
    full = np.asarray(decode_image(data).resize(small.size, Image.BOX), dtype=np.float64)
    assert np.abs(np.asarray(small, dtype=np.float64) - full).mean() < 3  # the same picture, smaller
    # other formats are decoded whole
    assert decode_image(_encode(src, "PNG"), min_side=64).size == (800, 600)
    # CMYK and greyscale JPEGs keep their colours
    grey = decode_image(_encode(src.convert("L"), "JPEG"), min_side=64)
    assert grey.mode == "RGB" and grey.size == (100, 75)
    cmyk = decode_image(_encode(Image.new("CMYK", (640, 480), (0, 255, 255, 0)), "JPEG", quality=95), min_side=60)
    assert cmyk.size == (80, 60) and np.asarray(cmyk).reshape(-1, 3).mean(0)[0] > 200


def test_min_side_keeps_the_exif_orientation_and_the_pixel_cap():
    src = _smooth(800, 600)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: the upright image is 600 wide, 800 high
    data = _encode(src, "JPEG", quality=95, exif=exif.tobytes())
    assert decode_image(data).size == (600, 800)
    assert decode_image(data, min_side=64).size == (75, 100)
    assert _code(data, max_pixels=400_000, min_side=64).code == "too_many_pixels"  # checked before any draft


def test_header_pixels_with_min_side_is_the_drafted_size():
    from excb.data.decode import header_pixels

    jpeg, png = _encode(_smooth(800, 600), "JPEG"), _encode(_smooth(800, 600), "PNG")
    assert header_pixels(jpeg) == header_pixels(png) == header_pixels(png, min_side=64) == 800 * 600
    assert header_pixels(jpeg, min_side=64) == 100 * 75 == np.prod(decode_image(jpeg, min_side=64).size)
