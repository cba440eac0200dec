"""VM benchmarks: cold boot, template restore through wrenbox vs a bare QEMU restore, pause, exec.

Prints one JSON line per figure, ``{"figure": NAME, "value": NUMBER, "unit": UNIT}``:

``cold_boot_s``             QEMU start → guest agent answers ``/health`` (the template build's boot step)
``restore_s``               p50 of a start from the template as the host runtime does it: copy the
                            template's RAM, ``Launcher.restore`` (agent ready), ``/init``
``bare_restore_s``          p50 of the same restore with no wrenbox code on the path: ``cp`` of the RAM file,
                            ``nsenter … qemu-system-x86_64 … -incoming defer``, raw QMP over the socket, raw
                            HTTP polling of ``/health`` (the command line is computed beforehand)
``restore_overhead_ratio``  restore_s / bare_restore_s (same run, same snapshot, interleaved)
``restore_shm_s``           p50 of the same start with the VM's RAM file on /dev/shm (not the data dir)
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
from wrenbox.images import build_image
from wrenbox.launch import Launcher, Placement, agent_client
from wrenbox.network import Network, NetworkConfig, NetworkSlot
from wrenbox.rootfs import RootfsBackend
from wrenbox.service import image_config, probe_host, rootfs_backend
from wrenbox.service import launcher as launcher_for
from wrenbox.templates import Template, TemplateBuilder, TemplateLibrary
from wrenbox.vmm.base import Vm
from wrenbox.vmm.qemu import QemuDriver, qemu_argv

CACHE = Path(os.environ.get("WRENBOX_TEST_DATA_DIR", "/var/tmp/wrenbox-test"))


def figure(name: str, value: float, unit: str) -> None:
    print(json.dumps({"figure": name, "value": round(value, 4), "unit": unit}), flush=True)


class Bench:
    def __init__(
        self,
        settings: Settings,
        launcher: Launcher,
        rootfs: RootfsBackend,
        template: Template,
        network: Network,
    ) -> None:
        self.settings, self.launcher, self.rootfs = settings, launcher, rootfs
        self.template, self.network = template, network
        self.slot_index = 0

    async def slot(self) -> NetworkSlot:
        self.slot_index += 1
        slot = self.network.slot(self.slot_index)
        await self.network.create(slot)
        return slot

    async def placement(self, slot: NetworkSlot, ram_dir: Path | None = None) -> Placement:
        """A directory, a root disk and a RAM file path for one VM."""
        name = f"b{secrets.token_hex(4)}"
        directory = self.settings.sandboxes_dir / name
        directory.mkdir(parents=True)
        disk = await self.rootfs.create(self.template.rootfs_image(), name)
        return Placement(directory / "run", disk.drive(), slot, (ram_dir or directory) / f"{name}.ram")

    async def start(self, placement: Placement) -> Vm:
        """A VM from the template, started the way the host runtime starts one."""
        m = self.template.manifest
        await asyncio.to_thread(self.template.copy_memory, placement.memory)
        async with agent_client(placement.slot, m.agent_token) as agent:
            vm = await self.launcher.restore(
                placement, self.template.snapshot(), vcpus=m.vcpus, memory_mib=m.memory_mib, agent=agent
            )
            await agent.init()
        return vm

    async def restore(self, slot: NetworkSlot, ram_dir: Path | None = None) -> float:
        """One start; returns its duration (the VM is destroyed afterwards)."""
        placement = await self.placement(slot, ram_dir)
        t0 = time.monotonic()
        vm = await self.start(placement)
        elapsed = time.monotonic() - t0
        await vm.destroy()
        placement.memory.unlink()
        return elapsed

    async def bare_restore(self, slot: NetworkSlot) -> float:
        placement = await self.placement(slot)
        m = self.template.manifest
        config = placement.vm_config(vcpus=m.vcpus, memory_mib=m.memory_mib)
        argv = [
            "nsenter",
            f"--net={config.netns}",
            "--",
            *qemu_argv(config, self.driver.config, incoming=True),
        ]
        config.run_dir.mkdir()
        elapsed = await asyncio.to_thread(
            bare_restore,
            argv,
            self.template,
            placement.memory,
            config.run_dir / "qmp.sock",
            str(slot.host_ip),
        )
        placement.memory.unlink()
        return elapsed

    @property
    def driver(self) -> QemuDriver:
        assert isinstance(self.launcher.driver, QemuDriver)
        return self.launcher.driver

    async def pause(self, slot: NetworkSlot) -> float:
        placement = await self.placement(slot)
        vm = await self.start(placement)
        dest = placement.run_dir.parent / "paused"
        dest.mkdir()
        t0 = time.monotonic()
        await vm.snapshot(dest)
        await vm.destroy()
        return time.monotonic() - t0

    async def exec_rtt(self, slot: NetworkSlot, count: int) -> list[float]:
        vm = await self.start(await self.placement(slot))
        try:
            async with agent_client(slot, self.template.manifest.agent_token) as agent:
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
    image = build_image(image_config(Settings(data_dir=CACHE)), "minimal").image
    caps = probe_host(Settings(data_dir=CACHE))
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
        launcher, rootfs = launcher_for(settings, caps), rootfs_backend(settings, caps)
        builder = TemplateBuilder(
            TemplateLibrary(settings.templates_dir), launcher=launcher, rootfs=rootfs, network=network
        )
        template = await builder.build("bench", image, vcpus=1, memory_mib=512)
        figure("cold_boot_s", template.manifest.timings["boot"], "s")
        bench = Bench(settings, launcher, rootfs, template, network)
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
