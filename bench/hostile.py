"""Hostile guests: what one sandbox attacking its own VM costs a neighbour sandbox and the host.

For each attack, run inside an attacker sandbox as root through E2B's SDK against a real ``wrenbox
serve``, it prints JSON lines (``{"figure": NAME, "value": NUMBER, "unit": UNIT}``):

``hostile_<attack>_neighbour_quiet_p50_ms``, ``..._quiet_p95_ms``
    the neighbour's ``commands.run("echo <word>")`` round trip with the attacker idle (half the samples
    just before the attack, half just after it was killed: the same run, and the machine's drift
    in load from other work is shared by both sides);
``hostile_<attack>_neighbour_attack_p50_ms``, ``..._attack_p95_ms``   the same during the attack;
``hostile_<attack>_neighbour_ratio``     attack p50 / quiet p50 (target ≤ 2.0);
``hostile_<attack>_neighbour_p95_ratio`` attack p95 / quiet p95;
``hostile_<attack>_neighbour_errors``    neighbour commands that failed or answered wrongly (target 0);
``hostile_<attack>_vmm_cpu_cores``       CPU the attacker's QEMU used during the attack, in cores;
``hostile_<attack>_vmm_rss_peak_mib``    the attacker's QEMU's peak RSS, sampled every 0.2 s;
``hostile_<attack>_cgroup_limit_mib``    its cgroup's memory limit (``memory.max`` / ``limit_in_bytes``);
``hostile_<attack>_cgroup_peak_mib``     its cgroup's own peak (``memory.peak`` / ``max_usage_in_bytes``);
``hostile_<attack>_vmm_oom_kills``       OOM kills in its cgroup (the VMM killed by its own limit);
``hostile_<attack>_host_available_min_mib``  the host's lowest ``MemAvailable`` during the attack;
``hostile_<attack>_server_health_max_ms``  the slowest ``GET /health`` of the server (polled every
                                         0.2 s), and ``..._server_health_failures`` those not answered
                                         200 within 5 s (target 0);
``hostile_<attack>_kill_s``              killing the attacker through the API after the attack.

The attacks: ``fork_bomb`` (a shell fork bomb), ``memory_hog`` (processes touching all the memory they
can, restarted when the guest's OOM killer ends them), ``disk_filler`` (``dd`` of zeros with direct
I/O onto the root disk, over and over), ``output_flood`` (``yes`` of 4 KiB lines, one SDK client
streaming it and a second attached client that never reads; also ``..._streamed_mib_per_s`` and the
server's RSS growth ``..._server_rss_growth_mib``).

Needs root and QEMU; a scratch data dir sharing the cached guest image; ``--quick`` takes fewer and
shorter samples. ``--attacks`` picks some (comma-separated).

    python bench/hostile.py [--quick] [--attacks fork_bomb,memory_hog]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from common import Server, figure, scratch_host
from wrenbox.config import LimitsConfig, SandboxDefaults
from wrenbox.runtime.sweep import our_processes
from wrenbox.service import vmm_cgroups
from wrenbox.vmm.cgroups import Cgroup, CgroupConfig

TEMPLATE = "minimal"
LINE = "x" * 4095
ATTACKS = {
    "fork_bomb": "b() { b | b & }; b",
    "memory_hog": ("while true; do python3 -c 'x = []\nwhile True: x.append(b\"\\1\" * (8 << 20))'; done"),
    "disk_filler": "while true; do dd if=/dev/zero of=/var/fill bs=1M count=4096 oflag=direct; done",
    "output_flood": f"yes {LINE}",
}
RANGES = ("10.59.0.0/16", "10.60.0.0/16")  # moved by WRENBOX_TEST_NET in scratch_host


def quantile(values: list[float], q: int) -> float:
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


@dataclass
class Neighbour:
    """The bystander: echoes a fresh word and times the answer."""

    sandbox: Any
    errors: int = 0

    def round_trips(self, keep_going: Callable[[], bool]) -> list[float]:
        times = []
        while keep_going():
            word = secrets.token_hex(4)
            t0 = time.perf_counter()
            try:
                out = self.sandbox.commands.run(f"echo {word}", timeout=120).stdout
            except Exception as exc:  # a failure is a figure, not the end of the bench
                print(f"neighbour: {type(exc).__name__}: {exc}", file=sys.stderr)
                self.errors += 1
                continue
            times.append(time.perf_counter() - t0)
            if out.strip() != word:
                self.errors += 1
        return times


def counted(n: int) -> Callable[[], bool]:
    left = [n]

    def again() -> bool:
        left[0] -= 1
        return left[0] >= 0

    return again


def until(deadline: float) -> Callable[[], bool]:
    return lambda: time.monotonic() < deadline


def _status_kib(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except FileNotFoundError:
        pass
    return 0


def _cpu_s(pid: int) -> float:
    """CPU seconds the process has used, all threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _available_kib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1])
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def vmm_group(pid: int) -> Cgroup | None:
    """The cgroup the VMM ``pid`` runs in (None where VMMs run unconfined)."""
    found = vmm_cgroups(CgroupConfig())
    return found[0].holding(pid) if found else None


