"""Load: E2B's SDK from N concurrent clients against ``wrenbox serve``, for a bounded time, twice.

Each client holds at most one sandbox and, until the time is up, picks an operation by weight:
``create`` (when it holds none; it writes a marker file whose hash it keeps), ``run`` (a command, its
output checked), ``files`` (64 KiB written and read back, compared), ``pause_resume`` (pause, then
``Sandbox.connect``; the marker's hash checked in the guest), ``fork`` (one child, checked and killed) and
``kill``. Every sandbox left is killed at the end of a run. All traffic is on loopback.

Prints one JSON line per figure, ``{"figure": NAME, "value": NUMBER, "unit": UNIT}``:

``load_<op>_p50_ms``, ``load_<op>_p95_ms``, ``load_<op>_p99_ms``   latency per operation (both runs)
``load_ops_per_s``       operations completed per second (both runs)
``load_errors``          failed operations: anything but an intended 429 (``load_throttled``) counts
``load_leaks``           what is left once every sandbox is gone, beyond what was there before the first
                         run: QEMU processes, RAM files, sandbox directories, disks, cgroups, network
                         namespaces and links of the server's prefix, nft tables, loop devices, and
                         sandboxes still listed (running or paused); ``load_leak_<kind>`` for each kind found
``load_rss_mib_start``, ``load_rss_mib_run1``, ``load_rss_mib_run2``  the server's resident memory
``load_rss_growth_ratio``  after run 2 / after run 1 (target < 1.10)

Needs root and QEMU; shares the cached guest image in ``$WRENBOX_TEST_DATA_DIR``.

    python bench/load.py [--quick] [--clients N] [--seconds S] [--mix run=4,files=2,...]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import secrets
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import Server, figure, scratch_host
from wrenbox.config import LimitsConfig, SandboxDefaults, Settings
from wrenbox.network.links import link_names
from wrenbox.network.netns import list_netns
from wrenbox.runtime.sweep import our_processes
from wrenbox.service import vmm_cgroups
from wrenbox.vmm.cgroups import CgroupConfig

TEMPLATE = "minimal"
MARKER = "/home/user/marker.bin"
DEFAULT_MIX = {"run": 4.0, "files": 2.0, "pause_resume": 1.0, "fork": 0.5, "kill": 1.0}


@dataclass
class Tally:
    """What every client saw, under one lock."""

    latencies: dict[str, list[float]] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    throttled: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def took(self, op: str, seconds: float) -> None:
        with self.lock:
            self.latencies.setdefault(op, []).append(seconds)

    def failed(self, op: str, exc: BaseException) -> None:
        from e2b import RateLimitException

        with self.lock:
            if isinstance(exc, RateLimitException):
                self.throttled += 1
            else:
                key = f"{op}: {type(exc).__name__}: {str(exc)[:120]}"
                self.errors[key] = self.errors.get(key, 0) + 1


class Client:
    """One SDK user: at most one sandbox, and a marker file in it whose hash it knows."""

    def __init__(self, server: Server, tally: Tally, mix: dict[str, float], seed: int) -> None:
        self.opts = {"api_key": server.key, "api_url": server.url, "sandbox_url": server.url}
        self.tally, self.mix, self.rng = tally, mix, random.Random(seed)
        self.sandbox: Any = None
        self.marker = ""

    def loop(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            op = "create" if self.sandbox is None else self._pick()
            t0 = time.perf_counter()
            try:
                getattr(self, f"op_{op}")()
            except Exception as exc:
                self.tally.failed(op, exc)
                self._drop()
                continue
            self.tally.took(op, time.perf_counter() - t0)
        self._drop()

    def _pick(self) -> str:
        ops = list(self.mix)
        return self.rng.choices(ops, weights=[self.mix[o] for o in ops])[0]

    def _drop(self) -> None:
        if self.sandbox is not None:
            try:
                self.sandbox.kill()
            except Exception as exc:
                self.tally.failed("kill", exc)
            self.sandbox = None

    @staticmethod
    def _hash_in_guest(sandbox: Any) -> str:
        return str(sandbox.commands.run(f"sha256sum {MARKER}").stdout.split()[0])

    def op_create(self) -> None:
        from e2b import Sandbox

        self.sandbox = Sandbox.create(TEMPLATE, timeout=600, **self.opts)
        data = os.urandom(4096)
        self.sandbox.files.write(MARKER, data)
        self.marker = hashlib.sha256(data).hexdigest()

    def op_run(self) -> None:
        word = secrets.token_hex(4)
        out = self.sandbox.commands.run(f"echo {word}").stdout
        if out.strip() != word:
            raise AssertionError(f"echo answered {out!r}")

    def op_files(self) -> None:
        data = os.urandom(64 * 1024)
        self.sandbox.files.write("/tmp/load.bin", data)
        if self.sandbox.files.read("/tmp/load.bin", format="bytes") != data:
            raise AssertionError("a file read back differs from what was written")

    def op_pause_resume(self) -> None:
        from e2b import Sandbox

        self.sandbox.pause()
        self.sandbox = Sandbox.connect(self.sandbox.sandbox_id, timeout=600, **self.opts)
        if self._hash_in_guest(self.sandbox) != self.marker:
            raise AssertionError("the marker changed across pause and resume")

    def op_fork(self) -> None:
        (child,) = self.sandbox.fork(timeout=600, count=1, **self.opts)
        if isinstance(child, Exception):
            raise child
        try:
            if self._hash_in_guest(child) != self.marker:
                raise AssertionError("a fork's marker differs from its parent's")
        finally:
            child.kill()

    def op_kill(self) -> None:
        self.sandbox.kill()
        self.sandbox = None


def one_run(
    server: Server, clients: int, seconds: float, mix: dict[str, float], seed: int
) -> tuple[Tally, float]:
    """``clients`` threads for ``seconds``; every sandbox is killed when it ends."""
    tally = Tally()
    workers = [Client(server, tally, mix, seed + i) for i in range(clients)]
    deadline = time.monotonic() + seconds
    threads = [threading.Thread(target=w.loop, args=(deadline,)) for w in workers]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return tally, time.monotonic() - t0


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def host_objects(settings: Settings) -> dict[str, int]:
    """What the host holds for the server's data dir and prefix, by kind."""
    prefix = settings.network.prefix
    data = settings.data_dir

    def count(path: Path) -> int:
        return len(list(path.iterdir())) if path.is_dir() else 0

    cgroups = vmm_cgroups(CgroupConfig())
    tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, check=False).stdout
    loops = subprocess.run(["losetup", "-J"], capture_output=True, text=True, check=False).stdout
    return {
        "qemu": len(our_processes([data])),
        "ram_files": count(settings.memory_dir),
        "sandbox_dirs": count(settings.sandboxes_dir),
        "disks": count(data / "disks"),
        "cgroups": len([n for n in (cgroups[0].names() if cgroups else []) if n.startswith(f"{prefix}-")]),
        "netns": len([n for n in list_netns() if n.startswith(prefix)]),
        "links": len([n for n in link_names() if n.startswith(prefix)]),
        "nft_tables": tables.count(f" {prefix}"),
        "loop_devices": loops.count(str(data)),
    }


