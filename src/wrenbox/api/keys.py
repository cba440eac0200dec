"""API keys: who may call the server, and which team (tenant) each caller acts for.

A key is ``e2b_`` and 40 hex digits (160 random bits), the shape E2B's SDK 2.45 checks client side. It is
shown once, when it is made; the store keeps only its SHA-256 (a fast hash is right for random secrets:
there is nothing to brute-force) and an 8-character prefix so people can tell keys apart in a list.
Revoked keys stay listed, marked, and never authenticate again.

Keys live in their own SQLite file beside the manager's (``keys.db``): they belong to the front door, not
to the sandbox lifecycle.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from wrenbox.errors import InvalidArgument, NotFound, Unauthenticated

__all__ = ["ApiKey", "KeyStore", "NewKey"]

KEY_PREFIX = "e2b_"
_TEAM = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
    id          TEXT PRIMARY KEY,
    digest      TEXT NOT NULL UNIQUE,
    name        TEXT NOT NULL,
    team        TEXT NOT NULL,
    created_at  REAL NOT NULL,
    revoked_at  REAL
)
"""


@dataclass(frozen=True, slots=True)
class ApiKey:
    """What is known about a key (never the key itself)."""

    id: str  # the key's first characters after the prefix: enough to name it, useless to use it
    name: str
    team: str
    created_at: float
    revoked_at: float | None = None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


@dataclass(frozen=True, slots=True)
class NewKey:
    """A key just made: ``secret`` is shown once and not kept."""

    key: ApiKey
    secret: str


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def check_team(team: object) -> str:
    if not isinstance(team, str) or not _TEAM.fullmatch(team):
        raise InvalidArgument(
            f"team must be 1-63 lower-case letters, digits, '-' or '_' (starting with a letter or digit), "
            f"not {team!r}"
        )
    return team


class KeyStore:
    """The keys of one server. Thread-safe; use as a context manager or call :meth:`close`."""

    def __init__(self, path: Path | str) -> None:
        if str(path) != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=30.0)
        self._lock = threading.Lock()
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> KeyStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def create(self, *, name: str = "", team: str = "default") -> NewKey:
        check_team(team)
        if not isinstance(name, str) or len(name) > 200:
            raise InvalidArgument("a key's name is a string of at most 200 characters")
        secret = KEY_PREFIX + secrets.token_hex(20)
        key = ApiKey(
            id=secret[len(KEY_PREFIX) : len(KEY_PREFIX) + 12], name=name, team=team, created_at=time.time()
        )
        with self._lock:
            self._db.execute(
                "INSERT INTO keys (id, digest, name, team, created_at) VALUES (?, ?, ?, ?, ?)",
                (key.id, _digest(secret), key.name, key.team, key.created_at),
            )
        return NewKey(key, secret)

    def list(self) -> list[ApiKey]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, name, team, created_at, revoked_at FROM keys ORDER BY created_at"
            ).fetchall()
        return [ApiKey(*row) for row in rows]

    def revoke(self, key_id: str) -> ApiKey:
        """Revoke the key whose id (or full secret) is ``key_id``; revoking twice changes nothing."""
        with self._lock:
            found = self._db.execute(
                "SELECT id FROM keys WHERE id = ? OR digest = ?", (key_id, _digest(key_id))
            ).fetchone()
            if found is None:
                raise NotFound(f"no API key {key_id!r}")
            self._db.execute(
                "UPDATE keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL", (time.time(), found[0])
            )
            row = self._db.execute(
                "SELECT id, name, team, created_at, revoked_at FROM keys WHERE id = ?", (found[0],)
            ).fetchone()
        return ApiKey(*row)

    def authenticate(self, secret: str | None) -> ApiKey:
        """The active key ``secret`` is, or Unauthenticated."""
        if not secret:
            raise Unauthenticated("missing API key: send it in the X-API-KEY header")
        digest = _digest(secret)
        with self._lock:
            row = self._db.execute(
                "SELECT id, name, team, created_at, revoked_at, digest FROM keys WHERE digest = ?", (digest,)
            ).fetchone()
        # compare_digest keeps the final check constant-time even though the lookup is by digest.
        if row is None or not hmac.compare_digest(row[5], digest) or row[4] is not None:
            raise Unauthenticated("invalid API key")
        return ApiKey(*row[:5])
