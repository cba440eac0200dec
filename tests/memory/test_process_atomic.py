"""Atomic snapshot writes: a failure or a crash at any step leaves the previous snapshot intact.

Faults are injected at the system-call level (every open, write, copy, fsync, link, mkdir, unlink, rename
the operation makes), at each step in turn: once as an exception (the cleanup path must leave nothing),
once as a real crash of a forked child (``os._exit``; :func:`reclaim` must then leave nothing).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from wrenbox import fileio
from wrenbox.errors import AlreadyExists, Conflict, NotFound
from wrenbox.memory.chain import Chain
from wrenbox.memory.format import HEADER_NAME, diff_name
from wrenbox.memory.process import MemoryConfig, process_diff, process_full
from wrenbox.memory.writer import SnapshotWriter, reclaim

K = 4096
OLD = b"".join(bytes([i % 5]) * K for i in range(32))
NEW = b"".join(bytes([(i * 3) % 7 if i % 4 else 0]) * K for i in range(32))

_TARGETS = [
    (os, "open"),
    (os, "write"),
    (os, "pwrite"),
    (fcntl, "ioctl"),
    (os, "copy_file_range"),
    (os, "sendfile"),
    (os, "fsync"),
    (os, "link"),
    (os, "mkdir"),
    (os, "ftruncate"),
    (os, "unlink"),
    (os, "rmdir"),
    (os, "rename"),
    (fileio, "_renameat2"),
]


class Crash(Exception):
    pass


@contextlib.contextmanager
def faults(at: int | None, action: Callable[[], None]) -> Iterator[list[str]]:
    """Count the calls to every target; at call number ``at``, run ``action`` instead of the call."""
    calls: list[str] = []
    saved = [(module, name, getattr(module, name)) for module, name in _TARGETS]

    def wrap(name: str, real: Callable[..., object]) -> Callable[..., object]:
        def wrapper(*args: object, **kwargs: object) -> object:
            calls.append(name)
            if len(calls) - 1 == at:
                action()
            return real(*args, **kwargs)

        return wrapper

    for module, name, real in saved:
        setattr(module, name, wrap(name, real))
    try:
        yield calls
    finally:
        for module, name, real in saved:
            setattr(module, name, real)


def fail() -> None:
    raise OSError(errno.EIO, "injected I/O error")


def crash() -> None:
    os._exit(99)


def files_in(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()}


def read_snapshot(directory: Path) -> tuple[bytes, bytes | None]:
    """Memory (checksums verified, no stray files) and device state of a snapshot directory."""
    with Chain.open(directory) as chain:
        memory_files = files_in(directory) - {"snapfile"}
        assert memory_files == {HEADER_NAME, *(diff_name(b) for b in chain.header.builds)}
        memory = chain.read(0, chain.size)
    state = directory / "snapfile"
    return memory, state.read_bytes() if state.exists() else None


BEFORE = (OLD, b"device state")
AFTER = (NEW, b"device state 2")


def first_pause(root: Path) -> Path:
    (root / "snaps").mkdir()
    (root / "old.raw").write_bytes(OLD)
    (root / "new.raw").write_bytes(NEW)
    dest = root / "snaps" / "sandbox"
    with SnapshotWriter(dest) as w:
        process_full(root / "old.raw", w.path)
        (w.path / "snapfile").write_bytes(b"device state")
        w.commit()
    return dest


def pause_again(root: Path) -> None:
    """The operation under test: a diff pause that replaces the snapshot in place."""
    dest = root / "snaps" / "sandbox"
    with Chain.open(dest) as parent, SnapshotWriter(dest, replace=True) as w:
        process_diff(root / "new.raw", parent, w.path)
        (w.path / "snapfile").write_bytes(b"device state 2")
        w.commit()


def test_commit_replaces_and_keeps_open_readers_working(tmp_path: Path) -> None:
    dest = first_pause(tmp_path)
    with Chain.open(dest) as old_reader:
        pause_again(tmp_path)
        assert old_reader.read(0, len(OLD)) == OLD  # its files stay open after the swap
    with Chain.open(dest) as chain:
        assert chain.generation == 1
    assert read_snapshot(dest) == AFTER
    assert files_in(tmp_path / "snaps") == {"sandbox"}


def count_steps(tmp_path: Path) -> list[str]:
    setup = tmp_path / "count"
    setup.mkdir()
    first_pause(setup)
    with faults(None, fail) as calls:
        pause_again(setup)
    return calls


def test_steps_cover_the_operation_and_are_durable_before_the_swap(tmp_path: Path) -> None:
    calls = count_steps(tmp_path)
    for name in ("open", "pwrite", "write", "fsync", "link", "mkdir", "_renameat2", "unlink"):
        assert name in calls, name
    swap = calls.index("_renameat2")
    writes = ("write", "pwrite", "copy_file_range", "ioctl", "link")
    last_data = max(i for i, c in enumerate(calls) if c in writes)
    assert last_data < swap
    assert "fsync" in calls[last_data:swap]  # files and directory synced before they are published
    assert "fsync" in calls[swap:]  # and the parent directory after


def test_failure_at_every_step_leaves_the_previous_snapshot(tmp_path: Path) -> None:
    calls = count_steps(tmp_path)
    swap = calls.index("_renameat2")
    for step in range(len(calls)):
        root = tmp_path / f"run{step}"
        root.mkdir()
        dest = first_pause(root)
        with faults(step, fail):
            try:
                pause_again(root)
            except OSError as exc:
                assert exc.errno == errno.EIO  # noqa: PT017 - some late failures are only logged
        assert read_snapshot(dest) == (AFTER if step > swap else BEFORE), (
            f"failure at step {step} ({calls[step]})"
        )
        assert files_in(root / "snaps") == {"sandbox"}, f"leftovers after a failure at step {step}"


def test_crash_at_every_step_leaves_a_complete_snapshot(tmp_path: Path) -> None:
    calls = count_steps(tmp_path)
    swap = calls.index("_renameat2")
    for step in range(len(calls)):
        root = tmp_path / f"run{step}"
        root.mkdir()
        dest = first_pause(root)
        pid = os.fork()
        if pid == 0:  # the child: crash at the chosen step
            code = 1
            try:
                with faults(step, crash):
                    pause_again(root)
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 99, f"step {step} did not crash"
        assert read_snapshot(dest) == (AFTER if step > swap else BEFORE), (
            f"crash at step {step} ({calls[step]})"
        )
        reclaim(dest)
        assert files_in(root / "snaps") == {"sandbox"}, f"reclaim left something after a crash at step {step}"
        pause_again(root)  # and the next pause works on what the crash left
        assert read_snapshot(dest) == AFTER


def test_failing_first_snapshot_leaves_nothing_or_everything(tmp_path: Path) -> None:
    (tmp_path / "old.raw").write_bytes(OLD)
    dest = tmp_path / "snap"

    def create() -> None:
        with SnapshotWriter(dest) as w:
            process_full(tmp_path / "old.raw", w.path)
            w.commit()

    with faults(None, fail) as calls:
        create()
    swap = calls.index("_renameat2")
    for step in range(len(calls)):
        shutil.rmtree(dest)
        with faults(step, fail), pytest.raises(OSError, match="injected"):
            create()
        if step > swap:
            assert read_snapshot(dest) == (OLD, None)
        else:
            assert not dest.exists()
            dest.mkdir()  # for the rmtree above
        assert files_in(tmp_path) == {"old.raw", "snap"}


@pytest.mark.parametrize(
    ("config", "generation"),
    [(MemoryConfig(), 1), (MemoryConfig(max_stored_ratio=1), 0)],  # 0: collapsed once the diff is stored
)
def test_processing_cleans_up_its_own_files_in_a_plain_directory(
    tmp_path: Path, config: MemoryConfig, generation: int
) -> None:
    # Without a SnapshotWriter around it, a failing process_* still leaves nothing in dest.
    first_pause(tmp_path)
    snapshot = tmp_path / "snaps" / "sandbox"

    def attempt(dest: Path) -> int:
        with Chain.open(snapshot) as parent:
            return process_diff(tmp_path / "new.raw", parent, dest, config=config).generation

    (tmp_path / "count").mkdir()
    with faults(None, fail) as calls:
        assert attempt(tmp_path / "count") == generation
    assert "link" in calls if generation else "unlink" in calls
    for step in range(len(calls)):
        dest = tmp_path / f"plain{step}"
        dest.mkdir()
        with faults(step, fail), pytest.raises(OSError, match="injected"):
            attempt(dest)
        assert files_in(dest) == set(), f"left behind after a failure at step {step} ({calls[step]})"


def test_writer_refuses_and_cleans_up(tmp_path: Path) -> None:
    dest = tmp_path / "snap"
    with pytest.raises(NotFound):
        SnapshotWriter(tmp_path / "missing" / "snap").__enter__()
    with SnapshotWriter(dest) as w:
        (w.path / "a").write_bytes(b"1")
        w.commit()
        with pytest.raises(Conflict):
            w.commit()
    with pytest.raises(AlreadyExists):
        SnapshotWriter(dest).__enter__()
    with pytest.raises(RuntimeError), SnapshotWriter(dest, replace=True) as w:
        (w.path / "b").write_bytes(b"2")
        raise RuntimeError("boom")
    assert files_in(dest) == {"a"}
    assert files_in(tmp_path) == {"snap"}
    # two writers racing for a new name: the second commit is refused, the first result kept
    other = tmp_path / "other"
    with SnapshotWriter(other) as first, SnapshotWriter(other) as second:
        (first.path / "x").write_bytes(b"first")
        (second.path / "x").write_bytes(b"second")
        first.commit()
        with pytest.raises(AlreadyExists):
            second.commit()
    assert (other / "x").read_bytes() == b"first"
    assert files_in(tmp_path) == {"snap", "other"}


def test_reclaim_removes_only_leftovers_of_its_own_name(tmp_path: Path) -> None:
    for name in (".snap.tmp-1a2b", ".snap.tmp-ffff", ".snapshot.tmp-1", "snap", ".other.tmp-1"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "f").write_bytes(b"x")
    (tmp_path / ".snap.tmp-0f0f").write_bytes(b"half a RAM file")
    removed = reclaim(tmp_path / "snap")
    assert sorted(p.name for p in removed) == [".snap.tmp-0f0f", ".snap.tmp-1a2b", ".snap.tmp-ffff"]
    assert files_in(tmp_path) == {".snapshot.tmp-1", "snap", ".other.tmp-1"}
    assert files_in(tmp_path / "snap") == {"f"}
