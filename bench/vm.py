"""VM benchmarks: cold boot, template restore through wrenbox vs a bare QEMU restore, pause, exec.

Prints one JSON line per figure, ``{"figure": NAME, "value": NUMBER, "unit": UNIT}``:

``cold_boot_s``             p50 of ``Launcher.boot`` of the image (a new RAM file): QEMU start → the guest
                            agent answers ``/health``
``bare_cold_boot_s``        p50 of the same boot with no wrenbox code on the path: ``nsenter … qemu …
                            -kernel`` (the command line computed beforehand), raw HTTP polling of ``/health``
``cold_boot_overhead_ratio``  cold_boot_s / bare_cold_boot_s (same run, interleaved)
``restore_s``               p50 of a start from the template as the host runtime does it: copy the
                            template's RAM, ``Launcher.restore`` (agent answers ``/health``), ``/init``
``bare_restore_s``          p50 of the same work with no wrenbox code on the path: ``cp`` of the RAM file,
                            ``nsenter … qemu … -incoming defer``, raw QMP over the socket, raw HTTP polling of
                            ``/health``, then a raw ``POST /init`` with the same fields (command line and
                            state file path computed beforehand)
``restore_overhead_ratio``  restore_s / bare_restore_s (same run, same snapshot, interleaved)
``restore_shm_s``           p50 of the same start with the VM's RAM file on /dev/shm (not the data dir)
``vm_snapshot_destroy_s``   p50 of ``Vm.snapshot`` (stop, device state written and sealed) then
                            ``Vm.destroy`` (QEMU gone) of a restored VM — not a sandbox pause, which also
                            processes memory and persists the disk (bench/sandbox.py times that)
``bare_snapshot_destroy_s`` p50 of the same with raw QMP: ``stop``, ``migrate`` of the device state to a file
                            (``x-ignore-shared``), the file fsynced, ``quit``, QEMU gone
``snapshot_destroy_overhead_ratio``  vm_snapshot_destroy_s / bare_snapshot_destroy_s (interleaved)
``vm_envd_exec_rtt_p50_ms`` p50 round trip of ``true`` through wrenbox's envd client to a VM's agent (after
                            one warm-up exec)
``vm_raw_exec_rtt_p50_ms``  p50 of the same ``true`` as one raw Connect request over a kept-alive
                            ``http.client`` connection (the transport's floor, same VM, interleaved)
``vm_envd_exec_overhead_ratio``  vm_envd_exec_rtt_p50_ms / vm_raw_exec_rtt_p50_ms

Needs root (network namespaces) and QEMU. The guest image is built (or reused) in
``$WRENBOX_TEST_DATA_DIR`` (default ``/var/tmp/wrenbox-test``, shared with the tests); everything else lives
in a temporary data dir that is removed afterwards. ``--quick`` takes fewer samples.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
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
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from wrenbox.config import SandboxDefaults, Settings
from wrenbox.images import Image, build_image
from wrenbox.launch import Launcher, Placement, agent_client
from wrenbox.network import Network, NetworkConfig, NetworkSlot
from wrenbox.rootfs import RootfsBackend
from wrenbox.service import image_config, probe_host, rootfs_backend
from wrenbox.service import launcher as launcher_for
from wrenbox.templates import Template, TemplateBuilder, TemplateLibrary
from wrenbox.vmm.base import Vm
from wrenbox.vmm.qemu import IGNORE_SHARED, QemuDriver, qemu_argv

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
        image: Image,
    ) -> None:
        self.settings, self.launcher, self.rootfs = settings, launcher, rootfs
        self.template, self.network, self.image = template, network, image
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

    async def bare(self, slot: NetworkSlot, *, incoming: bool) -> tuple[BareQemu, Path]:
        """A bare QEMU's command line for a VM of the template (restored, or cold-booted from the image),
        and its RAM file path; nothing started yet."""
        placement = await self.placement(slot)
        m = self.template.manifest
        kernel = None if incoming else self.launcher.kernel(self.image)
        config = placement.vm_config(vcpus=m.vcpus, memory_mib=m.memory_mib, kernel=kernel)
        argv = [
            "nsenter",
            f"--net={config.netns}",
            "--",
            *qemu_argv(config, self.driver.config, incoming=incoming),
        ]
        config.run_dir.mkdir()
        return BareQemu(argv, config.run_dir / "qmp.sock", str(slot.host_ip)), placement.memory

    async def bare_restore(self, slot: NetworkSlot) -> float:
        qemu, ram = await self.bare(slot, incoming=True)
        state = str(self.template.snapshot().state_path)
        try:
            return await asyncio.to_thread(
                qemu.restore, self.template.memory, ram, state, self.init_body(), self.token
            )
        finally:
            await asyncio.to_thread(qemu.quit)
            ram.unlink()

    async def cold_boot(self, slot: NetworkSlot) -> float:
        placement = await self.placement(slot)
        m = self.template.manifest
        t0 = time.monotonic()
        async with agent_client(slot) as agent:
            vm = await self.launcher.boot(
                placement, self.image, vcpus=m.vcpus, memory_mib=m.memory_mib, agent=agent
            )
        elapsed = time.monotonic() - t0
        await vm.destroy()
        placement.memory.unlink()
        return elapsed

    async def bare_cold_boot(self, slot: NetworkSlot) -> float:
        qemu, ram = await self.bare(slot, incoming=False)
        try:
            return await asyncio.to_thread(qemu.boot)
        finally:
            await asyncio.to_thread(qemu.quit)
            ram.unlink(missing_ok=True)

    @property
    def token(self) -> str | None:
        """The token the agent in the template's memory demands for its first ``/init``."""
        return self.template.manifest.agent_token

    def init_body(self) -> bytes:
        """What ``AsyncEnvdClient.init`` sends a restored agent: clock, entropy, a new token."""
        body = {
            "timestamp": datetime.now(UTC).isoformat(),
            "entropy": base64.b64encode(os.urandom(32)).decode(),
            "accessToken": secrets.token_urlsafe(24),
        }
        return json.dumps(body).encode()

    @property
    def driver(self) -> QemuDriver:
        assert isinstance(self.launcher.driver, QemuDriver)
        return self.launcher.driver

    async def snapshot_destroy(self, slot: NetworkSlot) -> float:
        placement = await self.placement(slot)
        vm = await self.start(placement)
        dest = placement.run_dir.parent / "paused"
        dest.mkdir()
        t0 = time.monotonic()
        await vm.snapshot(dest)
        await vm.destroy()
        return time.monotonic() - t0

    async def bare_snapshot_destroy(self, slot: NetworkSlot) -> float:
        qemu, ram = await self.bare(slot, incoming=True)
        state = str(self.template.snapshot().state_path)
        dest = ram.parent / "paused.state"
        try:
            await asyncio.to_thread(
                qemu.restore, self.template.memory, ram, state, self.init_body(), self.token
            )
            return await asyncio.to_thread(qemu.snapshot_and_quit, dest)
        finally:
            await asyncio.to_thread(qemu.quit)
            ram.unlink()

    async def exec_rtts(self, slot: NetworkSlot, count: int) -> tuple[list[float], list[float]]:
        """(through the envd client, as one raw Connect request), interleaved on one VM."""
        vm = await self.start(await self.placement(slot))
        token = self.template.manifest.agent_token
        try:
            async with agent_client(slot, token) as agent:
                raw = RawExec(str(slot.host_ip), token)
                await agent.processes.exec(["true"])
                raw.run()
                client, bare = [], []
                for _ in range(count):
                    t0 = time.monotonic()
                    await agent.processes.exec(["true"])
                    client.append(time.monotonic() - t0)
                    t0 = time.monotonic()
                    raw.run()
                    bare.append(time.monotonic() - t0)
                raw.close()
                return client, bare
        finally:
            await vm.destroy()