def listed(server: Server) -> int:
    import httpx

    answer = httpx.get(
        f"{server.url}/v2/sandboxes", params={"state": "running,paused"}, headers={"X-API-KEY": server.key}
    )
    answer.raise_for_status()
    return len(answer.json())


def settle(server: Server, settings: Settings, timeout: float = 60.0) -> None:
    """Wait until no VM of the data dir runs (kills finish in the background of the API's answers)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and (listed(server) or our_processes([settings.data_dir])):
        time.sleep(0.5)


def parse_mix(text: str | None) -> dict[str, float]:
    mix = dict(DEFAULT_MIX)
    for part in filter(None, (text or "").split(",")):
        name, _, weight = part.partition("=")
        if name not in DEFAULT_MIX:
            raise SystemExit(f"unknown operation {name!r}; expected {', '.join(DEFAULT_MIX)}")
        mix[name] = float(weight)
    return mix


def figures(clients: int, seconds: float, mix: dict[str, float]) -> list[dict[str, object]]:
    out: list[dict[str, object]] = []
    fields = {
        "defaults": SandboxDefaults(memory_mb=256, timeout_s=0),
        "limits": LimitsConfig(max_sandboxes=2 * clients + 2),
    }
    with (
        scratch_host("wbl", ("10.55.0.0/16", "10.56.0.0/16"), **fields) as settings,
        Server(settings, templates=(TEMPLATE,)) as server,
    ):
        assert server.process is not None
        pid = server.process.pid
        baseline = host_objects(settings)
        rss = [rss_mib(pid)]
        tallies, elapsed = [], 0.0
        for n in range(2):
            tally, took = one_run(server, clients, seconds, mix, seed=1000 * n)
            settle(server, settings)
            tallies.append(tally)
            elapsed += took
            rss.append(rss_mib(pid))
        after = host_objects(settings)
        after["listed"] = listed(server)
    ops: dict[str, list[float]] = {}
    errors: dict[str, int] = {}
    for t in tallies:
        for op, values in t.latencies.items():
            ops.setdefault(op, []).extend(values)
        for key, n in t.errors.items():
            errors[key] = errors.get(key, 0) + n
    for op, values in sorted(ops.items()):
        q = statistics.quantiles(values, n=100, method="inclusive") if len(values) > 1 else values * 99
        for name, value in (("p50", q[49]), ("p95", q[94]), ("p99", q[98])):
            out.append(figure(f"load_{op}_{name}_ms", value * 1000, "ms"))
    out.append(figure("load_ops_per_s", sum(len(v) for v in ops.values()) / elapsed, "ops/s"))
    out.append(figure("load_errors", sum(errors.values()), "count"))
    out.append(figure("load_throttled", sum(t.throttled for t in tallies), "count"))
    leaks = {k: after[k] - baseline.get(k, 0) for k in after if after[k] - baseline.get(k, 0) > 0}
    out.append(figure("load_leaks", sum(leaks.values()), "count"))
    out += [figure(f"load_leak_{kind}", n, "count") for kind, n in leaks.items()]
    out += [
        figure(f"load_rss_mib_{label}", value, "MiB")
        for label, value in zip(("start", "run1", "run2"), rss, strict=True)
    ]
    out.append(figure("load_rss_growth_ratio", rss[2] / rss[1], "ratio"))
    for key, n in sorted(errors.items()):
        print(f"error x{n}: {key}", file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 clients, 30 s per run")
    parser.add_argument("--clients", type=int, help="concurrent SDK clients (default 4)")
    parser.add_argument("--seconds", type=float, help="length of each of the two runs (default 120)")
    parser.add_argument("--mix", help="operation weights, e.g. run=4,files=2,pause_resume=1,fork=0.5,kill=1")
    args = parser.parse_args(argv)
    clients = args.clients or (2 if args.quick else 4)
    seconds = args.seconds or (30.0 if args.quick else 120.0)
    for item in figures(clients, seconds, parse_mix(args.mix)):
        print(json.dumps(item), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