def cgroup_figures(name: str, cg: Cgroup) -> list[dict[str, object]]:
    out = [figure(f"hostile_{name}_cgroup_limit_mib", cg.memory_limit_bytes() / 2**20, "MiB")]
    if (peak := cg.memory_peak_bytes()) is not None:
        out.append(figure(f"hostile_{name}_cgroup_peak_mib", peak / 2**20, "MiB"))
    out.append(figure(f"hostile_{name}_vmm_oom_kills", cg.oom_kills(), "count"))
    return out


@dataclass
class Watch:
    """Samples the host every 0.2 s while an attack runs, in a thread."""

    server: Server
    vmm_pid: int
    rss_peak_kib: int = 0
    available_min_kib: int = 1 << 62
    server_rss_kib: list[int] = field(default_factory=list)
    health_ms: list[float] = field(default_factory=list)
    health_failures: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> Watch:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join()

    def _run(self) -> None:
        assert self.server.process is not None
        with httpx.Client(timeout=5) as http:
            while not self._stop.wait(0.2):
                self.rss_peak_kib = max(self.rss_peak_kib, _status_kib(self.vmm_pid, "VmRSS"))
                self.available_min_kib = min(self.available_min_kib, _available_kib())
                self.server_rss_kib.append(_status_kib(self.server.process.pid, "VmRSS"))
                t0 = time.perf_counter()
                try:
                    ok = http.get(f"{self.server.url}/health").status_code == 200
                except httpx.HTTPError:
                    ok = False
                self.health_ms.append((time.perf_counter() - t0) * 1000)
                self.health_failures += not ok


class Flood:
    """The output flood's two clients: one streams (counting bytes), one is attached and never reads."""

    def __init__(self, attacker: Any, handle: Any, opts: dict[str, str]) -> None:
        from e2b import Sandbox

        self.received = 0
        self.started = time.monotonic()
        self.handle = handle
        self.idle = Sandbox.connect(attacker.sandbox_id, **opts).commands.connect(handle.pid, timeout=0)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        def count(chunk: str) -> None:
            self.received += len(chunk)

        try:
            self.handle.wait(on_stdout=count)
        except Exception:  # the attacker is killed under the stream: that is how it ends
            return

    def rate_mib_s(self) -> float:
        return self.received / (1 << 20) / (time.monotonic() - self.started)