class BareQemu:
    """One QEMU driven with plain subprocesses, sockets and JSON: the baselines' side (no wrenbox code)."""

    def __init__(self, argv: list[str], qmp_path: Path, host_ip: str) -> None:
        self.argv, self.qmp_path, self.host_ip = argv, qmp_path, host_ip
        self.process: subprocess.Popen[bytes] | None = None
        self.qmp: Any = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        sock = socket.socket(socket.AF_UNIX)
        while True:
            try:
                sock.connect(str(self.qmp_path))
                break
            except OSError:
                time.sleep(0.005)
        self.sock, self.qmp = sock, sock.makefile("rw")
        self.qmp.readline()  # greeting
        self.command("qmp_capabilities")

    def command(self, name: str, **arguments: object) -> Any:
        self.qmp.write(json.dumps({"execute": name, "arguments": arguments}) + "\n")
        self.qmp.flush()
        while True:
            reply = json.loads(self.qmp.readline())
            if "return" in reply or "error" in reply:
                return reply.get("return", reply)

    def send_fd(self, path: str, flags: int, name: str) -> None:
        """Hand QEMU an open file (``getfd``): its seccomp policy forbids ``exec:`` migration URIs."""
        fd = os.open(path, flags, 0o600)
        try:
            message = json.dumps({"execute": "getfd", "arguments": {"fdname": name}}).encode()
            socket.send_fds(self.sock, [message], [fd])
            while "return" not in (reply := json.loads(self.qmp.readline())):
                if "error" in reply:
                    raise SystemExit(f"getfd failed: {reply}")
        finally:
            os.close(fd)

    def wait_agent(self) -> None:
        while True:
            try:
                conn = http.client.HTTPConnection(self.host_ip, 49983, timeout=1)
                conn.request("GET", "/health")
                if conn.getresponse().status in (200, 204):
                    return
            except OSError:
                time.sleep(0.01)

    def boot(self) -> float:
        """Seconds from spawn to the agent's ``/health``."""
        t0 = time.monotonic()
        self.start()
        self.wait_agent()
        return time.monotonic() - t0

    def restore(self, memory: Path, ram: Path, state: str, init_body: bytes, token: str | None) -> float:
        """Seconds from the RAM copy to the agent's answer to ``/init``."""
        t0 = time.monotonic()
        subprocess.run(["cp", "--sparse=always", str(memory), str(ram)], check=True)
        ram.chmod(0o600)
        self.start()
        self.command("migrate-set-capabilities", capabilities=[IGNORE_SHARED])
        self.send_fd(state, os.O_RDONLY, "state")
        self.command("migrate-incoming", uri="fd:state")
        while self.command("query-status")["status"] != "paused":
            time.sleep(0.002)
        self.command("cont")
        self.wait_agent()
        conn = http.client.HTTPConnection(self.host_ip, 49983, timeout=10)
        headers = {"Content-Type": "application/json"} | ({"X-Access-Token": token} if token else {})
        conn.request("POST", "/init", body=init_body, headers=headers)
        if conn.getresponse().status not in (200, 204):
            raise SystemExit("the bare restore's /init was refused")
        return time.monotonic() - t0

    def snapshot_and_quit(self, dest: Path) -> float:
        """Seconds for stop, the device state into ``dest`` (fsynced), and QEMU gone."""
        assert self.process is not None
        t0 = time.monotonic()
        self.command("stop")
        self.command("migrate-set-capabilities", capabilities=[IGNORE_SHARED])
        self.command("migrate-set-parameters", **{"max-bandwidth": 32 << 30})
        self.send_fd(str(dest), os.O_WRONLY | os.O_CREAT | os.O_EXCL, "state")
        self.command("migrate", uri="fd:state")
        while self.command("query-migrate").get("status") not in ("completed", "failed"):
            time.sleep(0.002)
        fd = os.open(dest, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        self.quit()
        return time.monotonic() - t0

    def quit(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None and self.qmp is not None:
            with contextlib.suppress(OSError, ValueError):  # it may be on its way out already
                self.command("quit")
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None


class RawExec:
    """``true`` as one Connect request (JSON envelope) over a kept-alive ``http.client`` connection."""

    def __init__(self, host_ip: str, token: str | None) -> None:
        self.conn = http.client.HTTPConnection(host_ip, 49983, timeout=10)
        payload = json.dumps({"process": {"cmd": "true", "args": []}}).encode()
        self.body = b"\0" + len(payload).to_bytes(4, "big") + payload
        self.headers = {"Content-Type": "application/connect+json", "Connect-Protocol-Version": "1"}
        if token:
            self.headers["X-Access-Token"] = token

    def run(self) -> None:
        self.conn.request("POST", "/process.Process/Start", body=self.body, headers=self.headers)
        response = self.conn.getresponse()
        data = response.read()
        if response.status != 200 or b'"end"' not in data:
            raise SystemExit(f"raw exec failed: {response.status} {data[-200:]!r}")

    def close(self) -> None:
        self.conn.close()


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
        bench = Bench(settings, launcher, rootfs, template, network, image)
        rounds = 3 if quick else 10
        boot_slot, bare_boot_slot = await bench.slot(), await bench.slot()
        boots, bare_boots = await interleaved(
            2 if quick else 5,
            lambda: bench.cold_boot(boot_slot),
            lambda: bench.bare_cold_boot(bare_boot_slot),
        )
        figure("cold_boot_s", p50(boots), "s")
        figure("bare_cold_boot_s", p50(bare_boots), "s")
        figure("cold_boot_overhead_ratio", p50(boots) / p50(bare_boots), "ratio")
        restore_slot, bare_slot, shm_slot = await bench.slot(), await bench.slot(), await bench.slot()
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
        snap_slot, bare_snap_slot = await bench.slot(), await bench.slot()
        snaps, bare_snaps = await interleaved(
            rounds,
            lambda: bench.snapshot_destroy(snap_slot),
            lambda: bench.bare_snapshot_destroy(bare_snap_slot),
        )
        figure("vm_snapshot_destroy_s", p50(snaps), "s")
        figure("bare_snapshot_destroy_s", p50(bare_snaps), "s")
        figure("snapshot_destroy_overhead_ratio", p50(snaps) / p50(bare_snaps), "ratio")
        client, raw = await bench.exec_rtts(await bench.slot(), 20 if quick else 100)
        figure("vm_envd_exec_rtt_p50_ms", p50(client) * 1000, "ms")
        figure("vm_raw_exec_rtt_p50_ms", p50(raw) * 1000, "ms")
        figure("vm_envd_exec_overhead_ratio", p50(client) / p50(raw), "ratio")
    finally:
        await network.teardown()
        shutil.rmtree(data_dir, ignore_errors=True)
        shutil.rmtree(shm, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples (CI)")
    asyncio.run(main(parser.parse_args().quick))
