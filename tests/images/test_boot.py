"""Smoke boot of the built image with plain QEMU (not wrenbox.vmm): initramfs → rc → agent answering.

The VM runs in a throwaway network namespace with a tap, configured from the kernel command line exactly
as a sandbox slot is (``wrenbox.network.plan``), and the agent's ``GET /health`` is asked from inside it.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from wrenbox.command import spawn
from wrenbox.images import Image, guest_kernel_args
from wrenbox.network.plan import GATEWAY_IP, GUEST_IP, GUEST_MAC, GUEST_NETWORK, TAP_MAC
from wrenbox.service import probe_host

pytestmark = [pytest.mark.root, pytest.mark.vm, pytest.mark.slow]

DISK_BYTES = 1 << 30  # larger than the image's filesystem: the guest must grow it at boot
HEALTH = f"http://{GUEST_IP}:49983/health"


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"wbimg-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        prefix = GUEST_NETWORK.prefixlen
        for argv in (
            ["link", "set", "lo", "up"],
            ["tuntap", "add", "dev", "tap0", "mode", "tap"],
            ["link", "set", "tap0", "address", TAP_MAC],
            ["addr", "add", f"{GATEWAY_IP}/{prefix}", "dev", "tap0"],
            ["link", "set", "tap0", "up"],
        ):
            subprocess.run(["ip", "-n", name, *argv], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=True)


def _health_status(ns: str) -> str:
    probe = f"import urllib.request as u; print(u.urlopen({HEALTH!r}, timeout=1).status)"
    out = subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-c", probe], capture_output=True, text=True
    )
    return out.stdout.strip()


def test_image_boots_and_the_agent_answers(guest_image: Image, netns: str, tmp_path: Path) -> None:
    from tests.support.images import image_settings

    caps = probe_host(image_settings())
    disk = tmp_path / "disk.raw"
    subprocess.run(["cp", "--sparse=always", str(guest_image.rootfs), str(disk)], check=True)
    os.truncate(disk, DISK_BYTES)
    console = tmp_path / "console.log"
    console.touch()  # QEMU opens it a moment after it starts
    cmdline = guest_kernel_args(
        guest_image.manifest.kernel_args,
        ip=f"{GUEST_IP}/{GUEST_NETWORK.prefixlen}",
        gateway=str(GATEWAY_IP),
        tsc_khz=caps.tsc_khz if caps.accel == "tcg" else None,
    )
    argv = ["ip", "netns", "exec", netns, caps.qemu.path if caps.qemu else "qemu-system-x86_64"]
    argv += ["-M", "microvm,acpi=on", "-accel", caps.accel, "-cpu", "max" if caps.accel == "tcg" else "host"]
    argv += ["-smp", "1", "-m", "512M", "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"]
    argv += ["-serial", f"file:{console}", "-kernel", str(guest_image.kernel)]
    argv += ["-initrd", str(guest_image.initramfs), "-append", " ".join(cmdline)]
    argv += ["-drive", f"id=root,file={disk},format=raw,if=none", "-device", "virtio-blk-device,drive=root"]
    argv += ["-netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no"]
    argv += ["-device", f"virtio-net-device,netdev=n0,mac={GUEST_MAC}"]
    start = time.monotonic()
    vm = spawn(argv, log=tmp_path / "qemu.log")
    try:
        rc_done = health_at = None
        while time.monotonic() - start < 180:
            text = console.read_text(errors="replace")
            if rc_done is None and "WRENBOX-RC-DONE" in text:
                rc_done = time.monotonic() - start
            if rc_done is not None and _health_status(netns) == "204":
                health_at = time.monotonic() - start
                break
            assert vm.alive(), f"QEMU exited: {(tmp_path / 'qemu.log').read_text()}\n{text[-3000:]}"
            time.sleep(0.5)
        text = console.read_text(errors="replace")
        assert rc_done is not None, text[-3000:]
        assert health_at is not None, text[-3000:]
    finally:
        vm.terminate(grace=2.0)
    print(f"\nrc done after {rc_done:.1f} s, agent /health answered after {health_at:.1f} s ({caps.accel})")
    assert "WRENBOX-INITRAMFS-DONE" in text
    assert "WRENBOX-RC-DONE uptime=" in text
    assert f"ip={GUEST_IP}/{GUEST_NETWORK.prefixlen} gw={GATEWAY_IP}" in text
    assert "can't find device" not in text  # eth0 came up
    assert "is now 262144 (4k) blocks long" in text  # resize2fs grew it online to the 1 GiB disk
    assert "WRENBOX-INIT-FAILED" not in text
