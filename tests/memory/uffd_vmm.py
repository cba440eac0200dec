"""A stand-in for Firecracker restoring a snapshot with a ``Uffd`` memory backend (a test/bench helper).

It does what Firecracker does: mmap anonymous guest memory (one mapping per region, MAP_PRIVATE |
MAP_ANONYMOUS | MAP_NORESERVE, MAP_HUGETLB for huge pages), create a userfaultfd, UFFDIO_API (Firecracker
asks for EVENT_REMOVE), UFFDIO_REGISTER every region in missing mode, connect to the page server's socket
and send ONE message: the JSON region list with the uffd attached as SCM_RIGHTS. It keeps its own uffd
open, as Firecracker does. Then it runs the steps of its plan against the memory and checks every byte
against the memory file the server serves from (its own read-only mapping of that file).

Usage: ``python uffd_vmm.py PLAN_JSON``. One JSON line per step on stdout, then ``{"done": true}``.
Plan keys: socket, file, regions [{size, offset, huge}], features, page_size_key (page_size |
page_size_kib | both), wait_handoff, steps. Steps (``do``):

* ``touch`` {pattern: seq|random, threads, seed}: read every page of every region (random order split
  across threads), comparing with the file; reports ``mismatched_pages`` and ``seconds``.
* ``verify``: one memcmp per region against the file; reports ``mismatched_regions``.
* ``remove`` / ``unmap`` {region, offset, length}: madvise(MADV_DONTNEED) / munmap part of a region.
* ``expect_zero`` {region, offset, length}: reports whether the range reads as zeros.
* ``compare`` {region, offset, length}: reports mismatched pages of a range against the file.
* ``fork``: fork a child that exits at once (with EVENT_FORK negotiated, the server gets its uffd).
* ``pause``: print ``{"paused": true}`` and wait for a line on stdin.
* ``baseline``: the kernel-only reference for the benchmark, no uffd involved: time an anonymous mmap
  with MAP_POPULATE of the size of region 0 plus a memcpy of the file into it plus the same memcmp that
  ``time_read`` does.
* ``time_read``: time one memcmp of region 0 against the file (every page faults once to the server).
"""

from __future__ import annotations

import ctypes
import json
import os
import random
import socket
import sys
import threading
import time

from wrenbox.memory.uffd import abi as uffd_abi

PAGE = 4096
HUGE = 2 << 20
MADV_DONTNEED = 4

libc = ctypes.CDLL("libc.so.6", use_errno=True)
libc.memcmp.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
libc.memcmp.restype = ctypes.c_int
libc.memcpy.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


def emit(**result: object) -> None:
    print(json.dumps(result), flush=True)


class Vmm:
    def __init__(self, plan: dict) -> None:
        self.plan = plan
        fd = os.open(plan["file"], os.O_RDONLY)
        self.file = uffd_abi.map_file(fd, os.fstat(fd).st_size, populate=True)
        os.close(fd)
        self.regions = plan.get("regions", [])
        self.maps: list[uffd_abi.Mapping] = []
        self.uffd = -1

    def reference(self, region: int, offset: int) -> int:
        return self.file.address + self.regions[region]["offset"] + offset

    def handoff(self) -> None:
        self.uffd = uffd_abi.userfaultfd()
        uffd_abi.api(self.uffd, self.plan.get("features", uffd_abi.FEATURE_EVENT_REMOVE))
        message = []
        for spec in self.regions:
            mapping = uffd_abi.map_anonymous(spec["size"], huge=spec.get("huge", False))
            self.maps.append(mapping)
            uffd_abi.register(self.uffd, mapping.address, mapping.length)
            page_size = HUGE if spec.get("huge") else PAGE
            entry = {"base_host_virt_addr": mapping.address, "size": spec["size"], "offset": spec["offset"]}
            key = self.plan.get("page_size_key", "both")
            if key in ("page_size", "both"):
                entry["page_size"] = page_size
            if key in ("page_size_kib", "both"):
                entry["page_size_kib"] = page_size  # bytes, despite the name, as Firecracker sends it
            message.append(entry)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.connect(self.plan["socket"])
            socket.send_fds(conn, [json.dumps(message).encode()], [self.uffd])
            if self.plan.get("wait_handoff"):
                conn.recv(1)  # the server closes the connection once it has taken the hand-off

    def touch(self, pattern: str = "seq", threads: int = 1, seed: int = 0) -> dict:
        pages = [(i, off) for i, spec in enumerate(self.regions) for off in range(0, spec["size"], PAGE)]
        if pattern == "random":
            random.Random(seed).shuffle(pages)
        bad = [0] * threads

        def worker(n: int) -> None:
            for region, off in pages[n::threads]:
                # ctypes drops the GIL, so the threads fault concurrently like vCPUs
                if libc.memcmp(self.maps[region].address + off, self.reference(region, off), PAGE):
                    bad[n] += 1

        started = time.perf_counter()
        workers = [threading.Thread(target=worker, args=(n,)) for n in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        return {"mismatched_pages": sum(bad), "pages": len(pages), "seconds": time.perf_counter() - started}

    def verify(self) -> dict:
        bad = sum(
            1
            for i, spec in enumerate(self.regions)
            if libc.memcmp(self.maps[i].address, self.reference(i, 0), spec["size"])
        )
        return {"mismatched_regions": bad}

    def compare(self, region: int, offset: int, length: int) -> dict:
        bad = sum(
            1
            for off in range(offset, offset + length, PAGE)
            if libc.memcmp(self.maps[region].address + off, self.reference(region, off), PAGE)
        )
        return {"mismatched_pages": bad}

    def remove(self, region: int, offset: int, length: int) -> dict:
        return {"rc": libc.madvise(self.maps[region].address + offset, length, MADV_DONTNEED)}

    def unmap(self, region: int, offset: int, length: int) -> dict:
        return {"rc": libc.munmap(self.maps[region].address + offset, length)}

    def expect_zero(self, region: int, offset: int, length: int) -> dict:
        data = ctypes.string_at(self.maps[region].address + offset, length)
        return {"zero": data == bytes(length)}

    def fork(self) -> dict:
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        return {"status": status}

    def pause(self) -> dict:
        emit(paused=True)
        sys.stdin.readline()
        return {}

    def time_read(self) -> dict:
        size = self.regions[0]["size"]
        started = time.perf_counter()
        bad = libc.memcmp(self.maps[0].address, self.reference(0, 0), size)
        return {"seconds": time.perf_counter() - started, "equal": bad == 0}

    def baseline(self) -> dict:
        size = self.regions[0]["size"]
        started = time.perf_counter()
        with uffd_abi.map_anonymous(size, populate=True) as memory:
            libc.memcpy(memory.address, self.reference(0, 0), size)
            bad = libc.memcmp(memory.address, self.reference(0, 0), size)
            elapsed = time.perf_counter() - started
        return {"seconds": elapsed, "equal": bad == 0}


def main() -> None:
    plan = json.loads(sys.argv[1])
    vmm = Vmm(plan)
    if plan.get("socket"):
        vmm.handoff()
        emit(handoff=True, pid=os.getpid())
    for step in plan.get("steps", []):
        args = {k: v for k, v in step.items() if k != "do"}
        emit(step=step["do"], **getattr(vmm, step["do"])(**args))
    emit(done=True)


if __name__ == "__main__":
    main()
