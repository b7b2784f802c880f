"""Bad-input corpus: every case gets its 4xx in the one JSON error shape, never a 5xx, and the service
answers the next good request (reliability.md rows 19-23). Tricky-but-valid images get a 200."""

from __future__ import annotations

import base64
import shutil
import struct
from typing import Any, Callable

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from services.embed.app import create_app
from services.settings import EmbedSettings, Settings
from support import embed as es
from support.embed import png_bomb

MAX_IMAGE_BYTES = 300_000
MAX_REQUEST_BYTES = 2_000_000
MAX_IMAGES = 8


def gif_with_huge_screen() -> bytes:
    """A valid 8x8 GIF whose logical screen claims 65535 x 65535 pixels."""
    data = bytearray(es.encode(Image.new("P", (8, 8)), "GIF"))
    data[6:10] = struct.pack("<HH", 0xFFFF, 0xFFFF)
    return bytes(data)


def many_frame_gif(frames: int = 5000) -> bytes:
    base = Image.new("P", (8, 8))
    rest = [Image.new("P", (8, 8), color=i % 250) for i in range(1, frames)]
    return es.encode(base, "GIF", save_all=True, append_images=rest, duration=10, loop=0)


def truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def sixteen_bit_png() -> bytes:
    im = Image.new("I;16", (32, 32))
    im.putdata([i * 64 for i in range(32 * 32)])
    return es.encode(im, "PNG")


def exif_rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    return es.encode(es.digit_images()[3].rotate(90, expand=True), "JPEG", exif=exif, quality=95)


def palette_alpha_png() -> bytes:
    im = es.digit_images()[2].convert("P", palette=Image.ADAPTIVE)
    im.info["transparency"] = 0
    return es.encode(im, "PNG", transparency=0)


GOOD = es.digit_png


def files(*blobs: bytes) -> dict[str, Any]:
    return {"files": [("files", (f"{i}.bin", b, "application/octet-stream")) for i, b in enumerate(blobs)]}


def json_input(*items: Any, **extra: Any) -> dict[str, Any]:
    return {"json": {"input": list(items), **extra}}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# (name, request kwargs factory, expected status, expected error type or None)