def attack(
    server: Server, data_dir: Path, neighbour: Neighbour, name: str, quiet_n: int, seconds: float
) -> list[dict[str, object]]:
    from e2b import Sandbox

    opts = {"api_key": server.key, "api_url": server.url, "sandbox_url": server.url}
    before = {p.pid for p in our_processes([data_dir])}
    attacker = Sandbox.create(TEMPLATE, timeout=3600, **opts)
    (vmm_pid,) = {p.pid for p in our_processes([data_dir])} - before
    cg = vmm_group(vmm_pid)
    quiet = neighbour.round_trips(counted(quiet_n // 2))
    errors_before = neighbour.errors
    handle = attacker.commands.run(ATTACKS[name], background=True, user="root", timeout=0)
    flood = Flood(attacker, handle, opts) if name == "output_flood" else None
    if flood is None:
        handle.disconnect()
    time.sleep(2)  # let it take hold
    cpu_before = _cpu_s(vmm_pid)
    with Watch(server, vmm_pid) as watch:
        t0 = time.monotonic()
        loud = neighbour.round_trips(until(t0 + seconds))
        cores = (_cpu_s(vmm_pid) - cpu_before) / (time.monotonic() - t0)
    held = cgroup_figures(name, cg) if cg is not None else []  # read before the kill removes the group
    t0 = time.perf_counter()
    attacker.kill()
    kill_s = time.perf_counter() - t0
    errors_during = neighbour.errors - errors_before
    quiet += neighbour.round_trips(counted(quiet_n - quiet_n // 2))  # half after: the machine's drift
    out = [
        figure(f"hostile_{name}_neighbour_quiet_p50_ms", quantile(quiet, 50) * 1000, "ms"),
        figure(f"hostile_{name}_neighbour_quiet_p95_ms", quantile(quiet, 95) * 1000, "ms"),
        figure(f"hostile_{name}_neighbour_attack_p50_ms", quantile(loud, 50) * 1000, "ms"),
        figure(f"hostile_{name}_neighbour_attack_p95_ms", quantile(loud, 95) * 1000, "ms"),
        figure(f"hostile_{name}_neighbour_ratio", quantile(loud, 50) / quantile(quiet, 50), "ratio"),
        figure(f"hostile_{name}_neighbour_p95_ratio", quantile(loud, 95) / quantile(quiet, 95), "ratio"),
        figure(f"hostile_{name}_neighbour_samples", len(loud), "count"),
        figure(f"hostile_{name}_neighbour_errors", errors_during, "count"),
        figure(f"hostile_{name}_vmm_cpu_cores", cores, "cores"),
        figure(f"hostile_{name}_vmm_rss_peak_mib", watch.rss_peak_kib / 1024, "MiB"),
        figure(f"hostile_{name}_host_available_min_mib", watch.available_min_kib / 1024, "MiB"),
        figure(f"hostile_{name}_server_health_max_ms", max(watch.health_ms, default=0.0), "ms"),
        figure(f"hostile_{name}_server_health_failures", watch.health_failures, "count"),
        figure(f"hostile_{name}_kill_s", kill_s, "s"),
    ]
    out += held
    if flood is not None:
        rss = watch.server_rss_kib
        out.append(figure(f"hostile_{name}_streamed_mib_per_s", flood.rate_mib_s(), "MiB/s"))
        out.append(figure(f"hostile_{name}_server_rss_growth_mib", (max(rss) - rss[0]) / 1024, "MiB"))
    return out


def figures(attacks: list[str], quick: bool) -> list[dict[str, object]]:
    from e2b import Sandbox

    fields = {
        "defaults": SandboxDefaults(memory_mb=256, timeout_s=0),
        "limits": LimitsConfig(max_sandboxes=4),
    }
    out: list[dict[str, object]] = []
    with scratch_host("wbh", RANGES, **fields) as settings, Server(settings, templates=(TEMPLATE,)) as server:
        opts = {"api_key": server.key, "api_url": server.url, "sandbox_url": server.url}
        neighbour = Neighbour(Sandbox.create(TEMPLATE, timeout=3600, **opts))
        neighbour.round_trips(counted(5))  # warm-up
        for name in attacks:
            for item in attack(
                server, settings.data_dir, neighbour, name, 15 if quick else 50, 10.0 if quick else 30.0
            ):
                print(json.dumps(item), flush=True)
                out.append(item)
        neighbour.sandbox.kill()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="15 quiet samples and 10 s of each attack")
    parser.add_argument(
        "--attacks", default=",".join(ATTACKS), help="comma-separated, of: " + ", ".join(ATTACKS)
    )
    args = parser.parse_args(argv)
    attacks = [a for a in args.attacks.split(",") if a]
    unknown = [a for a in attacks if a not in ATTACKS]
    if unknown:
        raise SystemExit(f"unknown attacks {unknown}; expected some of {', '.join(ATTACKS)}")
    figures(attacks, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
