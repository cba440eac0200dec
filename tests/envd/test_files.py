"""Files through the envd client, against a real agent (on this host, so guest paths are host paths)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from wrenbox.envd import FileType, WatchEventType
from wrenbox.errors import AlreadyExists, InvalidArgument, NotFound

pytestmark = pytest.mark.anyio


async def _download(envd: Any, path: str) -> bytes:
    async with envd.files.download(path) as chunks:
        return b"".join([chunk async for chunk in chunks])


async def test_upload_stat_download(envd: Any, tmp_path: Path) -> None:
    target = tmp_path / "deep" / "er" / "file.bin"
    written = await envd.files.upload(str(target), b"\x00\xffpayload")
    assert (written.name, written.path) == ("file.bin", str(target))
    assert target.read_bytes() == b"\x00\xffpayload"

    entry = await envd.files.stat(str(target))
    assert (entry.name, entry.path, entry.type, entry.size) == ("file.bin", str(target), FileType.FILE, 9)
    assert entry.modified_time is not None
    assert await envd.files.exists(str(target))
    assert not await envd.files.exists(str(tmp_path / "nope"))
    assert await _download(envd, str(target)) == b"\x00\xffpayload"


async def test_upload_replaces_and_streams_chunks(envd: Any, flavour: Any, tmp_path: Path) -> None:
    target = tmp_path / "streamed.txt"
    target.write_text("old content that is longer")
    parts = [b"one,", b"two,", b"three"]
    if flavour.is_sync:
        source: Any = iter(parts)
    else:

        async def produce() -> AsyncIterator[bytes]:
            for part in parts:
                await anyio.lowlevel.checkpoint()
                yield part

        source = produce()
    await envd.files.upload(str(target), source)
    assert target.read_bytes() == b"one,two,three"


async def test_upload_of_missing_local_file_is_refused(envd: Any, tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="cannot read local file"):
        await envd.files.upload(str(tmp_path / "x"), tmp_path / "does-not-exist")
    assert not (tmp_path / "x").exists()


async def test_missing_files_are_not_found(envd: Any, tmp_path: Path) -> None:
    missing = str(tmp_path / "missing")
    with pytest.raises(NotFound):
        await envd.files.stat(missing)
    with pytest.raises(NotFound):
        await _download(envd, missing)
    with pytest.raises(NotFound):
        await envd.files.list_dir(missing)
    await envd.files.remove(missing)  # succeeds, as with envd
    dest = tmp_path / "local-copy"
    with pytest.raises(NotFound):
        await envd.files.download_to(missing, dest)
    assert not dest.exists()
    assert not (tmp_path / "local-copy.part").exists()


async def test_list_dir_depth(envd: Any, tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "c.txt").write_text("c")
    (tmp_path / "top.txt").write_text("t")
    shallow = {entry.path: entry.type for entry in await envd.files.list_dir(str(tmp_path))}
    assert shallow == {str(tmp_path / "a"): FileType.DIRECTORY, str(tmp_path / "top.txt"): FileType.FILE}
    deep = {entry.path for entry in await envd.files.list_dir(str(tmp_path), depth=3)}
    assert str(tmp_path / "a" / "b" / "c.txt") in deep
    with pytest.raises(InvalidArgument):
        await envd.files.list_dir(str(tmp_path), depth=0)


async def test_make_dir_move_remove(envd: Any, tmp_path: Path) -> None:
    made = await envd.files.make_dir(str(tmp_path / "x" / "y"))
    assert (made.type, made.path) == (FileType.DIRECTORY, str(tmp_path / "x" / "y"))
    with pytest.raises(AlreadyExists):
        await envd.files.make_dir(str(tmp_path / "x" / "y"))
    again = await envd.files.make_dir(str(tmp_path / "x" / "y"), exist_ok=True)
    assert again.type == FileType.DIRECTORY

    (tmp_path / "x" / "y" / "f").write_text("f")
    moved = await envd.files.move(str(tmp_path / "x"), str(tmp_path / "z"))
    assert moved.path == str(tmp_path / "z")
    assert (tmp_path / "z" / "y" / "f").read_text() == "f"
    assert not (tmp_path / "x").exists()

    await envd.files.remove(str(tmp_path / "z"))
    assert not (tmp_path / "z").exists()


async def test_watch_reports_changes(envd: Any, tmp_path: Path) -> None:
    async with envd.files.watch(str(tmp_path)) as events:
        await envd.files.upload(str(tmp_path / "new.txt"), b"x")
        with anyio.fail_after(10):
            async for event in events:
                if event.name == "new.txt" and event.type == WatchEventType.CREATE:
                    break
    with pytest.raises(NotFound):
        async with envd.files.watch(str(tmp_path / "missing")):
            pass


def _vm_hwm_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/self/status")


def _reset_peak_rss() -> int:
    """Reset this process's peak RSS to its current RSS (Linux: ``5`` into clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")
    return _vm_hwm_bytes()


def _random_file(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    with path.open("wb") as out:
        for _ in range(size // (1 << 20)):
            chunk = os.urandom(1 << 20)
            digest.update(chunk)
            out.write(chunk)
    return digest.hexdigest()


@pytest.mark.slow
async def test_50mb_round_trip_streams_in_bounded_memory(envd: Any, tmp_path: Path) -> None:
    size = 50 << 20
    local = tmp_path / "local.bin"
    expected = _random_file(local, size)
    remote = tmp_path / "remote" / "big.bin"

    baseline = _reset_peak_rss()
    written = await envd.files.upload(str(remote), local)
    assert written.path == str(remote)
    assert remote.stat().st_size == size

    digest = hashlib.sha256()
    received = 0
    async with envd.files.download(str(remote)) as chunks:
        async for chunk in chunks:
            digest.update(chunk)
            received += len(chunk)
    assert (received, digest.hexdigest()) == (size, expected)

    copy = tmp_path / "copy.bin"
    assert await envd.files.download_to(str(remote), copy) == size
    growth = _vm_hwm_bytes() - baseline
    assert hashlib.sha256(copy.read_bytes()).hexdigest() == expected
    # Streaming holds a few chunks at a time; buffering would cost at least the 50 MB file.
    assert growth < 20 << 20, f"peak RSS grew by {growth >> 20} MiB moving a 50 MiB file"
