"""The store's reserve on a real, completely full filesystem (a small tmpfs of this test's own): a write
that settles a sandbox draws on it and lands, a write that begins spending space is refused and changes
nothing, and the reserve is whole again once space is freed."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.support.mounts import tmpfs

from wrenbox.errors import StorageFull
from wrenbox.manager.reserve import Reserve
from wrenbox.manager.store import Store
from wrenbox.records import SandboxRecord, SandboxState

pytestmark = pytest.mark.root
CHUNK = 256 << 10


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    with tmpfs(tmp_path / "fs", "size=4m") as root:
        yield root


def fill(root: Path) -> None:
    """Take every free block of ``root``'s filesystem."""
    with (root / "filler").open("ab", buffering=0) as f:
        try:
            while True:
                f.write(b"\xff" * 4096)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
    assert os.statvfs(root).f_bavail == 0


@pytest.fixture
def store(small_fs: Path) -> Iterator[Store]:
    with Store(small_fs / "state.db", reserve=Reserve.beside(small_fs / "state.db", chunk_bytes=CHUNK)) as s:
        yield s


def reserve(small_fs: Path) -> Reserve:
    return Reserve.beside(small_fs / "state.db", chunk_bytes=CHUNK)


def test_on_a_full_disk_settling_writes_draw_on_the_reserve_and_spending_ones_are_refused(
    store: Store, small_fs: Path
) -> None:
    rec = SandboxRecord(id="abcd1234", template="minimal", state=SandboxState.RUNNING)
    store.insert_sandbox(rec)
    assert reserve(small_fs).held() == 4 * CHUNK
    fill(small_fs)

    # Beginning a pause: refused as it stands, without touching the reserve.
    rec.state = SandboxState.PAUSING
    with pytest.raises(StorageFull, match=r"could not be written.*free space"), store.spending("pausing"):
        store.save_sandbox(rec, event=("pausing", rec.id, {}))
    assert store.get_sandbox(rec.id).state is SandboxState.RUNNING
    assert reserve(small_fs).held() == 4 * CHUNK

    # Settling (back to running, then a destroy's moves): each lands, with its event.
    for state in (SandboxState.RUNNING, SandboxState.STOPPING, SandboxState.DESTROYED):
        rec.state = state
        store.save_sandbox(rec, event=(state.value, rec.id, {}))
        assert store.get_sandbox(rec.id).state is state
    assert [e["kind"] for e in store.events(sandbox_id=rec.id)] == ["running", "stopping", "destroyed"]
    held = reserve(small_fs).held()
    assert 0 < held < 4 * CHUNK  # drawn on, one chunk at a time: some is left for the next settling write

    # Beginning anything now is refused: the reserve cannot be made whole.
    with pytest.raises(StorageFull, match=r"cannot keep its reserve.*free space"), store.spending("creating"):
        pytest.fail("refused before any write")
    assert reserve(small_fs).held() == held

    (small_fs / "filler").unlink()
    with store.spending("creating"):
        store.insert_sandbox(SandboxRecord(id="efgh5678", template="minimal"))
    assert reserve(small_fs).held() == 4 * CHUNK


def test_a_spent_reserve_is_storage_full_and_nothing_is_written(store: Store, small_fs: Path) -> None:
    rec = SandboxRecord(id="abcd1234", template="minimal", state=SandboxState.RUNNING)
    store.insert_sandbox(rec)
    fill(small_fs)
    while reserve(small_fs).draw():
        pass
    fill(small_fs)  # what the chunks held is taken too

    rec.state = SandboxState.STOPPING
    with pytest.raises(StorageFull, match=r"could not be written.*free space"):
        store.save_sandbox(rec, event=("stopping", rec.id, {}))
    assert store.get_sandbox(rec.id).state is SandboxState.RUNNING
    assert store.events(sandbox_id=rec.id) == []


def test_a_refill_a_crash_interrupted_leaves_no_temporary(small_fs: Path) -> None:
    r = reserve(small_fs)
    r.directory.mkdir()
    stale = r.directory / ".chunk-0.tmp-abc"
    stale.write_bytes(b"x")
    assert r.refill()
    assert sorted(p.name for p in r.directory.iterdir()) == [f"chunk-{i}" for i in range(4)]
    assert all(p.stat().st_blocks * 512 >= CHUNK for p in r.directory.iterdir())  # allocated, not sparse
