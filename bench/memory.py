"""Memory snapshot benchmarks: processing raw guest memory into the snapshot format, against reading it.

Figures (JSON lines ``{"figure", "value", "unit"}``):

``memfile_process_mb_s``, ``memfile_process_ratio``
    ``process_full`` of a raw memory file (MB of raw file per second), and its ratio to a plain
    sequential read of the same file (``os.preadv`` into a 1 MiB buffer until EOF) measured in the same
    run. Both are timed with the file in the page cache (read once before either is timed), in
    alternating rounds; the medians are reported. The default file is synthetic and shaped like the RAM
    file of a freshly booted guest measured here (256 MiB QEMU template: 44 % holes, 8 % written zero
    pages, 48 % data): 44 % holes, 8 % zero pages, 48 % random data in runs of 1-64 pages.
    ``--memfile PATH`` uses a real file instead.
``memfile_process_dense_ratio``
    The same ratio for a file that is 100 % random data (the worst case: every byte is copied).
``memfile_diff_mb_s``, ``memfile_diff_ratio``
    ``process_diff`` (compared with the parent, through its chain) after 1/8 of the pages changed, 10 %
    of those to zero (the pause of a 512 MiB guest that dirtied 64 MiB).
``memfile_materialize_mb_s``, ``memfile_materialize_ratio``
    Rebuilding the sparse RAM file from that two-generation chain, against the same read.
``memfile_size_ratio``
    Bytes the generation-0 snapshot of the raw file occupies on disk (diff file and header) / bytes in
    the raw file's non-zero 4 KiB pages, counted by reading the raw file (not from the snapshot's
    header, which would make the ratio 1 by construction): zero pages stored as data raise it.

More groups are added as functions yielding figure dicts; a sibling ``bench/uffd.py`` exposing
``figures(quick: bool)`` is run too, and ``bench/sandbox.py`` for ``snapshot_size_ratio``: bytes on disk of
a real paused QEMU sandbox's memory snapshot / non-zero bytes of its guest memory.

    python bench/memory.py [--quick] [--memfile PATH] [--dir DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from wrenbox.memory.chain import Chain
from wrenbox.memory.process import process_diff, process_full

PAGE = 4096
MB = 1_000_000


def figure(name: str, value: float, unit: str) -> dict[str, object]:
    return {"figure": name, "value": round(value, 3), "unit": unit}


# -- inputs ---------------------------------------------------------------------------------------------
def make_memfile(path: Path, size: int, *, holes: float, zeros: float, seed: int = 1) -> None:
    """A raw memory file: runs of 1-64 pages that are holes, written zero pages, or random data."""
    rng = random.Random(seed)
    noise = os.urandom(8 << 20)
    with open(path, "wb") as f:
        f.truncate(size)
        position = 0
        while position < size:
            length = min(rng.randint(1, 64) * PAGE, size - position)
            roll = rng.random()
            if roll >= holes:
                f.seek(position)
                if roll < holes + zeros:
                    f.write(bytes(length))
                else:
                    at = rng.randrange(0, len(noise) - length, PAGE)
                    f.write(noise[at : at + length])
            position += length


def change_pages(src: Path, dst: Path, fraction: float, seed: int = 2) -> None:
    """``dst`` = ``src`` with ``fraction`` of its pages rewritten (runs of 1-64 pages, 10 % zeroed)."""
    shutil.copyfile(src, dst)
    size = dst.stat().st_size
    rng = random.Random(seed)
    changed, target = 0, int(size * fraction)
    with open(dst, "r+b") as f:
        while changed < target:
            length = rng.randint(1, 64) * PAGE
            at = rng.randrange(0, size - length, PAGE)
            f.seek(at)
            f.write(bytes(length) if rng.random() < 0.1 else os.urandom(length))
            changed += length


# -- timing ---------------------------------------------------------------------------------------------
def sequential_read(path: Path) -> None:
    buffer = bytearray(1 << 20)
    view = memoryview(buffer)
    fd = os.open(path, os.O_RDONLY)
    try:
        offset = 0
        while n := os.preadv(fd, [view], offset):
            offset += n
    finally:
        os.close(fd)


def interleaved(
    rounds: int, cases: dict[str, Callable[[], None]], cleanup: Callable[[], None]
) -> dict[str, float]:
    """Median seconds of each case, run in turns so that load and cache state hit them alike."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, case in cases.items():
            started = time.perf_counter()
            case()
            times[name].append(time.perf_counter() - started)
            cleanup()
    return {name: statistics.median(samples) for name, samples in times.items()}


