"""VM benchmarks: cold boot, template restore through wrenbox vs a bare QEMU restore, pause, exec.

Prints one JSON line per figure, ``{"figure": NAME, "value": NUMBER, "unit": UNIT}``:

``cold_boot_s``             QEMU start → guest agent answers ``/health`` (the template build's boot step)
``restore_s``               p50 of ``Templates.start``: copy the template's RAM, restore, agent ready,
                            ``/init``
``bare_restore_s``          p50 of the same restore with no wrenbox code on the path: ``cp`` of the RAM file,
                            ``nsenter … qemu-system-x86_64 … -incoming defer``, raw QMP over the socket, raw
                            HTTP polling of ``/health`` (the command line is computed beforehand)
``restore_overhead_ratio``  restore_s / bare_restore_s (same run, same snapshot, interleaved)
``restore_shm_s``           p50 of ``Templates.start`` with the VM's RAM file on /dev/shm (not the data dir)
``pause_s``                 p50 of pausing a restored sandbox: snapshot (stop + device state) + QEMU gone
``exec_rtt_p50_ms``         p50 round trip of ``true`` through the envd client (after one warm-up exec)

Needs root (network namespaces) and QEMU. The guest image is built (or reused) in
``$WRENBOX_TEST_DATA_DIR`` (default ``/var/tmp/wrenbox-test``, shared with the tests); everything else lives
in a temporary data dir that is removed afterwards. ``--quick`` takes fewer samples.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import secrets
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from wrenbox.config import SandboxDefaults, Settings
from wrenbox.images import ImageConfig, build_image
from wrenbox.network import Network, NetworkConfig, NetworkSlot
from wrenbox.probe import HostCapabilities
from wrenbox.templates import Placement, Template, Templates, agent_client, build_template, host_templates
from wrenbox.templates.vm import netns_path
from wrenbox.vmm.base import Drive, MemoryFile, VmConfig
from wrenbox.vmm.qemu import QemuDriver, qemu_argv

CACHE = Path(os.environ.get("WRENBOX_TEST_DATA_DIR", "/var/tmp/wrenbox-test"))


def figure(name: str, value: float, unit: str) -> None:
    print(json.dumps({"figure": name, "value": round(value, 4), "unit": unit}), flush=True)


class Bench:
    def __init__(
        self, settings: Settings, templates: Templates, template: Template, network: Network
    ) -> None:
        self.settings, self.templates, self.template, self.network = settings, templates, template, network
        self.slot_index = 0

    async def slot(self) -> NetworkSlot:
        self.slot_index += 1
        slot = self.network.slot(self.slot_index)
        await self.network.create(slot)
        return slot

    async def sandbox_dir(self, ram_dir: Path | None = None) -> tuple[Path, Drive, Path]:
        """A directory, a root disk and a RAM file path for one VM."""
        name = f"b{secrets.token_hex(4)}"
        directory = self.settings.sandboxes_dir / name
        directory.mkdir(parents=True)
        disk = await self.templates.rootfs.create(self.template.rootfs_image(), name)
        return directory, Drive(disk.path, disk.format), (ram_dir or directory) / f"{name}.ram"

    async def restore(self, slot: NetworkSlot, ram_dir: Path | None = None) -> float:
        """One ``Templates.start``; returns its duration (the VM is destroyed afterwards)."""
        directory, drive, ram = await self.sandbox_dir(ram_dir)
        t0 = time.monotonic()
        vm = await self.templates.start(self.template, Placement(directory / "run", drive, slot, ram))
        elapsed = time.monotonic() - t0
        await vm.destroy()
        ram.unlink()
        return elapsed

    async def bare_restore(self, slot: NetworkSlot) -> float:
        directory, drive, ram = await self.sandbox_dir()
        config = VmConfig(
            machine=self.template.machine(drive),
            memory=MemoryFile(ram),
            run_dir=directory / "run",
            netns=netns_path(slot),
        )
        argv = [
            "nsenter",
            f"--net={config.netns}",
            "--",
            *qemu_argv(config, self.driver.config, incoming=True),
        ]
        config.run_dir.mkdir()
        elapsed = await asyncio.to_thread(
            bare_restore, argv, self.template, ram, config.run_dir / "qmp.sock", str(slot.host_ip)
        )
        ram.unlink()
        return elapsed

    @property
    def driver(self) -> QemuDriver:
        assert isinstance(self.templates.driver, QemuDriver)
        return self.templates.driver

    async def pause(self, slot: NetworkSlot) -> float:
        directory, drive, ram = await self.sandbox_dir()
        vm = await self.templates.start(self.template, Placement(directory / "run", drive, slot, ram))
        dest = directory / "paused"
        dest.mkdir()
        t0 = time.monotonic()
        await vm.snapshot(dest)
        await vm.destroy()
        return time.monotonic() - t0

    async def exec_rtt(self, slot: NetworkSlot, count: int) -> list[float]:
        directory, drive, ram = await self.sandbox_dir()
        vm = await self.templates.start(self.template, Placement(directory / "run", drive, slot, ram))
        try:
            async with agent_client(slot) as agent:
                await agent.processes.exec(["true"])
                rtts = []
                for _ in range(count):
                    t0 = time.monotonic()
                    await agent.processes.exec(["true"])
                    rtts.append(time.monotonic() - t0)
                return rtts
        finally:
            await vm.destroy()


def bare_restore(argv: list[str], template: Template, ram: Path, qmp_path: Path, host_ip: str) -> float:
    """Restore the template with plain subprocesses, sockets and JSON; seconds to the agent's answer."""
    t0 = time.monotonic()
    subprocess.run(["cp", "--sparse=always", str(template.memory), str(ram)], check=True)
    ram.chmod(0o600)
    qemu = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        sock = socket.socket(socket.AF_UNIX)
        while True:
            try:
                sock.connect(str(qmp_path))
                break
            except OSError:
                time.sleep(0.005)
        qmp = sock.makefile("rw")

        def command(name: str, **arguments: object) -> object:
            qmp.write(json.dumps({"execute": name, "arguments": arguments}) + "\n")
            qmp.flush()
            while True:
                reply = json.loads(qmp.readline())
                if "return" in reply or "error" in reply:
                    return reply.get("return", reply)

        qmp.readline()  # greeting
        command("qmp_capabilities")
        command("migrate-set-capabilities", capabilities=[{"capability": "x-ignore-shared", "state": True}])
        command("migrate-incoming", uri=f"exec:cat {template.snapshot().state_path}")
        while command("query-status")["status"] != "paused":  # type: ignore[index]
            time.sleep(0.002)
        command("cont")
        while True:
            try:
                conn = http.client.HTTPConnection(host_ip, 49983, timeout=1)
                conn.request("GET", "/health")
                if conn.getresponse().status in (200, 204):
                    break
            except OSError:
                time.sleep(0.01)
        elapsed = time.monotonic() - t0
        command("quit")
        sock.close()
        return elapsed
    finally:
        try:
            qemu.wait(10)
        except subprocess.TimeoutExpired:
            qemu.kill()
            qemu.wait()