BAD_CASES: list[tuple[str, Callable[[], dict[str, Any]], int, str | None]] = [
    ("empty file", lambda: files(b""), 422, "empty"),
    ("random bytes", lambda: files(b"\x00\x01garbage" * 50), 415, "unsupported_format"),
    ("svg text", lambda: files(b"<svg xmlns='http://www.w3.org/2000/svg'/>"), 415, "unsupported_format"),
    ("pdf", lambda: files(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj<<>>endobj\n"), 415, "unsupported_format"),
    ("format not on the allow-list (PPM)", lambda: files(es.encode(es.digit_images()[0], "PPM")), 415,
     "unsupported_format"),
    ("truncated png", lambda: files(truncated(GOOD(1))), 422, None),
    ("truncated jpeg", lambda: files(truncated(es.encode(es.digit_images()[1].resize((256, 256)), "JPEG"))), 422,
     None),
    ("png decompression bomb", lambda: files(png_bomb()), 413, "too_many_pixels"),
    ("gif with huge logical screen", lambda: files(gif_with_huge_screen()), 413, "too_many_pixels"),
    ("image over the byte cap", lambda: files(es.encode(Image.effect_noise((400, 400), 64).convert("RGB"), "PNG")),
     413, "too_large"),
    ("body over the request cap", lambda: {"content": b"x" * (MAX_REQUEST_BYTES + 10),
                                           "headers": {"content-type": "application/json"}}, 413, None),
    ("too many images", lambda: files(*[GOOD(i) for i in range(MAX_IMAGES + 1)]), 413, "too_many_images"),
    ("one good one bad", lambda: files(GOOD(0), b"nope"), 415, None),
    ("no images", lambda: json_input(), 422, None),
    ("invalid base64", lambda: json_input("abcde"), 422, "invalid_input"),
    # a string outside the base64 alphabet names a path, on every image route (issue 27 item 4)
    ("not base64: a path, no data roots", lambda: json_input("!!!not base64!!!"), 422, "path_not_allowed"),
    ("data uri without base64", lambda: json_input("data:image/png,rawbytes"), 422, "invalid_input"),
    ("url in json body, URLs off", lambda: json_input("http://169.254.169.254/latest"), 403, "url_disabled"),
    ("input not a string", lambda: json_input(123), 422, "validation_error"),
    ("unknown option", lambda: json_input(b64(GOOD(0)), colour="red"), 422, "validation_error"),
    ("top_k zero", lambda: json_input(b64(GOOD(0)), top_k=0), 422, "validation_error"),
    ("top_k above max", lambda: json_input(b64(GOOD(0)), top_k=10_000), 422, "validation_error"),
    ("bad encoding_format", lambda: json_input(b64(GOOD(0)), encoding_format="int8"), 422, "validation_error"),
    ("unknown model", lambda: json_input(b64(GOOD(0)), model="nope"), 404, "not_found"),
    ("invalid json", lambda: {"content": b"{\"input\": [", "headers": {"content-type": "application/json"}}, 422,
     "invalid_json"),
    ("json array body", lambda: {"content": b"[1, 2]", "headers": {"content-type": "application/json"}}, 422, None),
    ("text/plain body", lambda: {"content": b"hello", "headers": {"content-type": "text/plain"}}, 415, None),
    ("form field twice", lambda: {**files(GOOD(0)), "data": {"top_k": ["1", "2"]}}, 422, None),
    ("too many form parts", lambda: {**files(GOOD(0)), "data": {f"f{i}": "1" for i in range(1100)}}, 400, None),
]

GOOD_TRICKY: list[tuple[str, Callable[[], bytes]]] = [
    ("5000-frame gif (frame 0 only)", lambda: many_frame_gif()),
    ("16-bit grey png", sixteen_bit_png),
    ("cmyk jpeg", lambda: es.encode(es.digit_images()[4].convert("CMYK"), "JPEG")),
    ("palette png with transparency", palette_alpha_png),
    ("rgba png", lambda: es.encode(es.digit_images()[5].convert("RGBA"), "PNG")),
    ("exif-rotated jpeg", exif_rotated_jpeg),
    ("animated webp", lambda: es.encode(es.digit_images()[6], "WEBP", save_all=True,
                                        append_images=[es.digit_images()[7]])),
]


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory):
    home = tmp_path_factory.mktemp("bad-inputs")
    shutil.copytree(es.bundle(), home / "models" / "digits-a")
    s = Settings(home=home, embed=EmbedSettings(
        max_delay_ms=1.0, max_image_bytes=MAX_IMAGE_BYTES, max_request_bytes=MAX_REQUEST_BYTES,
        max_images_per_request=MAX_IMAGES, max_top_k=32,
        allowed_formats=["JPEG", "PNG", "WEBP", "GIF"]))
    with TestClient(create_app(s), raise_server_exceptions=False) as c:
        yield c


def _good_request(client: TestClient) -> None:
    r = client.post("/v1/embed", **files(GOOD(9)))
    assert r.status_code == 200, r.text
    assert len(r.json()["data"]) == 1


@pytest.mark.parametrize("name,make,status,etype", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_input_gets_its_4xx_and_service_stays_up(client: TestClient, name: str, make: Callable[[], dict],
                                                     status: int, etype: str | None) -> None:
    r = client.post("/v1/embed", **make())
    assert r.status_code == status, (name, r.status_code, r.text[:300])
    err = r.json()["error"]
    assert set(err) == {"type", "message", "field"} and err["message"]
    if etype is not None:
        assert err["type"] == etype, err
    _good_request(client)


@pytest.mark.parametrize("name,make", GOOD_TRICKY, ids=[c[0] for c in GOOD_TRICKY])
def test_tricky_but_valid_images_are_embedded(client: TestClient, name: str, make: Callable[[], bytes]) -> None:
    r = client.post("/v1/embed", **files(make()))
    assert r.status_code == 200, (name, r.text[:300])
    assert len(r.json()["data"][0]["embedding"]) == 64 and r.json()["data"][0]["cluster"]["top_k"]


def test_bad_get_queries_are_4xx(client: TestClient) -> None:
    for params, status in (({}, 422), ({"uri": ""}, 422), ({"uri": "a.png", "top_k": "x"}, 422),
                           ({"uri": "a.png", "encoding_format": "int8"}, 422), ({"uri": "a.png"}, 422)):
        r = client.get("/embed", params=params)  # no data roots configured: every path is refused
        assert r.status_code == status, (params, r.text)
        assert "error" in r.json()
    _good_request(client)


def test_no_5xx_in_metrics_after_the_corpus(client: TestClient) -> None:
    text = client.get("/metrics").text
    lines = [x for x in text.splitlines() if x.startswith("excb_http_requests_total{") and 'route="/v1/embed"' in x]
    assert lines and not [x for x in lines if 'status="5' in x]
    assert 'excb_embed_rejected_total{reason="too_many_pixels"}' in text
