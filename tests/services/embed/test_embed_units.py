"""Micro-batcher, balance monitor and the SSRF-safe fetcher, each on its own (real threads, real sockets)."""

from __future__ import annotations

import http.server
import ipaddress
import threading
import time
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pytest

from excb.method.stats import balance_stats, drift
from services.embed.batcher import MicroBatcher, QueueFull, QueueTimeout
from services.embed.fetch import FetchError, FetchPolicy, check_url, fetch_url, is_public
from services.embed.monitor import BalanceMonitor
from support import embed as es


class Recorder:
    """A real run function: doubles the input, records batch sizes, can be made slow or failing."""

    def __init__(self, delay: float = 0.0) -> None:
        self.sizes: list[int] = []
        self.delay = delay

    def __call__(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.sizes.append(len(x))
        time.sleep(self.delay)
        if (x < 0).any():
            raise RuntimeError("poisoned input")
        return x * 2, x.sum(axis=1, keepdims=True)


def test_requests_are_merged_up_to_max_batch_counting_images() -> None:
    run = Recorder(delay=0.05)
    b = MicroBatcher(run, max_batch=8, max_delay_ms=50, queue_size=100)
    futs = [b.submit(np.full((3, 2), i, np.float32)) for i in range(6)]  # 18 images
    results = [f.result(5) for f in futs]
    for i, (emb, sims) in enumerate(results):
        assert np.all(emb == 2 * i) and emb.shape == (3, 2) and np.all(sims == 2 * i)
    assert max(run.sizes) <= 8 and sum(run.sizes) == 18 and len(run.sizes) < 6
    big = b.submit(np.arange(40, dtype=np.float32).reshape(20, 2)).result(5)  # split into chunks <= 8
    assert np.array_equal(big[0], np.arange(40, dtype=np.float32).reshape(20, 2) * 2)
    assert max(run.sizes) <= 8
    b.close()


def test_lone_request_does_not_wait_but_announced_ones_are_awaited() -> None:
    run = Recorder()
    b = MicroBatcher(run, max_batch=8, max_delay_ms=300, queue_size=100)
    t0 = time.perf_counter()
    b.submit(np.ones((1, 2), np.float32)).result(5)
    assert time.perf_counter() - t0 < 0.25  # nobody else announced: no 300 ms wait
    b.announce()  # a second request is still decoding
    t0 = time.perf_counter()
    first = b.submit(np.ones((1, 2), np.float32))
    time.sleep(0.1)
    second = b.submit(np.ones((1, 2), np.float32))
    b.withdraw()
    first.result(5), second.result(5)
    assert run.sizes[-1] == 2  # held open until the announced request arrived, then ran together
    b.close()


def test_disabled_batching_runs_each_request_alone() -> None:
    run = Recorder(delay=0.02)
    b = MicroBatcher(run, max_batch=8, max_delay_ms=50, queue_size=100, enabled=False)
    futs = [b.submit(np.ones((2, 2), np.float32)) for _ in range(5)]
    [f.result(5) for f in futs]
    assert run.sizes == [2] * 5
    b.close()


def test_a_failing_batch_fails_only_its_requests() -> None:
    run = Recorder()
    b = MicroBatcher(run, max_batch=1, max_delay_ms=0, queue_size=10)
    bad = b.submit(-np.ones((1, 2), np.float32))
    good = b.submit(np.ones((1, 2), np.float32))
    with pytest.raises(RuntimeError, match="poisoned"):
        bad.result(5)
    assert np.all(good.result(5)[0] == 2)
    assert b.pending == 0
    b.close()


def test_bounded_queue_and_timeouts() -> None:
    gate = threading.Event()

    def blocked(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        gate.wait(5)
        return x, x

    b = MicroBatcher(blocked, max_batch=2, max_delay_ms=0, queue_size=4, timeout_s=0.2, retry_after=3)
    first = b.submit(np.ones((2, 1), np.float32))
    time.sleep(0.05)  # the consumer is now stuck in the first run
    queued = b.submit(np.ones((2, 1), np.float32))
    with pytest.raises(QueueFull) as info:
        b.submit(np.ones((1, 1), np.float32))
    assert info.value.retry_after == 3
    time.sleep(0.3)  # the queued request outlives its deadline while waiting
    gate.set()
    assert first.result(5)[0].shape == (2, 1)
    with pytest.raises(QueueTimeout):
        queued.result(5)
    assert b.pending == 0
    b.submit(np.ones((1, 1), np.float32)).result(5)  # and it keeps serving
    b.close()


def test_batcher_drives_a_real_ort_session() -> None:
    from excb.inference.onnx_runtime import OrtEmbedder, load_bundle

    e = OrtEmbedder(load_bundle(es.bundle()), intra_op_threads=1)
    b = MicroBatcher(e.run, max_batch=4, max_delay_ms=20, queue_size=64)
    x = np.stack([e.preprocess(im) for im in es.digit_images()[:10]])
    futs: list[Future] = [b.submit(x[i:i + 1]) for i in range(10)]
    got = np.concatenate([f.result(10)[0] for f in futs])
    assert np.allclose(got, e.run(x)[0], atol=1e-5)
    assert b.batches < 10
    b.close()


def test_monitor_window_matches_excb_stats() -> None:
    rng = np.random.default_rng(0)
    sizes = rng.dirichlet(np.ones(16))
    m = BalanceMonitor(16, sizes, window=50)
    ids = rng.integers(0, 16, size=137)
    raw = rng.integers(0, 16, size=137)
    for start in range(0, 137, 9):
        m.record(ids[start:start + 9], raw[start:start + 9])
    snap = m.snapshot("x")
    counts = np.bincount(ids[-50:], minlength=16)
    assert snap["assignments"] == 50 and snap["total_assignments"] == 137
    assert snap["served"] == balance_stats(counts, kind="counts")
    assert snap["served_raw"] == balance_stats(np.bincount(raw[-50:], minlength=16), kind="counts")
    assert snap["drift"] == drift(counts, sizes)
    with pytest.raises(ValueError):
        m.record(np.array([16]), np.array([0]))


# ------------------------------------------------------------------------------------------------ fetch


def test_non_public_addresses_are_refused() -> None:
    for text in ("127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1", "0.0.0.0",
                 "::1", "fc00::1", "fe80::1", "::ffff:127.0.0.1", "::ffff:169.254.169.254", "64:ff9b::a9fe:a9fe",
                 "224.0.0.1", "255.255.255.255"):
        assert not is_public(ipaddress.ip_address(text)), text
    assert is_public(ipaddress.ip_address("93.184.216.34")) and is_public(ipaddress.ip_address("2606:4700::1"))


def test_check_url_policy() -> None:
    policy = FetchPolicy.build(["images.example.com", "*.cdn.example.org", "0x7f000001", "169.254.169.254"], [],
                               1000, 1.0, 2)
    public = lambda host, port: ["93.184.216.34"]  # noqa: E731 - a DNS answer, injected
    assert check_url("https://images.example.com/a.png", policy, public).address == "93.184.216.34"
    assert check_url("http://x.cdn.example.org/a.png", policy, public).port == 80
    cases = {
        "ftp://images.example.com/a.png": "invalid_url",
        "https://user:pw@images.example.com/a.png": "invalid_url",
        "https://evil.example.net/a.png": "url_not_allowed",
        "https://cdn.example.org/a.png": "url_not_allowed",  # the wildcard does not cover the parent
        "http://169.254.169.254/latest/meta-data": "url_not_allowed",
        "http://0x7f000001/": "url_not_allowed",  # resolves (inet_aton) to 127.0.0.1
    }
    for url, code in cases.items():
        with pytest.raises(FetchError) as info:
            check_url(url, policy)
        assert info.value.code == code, url
    rebinding = lambda host, port: ["93.184.216.34", "127.0.0.1"]  # noqa: E731 - one private answer is enough
    with pytest.raises(FetchError, match="non-public"):
        check_url("https://images.example.com/a.png", policy, rebinding)
    with pytest.raises(FetchError) as off:
        check_url("https://images.example.com/a.png", FetchPolicy(), public)
    assert off.value.code == "url_disabled"


@pytest.fixture(scope="module")
def image_server():
    png = es.digit_png(1)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            routes = {"/to-metadata": "http://169.254.169.254/latest", "/to-localhost": f"http://localhost:{port}/a.png",
                      "/to-self": "/a.png"}
            if self.path in routes:
                self.send_response(302)
                self.send_header("Location", routes[self.path])
                self.end_headers()
                return
            body = png if self.path == "/a.png" else b"x" * 5000
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield port, png
    server.shutdown()


def test_fetch_real_server_with_redirect_revalidation(image_server: tuple[int, bytes]) -> None:
    port, png = image_server
    policy = FetchPolicy.build([f"127.0.0.1:{port}"], ["127.0.0.1/32"], 4000, 3.0, 2)
    base = f"http://127.0.0.1:{port}"
    assert fetch_url(f"{base}/a.png", policy) == png
    assert fetch_url(f"{base}/to-self", policy) == png
    for path, code in (("/to-metadata", "url_not_allowed"), ("/to-localhost", "url_not_allowed"),
                       ("/big", "too_large")):
        with pytest.raises(FetchError) as info:
            fetch_url(base + path, policy)
        assert info.value.code == code, path
    strict = FetchPolicy.build([f"127.0.0.1:{port}"], [], 4000, 3.0, 2)  # loopback not explicitly allowed
    with pytest.raises(FetchError, match="non-public"):
        fetch_url(f"{base}/a.png", strict)


def test_get_embed_by_allow_listed_url(image_server: tuple[int, bytes], tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from services.embed.app import create_app
    from services.embed.registry import ModelRegistry
    from services.settings import EmbedSettings, Settings

    port, _ = image_server
    embed = EmbedSettings(url_allowed_hosts=[f"127.0.0.1:{port}"], url_allowed_networks=["127.0.0.1/32"],
                          max_delay_ms=1)
    reg = ModelRegistry(embed)
    reg.register(es.bundle())
    with TestClient(create_app(Settings(home=tmp_path, embed=embed), reg)) as c:
        ok = c.get("/embed", params={"uri": f"http://127.0.0.1:{port}/a.png"})
        assert ok.status_code == 200 and ok.json()["data"][0]["embedding"]
        bad = c.get("/embed", params={"uri": f"http://127.0.0.1:{port}/to-metadata"})
        assert bad.status_code == 403 and bad.json()["error"]["type"] == "url_not_allowed"
    reg.close()