def p50(samples: list[float]) -> float:
    return statistics.median(samples)


async def interleaved(n: int, *runs: Callable[[], object]) -> list[list[float]]:
    """``n`` rounds of every run in turn, so that a busy host slows them alike."""
    results: list[list[float]] = [[] for _ in runs]
    for _ in range(n):
        for samples, run in zip(results, runs, strict=True):
            samples.append(await run())  # type: ignore[misc]
    return results


async def main(quick: bool) -> None:
    image = build_image(ImageConfig.from_settings(Settings(data_dir=CACHE)), "minimal").image
    caps = HostCapabilities.probe(Settings(data_dir=CACHE))
    data_dir = Path(tempfile.mkdtemp(prefix="wrenbox-bench-", dir="/var/tmp"))
    shm = Path(tempfile.mkdtemp(prefix="wrenbox-bench-", dir="/dev/shm"))
    settings = Settings(data_dir=data_dir, defaults=SandboxDefaults(memory_mb=512))
    settings.images_dir.mkdir(parents=True)
    (settings.images_dir / image.name).symlink_to(image.path)
    suffix = secrets.randbelow(250)
    network = Network(
        NetworkConfig(
            prefix="wbench", host_range=f"10.253.{suffix}.0/26", transfer_range=f"10.253.{suffix}.64/26"
        )
    )
    await network.setup()
    try:
        template = await build_template(settings, "bench", caps=caps, network=network)
        figure("cold_boot_s", template.manifest.timings["boot"], "s")
        bench = Bench(settings, host_templates(settings, caps), template, network)
        restore_slot, bare_slot, shm_slot = await bench.slot(), await bench.slot(), await bench.slot()
        rounds = 3 if quick else 10
        wrenbox, bare, in_shm = await interleaved(
            rounds,
            lambda: bench.restore(restore_slot),
            lambda: bench.bare_restore(bare_slot),
            lambda: bench.restore(shm_slot, shm),
        )
        figure("restore_s", p50(wrenbox), "s")
        figure("bare_restore_s", p50(bare), "s")
        figure("restore_overhead_ratio", p50(wrenbox) / p50(bare), "ratio")
        figure("restore_shm_s", p50(in_shm), "s")
        pause_slot = await bench.slot()
        figure("pause_s", p50([await bench.pause(pause_slot) for _ in range(rounds)]), "s")
        rtts = await bench.exec_rtt(await bench.slot(), 20 if quick else 100)
        figure("exec_rtt_p50_ms", p50(rtts) * 1000, "ms")
    finally:
        await network.teardown()
        shutil.rmtree(data_dir, ignore_errors=True)
        shutil.rmtree(shm, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples (CI)")
    asyncio.run(main(parser.parse_args().quick))
