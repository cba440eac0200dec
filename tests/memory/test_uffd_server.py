"""The page server against a real child process doing exactly what Firecracker does (``uffd_vmm.py``)."""

from __future__ import annotations

import json
import os
import random
import select
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from wrenbox.errors import AlreadyExists, Conflict, CorruptData, InvalidArgument, Timeout
from wrenbox.memory.uffd import FileSource, PageServer, PageServerConfig, PageSource, ServerState
from wrenbox.memory.uffd import abi as uffd_abi

VMM = Path(__file__).with_name("uffd_vmm.py")
MiB = 1 << 20
UNIT = 64 * 1024


UNUSABLE = uffd_abi.unusable()
pytestmark = pytest.mark.skipif(bool(UNUSABLE), reason=f"needs userfaultfd: {UNUSABLE}")


def make_memory(path: Path, size: int, seed: int = 1) -> Path:
    """A memory file of 64 KiB units, each at random a hole (1 in 4), written zeros (1 in 8) or random."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for unit in range(size // UNIT):
            kind = rng.random()
            if kind < 0.25:
                continue
            f.seek(unit * UNIT)
            f.write(bytes(UNIT) if kind < 0.375 else rng.randbytes(UNIT))
    return path


def open_fds() -> int:
    return len(list(Path("/proc/self/fd").iterdir()))


class Child:
    """The fake Firecracker: a subprocess following a plan, reporting one JSON line per step."""

    def __init__(self, plan: dict) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(VMM), json.dumps(plan)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        self._buffer = b""

    def line(self, timeout: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                raise AssertionError(f"child {self.proc.pid} said nothing for {timeout} s")
            chunk = os.read(fd, 65536)
            if not chunk:
                raise AssertionError(f"child exited ({self.proc.wait()}) without finishing its plan")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def results(self, timeout: float = 120.0) -> list[dict]:
        out = []
        while not (result := self.line(timeout)).get("done"):
            out.append(result)
        assert self.proc.wait(timeout) == 0
        return out

    def resume(self) -> None:
        self.proc.stdin.write(b"go\n")
        self.proc.stdin.flush()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.proc.stdin.close()
        self.proc.stdout.close()


@pytest.fixture
def spawn() -> Iterator:
    children: list[Child] = []

    def start(plan: dict) -> Child:
        children.append(Child(plan))
        return children[-1]

    yield start
    for child in children:
        child.kill()


@pytest.fixture
def memfile(tmp_path: Path) -> Path:
    return make_memory(tmp_path / "memfile", 32 * MiB)


def plan(server: PageServer, memfile: Path, regions: list[dict], steps: list[dict], **extra: object) -> dict:
    return {
        "socket": str(server.socket_path),
        "file": str(memfile),
        "regions": regions,
        "steps": steps,
    } | extra


def by_step(results: list[dict], name: str) -> list[dict]:
    return [r for r in results if r.get("step") == name]


NO_PREFETCH = PageServerConfig(prefetch=False)


def until(server: PageServer, condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, (server.state, server.stats)
        time.sleep(0.005)


@pytest.mark.parametrize("chunk", [4096, 64 * 1024, 2 * MiB])
def test_random_touches_from_four_threads_see_every_byte(tmp_path, memfile, spawn, chunk):
    size = 32 * MiB
    with FileSource(memfile) as source:
        data = source.data_bytes
    assert 0 < data < size
    config = PageServerConfig(chunk_size=chunk, prefetch=False)
    with PageServer(tmp_path / "uffd.sock", FileSource(memfile), config) as server:
        steps = [{"do": "touch", "pattern": "random", "threads": 4, "seed": chunk}, {"do": "verify"}]
        child = spawn(plan(server, memfile, [{"size": size, "offset": 0}], steps))
        server.wait_ready(timeout=30)
        results = child.results()
        stats = server.stats
    assert by_step(results, "touch")[0]["mismatched_pages"] == 0
    assert by_step(results, "verify")[0]["mismatched_regions"] == 0
    assert server.peer_pid == child.proc.pid
    # Holes are answered with the zero page, data with copies, in chunks of the configured size.
    assert stats.zeroed_bytes == size - data
    assert stats.copied_bytes == data
    assert stats.fault_bytes == size
    assert size // chunk <= stats.faults <= size // chunk + 64  # a few duplicates from racing threads
    assert stats.prefetch_bytes == 0
    assert stats.stray_faults == 0


def test_several_regions_with_the_legacy_page_size_key(tmp_path, memfile, spawn):
    regions = [
        {"size": 4 * MiB, "offset": 20 * MiB},
        {"size": 8 * MiB, "offset": 0},
        {"size": 12 * MiB, "offset": 8 * MiB},
    ]
    steps = [{"do": "touch", "pattern": "seq"}, {"do": "touch", "pattern": "random", "threads": 3}]
    with PageServer(tmp_path / "uffd.sock", FileSource(memfile), NO_PREFETCH) as server:
        child = spawn(plan(server, memfile, regions, steps, page_size_key="page_size_kib"))
        server.wait_ready(timeout=30)
        results = child.results()
        served = server.regions
    assert [t["mismatched_pages"] for t in by_step(results, "touch")] == [0, 0]
    assert sorted((r.offset, r.size, r.page_size) for r in served) == sorted(
        (r["offset"], r["size"], 4096) for r in regions
    )


@pytest.mark.parametrize("prefetch", [False, True], ids=["faults-only", "with-prefetch"])
def test_removed_ranges_read_as_zeros_and_are_not_served_again(tmp_path, memfile, spawn, prefetch):
    # With prefetch, the background fill runs while pages are removed: it must never refill them.
    steps = [
        {"do": "compare", "region": 0, "offset": 0, "length": 8 * MiB},  # populate the first 8 MiB
        {"do": "remove", "region": 0, "offset": 2 * MiB, "length": MiB},  # present pages removed
        {"do": "remove", "region": 0, "offset": 20 * MiB, "length": 2 * MiB},  # never served
        {"do": "expect_zero", "region": 0, "offset": 2 * MiB, "length": MiB},
        {"do": "expect_zero", "region": 0, "offset": 20 * MiB, "length": 2 * MiB},
        {"do": "compare", "region": 0, "offset": 0, "length": 2 * MiB},
        {"do": "compare", "region": 0, "offset": 3 * MiB, "length": 17 * MiB},
        {"do": "compare", "region": 0, "offset": 22 * MiB, "length": 10 * MiB},
    ]
    config = PageServerConfig(chunk_size=256 * 1024, prefetch=prefetch, prefetch_chunk_size=4096)
    with PageServer(tmp_path / "uffd.sock", FileSource(memfile), config) as server:
        child = spawn(plan(server, memfile, [{"size": 32 * MiB, "offset": 0}], steps))
        server.wait_ready(timeout=30)
        results = child.results()
        stats = server.stats
    assert [r["rc"] for r in by_step(results, "remove")] == [0, 0]
    assert [r["zero"] for r in by_step(results, "expect_zero")] == [True, True]
    assert [r["mismatched_pages"] for r in by_step(results, "compare")] == [0, 0, 0, 0]
    assert stats.removes == 2
    # The file has data in both removed ranges, so "reads as zeros" came from the server's bookkeeping.
    source = FileSource(memfile)
    try:
        assert any(e.address is not None for e in source.extents(20 * MiB, 2 * MiB))
        assert any(e.address is not None for e in source.extents(2 * MiB, MiB))
    finally:
        source.close()


def test_prefetch_fills_memory_before_it_is_touched(tmp_path, memfile, spawn):
    steps = [{"do": "pause"}, {"do": "touch", "pattern": "random", "threads": 2}, {"do": "verify"}]
    config = PageServerConfig(prefetch=True, prefetch_chunk_size=MiB)
    with PageServer(tmp_path / "uffd.sock", FileSource(memfile), config) as server:
        child = spawn(
            plan(
                server,
                memfile,
                [{"size": 16 * MiB, "offset": 0}, {"size": 16 * MiB, "offset": 16 * MiB}],
                steps,
            )
        )
        server.wait_ready(timeout=30)
        assert child.line() == {"handoff": True, "pid": child.proc.pid}
        assert child.line() == {"paused": True}
        until(server, lambda: server.stats.prefetch_done)
        child.resume()
        results = child.results()
        stats = server.stats
    assert by_step(results, "touch")[0]["mismatched_pages"] == 0
    assert by_step(results, "verify")[0]["mismatched_regions"] == 0
    assert stats.prefetch_bytes == 32 * MiB
    assert stats.faults == 0


def test_unmapped_ranges_are_dropped_and_serving_goes_on(tmp_path, memfile, spawn):
    features = uffd_abi.FEATURE_EVENT_REMOVE | uffd_abi.FEATURE_EVENT_UNMAP
    steps = [
        {"do": "compare", "region": 0, "offset": 0, "length": 4 * MiB},
        {"do": "unmap", "region": 0, "offset": 8 * MiB, "length": 2 * MiB},
        {"do": "compare", "region": 0, "offset": 4 * MiB, "length": 4 * MiB},
        {"do": "compare", "region": 0, "offset": 10 * MiB, "length": 22 * MiB},
    ]
    config = PageServerConfig(prefetch=True, prefetch_chunk_size=4 * MiB)
    with PageServer(tmp_path / "uffd.sock", FileSource(memfile), config) as server:
        child = spawn(plan(server, memfile, [{"size": 32 * MiB, "offset": 0}], steps, features=features))
        server.wait_ready(timeout=30)
        results = child.results()
        until(server, lambda: server.stats.prefetch_done)
        stats, state = server.stats, server.state
    assert by_step(results, "unmap") == [{"step": "unmap", "rc": 0}]
    assert [r["mismatched_pages"] for r in by_step(results, "compare")] == [0, 0, 0]
    assert stats.unmaps == 1
    assert state is ServerState.SERVING
    assert server.error is None


def test_serves_a_vmm_that_negotiated_no_events(tmp_path, memfile, spawn):
    steps = [{"do": "touch", "pattern": "random", "threads": 2}]
    with PageServer(tmp_path / "uffd.sock", FileSource(memfile), NO_PREFETCH) as server:
        child = spawn(plan(server, memfile, [{"size": 32 * MiB, "offset": 0}], steps, features=0))
        server.wait_ready(timeout=30)
        results = child.results()
    assert by_step(results, "touch")[0]["mismatched_pages"] == 0


def test_a_forked_uffd_is_closed(tmp_path, memfile, spawn):
    baseline = open_fds()
    features = uffd_abi.FEATURE_EVENT_REMOVE | uffd_abi.FEATURE_EVENT_FORK
    steps = [
        {"do": "compare", "region": 0, "offset": 0, "length": MiB},
        {"do": "fork"},
        {"do": "compare", "region": 0, "offset": MiB, "length": 31 * MiB},
    ]
    server = PageServer(tmp_path / "uffd.sock", FileSource(memfile), NO_PREFETCH)
    server.start()
    child = spawn(plan(server, memfile, [{"size": 32 * MiB, "offset": 0}], steps, features=features))
    server.wait_ready(timeout=30)
    results = child.results()
    assert [r["mismatched_pages"] for r in by_step(results, "compare")] == [0, 0]
    assert by_step(results, "fork") == [{"step": "fork", "status": 0}]
    assert server.stats.other_events == 1
    server.stop()
    child.kill()  # closes our pipes to it
    _settled(baseline)


@pytest.fixture
def huge_pages() -> Iterator[None]:
    """Reserve a few 2 MiB huge pages for the test and give them back after."""
    needed = 8
    knob = Path("/proc/sys/vm/nr_hugepages")
    before = int(knob.read_text())
    try:
        knob.write_text(str(before + needed))
    except OSError as exc:
        pytest.skip(f"needs hugetlb pages (root to reserve them): {exc}")
    try:
        free = int(
            next(
                ln.split()[1]
                for ln in Path("/proc/meminfo").read_text().splitlines()
                if ln.startswith("HugePages_Free:")
            )
        )
        if free < needed:
            pytest.skip(f"needs {needed} free 2 MiB huge pages, the kernel reserved only {free}")
        yield
    finally:
        knob.write_text(str(before))


def test_huge_pages_are_copied_whole_including_holes_inside_them(tmp_path, huge_pages, spawn):
    # 64 KiB holes inside 2 MiB pages: the server assembles those pages and copies them whole.
    memfile = make_memory(tmp_path / "memfile", 8 * MiB, seed=7)
    steps = [{"do": "touch", "pattern": "random", "threads": 2}, {"do": "verify"}]
    regions = [
        {"size": 4 * MiB, "offset": 4 * MiB, "huge": True},
        {"size": 4 * MiB, "offset": 0, "huge": True},
    ]
    with PageServer(tmp_path / "uffd.sock", FileSource(memfile), NO_PREFETCH) as server:
        child = spawn(plan(server, memfile, regions, steps))
        server.wait_ready(timeout=30)
        results = child.results()
        stats = server.stats
    assert by_step(results, "touch")[0]["mismatched_pages"] == 0
    assert by_step(results, "verify")[0]["mismatched_regions"] == 0
    assert stats.copied_bytes == 8 * MiB
    assert stats.zeropage_calls == 0


# -- stopping -------------------------------------------------------------------------------------------


def _settled(baseline: int) -> None:
    assert open_fds() == baseline
    assert not [t for t in threading.enumerate() if t.name.startswith("uffd:")]


def test_stop_while_never_connected(tmp_path, memfile):
    baseline = open_fds()
    server = PageServer(tmp_path / "uffd.sock", FileSource(memfile), PageServerConfig(accept_timeout=None))
    server.start()
    assert server.state is ServerState.LISTENING
    assert (tmp_path / "uffd.sock").is_socket()
    started = time.monotonic()
    server.stop()
    assert time.monotonic() - started < 1
    assert server.state is ServerState.STOPPED
    assert not (tmp_path / "uffd.sock").exists()
    with pytest.raises(Conflict, match="stopped before a VMM connected"):
        server.wait_ready(0)
    server.stop()  # idempotent
    _settled(baseline)


def test_no_vmm_within_accept_timeout_fails_cleanly(tmp_path, memfile):
    baseline = open_fds()
    server = PageServer(tmp_path / "uffd.sock", FileSource(memfile), PageServerConfig(accept_timeout=0.2))
    server.start()
    with pytest.raises(Timeout, match="no VMM connected"):
        server.wait_ready(timeout=10)
    assert server.state is ServerState.FAILED
    server.stop()
    assert server.state is ServerState.FAILED
    _settled(baseline)


def test_stop_while_serving(tmp_path, spawn):
    memfile = make_memory(tmp_path / "memfile", 128 * MiB)
    baseline = open_fds()
    config = PageServerConfig(chunk_size=4096, prefetch=False)
    server = PageServer(tmp_path / "uffd.sock", FileSource(memfile), config)
    server.start()
    steps = [{"do": "touch", "pattern": "random", "threads": 4}]
    child = spawn(plan(server, memfile, [{"size": 128 * MiB, "offset": 0}], steps))
    server.wait_ready(timeout=30)
    until(server, lambda: server.stats.faults >= 500)
    started = time.monotonic()
    server.stop()
    assert time.monotonic() - started < 1
    assert server.state is ServerState.STOPPED
    assert child.proc.poll() is None  # its vCPUs now wait on faults nobody answers, as in Firecracker
    child.kill()
    _settled(baseline)


def test_stop_after_the_vmm_died(tmp_path, memfile, spawn):
    baseline = open_fds()
    config = PageServerConfig(prefetch=True, prefetch_chunk_size=4096)
    server = PageServer(tmp_path / "uffd.sock", FileSource(memfile), config)
    server.start()
    child = spawn(plan(server, memfile, [{"size": 32 * MiB, "offset": 0}], [{"do": "pause"}]))
    server.wait_ready(timeout=30)
    assert child.line()["handoff"]
    child.kill()  # SIGKILL while the prefetch is filling its memory page by page
    until(server, lambda: server.state is not ServerState.SERVING or server.stats.prefetch_done)
    assert server.state is ServerState.FINISHED, server.stats
    assert server.error is None
    server.stop()
    assert server.state is ServerState.STOPPED
    _settled(baseline)


def test_stop_without_start_closes_the_source(tmp_path, memfile):
    baseline = open_fds()
    source = FileSource(memfile)
    maps = Path("/proc/self/maps")
    assert str(memfile) in maps.read_text()
    PageServer(tmp_path / "uffd.sock", source).stop()
    assert str(memfile) not in maps.read_text()
    assert open_fds() == baseline


def test_a_server_starts_once(tmp_path, memfile):
    with PageServer(tmp_path / "uffd.sock", FileSource(memfile)) as server, pytest.raises(Conflict):
        server.start()


def test_a_stale_socket_is_replaced_but_other_files_are_not(tmp_path, memfile):
    import socket

    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(tmp_path / "uffd.sock"))
    stale.close()  # the file stays behind, as after a crash
    with PageServer(tmp_path / "uffd.sock", FileSource(memfile)) as server:
        assert server.state is ServerState.LISTENING
    (tmp_path / "taken").write_text("not a socket")
    server = PageServer(tmp_path / "taken", FileSource(memfile))
    with pytest.raises(AlreadyExists):
        server.start()
    server.stop()
    assert (tmp_path / "taken").read_text() == "not a socket"


@pytest.mark.parametrize(
    "config",
    [
        {"chunk_size": 3 * 4096},
        {"chunk_size": 4 * MiB},
        {"chunk_size": 2048},
        {"chunk_size": True},
        {"prefetch_chunk_size": 128 * MiB},
        {"accept_timeout": 0},
        {"handshake_timeout": -1},
        {"max_handshake_bytes": 10},
        {"socket_mode": 0o1777},
    ],
)
def test_bad_config_is_refused(config):
    with pytest.raises(InvalidArgument):
        PageServerConfig(**config)


def test_socket_path_too_long_is_refused(tmp_path, memfile):
    source = FileSource(memfile)
    try:
        with pytest.raises(InvalidArgument, match="longer than"):
            PageServer(tmp_path / ("x" * 120), source)
    finally:
        source.close()


def test_pages_dropped_without_a_remove_event_read_as_zeros(tmp_path, memfile, spawn):
    # A VMM that did not ask for EVENT_REMOVE drops pages silently: the re-fault is the only sign.
    steps = [
        {"do": "compare", "region": 0, "offset": 0, "length": 4 * MiB},
        {"do": "remove", "region": 0, "offset": MiB, "length": MiB},
        {"do": "expect_zero", "region": 0, "offset": MiB, "length": MiB},
        {"do": "compare", "region": 0, "offset": 2 * MiB, "length": 30 * MiB},
    ]
    with PageServer(tmp_path / "uffd.sock", FileSource(memfile), NO_PREFETCH) as server:
        child = spawn(plan(server, memfile, [{"size": 32 * MiB, "offset": 0}], steps, features=0))
        server.wait_ready(timeout=30)
        results = child.results(timeout=20)
        stats = server.stats
    assert by_step(results, "expect_zero")[0]["zero"] is True
    assert [r["mismatched_pages"] for r in by_step(results, "compare")] == [0, 0]
    assert stats.removes == 0


class DamagedSource:
    """A PageSource (not a file) whose data past ``bad_from`` fails its checksum."""

    def __init__(self, inner: FileSource, bad_from: int) -> None:
        self.inner, self.bad_from, self.closed = inner, bad_from, False

    @property
    def size(self) -> int:
        return self.inner.size

    def extents(self, offset: int, length: int) -> list:
        if offset + length > self.bad_from:
            raise CorruptData(f"diff block at {offset} fails its checksum")
        return self.inner.extents(offset, length)

    def close(self) -> None:
        self.inner.close()
        self.closed = True


def test_corrupt_source_data_is_never_served(tmp_path, memfile, spawn):
    baseline = open_fds()
    source = DamagedSource(FileSource(memfile), bad_from=16 * MiB)
    assert isinstance(source, PageSource)
    server = PageServer(tmp_path / "uffd.sock", source, NO_PREFETCH)
    server.start()
    steps = [
        {"do": "compare", "region": 0, "offset": 0, "length": 4 * MiB},
        {"do": "compare", "region": 0, "offset": 20 * MiB, "length": 4 * MiB},
    ]
    child = spawn(plan(server, memfile, [{"size": 32 * MiB, "offset": 0}], steps))
    server.wait_ready(timeout=30)
    assert child.line()["handoff"]
    assert child.line() == {"step": "compare", "mismatched_pages": 0}
    until(server, lambda: server.state is ServerState.FAILED)
    assert isinstance(server.error, CorruptData)
    time.sleep(0.2)
    assert child.proc.poll() is None  # blocked on the page, not running on wrong memory
    child.kill()
    server.stop()
    assert source.closed
    _settled(baseline)
