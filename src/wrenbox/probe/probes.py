"""Individual host probes. Each one tries the real thing (an ioctl, a syscall, a throwaway namespace)
and reports what happened; none guesses from version numbers."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import re
import secrets
import shutil
import struct
import tempfile
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from wrenbox.command import require_tool, run
from wrenbox.errors import CommandFailed, MissingTool, Timeout
from wrenbox.rollback import Rollback

__all__ = [
    "Check",
    "NetworkChecks",
    "filesystem_type",
    "probe_device_mapper",
    "probe_network",
    "probe_reflink",
    "probe_tsc_khz",
    "probe_userfaultfd",
    "qemu_version",
]

_FICLONE = 0x40049409
_SYS_USERFAULTFD = 323  # x86_64
_UFFD_USER_MODE_ONLY = 1
_UFFDIO_API = 0xC018AA3F  # _IOWR(0xAA, 0x3F, struct uffdio_api)
_UFFD_API = 0xAA
_PROBE_NETNS_PREFIX = "wbprobe-"


class Check(BaseModel):
    model_config = ConfigDict(frozen=True)

    ok: bool
    detail: str


def qemu_version(qemu: str) -> str:
    out = run([qemu, "--version"], timeout=30).text
    match = re.search(r"version (\S+)", out)
    return match.group(1) if match else out.splitlines()[0]


def probe_tsc_khz() -> tuple[int | None, str]:
    """The host TSC frequency (kHz) and where it came from. Under TCG the guest reads the host TSC, and a
    microvm guest cannot calibrate it (no PIT/HPET), so it must be told: ``tsc_early_khz``."""
    mhz = _kernel_log_tsc_mhz()
    if mhz is not None:
        return round(mhz * 1000), "kernel log"
    with contextlib.suppress(OSError):
        match = re.search(r"^cpu MHz\s*:\s*([\d.]+)", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
        if match:
            return round(float(match.group(1)) * 1000), "/proc/cpuinfo (approximate)"
    return None, "not found in the kernel log or /proc/cpuinfo"


def _kernel_log_tsc_mhz() -> float | None:
    """'tsc: Refined TSC clocksource calibration: X MHz' (better) or 'tsc: Detected X MHz' from /dev/kmsg."""
    try:
        fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None
    detected = refined = None
    try:
        while True:
            try:
                record = os.read(fd, 8192).decode(errors="replace")
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.EPIPE:  # a record was overwritten while reading: skip it
                    continue
                break
            if match := re.search(r"tsc: Refined TSC clocksource calibration: ([\d.]+) MHz", record):
                refined = float(match.group(1))
            elif match := re.search(r"tsc: Detected ([\d.]+) MHz", record):
                detected = float(match.group(1))
    finally:
        os.close(fd)
    return refined or detected


def probe_device_mapper() -> Check:
    misc = Path("/proc/misc").read_text() if Path("/proc/misc").exists() else ""
    if "device-mapper" not in misc and not Path("/dev/mapper/control").exists():
        return Check(ok=False, detail="the kernel has no device-mapper (not in /proc/misc)")
    try:
        targets = run([require_tool("dmsetup"), "targets"], timeout=30).text
    except MissingTool as exc:
        return Check(ok=False, detail=f"device-mapper present but {exc.message}")
    except CommandFailed as exc:
        return Check(ok=False, detail=f"dmsetup targets failed: {exc.stderr.strip()[:200]}")
    if not re.search(r"^snapshot\b", targets, re.MULTILINE):
        # The snapshot target is usually a module loaded on first use; dm-snapshot creation will load it.
        return Check(ok=True, detail="device-mapper present (snapshot target not loaded yet)")
    return Check(ok=True, detail="device-mapper with the snapshot target")


def filesystem_type(path: Path) -> str:
    """The type of the filesystem ``path`` lives on (longest matching mount point)."""
    target = str(path.resolve())
    best, fstype = "", "unknown"
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        point = fields[4].encode().decode("unicode_escape")
        sep = fields.index("-")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, fstype = point, fields[sep + 1]
    return fstype


def probe_reflink(directory: Path) -> Check:
    """Clone one temp file into another with FICLONE, in ``directory`` itself."""
    fstype = filesystem_type(directory)
    try:
        with tempfile.TemporaryDirectory(prefix=".reflink-probe-", dir=directory) as tmp:
            src, dst = Path(tmp) / "a", Path(tmp) / "b"
            src.write_bytes(b"wrenbox" * 4096)
            with open(src, "rb") as s, open(dst, "wb") as d:
                fcntl.ioctl(d.fileno(), _FICLONE, s.fileno())
            if dst.read_bytes() != src.read_bytes():
                return Check(ok=False, detail=f"FICLONE on {fstype} returned a different file")
    except OSError as exc:
        return Check(
            ok=False, detail=f"{fstype} at {directory}: FICLONE failed ({os.strerror(exc.errno or 0)})"
        )
    return Check(ok=True, detail=f"{fstype} at {directory} clones files (FICLONE)")


def probe_userfaultfd() -> Check:
    """Open a userfaultfd and complete the UFFDIO_API handshake."""
    libc = ctypes.CDLL(None, use_errno=True)
    flags = os.O_CLOEXEC | os.O_NONBLOCK
    fd = libc.syscall(_SYS_USERFAULTFD, flags)
    mode = ""
    if fd < 0 and ctypes.get_errno() == errno.EPERM:
        fd = libc.syscall(_SYS_USERFAULTFD, flags | _UFFD_USER_MODE_ONLY)
        mode = " (user-mode faults only: vm.unprivileged_userfaultfd=0 and not root)"
    if fd < 0:
        return Check(ok=False, detail=f"userfaultfd() failed: {os.strerror(ctypes.get_errno())}")
    try:
        api = bytearray(struct.pack("QQQ", _UFFD_API, 0, 0))
        fcntl.ioctl(fd, _UFFDIO_API, api)
        _, features, _ = struct.unpack("QQQ", api)
    except OSError as exc:
        return Check(ok=False, detail=f"UFFDIO_API failed: {os.strerror(exc.errno or 0)}")
    finally:
        os.close(fd)
    return Check(ok=True, detail=f"userfaultfd works, features 0x{features:x}{mode}")


class NetworkChecks(BaseModel):
    model_config = ConfigDict(frozen=True)

    netns: Check
    veth: Check
    tap: Check
    nftables: Check


def probe_network() -> NetworkChecks:
    """Create a throwaway netns with a veth pair, a tap and an nftables NAT chain; delete it all."""
    try:
        ip = require_tool("ip")
    except MissingTool as exc:
        skipped = Check(ok=False, detail=exc.message)
        return NetworkChecks(netns=skipped, veth=skipped, tap=skipped, nftables=skipped)
    _reclaim_probe_namespaces(ip)
    ns = f"{_PROBE_NETNS_PREFIX}{os.getpid()}-{secrets.token_hex(3)}"
    with Rollback("network probe") as undo:
        netns = _try([ip, "netns", "add", ns], "network namespaces")
        if not netns.ok:
            skipped = Check(ok=False, detail="not tried: no network namespace")
            return NetworkChecks(netns=netns, veth=skipped, tap=skipped, nftables=skipped)
        undo.push(f"delete netns {ns}", run, [ip, "netns", "delete", ns])
        veth = _try(
            [ip, "-n", ns, "link", "add", "wbp0", "type", "veth", "peer", "name", "wbp1"], "veth pairs"
        )
        tap = _try([ip, "-n", ns, "tuntap", "add", "dev", "wbt0", "mode", "tap"], "tap devices")
        nftables = _probe_nft(ip, ns)
        undo.unwind()  # deleting the namespace removes its links and nftables tables with it
    return NetworkChecks(netns=netns, veth=veth, tap=tap, nftables=nftables)


def _probe_nft(ip: str, ns: str) -> Check:
    try:
        nft = require_tool("nft")
    except MissingTool as exc:
        return Check(ok=False, detail=exc.message)
    ruleset = (
        "table ip wrenbox_probe {\n"
        "  chain post { type nat hook postrouting priority srcnat; policy accept; masquerade; }\n"
        "}\n"
    )
    return _try([ip, "netns", "exec", ns, nft, "-f", "-"], "nftables with NAT", input=ruleset.encode())


def _try(argv: list[str], what: str, input: bytes | None = None) -> Check:
    try:
        run(argv, input=input, timeout=30)
    except (CommandFailed, Timeout) as exc:
        return Check(ok=False, detail=f"{what}: {exc.message.splitlines()[-1][:200]}")
    return Check(ok=True, detail=f"{what} work")


def _reclaim_probe_namespaces(ip: str) -> None:
    """Delete namespaces a crashed probe left behind (their creator's PID is gone)."""
    for entry in Path("/run/netns").glob(f"{_PROBE_NETNS_PREFIX}*"):
        pid = entry.name.removeprefix(_PROBE_NETNS_PREFIX).split("-")[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            run([ip, "netns", "delete", entry.name], check=False, timeout=30)


def disk_free(path: Path) -> int:
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def memory() -> tuple[int, int]:
    """(MemTotal, MemAvailable) in bytes."""
    info = dict(re.findall(r"^(\w+):\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.MULTILINE))
    return int(info["MemTotal"]) * 1024, int(info.get("MemAvailable", info["MemFree"])) * 1024
