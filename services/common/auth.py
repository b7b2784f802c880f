"""Optional bearer API keys (``Settings.api_keys_file``), kept only as sha256 hashes in memory.

One key may also come from ``Settings.api_key`` (``excb serve/up --api-key``, ``EXCB_API_KEY``), beside the file.
File format: one key per line; ``#`` comments and blank lines are ignored; a line ``sha256:<hex>`` is an
already-hashed key (so the file itself need not hold secrets). No file configured = no auth (embedded mode).
The principal id is derived from the hash, so ownership survives restarts without storing the key.

Operators' keys (``Settings.admin_keys_file``, same format) authenticate like any key and own their own jobs;
``Principal.admin`` additionally lets them see every tenant in the operational views (``GET /v1/workers``'
job ids, ``/metrics``' per-model series). Nothing else reads it: an admin key does not reach another key's
jobs or models.
"""

from __future__ import annotations

import hashlib
import hmac
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import Request

from services.common.errors import ApiError

if TYPE_CHECKING:
    from services.settings import Settings


@dataclass(frozen=True)
class Principal:
    """Who is calling: ``id`` is stable per key (``None`` when auth is off); ``admin``: an operator's key."""

    id: str | None
    admin: bool = False

    def sees_all(self, auth_enabled: bool) -> bool:
        """Operational views show every tenant: to an operator's key, or to anyone when there are no keys."""
        return self.admin or not auth_enabled


ANONYMOUS = Principal(id=None)

# The caller of the request being served (set by ApiKeyAuth.authenticate in the request's task). The embed
# registry reads it so every route that authenticates - including ones added later - sees only the caller's
# models; unset (background threads, health checks) means no tenant filter.
CURRENT_PRINCIPAL: ContextVar[Principal | None] = ContextVar("excb_principal", default=None)


def hash_key(key: str) -> str:
    """sha256 hex of a key (what the file may hold as ``sha256:<hex>``)."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def load_key_hashes(path: Path) -> list[str]:
    """Read the keys file into a list of sha256 hex digests."""
    hashes: list[str] = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("sha256:"):
            digest = line[len("sha256:"):].strip().lower()
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise ValueError(f"{path}: malformed sha256 line")
            hashes.append(digest)
        else:
            hashes.append(hash_key(line))
    if not hashes:
        raise ValueError(f"{path}: no API keys found")
    return hashes


class ApiKeyAuth:
    """Checks ``Authorization: Bearer <key>`` (or ``X-API-Key``) against the hashed keys."""

    def __init__(self, hashes: list[str] | None, admin_hashes: list[str] | None = None) -> None:
        self.admin = {h.encode() for h in (admin_hashes or [])}
        self.hashes = [h.encode() for h in (hashes or [])] + sorted(self.admin)

    @classmethod
    def from_file(cls, path: Path | None, admin_path: Path | None = None) -> "ApiKeyAuth":
        return cls(load_key_hashes(path) if path else None, load_key_hashes(admin_path) if admin_path else None)

    @classmethod
    def from_settings(cls, settings: "Settings") -> "ApiKeyAuth":
        """The keys file's keys plus ``api_key`` (``--api-key`` / ``EXCB_API_KEY``, the one-key case)."""
        hashes = load_key_hashes(settings.api_keys_file) if settings.api_keys_file else []
        if settings.api_key is not None:
            key = settings.api_key.get_secret_value().strip()
            if not key:
                raise ValueError("api_key is empty")
            hashes.append(hash_key(key))
        admin = load_key_hashes(settings.admin_keys_file) if settings.admin_keys_file else None
        return cls(hashes or None, admin)

    @property
    def enabled(self) -> bool:
        return bool(self.hashes)

    def match(self, key: str) -> str | None:
        """The matching hash, compared in constant time against every stored hash (no early exit)."""
        candidate = hash_key(key).encode()
        found: str | None = None
        for stored in self.hashes:
            if hmac.compare_digest(candidate, stored):
                found = stored.decode()
        return found

    def authenticate(self, request: Request) -> Principal:
        """The caller's principal; raises 401 when auth is on and the key is missing or wrong."""
        if not self.enabled:
            CURRENT_PRINCIPAL.set(ANONYMOUS)
            return ANONYMOUS
        key = _presented_key(request)
        if key is None:
            raise ApiError(401, "unauthorized", "missing API key (Authorization: Bearer <key>)",
                           headers={"WWW-Authenticate": "Bearer"})
        digest = self.match(key)
        if digest is None:
            raise ApiError(401, "unauthorized", "invalid API key", headers={"WWW-Authenticate": "Bearer"})
        principal = Principal(id="key-" + digest[:16], admin=digest.encode() in self.admin)
        CURRENT_PRINCIPAL.set(principal)
        return principal


def _presented_key(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if header:
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
        return None
    alt = request.headers.get("x-api-key")
    return alt.strip() if alt and alt.strip() else None
