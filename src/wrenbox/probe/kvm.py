"""Whether KVM can run an ordinary guest on this host: proved by booting one, never inferred.

``/dev/kvm`` existing proves little: on a host that is itself a PVM guest, KVM runs real-mode code but a
standard Linux kernel hangs right after its setup code. So the probe boots a real guest kernel (the
built image's, else one from the image cache) with ``-accel kvm`` and waits a few seconds for
``Linux version`` on the serial console. Without any kernel it falls back to a tiny real-mode program
that prints a marker: passing it shows KVM works at all, not that Linux boots, so the verdict stays
"not proven" and wrenbox keeps to TCG until a kernel can be tried.

A verdict is cached in the data dir, keyed by the host kernel, the QEMU version and the guest kernel.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import tempfile
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from wrenbox.command import spawn

__all__ = ["KvmVerdict", "find_guest_kernel", "probe_kvm", "real_mode_probe_firmware", "watch_console"]

_LINUX_MARKER = b"Linux version"
_FIRMWARE_MARKER = b"WRENBOX-KVM-PROBE-OK"
_WAIT_S = 5.0


class KvmVerdict(BaseModel):
    model_config = ConfigDict(frozen=True)

    usable: bool  # a Linux guest boots under KVM here
    method: Literal["guest-kernel", "real-mode", "none"]
    detail: str
    kernel: str | None = None  # the guest kernel tried (sha256), if any
    seconds: float = 0.0


def find_guest_kernel(images_dir: Path) -> Path | None:
    """A guest kernel to try: a built image's (``minimal`` first), else one in the image cache."""
    candidates = [images_dir / "minimal" / "vmlinuz", *sorted(images_dir.glob("*/vmlinuz"))]
    candidates += sorted(images_dir.glob(".cache/kernel/*/tree/boot/vmlinuz-*"))
    return next((p for p in candidates if p.is_file()), None)


def probe_kvm(*, qemu: str | None, qemu_version: str, images_dir: Path, cache_file: Path) -> KvmVerdict:
    if not Path("/dev/kvm").exists():
        return KvmVerdict(
            usable=False, method="none", detail="no /dev/kvm (KVM module not loaded or no VT-x/AMD-V)"
        )
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return KvmVerdict(usable=False, method="none", detail="no read/write access to /dev/kvm")
    if qemu is None:
        return KvmVerdict(usable=False, method="none", detail="QEMU is not installed, so KVM was not tried")
    kernel = find_guest_kernel(images_dir)
    kernel_id = hashlib.sha256(kernel.read_bytes()).hexdigest() if kernel else "real-mode"
    key = f"{os.uname().release}|{qemu_version}|{kernel_id}"
    cached = _load(cache_file).get(key)
    if cached is not None:
        return KvmVerdict.model_validate(cached)
    verdict = _boot_linux(qemu, kernel, kernel_id) if kernel else _boot_real_mode(qemu)
    _store(cache_file, key, verdict)
    return verdict


def _boot_linux(qemu: str, kernel: Path, kernel_id: str) -> KvmVerdict:
    args = ["-kernel", str(kernel), "-append", "console=ttyS0 panic=-1 reboot=t"]
    seen, console, seconds = watch_console(qemu, args, _LINUX_MARKER)
    if seen:
        return KvmVerdict(
            usable=True,
            method="guest-kernel",
            detail=f"a Linux guest kernel started under KVM in {seconds:.2f} s",
            kernel=kernel_id,
            seconds=seconds,
        )
    last = console.decode(errors="replace").strip().splitlines()[-1:] or ["nothing"]
    return KvmVerdict(
        usable=False,
        method="guest-kernel",
        detail=(
            f"a Linux guest kernel printed no 'Linux version' within {_WAIT_S:.0f} s under KVM (its console "
            f"stopped at {last[0][:80]!r}); this host's KVM cannot run an ordinary guest (e.g. a PVM host)"
        ),
        kernel=kernel_id,
        seconds=seconds,
    )


def _boot_real_mode(qemu: str) -> KvmVerdict:
    with tempfile.TemporaryDirectory(prefix="wrenbox-kvm-") as tmp:
        firmware = Path(tmp) / "probe.bin"
        firmware.write_bytes(real_mode_probe_firmware())
        seen, _, seconds = watch_console(qemu, ["-bios", str(firmware)], _FIRMWARE_MARKER)
    detail = (
        "KVM ran real-mode code, but no guest kernel was available to prove a Linux guest boots; "
        "build an image (wrenbox image build) and run wrenbox doctor again"
        if seen
        else "KVM could not even run real-mode code"
    )
    return KvmVerdict(usable=False, method="real-mode", detail=detail, seconds=seconds)


def watch_console(
    qemu: str, extra: list[str], marker: bytes, accel: str = "kvm"
) -> tuple[bool, bytes, float]:
    """Start a throwaway VM, wait up to _WAIT_S for ``marker`` on its serial console, then kill it."""
    with tempfile.TemporaryDirectory(prefix="wrenbox-kvm-") as tmp:
        console = Path(tmp) / "console"
        console.touch()
        # A hard deadline that outlives us: if the prober is killed, a hung guest still goes away.
        argv = [
            "timeout",
            "-s",
            "KILL",
            str(int(_WAIT_S) + 10),
            qemu,
            "-M",
            "microvm,acpi=on",
            "-accel",
            accel,
        ]
        argv += ["-cpu", "host" if accel == "kvm" else "max"]
        argv += ["-m", "128M", "-smp", "1", "-nodefaults", "-no-user-config", "-display", "none"]
        argv += ["-no-reboot", "-serial", f"file:{console}", *extra]
        start = time.monotonic()
        proc = spawn(argv, log=Path(tmp) / "qemu.log")
        try:
            while time.monotonic() - start < _WAIT_S:
                if marker in console.read_bytes():
                    return True, console.read_bytes(), time.monotonic() - start
                if not proc.alive():
                    break
                time.sleep(0.05)
            return False, console.read_bytes(), time.monotonic() - start
        finally:
            proc.terminate(grace=1.0)


def real_mode_probe_firmware() -> bytes:
    """A 64 KiB BIOS image whose reset vector prints the probe marker on COM1 and halts."""
    image = bytearray(b"\xf4" * 0x10000)  # hlt everywhere
    message = _FIRMWARE_MARKER + b"\n\0"
    code = bytes.fromhex(
        "baf803"  # mov dx, 0x3f8
        "be00f1"  # mov si, 0xf100 (the message)
        "2eac"  # next: cs lodsb
        "84c0"  # test al, al
        "7403"  # jz done
        "ee"  # out dx, al
        "ebf7"  # jmp next
        "f4"  # done: hlt
        "ebfd"  # jmp done
    )
    image[0xF000 : 0xF000 + len(code)] = code
    image[0xF100 : 0xF100 + len(message)] = message
    # Reset vector (CS base 0xffff0000, IP 0xfff0): jmp near 0xf000.
    image[0xFFF0:0xFFF3] = b"\xe9" + struct.pack("<h", 0xF000 - 0xFFF3)
    return bytes(image)


def _load(cache_file: Path) -> dict[str, dict[str, object]]:
    try:
        return json.loads(cache_file.read_text())
    except (FileNotFoundError, ValueError):
        return {}


def _store(cache_file: Path, key: str, verdict: KvmVerdict) -> None:
    with contextlib.suppress(OSError):  # a read-only data dir only costs a re-probe next time
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        data = _load(cache_file)
        data[key] = verdict.model_dump()
        tmp = cache_file.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        tmp.replace(cache_file)
