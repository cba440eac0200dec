"""Persistent state in SQLite: sandboxes, templates, and an event log.

One database file under the data dir, in WAL mode so readers never wait for the writer. The schema is
versioned with ``PRAGMA user_version``; :data:`MIGRATIONS` is append-only, and opening a database runs
whatever it has not seen yet, inside one transaction each.

Every write is a single short transaction and is durable when the call returns (``synchronous=FULL``:
a lifecycle transition that was reported must survive a power cut, and these writes are rare enough that
the fsync does not matter). Calls are synchronous and take well under a millisecond on a warm database,
so the async manager calls them directly.

A full filesystem: a write SQLite refuses with SQLITE_FULL draws on a reserve of room kept beside the
database and is retried (:mod:`wrenbox.manager.reserve` says why), so the writes that settle a sandbox land;
writes that begin an operation which will spend space are made inside :meth:`Store.spending` instead,
which refuses them while the reserve cannot be kept whole.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from wrenbox.errors import AlreadyExists, NotFound, StorageFull
from wrenbox.records import SandboxRecord, SandboxState, TemplateRecord, TemplateState

if TYPE_CHECKING:
    from wrenbox.manager.reserve import Reserve

__all__ = ["MIGRATIONS", "Event", "EventSpec", "Store"]

MIGRATIONS: tuple[str, ...] = (
    # 1: initial schema
    """
    CREATE TABLE sandboxes (
        id               TEXT PRIMARY KEY,
        template         TEXT NOT NULL,
        state            TEXT NOT NULL,
        vcpus            INTEGER NOT NULL,
        memory_mb        INTEGER NOT NULL,
        disk_mb          INTEGER,
        timeout_s        INTEGER NOT NULL,
        on_timeout       TEXT NOT NULL,
        metadata         TEXT NOT NULL,
        env              TEXT NOT NULL,
        created_at       REAL NOT NULL,
        last_active_at   REAL NOT NULL,
        state_changed_at REAL NOT NULL,
        host_ip          TEXT,
        resources        TEXT NOT NULL,
        leftovers        TEXT NOT NULL,
        error            TEXT,
        pause_failures   INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX sandboxes_state ON sandboxes(state);
    CREATE INDEX sandboxes_template ON sandboxes(template);
    CREATE TABLE templates (
        name        TEXT PRIMARY KEY,
        kind        TEXT NOT NULL,
        path        TEXT NOT NULL,
        vcpus       INTEGER NOT NULL,
        memory_mb   INTEGER NOT NULL,
        state       TEXT NOT NULL,
        source      TEXT,
        parent      TEXT,
        size_bytes  INTEGER NOT NULL,
        created_at  REAL NOT NULL,
        manifest    TEXT NOT NULL
    );
    CREATE TABLE events (
        seq         INTEGER PRIMARY KEY AUTOINCREMENT,
        ts          REAL NOT NULL,
        sandbox_id  TEXT,
        kind        TEXT NOT NULL,
        detail      TEXT NOT NULL
    );
    CREATE INDEX events_sandbox ON events(sandbox_id, seq);
    """,
    # 2: the guest agent's access token, per sandbox
    "ALTER TABLE sandboxes ADD COLUMN access_token TEXT",
    # 3: tenants (API teams) own sandboxes and the templates made from them; what a timeout does
    """
    ALTER TABLE sandboxes ADD COLUMN team TEXT;
    ALTER TABLE templates ADD COLUMN team TEXT;
    CREATE INDEX sandboxes_team ON sandboxes(team);
    ALTER TABLE sandboxes ADD COLUMN pause_memory INTEGER NOT NULL DEFAULT 1;
    ALTER TABLE sandboxes ADD COLUMN auto_resume INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE templates ADD COLUMN disk_mb INTEGER;
    ALTER TABLE sandboxes ADD COLUMN end_at REAL;
    ALTER TABLE sandboxes ADD COLUMN egress TEXT NOT NULL DEFAULT '{}';
    """,
)

# An event to log with a write: kind, sandbox id, detail.
EventSpec = tuple[str, str | None, Mapping[str, Any]]
# Set while writes begin an operation that will spend space (Store.spending); per task, as the manager's
# operations interleave on one event loop.
_spending: ContextVar[bool] = ContextVar("wrenbox_store_spending", default=False)
T = TypeVar("T")
log = logging.getLogger(__name__)

_SANDBOX_JSON = ("metadata", "env", "resources", "leftovers", "egress")
_TEMPLATE_JSON = ("manifest",)


class Event(dict[str, Any]):
    """One entry of the event log: ``seq``, ``ts``, ``sandbox_id``, ``kind``, ``detail``."""


class Store:
    """The SQLite store. Thread-safe; use as a context manager or call :meth:`close`."""

    def __init__(self, path: Path | str, *, reserve: Reserve | None = None) -> None:
        self.path = Path(path)
        self._reserve = reserve
        if str(path) != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=30.0)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.RLock()
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        try:
            self._migrate()
            if reserve is not None and not reserve.refill():
                log.warning("no room for the store's reserve beside %s: free space there", self.path)
        except BaseException:
            self._db.close()
            raise

    # -- plumbing ------------------------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _write(self, body: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``body`` in one write transaction. One refused for want of space changed nothing (SQLite
        rolls it back): it draws on the reserve and is tried again, unless it starts spending space
        (:meth:`spending`) or the reserve is spent; then it is StorageFull."""
        with self._lock:
            while True:
                try:
                    return self._transaction(body)
                except sqlite3.OperationalError as exc:
                    if exc.sqlite_errorcode != sqlite3.SQLITE_FULL:
                        raise
                    if _spending.get() or self._reserve is None or not self._reserve.draw():
                        raise StorageFull(
                            f"the store {self.path} could not be written: its filesystem is full; "
                            "free space there"
                        ) from exc
                    log.warning("the store's filesystem is full: drew on its reserve to write")

    def _transaction(self, body: Callable[[sqlite3.Connection], T]) -> T:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            result = body(self._db)
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:  # a failed COMMIT may have rolled back already
                self._db.execute("ROLLBACK")
            raise
        return result

    @contextmanager
    def spending(self, what: str) -> Iterator[None]:
        """Writes inside begin ``what``, an operation that will take space on the store's filesystem:
        the reserve is made whole first (StorageFull if there is no room for it), and they do not draw
        on it, so a refusal now is clean and the reserve is there to settle the operation later."""
        if self._reserve is not None and not self._reserve.refill():
            raise StorageFull(
                f"the store {self.path} cannot keep its reserve of {self._reserve.size >> 20} MiB, so "
                f"{what} is refused: its filesystem is full; free space there"
            )
        token = _spending.set(True)
        try:
            yield
        finally:
            _spending.reset(token)

    @property
    def schema_version(self) -> int:
        return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    def _migrate(self) -> None:
        for version, script in enumerate(MIGRATIONS, start=1):
            if self.schema_version >= version:
                continue
            with self._lock:
                try:
                    self._db.executescript(
                        f"BEGIN IMMEDIATE; {script}; PRAGMA user_version = {version}; COMMIT;"
                    )
                except BaseException:
                    if self._db.in_transaction:
                        self._db.execute("ROLLBACK")
                    raise

    # -- sandboxes -----------------------------------------------------------------------------------

    def _insert(self, table: str, row: dict[str, Any], what: str, event: EventSpec | None = None) -> None:
        cols = ", ".join(row)
        marks = ", ".join(f":{k}" for k in row)

        def insert(db: sqlite3.Connection) -> None:
            db.execute(f"INSERT INTO {table} ({cols}) VALUES ({marks})", row)
            _log_event(db, event)

        try:
            self._write(insert)
        except sqlite3.IntegrityError as exc:
            raise AlreadyExists(f"{what} already exists") from exc

    def _update(
        self, table: str, key: str, row: dict[str, Any], what: str, event: EventSpec | None = None
    ) -> None:
        """Write a whole row, which must exist."""
        sets = ", ".join(f"{k} = :{k}" for k in row if k != key)

        def update(db: sqlite3.Connection) -> None:
            if db.execute(f"UPDATE {table} SET {sets} WHERE {key} = :{key}", row).rowcount != 1:
                raise NotFound(f"{what} not found")
            _log_event(db, event)

        self._write(update)

    def insert_sandbox(self, rec: SandboxRecord, *, event: EventSpec | None = None) -> None:
        """Add the record, and ``event`` (kind, detail) about it in the same transaction."""
        self._insert("sandboxes", _sandbox_row(rec), f"sandbox {rec.id}", event)

    def save_sandbox(self, rec: SandboxRecord, *, event: EventSpec | None = None) -> None:
        """Write the whole record (it must exist), and ``event`` (kind, detail) about it in the same
        transaction: a state and the event that says how it came are never one without the other."""
        self._update("sandboxes", "id", _sandbox_row(rec), f"sandbox {rec.id}", event)

    def get_sandbox(self, sandbox_id: str) -> SandboxRecord:
        with self._lock:
            row = self._db.execute("SELECT * FROM sandboxes WHERE id = ?", (sandbox_id,)).fetchone()
        if row is None:
            raise NotFound(f"sandbox {sandbox_id} not found")
        return _sandbox_from_row(row)

    def list_sandboxes(
        self,
        *,
        states: set[SandboxState] | None = None,
        metadata: Mapping[str, str] | None = None,
        template: str | None = None,
        team: str | None = None,
    ) -> list[SandboxRecord]:
        """Sandboxes in creation order; ``metadata`` matches records having all the given pairs."""
        sql, args = "SELECT * FROM sandboxes", []
        where = []
        if states is not None:
            where.append(f"state IN ({', '.join('?' * len(states))})")
            args.extend(s.value for s in states)
        if template is not None:
            where.append("template = ?")
            args.append(template)
        if team is not None:
            where.append("team = ?")
            args.append(team)
        for key, value in (metadata or {}).items():
            where.append("json_extract(metadata, ?) = ?")
            args.extend([f"$.{json.dumps(key)}", value])
        if where:
            sql += " WHERE " + " AND ".join(where)
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY created_at, id", args).fetchall()
        return [_sandbox_from_row(r) for r in rows]

    def delete_sandbox(self, sandbox_id: str) -> None:
        self._write(lambda db: db.execute("DELETE FROM sandboxes WHERE id = ?", (sandbox_id,)))

    # -- templates -----------------------------------------------------------------------------------

    def insert_template(self, rec: TemplateRecord) -> None:
        self._insert("templates", _template_row(rec), f"template {rec.name}")

    def save_template(self, rec: TemplateRecord) -> None:
        self._update("templates", "name", _template_row(rec), f"template {rec.name}")

    def get_template(self, name: str) -> TemplateRecord:
        with self._lock:
            row = self._db.execute("SELECT * FROM templates WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise NotFound(f"template {name} not found")
        return _template_from_row(row)

    def list_templates(self, *, states: set[TemplateState] | None = None) -> list[TemplateRecord]:
        sql, args = "SELECT * FROM templates", []
        if states is not None:
            sql += f" WHERE state IN ({', '.join('?' * len(states))})"
            args = [s.value for s in states]
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY created_at, name", args).fetchall()
        return [_template_from_row(r) for r in rows]

    def template_users(self, name: str) -> list[str]:
        """What still depends on template ``name``: the sandboxes made from it (their disks are overlays
        on its root disk). Templates made from those sandboxes are standalone: flattened disk, own
        memory; ``parent`` only records where they came from."""
        with self._lock:
            sandboxes = self._db.execute(
                "SELECT id FROM sandboxes WHERE template = ? AND state != ?",
                (name, SandboxState.DESTROYED.value),
            ).fetchall()
        return [f"sandbox {r[0]}" for r in sandboxes]

    def delete_template(self, name: str) -> None:
        self._write(lambda db: db.execute("DELETE FROM templates WHERE name = ?", (name,)))

    # -- events --------------------------------------------------------------------------------------

    def record_event(self, kind: str, sandbox_id: str | None = None, **detail: Any) -> None:
        self._write(lambda db: _log_event(db, (kind, sandbox_id, detail)))

    def events(self, *, sandbox_id: str | None = None, after: int = 0, limit: int = 1000) -> list[Event]:
        sql = "SELECT * FROM events WHERE seq > ?"
        args: list[Any] = [after]
        if sandbox_id is not None:
            sql += " AND sandbox_id = ?"
            args.append(sandbox_id)
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY seq LIMIT ?", [*args, limit]).fetchall()
        return [Event(dict(r) | {"detail": json.loads(r["detail"])}) for r in rows]


def _log_event(db: sqlite3.Connection, event: EventSpec | None) -> None:
    if event is None:
        return
    kind, sandbox_id, detail = event
    db.execute(
        "INSERT INTO events (ts, sandbox_id, kind, detail) VALUES (?, ?, ?, ?)",
        (time.time(), sandbox_id, kind, json.dumps(detail, default=str)),
    )


def _to_row(rec: SandboxRecord | TemplateRecord, json_fields: tuple[str, ...]) -> dict[str, Any]:
    row = {f: getattr(rec, f) for f in rec.__slots__}  # type: ignore[union-attr]
    row["state"] = rec.state.value
    for key in json_fields:
        # Not sorted: the order of a sandbox's ``resources`` is the order of acquisition, which
        # release reverses.
        row[key] = json.dumps(row[key])
    return row


def _from_row(row: sqlite3.Row, json_fields: tuple[str, ...]) -> dict[str, Any]:
    data = dict(row)
    for key in json_fields:
        data[key] = json.loads(data[key])
    return data


def _sandbox_row(rec: SandboxRecord) -> dict[str, Any]:
    return _to_row(rec, _SANDBOX_JSON)


def _sandbox_from_row(row: sqlite3.Row) -> SandboxRecord:
    data = _from_row(row, _SANDBOX_JSON)
    flags = {k: bool(data[k]) for k in ("pause_memory", "auto_resume")}
    return SandboxRecord(**data | flags | {"state": SandboxState(data["state"])})


def _template_row(rec: TemplateRecord) -> dict[str, Any]:
    return _to_row(rec, _TEMPLATE_JSON)


def _template_from_row(row: sqlite3.Row) -> TemplateRecord:
    data = _from_row(row, _TEMPLATE_JSON)
    return TemplateRecord(**data | {"state": TemplateState(data["state"])})
