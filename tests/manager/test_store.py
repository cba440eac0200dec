from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from wrenbox.errors import AlreadyExists, NotFound
from wrenbox.manager import store as store_mod
from wrenbox.manager.store import Store
from wrenbox.records import SandboxRecord, SandboxState, TemplateRecord, TemplateState


@pytest.fixture
def store(tmp_path: Path) -> Store:
    with Store(tmp_path / "state.db") as s:
        yield s


def test_sandbox_round_trip_keeps_every_field(store: Store) -> None:
    rec = SandboxRecord(
        id="abcd1234",
        template="minimal",
        vcpus=2,
        memory_mb=256,
        timeout_s=30,
        metadata={"owner": "me", "ünï": "cödé"},
        env={"A": "1"},
        resources={"slot": 3, "vm": {"pid": 10, "start_time": 99}},
        leftovers=["netns wrenbox-ns-3"],
    )
    store.insert_sandbox(rec)
    assert store.get_sandbox("abcd1234") == rec


def test_insert_twice_is_already_exists(store: Store) -> None:
    store.insert_sandbox(SandboxRecord(id="abcd1234", template="t"))
    with pytest.raises(AlreadyExists):
        store.insert_sandbox(SandboxRecord(id="abcd1234", template="t"))


def test_save_and_missing(store: Store) -> None:
    rec = SandboxRecord(id="abcd1234", template="t")
    store.insert_sandbox(rec)
    store.save_sandbox(rec.replace(state=SandboxState.RUNNING, host_ip="10.11.0.1"))
    got = store.get_sandbox("abcd1234")
    assert got.state is SandboxState.RUNNING
    assert got.host_ip == "10.11.0.1"
    with pytest.raises(NotFound):
        store.get_sandbox("nope0000")
    with pytest.raises(NotFound):
        store.save_sandbox(SandboxRecord(id="nope0000", template="t"))


def test_list_filters_by_state_metadata_and_template(store: Store) -> None:
    store.insert_sandbox(SandboxRecord(id="aaaa0001", template="x", metadata={"team": "a", "k": "1"}))
    store.insert_sandbox(
        SandboxRecord(id="aaaa0002", template="y", state=SandboxState.PAUSED, metadata={"team": "a"})
    )
    store.insert_sandbox(SandboxRecord(id="aaaa0003", template="x", metadata={"team": "b"}))
    ids = lambda rs: [r.id for r in rs]  # noqa: E731
    assert ids(store.list_sandboxes()) == ["aaaa0001", "aaaa0002", "aaaa0003"]
    assert ids(store.list_sandboxes(states={SandboxState.PAUSED})) == ["aaaa0002"]
    assert ids(store.list_sandboxes(metadata={"team": "a"})) == ["aaaa0001", "aaaa0002"]
    assert ids(store.list_sandboxes(metadata={"team": "a", "k": "1"})) == ["aaaa0001"]
    assert ids(store.list_sandboxes(template="x", metadata={"team": "b"})) == ["aaaa0003"]
    # keys that look like JSON paths are matched literally, never interpreted
    assert store.list_sandboxes(metadata={"team.x": "a"}) == []
    assert store.list_sandboxes(metadata={'"]) OR 1=1 --': "a"}) == []


def test_templates_and_their_users(store: Store) -> None:
    store.insert_template(TemplateRecord(name="minimal", kind="base", path="/t/minimal"))
    store.insert_template(TemplateRecord(name="child", kind="snapshot", path="/t/child", parent="minimal"))
    store.insert_sandbox(SandboxRecord(id="aaaa0001", template="minimal"))
    store.insert_sandbox(SandboxRecord(id="aaaa0002", template="minimal", state=SandboxState.DESTROYED))
    assert store.template_users("minimal") == ["sandbox aaaa0001"]  # a child template is standalone
    assert store.template_users("child") == []
    rec = store.get_template("minimal")
    rec.state = TemplateState.READY
    store.save_template(rec)
    assert [t.name for t in store.list_templates(states={TemplateState.READY})] == ["minimal"]
    with pytest.raises(AlreadyExists):
        store.insert_template(TemplateRecord(name="minimal", kind="base", path="/x"))
    store.delete_template("child")
    with pytest.raises(NotFound):
        store.get_template("child")


def test_events_are_ordered_and_filtered(store: Store) -> None:
    store.record_event("created", "aaaa0001", template="minimal")
    store.record_event("paused", "aaaa0001", seconds=0.2)
    store.record_event("created", "aaaa0002")
    evs = store.events(sandbox_id="aaaa0001")
    assert [e["kind"] for e in evs] == ["created", "paused"]
    assert evs[1]["detail"] == {"seconds": 0.2}
    assert [e["kind"] for e in store.events(after=evs[1]["seq"])] == ["created"]


def test_state_survives_reopen_and_schema_is_versioned(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    with Store(path) as s:
        s.insert_sandbox(SandboxRecord(id="abcd1234", template="t", state=SandboxState.PAUSED))
        assert s.schema_version == len(store_mod.MIGRATIONS)
    with Store(path) as s:
        assert s.get_sandbox("abcd1234").state is SandboxState.PAUSED
    mode = sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_a_new_migration_runs_once_and_a_failing_one_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "state.db"
    Store(path).close()
    extra = "CREATE TABLE extra (x INTEGER); INSERT INTO extra VALUES (1)"
    monkeypatch.setattr(store_mod, "MIGRATIONS", (*store_mod.MIGRATIONS, extra))
    latest = len(store_mod.MIGRATIONS)
    with Store(path) as s:
        assert s.schema_version == latest
    with Store(path) as s:  # not applied twice
        assert s._db.execute("SELECT count(*) FROM extra").fetchone()[0] == 1
    broken = "CREATE TABLE half (x INTEGER); INSERT INTO nosuchtable VALUES (1)"
    monkeypatch.setattr(store_mod, "MIGRATIONS", (*store_mod.MIGRATIONS, broken))
    with pytest.raises(sqlite3.OperationalError):
        Store(path)
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == latest
    assert db.execute("SELECT name FROM sqlite_master WHERE name = 'half'").fetchone() is None


def test_concurrent_writers_from_threads(store: Store) -> None:
    def worker(n: int) -> None:
        for i in range(50):
            store.insert_sandbox(SandboxRecord(id=f"t{n:03d}{i:04d}", template="t"))

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(store.list_sandboxes()) == 200


def test_a_version_1_database_upgrades_in_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "state.db"
    with monkeypatch.context() as m:
        m.setattr(store_mod, "MIGRATIONS", store_mod.MIGRATIONS[:1])
        old = Store(path)
        old._db.execute(
            "INSERT INTO sandboxes VALUES ('abcd1234', 't', 'paused', 1, 512, NULL, 0, 'pause',"
            " '{}', '{}', 1.0, 1.0, 1.0, NULL, '{\"disk\": 1}', '[]', NULL, 0)"
        )
        old.close()
    with Store(path) as s:
        rec = s.get_sandbox("abcd1234")
        assert rec.state is SandboxState.PAUSED
        assert rec.resources == {"disk": 1}
        assert rec.access_token is None
