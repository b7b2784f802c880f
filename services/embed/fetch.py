"""SSRF-safe fetch of an image URL (reliability.md row 24).

Off unless hosts are allow-listed. For every hop (redirects included): http/https only, no userinfo, the
host must be on the allow-list, the name is resolved once and *every* address must be public (loopback,
private, link-local incl. 169.254.169.254, CGNAT, ULA, multicast, reserved and IPv4-mapped/NAT64 forms of
those are refused) unless it falls in an explicitly allowed network; the connection then goes to that
pinned address (no second DNS lookup, so DNS rebinding cannot swap it), with SNI/Host set to the name.
Redirects are followed by hand, each hop re-validated. The body is read in chunks up to a byte cap.
One wall-clock deadline (``timeout_s``) covers connect, TLS, headers, every redirect and the body: a watchdog
shuts the socket when it passes, so a server dripping one byte at a time cannot hold a thread for longer. A
caller fetching several URLs for one request passes that request's own deadline and remaining byte allowance
too (``deadline=``, ``max_bytes=``): whichever comes first ends the fetch.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence
from urllib.parse import urljoin, urlsplit

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], list[str]]

_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_REDIRECTS = (301, 302, 303, 307, 308)


class FetchError(ValueError):
    """The URL may not or could not be fetched; ``status`` is the HTTP status to answer, ``code`` a stable type."""

    def __init__(self, code: str, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status


@dataclass(frozen=True)
class FetchPolicy:
    allowed_hosts: tuple[str, ...] = ()
    allowed_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    max_bytes: int = 20_000_000
    timeout_s: float = 5.0
    max_redirects: int = 3

    @classmethod
    def build(cls, hosts: Iterable[str], networks: Iterable[str], max_bytes: int, timeout_s: float,
              max_redirects: int) -> "FetchPolicy":
        return cls(tuple(h.strip().lower().rstrip(".") for h in hosts if h.strip()),
                   tuple(ipaddress.ip_network(n.strip(), strict=False) for n in networks if n.strip()),
                   max_bytes, timeout_s, max_redirects)

    @property
    def enabled(self) -> bool:
        return bool(self.allowed_hosts)


def system_resolver(host: str, port: int) -> list[str]:
    """All addresses a name resolves to (one lookup; the caller pins one of them)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise FetchError("fetch_failed", f"cannot resolve {host!r}: {exc.strerror}") from exc
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def _embedded_v4(ip: Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address hidden in an IPv4-mapped, 6to4-less NAT64 or IPv4-compatible IPv6 address."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip in _NAT64:
            return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if int(ip) >> 32 == 0 and int(ip) > 1:  # deprecated IPv4-compatible ::a.b.c.d
            return ipaddress.IPv4Address(int(ip))
    return None


def is_public(ip: Address) -> bool:
    """True only for globally routable unicast addresses (after unwrapping embedded IPv4)."""
    inner = _embedded_v4(ip)
    if inner is not None:
        return is_public(inner)
    return bool(ip.is_global and not ip.is_multicast and not ip.is_reserved and not ip.is_unspecified)


def _split_port(pattern: str) -> tuple[str, int | None]:
    """``host``, ``host:port``, ``[v6]`` or ``[v6]:port`` -> (host, port or None)."""
    if pattern.startswith("["):
        host, _, rest = pattern[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") and rest[1:].isdigit() else None
    host, sep, port = pattern.rpartition(":")
    if sep and port.isdigit() and ":" not in host:
        return host, int(port)
    return pattern, None


def _host_allowed(host: str, port: int, default_port: int, allowed: Sequence[str]) -> bool:
    """Exact name match, or ``*.example.com`` for subdomains (never the bare parent by wildcard); an entry
    without a port allows only the scheme's default port, so an allowed host's other services (Redis on
    6379 behind a redirect) stay out of reach (issue 13 item 12)."""
    for entry in allowed:
        pattern, wanted = _split_port(entry)
        if port != (wanted if wanted is not None else default_port):
            continue
        if pattern.startswith("*."):
            if host.endswith(pattern[1:]) and host != pattern[2:]:
                return True
        elif host == pattern:
            return True
    return False


@dataclass(frozen=True)
class Target:
    scheme: str
    host: str
    port: int
    path: str
    address: str


def check_url(url: str, policy: FetchPolicy, resolver: Resolver = system_resolver) -> Target:
    """Validate one hop and pin the address to connect to; raises :class:`FetchError`."""
    if not policy.enabled:
        raise FetchError("url_disabled", "URL input is disabled on this server (no allowed hosts configured)", 403)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise FetchError("invalid_url", f"malformed URL: {exc}") from exc
    if parts.scheme not in ("http", "https"):
        raise FetchError("invalid_url", "only http and https URLs are accepted")
    if parts.username is not None or parts.password is not None:
        raise FetchError("invalid_url", "URLs with credentials are not accepted")
    host = (parts.hostname or "").lower().rstrip(".")
    if not host:
        raise FetchError("invalid_url", "the URL has no host")
    default_port = 443 if parts.scheme == "https" else 80
    port = port or default_port
    if not _host_allowed(host, port, default_port, policy.allowed_hosts):
        raise FetchError("url_not_allowed", f"{host}:{port} is not on the allow-list", 403)
    addresses = resolver(host, port)
    if not addresses:
        raise FetchError("fetch_failed", f"{host!r} resolves to no address")
    for text in addresses:
        ip = ipaddress.ip_address(text.split("%", 1)[0])
        if not is_public(ip) and not any(ip in net for net in policy.allowed_networks):
            raise FetchError("url_not_allowed", f"{host!r} resolves to a non-public address ({ip})", 403)
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return Target(parts.scheme, host, port, path, addresses[0])


class _PinnedHTTPS(http.client.HTTPSConnection):
    """HTTPS to a fixed IP while verifying the certificate for the host name (SNI = name)."""

    def __init__(self, address: str, host: str, port: int, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._address = address
        self.raw_sock: socket.socket | None = None

    def connect(self) -> None:
        sock = self.raw_sock = socket.create_connection((self._address, self.port), self.timeout)
        # why the ignore below: http.client.HTTPSConnection's _context is private, absent from its stubs
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)  # type: ignore[attr-defined]


class _PinnedHTTP(http.client.HTTPConnection):
    def __init__(self, address: str, host: str, port: int, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._address = address
        self.raw_sock: socket.socket | None = None

    def connect(self) -> None:
        self.sock = self.raw_sock = socket.create_connection((self._address, self.port), self.timeout)


class _Watchdog:
    """Shuts the connection's socket at the deadline, whatever call is blocked on it (per-call socket
    timeouts alone restart with every byte that arrives, so they bound nothing)."""

    def __init__(self, conn: "_PinnedHTTP | _PinnedHTTPS", deadline: float) -> None:
        self.conn = conn
        self.fired = False
        self._timer = threading.Timer(max(0.0, deadline - time.monotonic()), self._fire)
        self._timer.daemon = True

    def _fire(self) -> None:
        self.fired = True
        sock = self.conn.raw_sock  # not conn.sock: http.client drops that once the response owns the socket
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def __enter__(self) -> "_Watchdog":
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()


def _timed_out() -> FetchError:
    return FetchError("fetch_timeout", "the image URL did not deliver in time (url_timeout_seconds per fetch: "
                                       "connect, redirects and body; url_request_timeout_seconds for all of a "
                                       "request's fetches)")


def _one_hop(target: Target, max_bytes: int, deadline: float) -> tuple[int, str | None, bytes]:
    cls = _PinnedHTTPS if target.scheme == "https" else _PinnedHTTP
    left = deadline - time.monotonic()
    if left <= 0:
        raise _timed_out()
    conn = cls(target.address, target.host, target.port, left)
    with _Watchdog(conn, deadline) as watchdog:
        try:
            status, location, body = _exchange(conn, target, max_bytes)
        except (OSError, http.client.HTTPException) as exc:
            if watchdog.fired:
                raise _timed_out() from exc
            raise FetchError("fetch_failed", f"could not fetch the image URL: {exc}") from exc
        finally:
            conn.close()
        if watchdog.fired:  # a read-until-close body cut short by the watchdog looks complete; it is not
            raise _timed_out()
    return status, location, body


def _exchange(conn: "_PinnedHTTP | _PinnedHTTPS", target: Target, max_bytes: int) -> tuple[int, str | None, bytes]:
    conn.request("GET", target.path, headers={"User-Agent": "excb-embed", "Accept": "image/*"})
    resp = conn.getresponse()
    if resp.status in _REDIRECTS:
        return resp.status, resp.getheader("Location"), b""
    if resp.status != 200:
        raise FetchError("fetch_failed", f"the image URL answered HTTP {resp.status}")
    length = resp.getheader("Content-Length")
    if length is not None and length.isdigit() and int(length) > max_bytes:
        raise FetchError("too_large", f"the image is {length} bytes; the limit is {max_bytes}", 413)
    chunks, total = [], 0
    while True:
        block = resp.read1(65536)
        if not block:
            break
        total += len(block)
        if total > max_bytes:
            raise FetchError("too_large", f"the image exceeds the limit of {max_bytes} bytes", 413)
        chunks.append(block)
    return 200, None, b"".join(chunks)


def fetch_url(url: str, policy: FetchPolicy, resolver: Resolver = system_resolver, *, deadline: float | None = None,
              max_bytes: int | None = None) -> bytes:
    """GET an image by URL under ``policy``; every redirect hop is validated like the first. ``deadline`` (a
    ``time.monotonic()`` instant) and ``max_bytes`` may only tighten the policy's own limits."""
    own = time.monotonic() + policy.timeout_s
    deadline = own if deadline is None else min(own, deadline)
    limit = policy.max_bytes if max_bytes is None else min(policy.max_bytes, max_bytes)
    current = url
    for _ in range(policy.max_redirects + 1):
        target = check_url(current, policy, resolver)
        status, location, body = _one_hop(target, limit, deadline)
        if status == 200:
            return body
        if not location:
            raise FetchError("fetch_failed", f"redirect {status} without a Location header")
        current = urljoin(current, location)
    raise FetchError("fetch_failed", f"more than {policy.max_redirects} redirects")
