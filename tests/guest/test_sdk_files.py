"""The official e2b SDK reads, writes, lists and watches files through our agent."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest
from e2b import FileType, Sandbox
from e2b.exceptions import FileNotFoundException, InvalidArgumentException, NotFoundException
from e2b.sandbox.filesystem.filesystem import WriteEntry
from e2b.sandbox.filesystem.watch_handle import FilesystemEventType


def test_text_write_read_and_info(sandbox: Sandbox, workdir: Path) -> None:
    path = workdir / "deep" / "er" / "note.txt"  # parents are created
    info = sandbox.files.write(str(path), "héllo\n")
    assert info.path == str(path)
    assert info.name == "note.txt"
    assert path.read_text() == "héllo\n"
    assert sandbox.files.read(str(path)) == "héllo\n"
    entry = sandbox.files.get_info(str(path))
    assert entry.type == FileType.FILE
    assert entry.size == len("héllo\n".encode())
    assert entry.permissions == "-rw-r--r--"
    assert abs(entry.modified_time.timestamp() - path.stat().st_mtime) < 1


def test_binary_round_trip(sandbox: Sandbox, workdir: Path) -> None:
    data = os.urandom(100_000) + b"\0\r\n--boundary--\r\n"
    sandbox.files.write(str(workdir / "blob.bin"), data)
    assert (workdir / "blob.bin").read_bytes() == data
    assert bytes(sandbox.files.read(str(workdir / "blob.bin"), format="bytes")) == data


def test_write_several_files_in_one_upload(sandbox: Sandbox, workdir: Path) -> None:
    entries = [WriteEntry(path=str(workdir / f"multi/{i}.txt"), data=f"file {i}") for i in range(3)]
    written = sandbox.files.write_files(entries)
    assert sorted(w.path for w in written) == sorted(e["path"] for e in entries)
    assert [(workdir / f"multi/{i}.txt").read_text() for i in range(3)] == ["file 0", "file 1", "file 2"]


def test_fifty_megabytes(sandbox: Sandbox, workdir: Path) -> None:
    data = os.urandom(50 * 1024 * 1024)
    sandbox.files.write(str(workdir / "big.bin"), data)
    assert hashlib.sha256((workdir / "big.bin").read_bytes()).digest() == hashlib.sha256(data).digest()
    read = sandbox.files.read(str(workdir / "big.bin"), format="bytes")
    assert len(read) == len(data)
    assert hashlib.sha256(read).digest() == hashlib.sha256(data).digest()


def test_list_exists_make_dir_rename_remove(sandbox: Sandbox, workdir: Path) -> None:
    (workdir / "a" / "b").mkdir(parents=True)
    (workdir / "a" / "one.txt").write_text("1")
    (workdir / "a" / "b" / "two.txt").write_text("22")
    (workdir / "a" / "link").symlink_to(workdir / "a" / "one.txt")

    shallow = sandbox.files.list(str(workdir / "a"))
    assert sorted(e.name for e in shallow) == ["b", "link", "one.txt"]
    link = next(e for e in shallow if e.name == "link")
    assert link.type == FileType.SYMLINK
    assert link.symlink_target == str(workdir / "a" / "one.txt")
    deep = sandbox.files.list(str(workdir / "a"), depth=2)
    assert str(workdir / "a" / "b" / "two.txt") in [e.path for e in deep]

    assert sandbox.files.exists(str(workdir / "a" / "one.txt"))
    assert not sandbox.files.exists(str(workdir / "a" / "nope"))
    assert sandbox.files.make_dir(str(workdir / "new" / "dir")) is True
    assert sandbox.files.make_dir(str(workdir / "new" / "dir")) is False  # already exists
    moved = sandbox.files.rename(str(workdir / "a" / "one.txt"), str(workdir / "new" / "uno.txt"))
    assert moved.path == str(workdir / "new" / "uno.txt")
    assert (workdir / "new" / "uno.txt").read_text() == "1"
    sandbox.files.remove(str(workdir / "a"))
    assert not (workdir / "a").exists()


def test_missing_files_and_directories_as_files(sandbox: Sandbox, workdir: Path) -> None:
    with pytest.raises(FileNotFoundException):
        sandbox.files.read(str(workdir / "missing.txt"))
    with pytest.raises(FileNotFoundException):
        sandbox.files.get_info(str(workdir / "missing.txt"))
    sandbox.files.remove(str(workdir / "missing.txt"))  # succeeds, as with envd
    with pytest.raises(InvalidArgumentException):
        sandbox.files.read(str(workdir))  # a directory


def test_watch_dir(sandbox: Sandbox, workdir: Path) -> None:
    (workdir / "sub").mkdir()
    handle = sandbox.files.watch_dir(str(workdir), recursive=True)
    try:
        (workdir / "created.txt").write_text("x")
        (workdir / "sub" / "inner.txt").write_text("y")
        (workdir / "created.txt").unlink()
        events: list[tuple[str, FilesystemEventType]] = []
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and ("created.txt", FilesystemEventType.REMOVE) not in events:
            events += [(e.name, e.type) for e in handle.get_new_events()]
            time.sleep(0.05)
    finally:
        handle.stop()
    assert ("created.txt", FilesystemEventType.CREATE) in events
    assert ("created.txt", FilesystemEventType.WRITE) in events
    assert ("sub/inner.txt", FilesystemEventType.CREATE) in events
    assert ("created.txt", FilesystemEventType.REMOVE) in events
    # The SDK stops asking once stopped; a second stop still reaches the agent, which no longer knows it.
    with pytest.raises(NotFoundException, match="no watcher with id"):
        handle.stop()


def test_file_metadata_is_replaced_by_each_write(sandbox: Sandbox, workdir: Path) -> None:
    path = str(workdir / "tagged.txt")
    sandbox.files.write(path, "one", metadata={"owner": "alice", "stage": "draft"})
    assert sandbox.files.get_info(path).metadata == {"owner": "alice", "stage": "draft"}
    sandbox.files.write(path, "two", metadata={"stage": "final"}, use_octet_stream=True)
    assert sandbox.files.get_info(path).metadata == {"stage": "final"}  # nothing stale left
    sandbox.files.write(path, "three")
    assert not sandbox.files.get_info(path).metadata
    assert sandbox.files.read(path) == "three"


@pytest.mark.root
def test_writing_a_new_file_is_one_create_and_one_write_for_watchers(sandbox: Sandbox, workdir: Path) -> None:
    workdir.chmod(0o777)
    handle = sandbox.files.watch_dir(str(workdir))
    try:
        # As another user, so the agent hands the file over (a chmod event between the others).
        sandbox.files.write(str(workdir / "new.txt"), "content", user="nobody")
        events: list[FilesystemEventType] = []
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and FilesystemEventType.WRITE not in events:
            events += [e.type for e in handle.get_new_events() if e.name == "new.txt"]
            time.sleep(0.05)
        time.sleep(0.2)
        events += [e.type for e in handle.get_new_events() if e.name == "new.txt"]
    finally:
        handle.stop()
    # As envd's: create, (chmod when the owner changes), write; no write for truncating an empty file.
    assert events[0] == FilesystemEventType.CREATE
    assert events.count(FilesystemEventType.WRITE) == 1