class Scratch:
    """Output directories that are emptied after each timed case."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.count = 0

    def new(self) -> Path:
        self.count += 1
        path = self.root / f"out{self.count}"
        path.mkdir()
        return path

    def clear(self) -> None:
        for path in self.root.glob("out*"):
            shutil.rmtree(path)


def disk_bytes(directory: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in directory.iterdir())


PAGE = 4096
ZERO_PAGE = bytes(PAGE)


def nonzero_bytes(raw: Path) -> int:
    """Bytes in the non-zero 4 KiB pages of the raw memory file, counted by reading it (holes skipped
    with SEEK_DATA/SEEK_HOLE): independent of the snapshot code, so zero pages stored as data show."""
    count = 0
    with raw.open("rb") as f:
        fd, size, offset = f.fileno(), raw.stat().st_size, 0
        while offset < size:
            try:
                start = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError:  # ENXIO: no data after offset
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            f.seek(start)
            for pos in range(start, end, 1 << 20):
                chunk = f.read(min(1 << 20, end - pos))
                count += sum(chunk[i : i + PAGE] != ZERO_PAGE for i in range(0, len(chunk), PAGE))
            offset = end
    return count * PAGE


# -- figure groups --------------------------------------------------------------------------------------
def processing_figures(quick: bool, work: Path, memfile: Path | None) -> Iterator[dict[str, object]]:
    size = (64 if quick else 512) << 20
    rounds = 3 if quick else 5
    scratch = Scratch(work)
    if memfile is None:
        memfile = work / "guest.raw"
        make_memfile(memfile, size, holes=0.44, zeros=0.08)
    dense = work / "dense.raw"
    make_memfile(dense, size, holes=0.0, zeros=0.0)
    for path in (memfile, dense):
        sequential_read(path)  # page cache warm for every case

    t = interleaved(
        rounds,
        {
            "read": lambda: sequential_read(memfile),
            "full": lambda: process_full(memfile, scratch.new()),
            "read_dense": lambda: sequential_read(dense),
            "full_dense": lambda: process_full(dense, scratch.new()),
        },
        scratch.clear,
    )
    mb = memfile.stat().st_size / MB
    yield figure("memfile_process_mb_s", mb / t["full"], "MB/s")
    yield figure("memfile_process_ratio", t["read"] / t["full"], "ratio")
    yield figure("memfile_process_dense_ratio", t["read_dense"] / t["full_dense"], "ratio")

    parent = work / "parent"
    parent.mkdir()
    process_full(memfile, parent)
    yield figure("memfile_size_ratio", disk_bytes(parent) / nonzero_bytes(memfile), "ratio")
    changed = work / "changed.raw"
    change_pages(memfile, changed, 1 / 8)
    sequential_read(changed)
    child = work / "child"
    with Chain.open(parent) as chain:
        child.mkdir()
        process_diff(changed, chain, child)
        t = interleaved(
            rounds,
            {
                "read": lambda: sequential_read(changed),
                "diff": lambda: process_diff(changed, chain, scratch.new()),
            },
            scratch.clear,
        )
    yield figure("memfile_diff_mb_s", changed.stat().st_size / MB / t["diff"], "MB/s")
    yield figure("memfile_diff_ratio", t["read"] / t["diff"], "ratio")

    ram = work / "ram"
    with Chain.open(child) as chain:
        t = interleaved(
            rounds,
            {"read": lambda: sequential_read(changed), "materialize": lambda: chain.materialize(ram)},
            lambda: ram.unlink(missing_ok=True),
        )
    yield figure("memfile_materialize_mb_s", changed.stat().st_size / MB / t["materialize"], "MB/s")
    yield figure("memfile_materialize_ratio", t["read"] / t["materialize"], "ratio")


def sibling_figures(name: str, quick: bool, **kwargs: object) -> Iterable[dict[str, object]]:
    """``figures(quick, **kwargs)`` of ``bench/<name>.py`` when that benchmark exists."""
    path = Path(__file__).with_name(f"{name}.py")
    if not path.exists():
        return []
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.figures(quick, **kwargs) if hasattr(module, "figures") else []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small files, few rounds (seconds)")
    parser.add_argument(
        "--memfile", type=Path, help="a real raw memory file to process instead of a synthetic one"
    )
    parser.add_argument("--dir", type=Path, help="where to put scratch files (default: the temp dir)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="wrenbox-bench-memory-", dir=args.dir) as tmp:
        for item in processing_figures(args.quick, Path(tmp), args.memfile):
            print(json.dumps(item), flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        for item in sibling_figures("uffd", args.quick):
            print(json.dumps(item), flush=True)
        # snapshot_size_ratio of a real paused QEMU sandbox (needs root and QEMU)
        for item in sibling_figures("sandbox", args.quick, latency=False):
            if item["figure"] == "snapshot_size_ratio":
                print(json.dumps(item), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
