"""UFFD page server throughput, against the kernel's own populate+copy of the same region in the same run.

Setup: a memory file of SIZE bytes of random data (no holes: every byte is copied, none zero-filled),
page-cache warm. A child process (``tests/memory/uffd_vmm.py``) plays Firecracker: it maps SIZE bytes of
anonymous memory, registers it with a userfaultfd and hands it to a :class:`PageServer` (prefetch off)
running in this process, waits until the server has taken the hand-off, then is timed.

``uffd_4k_gb_s`` / ``uffd_2m_gb_s``
    SIZE / time of ONE ``memcmp`` of the whole registered region against the child's own (populated)
    mapping of the memory file. Every page faults once and the server fills it, per fault one chunk of
    4 KiB (per-page serving) or 2 MiB; ``uffd_256k_gb_s`` is the default chunk. The memcmp also checks
    that every byte arrived.
baseline (``uffd_baseline_gb_s``)
    In the same kind of child, SIZE / time of: ``mmap`` of SIZE anonymous bytes with MAP_POPULATE (the
    kernel allocates and zeroes every page) + ``memcpy`` of the file mapping into it + the same ``memcmp``.
    That is the kernel alone producing the same bytes in fresh anonymous memory, followed by the same read.
``uffd_ratio_4k`` / ``uffd_ratio_256k`` / ``uffd_ratio_2m``
    baseline time / page-server time (a throughput ratio): 1.0 means serving through the page server is as
    fast as the kernel populating and copying by itself. Target for the chunked mode: >= 0.8.

Each figure is the median over the rounds; a round runs baseline, 4 KiB, 256 KiB and 2 MiB back to back,
so load from other work on the machine hits them alike. ``--quick``: 64 MiB, 3 rounds; else 256 MiB, 5.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from wrenbox.memory.uffd import FileSource, PageServer, PageServerConfig

VMM = Path(__file__).resolve().parents[1] / "tests" / "memory" / "uffd_vmm.py"
MiB = 1 << 20
MODES = {"4k": 4096, "256k": 256 * 1024, "2m": 2 * MiB}


def _child(plan: dict) -> dict:
    done = subprocess.run(
        [sys.executable, str(VMM), json.dumps(plan)], capture_output=True, check=True, timeout=600
    )
    result = next(r for r in map(json.loads, done.stdout.splitlines()) if "seconds" in r)
    if not result["equal"]:
        raise RuntimeError(f"memory differs from the file: {plan}")
    return result


def _baseline(memfile: Path, size: int) -> float:
    plan = {"file": str(memfile), "regions": [{"size": size, "offset": 0}], "steps": [{"do": "baseline"}]}
    return _child(plan)["seconds"]


def _served(memfile: Path, size: int, chunk: int, workdir: Path) -> float:
    config = PageServerConfig(chunk_size=chunk, prefetch=False)
    with PageServer(workdir / "uffd.sock", FileSource(memfile), config) as server:
        plan = {
            "socket": str(server.socket_path),
            "file": str(memfile),
            "regions": [{"size": size, "offset": 0}],
            "wait_handoff": True,
            "steps": [{"do": "time_read"}],
        }
        seconds = _child(plan)["seconds"]
        if server.error is not None:
            raise server.error
    return seconds


def _memfile(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        for _ in range(size // (4 * MiB)):
            f.write(os.urandom(4 * MiB))
    with open(path, "rb") as f:  # warm the page cache, as a just-written snapshot is
        while f.read(4 * MiB):
            pass


def figures(quick: bool) -> Iterable[dict]:
    size, rounds = (64 * MiB, 3) if quick else (256 * MiB, 5)
    with tempfile.TemporaryDirectory(prefix="wrenbox-bench-uffd-") as tmp:
        workdir = Path(tmp)
        memfile = workdir / "memfile"
        _memfile(memfile, size)
        times: dict[str, list[float]] = {"baseline": [], **{mode: [] for mode in MODES}}
        for _ in range(rounds):
            times["baseline"].append(_baseline(memfile, size))
            for mode, chunk in MODES.items():
                times[mode].append(_served(memfile, size, chunk, workdir))
    median = {name: statistics.median(values) for name, values in times.items()}
    yield from _report(median, size)


def _report(median: dict[str, float], size: int) -> Iterator[dict]:
    yield {"figure": "uffd_baseline_gb_s", "value": round(size / median["baseline"] / 1e9, 3), "unit": "GB/s"}
    for mode in MODES:
        yield {"figure": f"uffd_{mode}_gb_s", "value": round(size / median[mode] / 1e9, 3), "unit": "GB/s"}
    for mode in MODES:
        ratio = median["baseline"] / median[mode]
        yield {"figure": f"uffd_ratio_{mode}", "value": round(ratio, 3), "unit": "ratio"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="64 MiB, 3 rounds (seconds, for CI)")
    for figure in figures(parser.parse_args().quick):
        print(json.dumps(figure), flush=True)


if __name__ == "__main__":
    main()
