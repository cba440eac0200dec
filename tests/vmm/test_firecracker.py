"""The Firecracker driver against a fake Firecracker that checks every request (``fake_firecracker.py``).

The fake runs where real Firecracker would: launched by the driver through ``unshare`` + ``sh`` +
``nsenter`` in a private mount namespace inside a real network namespace, so these tests need root.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.vmm.fake_firecracker import PAGE, FakeFirecracker, call

from wrenbox.errors import Timeout, Unavailable
from wrenbox.fileio import data_extents
from wrenbox.memory.chain import Chain
from wrenbox.memory.process import RawKind, process_diff, process_full
from wrenbox.memory.uffd import PageServerConfig, ServerState
from wrenbox.memory.uffd import abi as uffd_abi
from wrenbox.network.netns import NETNS_DIR, create_netns, remove_netns
from wrenbox.pids import ProcessRef
from wrenbox.vmm.base import (
    Drive,
    Kernel,
    Machine,
    MemoryFile,
    Nic,
    PagedMemory,
    Snapshot,
    SnapshotMeta,
    VmConfig,
)
from wrenbox.vmm.firecracker import FirecrackerConfig, FirecrackerDriver
from wrenbox.vmm.firecracker.api import FirecrackerApiError

GUEST_MAC = "02:fc:00:00:00:05"  # the network plan's guest MAC (vmm does not know the plan)
NIC = Nic(mac=GUEST_MAC, tap="tap0")

pytestmark = [pytest.mark.root, pytest.mark.anyio]

MiB = 1 << 20
BOOT_ARGS = "console=ttyS0 reboot=k panic=1 pci=off"
UFFD_UNUSABLE = uffd_abi.unusable()


@pytest.fixture
def netns() -> Iterator[Path]:
    name = f"wbfc{secrets.token_hex(4)}"
    create_netns(name)
    try:
        yield NETNS_DIR / name
    finally:
        remove_netns(name)


@pytest.fixture
def fake(tmp_path: Path) -> FakeFirecracker:
    return FakeFirecracker(tmp_path / "fc")


def make_driver(fake: FakeFirecracker, tmp_path: Path, **options: object) -> FirecrackerDriver:
    settings: dict = {
        "binary": str(fake.binary),
        "vm_dir": tmp_path / "vm",
        "kill_grace_s": 2.0,
        "page_server": PageServerConfig(prefetch=False, chunk_size=64 * 1024),
        **options,
    }
    return FirecrackerDriver(FirecrackerConfig(**settings))


class Guest:
    """Disks, kernel and machine of one test VM (the disk name is hostile on purpose)."""

    def __init__(self, root: Path, memory_mib: int = 64) -> None:
        root.mkdir(exist_ok=True)
        self.root = root
        self.kernel = root / "vmlinux"
        self.kernel.write_bytes(b"kernel")
        self.disk = root / "root $(touch PWNED) 'q' \"d\"; x.ext4"
        self.disk.write_bytes(b"\0" * 4096)
        self.data = root / "data.img"
        self.data.write_bytes(b"\0" * 4096)
        self.machine = Machine(
            vcpus=2,
            memory_mib=memory_mib,
            drives=(Drive(self.disk), Drive(self.data, read_only=True)),
            nics=(NIC,),
        )

    def config(self, run: str, netns: Path | None, memory: object = None) -> VmConfig:
        return VmConfig(
            machine=self.machine,
            memory=memory
            or MemoryFile(self.root / "ram"),  # a boot ignores it: Firecracker's RAM is anonymous
            run_dir=self.root / run,
            kernel=Kernel(self.kernel, cmdline="wrenbox.ip=169.254.0.21/30"),
            netns=netns,
        )

    def boot_plan(self, vm_dir: Path) -> list[dict]:
        """A cold boot as Firecracker's API reference spells it, written out independently of the driver."""
        return [
            call(
                "PUT",
                "/boot-source",
                {
                    "kernel_image_path": str(self.kernel),
                    "boot_args": f"{BOOT_ARGS} wrenbox.ip=169.254.0.21/30",
                },
            ),
            call(
                "PUT",
                "/drives/rootfs",
                {
                    "drive_id": "rootfs",
                    "path_on_host": f"{vm_dir}/rootfs.ext4",
                    "is_root_device": True,
                    "is_read_only": False,
                },
            ),
            call(
                "PUT",
                "/drives/drive1",
                {
                    "drive_id": "drive1",
                    "path_on_host": f"{vm_dir}/drive1",
                    "is_root_device": False,
                    "is_read_only": True,
                },
            ),
            call(
                "PUT",
                "/machine-config",
                {
                    "vcpu_count": 2,
                    "mem_size_mib": self.machine.memory_mib,
                    "smt": False,
                    "track_dirty_pages": True,
                },
            ),
            call(
                "PUT",
                "/network-interfaces/eth0",
                {"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "02:fc:00:00:00:05"},
            ),
            call("PUT", "/balloon", {"amount_mib": 0, "deflate_on_oom": True, "free_page_reporting": True}),
            call("PUT", "/entropy", {}),
            call("PUT", "/actions", {"action_type": "InstanceStart"}),
        ]


def processes_of(fake: FakeFirecracker) -> list[int]:
    """Live processes running the fake binary."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.fsencode(fake.binary) in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def namespaces(netns: Path) -> tuple[str, str]:
    """How /proc names the network namespace ``netns``, and the mount namespace of this process."""
    return f"net:[{netns.stat().st_ino}]", str(Path("/proc/self/ns/mnt").readlink())


def pwned(root: Path) -> bool:
    """Did a shell run the command hidden in the disk's name (in its cwd or next to the disk)?"""
    return any(p.name == "PWNED" for p in [*root.rglob("*"), *Path.cwd().iterdir()])


def extents(path: Path, size: int) -> list[tuple[int, int]]:
    with open(path, "rb") as f:
        return data_extents(f.fileno(), size)


def fd_count() -> int:
    return len(list(Path("/proc/self/fd").iterdir()))


async def test_cold_boot_in_its_namespaces_then_pause_resume_destroy(
    tmp_path: Path, fake: FakeFirecracker, netns: Path
) -> None:
    guest = Guest(tmp_path / "guest")
    driver = make_driver(fake, tmp_path)
    vm_dir = tmp_path / "vm"
    fake.program(
        [
            *guest.boot_plan(vm_dir),
            call("GET", "/"),
            call("PATCH", "/vm", {"state": "Paused"}),
            call("GET", "/"),
            call("PATCH", "/vm", {"state": "Resumed"}),
        ],
        vm_dir=str(vm_dir),
    )
    vm = await driver.boot(guest.config("run", netns))
    assert await vm.status() == "running"
    await vm.pause()
    assert await vm.status() == "paused"
    await vm.resume()
    fake.assert_served_exactly()

    [start] = fake.events("start")
    assert start["pid"] == vm.pid  # every launcher link exec-replaced itself
    assert start["argv"] == ["--api-sock", str(guest.root / "run" / "firecracker.sock")]
    net_ns, mnt_ns = namespaces(netns)
    assert start["net_ns"] == net_ns
    assert start["mnt_ns"] != mnt_ns
    [seen] = fake.events("vm_dir")
    assert seen == {
        "event": "vm_dir",
        "fstypes": ["tmpfs"],
        "links": {"rootfs.ext4": str(guest.disk), "drive1": str(guest.data)},
    }
    assert [d["resolves"] for d in fake.events("drive")] == [str(guest.disk), str(guest.data)]
    assert list(vm_dir.iterdir()) == []  # the tmpfs and its links exist only in the VM's namespace
    assert not pwned(tmp_path)
    assert "Running Firecracker v1.7.0" in await vm.console_tail()

    await vm.destroy()
    assert not vm.alive()
    assert not vm.api_socket.exists()
    await vm.destroy()  # idempotent
    assert processes_of(fake) == []


def memory_image(size: int, seed: int) -> bytearray:
    """Random pages, zero runs and holes-to-be."""
    rng = random.Random(seed)
    memory = bytearray(size)
    for unit in range(0, size, 16 * 1024):
        if rng.random() > 0.4:
            memory[unit : unit + 16 * 1024] = rng.randbytes(16 * 1024)
    return memory


@pytest.mark.skipif(bool(UFFD_UNUSABLE), reason=f"needs userfaultfd: {UFFD_UNUSABLE}")
async def test_full_and_diff_snapshots_make_a_chain_the_page_server_restores_byte_exactly(
    tmp_path: Path, fake: FakeFirecracker, netns: Path
) -> None:
    guest = Guest(tmp_path / "guest")
    driver = make_driver(fake, tmp_path)
    size = guest.machine.memory_mib * MiB
    image = tmp_path / "guest-memory"
    memory = memory_image(size, seed=1)
    image.write_bytes(memory)
    dirty = [3, 100, 7, 5000, size // PAGE - 1]
    dirs = [tmp_path / "s0", tmp_path / "s1"]
    for d in dirs:
        d.mkdir()
    (dirs[1] / "memfile.raw").write_bytes(b"\xff" * size)  # a stale file Firecracker would merge into
    fake.program(
        [
            *guest.boot_plan(tmp_path / "vm"),
            call("GET", "/"),
            call("PATCH", "/vm", {"state": "Paused"}),
            call(
                "PUT",
                "/snapshot/create",
                {
                    "snapshot_type": "Full",
                    "snapshot_path": f"{dirs[0]}/vmstate",
                    "mem_file_path": f"{dirs[0]}/memfile.raw",
                },
            ),
            call("PATCH", "/vm", {"state": "Resumed"}),
            call("GET", "/"),
            call("PATCH", "/vm", {"state": "Paused"}),
            call(
                "PUT",
                "/snapshot/create",
                {
                    "snapshot_type": "Diff",
                    "snapshot_path": f"{dirs[1]}/vmstate",
                    "mem_file_path": f"{dirs[1]}/memfile.raw",
                },
                dirty_pages=dirty,
            ),
        ],
        memory_image=str(image),
    )
    vm = await driver.boot(guest.config("run", netns))
    full = await vm.snapshot(dirs[0], "full")
    assert (dirs[0] / "memfile.raw").read_bytes() == memory
    await vm.resume()
    rng = random.Random(2)
    for page in dirty:  # the guest writes these pages; page 7 becomes all zero
        memory[page * PAGE : (page + 1) * PAGE] = bytes(PAGE) if page == 7 else rng.randbytes(PAGE)
    image.write_bytes(memory)
    diff = await vm.snapshot(dirs[1], "diff")
    await vm.destroy()
    fake.assert_served_exactly()

    assert (full.meta.kind, diff.meta.kind) == ("full", "diff")
    assert diff.meta.pinned == driver.pinned(guest.machine)
    assert Snapshot.load(dirs[1]).meta == diff.meta
    # Only the dirtied pages, in a new sparse file.
    assert extents(dirs[1] / "memfile.raw", size) == [(p * PAGE, (p + 1) * PAGE) for p in sorted(dirty)]

    chains = [tmp_path / "c0", tmp_path / "c1"]
    for c in chains:
        c.mkdir()
    process_full(dirs[0] / "memfile.raw", chains[0])
    with Chain.open(chains[0]) as parent:
        process_diff(dirs[1] / "memfile.raw", parent, chains[1], kind=RawKind.SPARSE_DIFF)

    expected = tmp_path / "expected-memory"
    expected.write_bytes(memory)
    run = guest.root / "run2"
    fake.program(
        [
            call(
                "PUT",
                "/snapshot/load",
                {
                    "snapshot_path": f"{dirs[1]}/vmstate",
                    "mem_backend": {"backend_type": "Uffd", "backend_path": f"{run}/uffd.sock"},
                    "track_dirty_pages": True,
                    "resume_vm": False,
                },
            ),
            call("PATCH", "/vm", {"state": "Resumed"}),
            call("GET", "/"),
        ],
        expected_memory=str(expected),
    )
    fds = fd_count()
    restored = await driver.restore(guest.config("run2", netns, PagedMemory(chains[1])), diff)
    assert await restored.status() == "running"
    fake.assert_served_exactly()
    [touch] = fake.events("touch")
    assert (touch["pages"], touch["mismatched_pages"], touch["mismatched_regions"]) == (size // PAGE, 0, 0)
    server = restored.page_server
    assert server is not None
    stats = server.stats
    assert stats.fault_bytes == size
    assert stats.copied_bytes > 0
    assert stats.zeroed_bytes > 0
    assert restored.memory_error is None

    await restored.destroy()
    assert server.state is ServerState.STOPPED
    assert not (run / "uffd.sock").exists()
    assert not (run / "firecracker.sock").exists()
    assert fd_count() == fds
    assert processes_of(fake) == []


def saved_snapshot(
    directory: Path, driver: FirecrackerDriver, machine: Machine, kind: str = "full"
) -> Snapshot:
    """A snapshot directory as the fake writes one (its state file names the memory size)."""
    directory.mkdir()
    state = json.dumps({"mem_size": machine.memory_mib * MiB, "fake": True}).encode()
    (directory / "vmstate").write_bytes(state)
    meta = SnapshotMeta(
        vmm="firecracker",
        vmm_version="1.7.0",
        kind=kind,  # type: ignore[arg-type]
        pinned=driver.pinned(machine),
        argv=(),
        state_bytes=len(state),
    )
    return Snapshot.save(directory, meta)


async def test_restore_from_a_memory_file(tmp_path: Path, fake: FakeFirecracker, netns: Path) -> None:
    guest = Guest(tmp_path / "guest")
    driver = make_driver(fake, tmp_path)
    snapshot = saved_snapshot(tmp_path / "snap", driver, guest.machine)
    ram = tmp_path / "ram"
    ram.write_bytes(memory_image(guest.machine.memory_mib * MiB, seed=4))
    fake.program(
        [
            call(
                "PUT",
                "/snapshot/load",
                {
                    "snapshot_path": str(snapshot.state_path),
                    "mem_backend": {"backend_type": "File", "backend_path": str(ram)},
                    "track_dirty_pages": True,
                    "resume_vm": False,
                },
            ),
            call("PATCH", "/vm", {"state": "Resumed"}),
        ]
    )
    vm = await driver.restore(guest.config("run", netns, MemoryFile(ram)), snapshot)
    assert vm.page_server is None
    await vm.destroy()
    fake.assert_served_exactly()
    [loaded] = fake.events("file_backend")
    assert loaded["sha256"] == hashlib.sha256(ram.read_bytes()).hexdigest()


@pytest.mark.skipif(bool(UFFD_UNUSABLE), reason=f"needs userfaultfd: {UFFD_UNUSABLE}")
async def test_a_failed_uffd_load_stops_the_page_server_and_the_process(
    tmp_path: Path, fake: FakeFirecracker, netns: Path
) -> None:
    guest = Guest(tmp_path / "guest")
    driver = make_driver(fake, tmp_path)
    snapshot = saved_snapshot(tmp_path / "snap", driver, guest.machine)
    raw = tmp_path / "raw"
    raw.write_bytes(memory_image(guest.machine.memory_mib * MiB, seed=5))
    (tmp_path / "chain").mkdir()
    process_full(raw, tmp_path / "chain")
    run = guest.root / "run"
    fake.program(
        [
            call(
                "PUT",
                "/snapshot/load",
                {
                    "snapshot_path": str(snapshot.state_path),
                    "mem_backend": {"backend_type": "Uffd", "backend_path": f"{run}/uffd.sock"},
                    "track_dirty_pages": True,
                    "resume_vm": False,
                },
                fault="Failed to restore from snapshot: vmstate is garbage",
            )
        ]
    )
    fds = fd_count()
    with pytest.raises(FirecrackerApiError, match=r"PUT /snapshot/load.*vmstate is garbage") as caught:
        await driver.restore(guest.config("run", netns, PagedMemory(tmp_path / "chain")), snapshot)
    assert caught.value.status == 400
    assert caught.value.leftovers == []  # type: ignore[attr-defined]
    fake.assert_served_exactly()
    assert processes_of(fake) == []
    assert not (run / "uffd.sock").exists()
    assert not (run / "firecracker.sock").exists()
    assert not [t for t in threading.enumerate() if t.name.startswith("uffd:")]
    assert fd_count() == fds


async def test_firecracker_dying_before_its_socket_is_reported_with_its_words(
    tmp_path: Path, fake: FakeFirecracker, netns: Path
) -> None:
    guest = Guest(tmp_path / "guest")
    fake.program([], startup={"exit": 1, "message": "Error creating the VMM: Kvm error: /dev/kvm busy"})
    with pytest.raises(Unavailable, match=r"(?s)exited before its API socket.*firecracker log.*kvm busy"):
        await make_driver(fake, tmp_path).boot(guest.config("run", netns))
    assert processes_of(fake) == []
    assert not (guest.root / "run" / "firecracker.sock").exists()


async def test_firecracker_dying_during_a_call(tmp_path: Path, fake: FakeFirecracker, netns: Path) -> None:
    guest = Guest(tmp_path / "guest")
    plan = guest.boot_plan(tmp_path / "vm")
    plan[3]["exit"] = 134
    plan[3]["message"] = "thread 'fc_api' panicked: KVM_CREATE_VCPU failed"
    fake.program(plan[:4])
    with pytest.raises(Unavailable, match=r"(?s)went away during PUT /machine-config.*exited.*panicked"):
        await make_driver(fake, tmp_path).boot(guest.config("run", netns))
    fake.assert_served_exactly()
    assert processes_of(fake) == []


async def test_an_api_error_names_the_call_and_firecrackers_fault(
    tmp_path: Path, fake: FakeFirecracker, netns: Path
) -> None:
    guest = Guest(tmp_path / "guest")
    plan = guest.boot_plan(tmp_path / "vm")
    plan[1]["fault"] = "Unable to create the block device: No such file or directory (os error 2)"
    fake.program(plan[:2])
    with pytest.raises(FirecrackerApiError) as caught:
        await make_driver(fake, tmp_path).boot(guest.config("run", netns))
    error = caught.value
    assert (error.method, error.path, error.status) == ("PUT", "/drives/rootfs", 400)
    assert error.fault.startswith("Unable to create the block device")
    assert "PUT /drives/rootfs" in str(error)
    assert processes_of(fake) == []


async def test_the_fake_refuses_what_it_was_not_told_to_expect(
    tmp_path: Path, fake: FakeFirecracker, netns: Path
) -> None:
    guest = Guest(tmp_path / "guest")
    plan = guest.boot_plan(tmp_path / "vm")
    plan[3]["body"]["mem_size_mib"] = 128  # the driver asks for 64
    fake.program(plan)
    with pytest.raises(FirecrackerApiError, match=r"unexpected request.*/machine-config"):
        await make_driver(fake, tmp_path).boot(guest.config("run", netns))
    assert [r["ok"] for r in fake.events("request")] == [True, True, True, False]


async def test_snapshot_deadlines_grow_with_guest_memory(
    tmp_path: Path, fake: FakeFirecracker, netns: Path
) -> None:
    """Each guest size gets its own deadline, named in the error and never cut short. Firecracker answers
    after 1.5 s, past both deadlines, so the outcome does not depend on how busy the host is (a load
    only delays the timeout further)."""
    options = {"snapshot_timeout_s": 0.2, "snapshot_timeout_per_gib_s": 4.8}  # 64 MiB: 0.5 s, 128: 0.8 s
    assert FirecrackerConfig(**options).snapshot_timeout(2048) == pytest.approx(9.8)  # and on, per GiB
    for memory_mib, deadline in ((64, 0.5), (128, 0.8)):
        guest = Guest(tmp_path / f"guest{memory_mib}", memory_mib=memory_mib)
        snap = tmp_path / f"snap{memory_mib}"
        snap.mkdir()
        image = tmp_path / "image"
        image.write_bytes(bytes(memory_mib * MiB))
        body = {
            "snapshot_type": "Full",
            "snapshot_path": f"{snap}/vmstate",
            "mem_file_path": f"{snap}/memfile.raw",
        }
        fake.program(
            [
                *guest.boot_plan(tmp_path / "vm"),
                call("GET", "/"),
                call("PATCH", "/vm", {"state": "Paused"}),
                call("PUT", "/snapshot/create", body, delay=1.5),
            ],
            memory_image=str(image),
        )
        vm = await make_driver(fake, tmp_path, **options).boot(guest.config("run", netns))
        try:
            t0 = time.monotonic()
            with pytest.raises(Timeout, match=rf"PUT /snapshot/create within {deadline} s"):
                await vm.snapshot(snap)
            assert time.monotonic() - t0 >= deadline
        finally:
            await vm.destroy()
        fake.assert_served_exactly()


async def test_destroy_kills_a_firecracker_that_ignores_sigterm(
    tmp_path: Path, fake: FakeFirecracker, netns: Path
) -> None:
    guest = Guest(tmp_path / "guest")
    fake.program(guest.boot_plan(tmp_path / "vm"), ignore_sigterm=True)
    vm = await make_driver(fake, tmp_path, kill_grace_s=0.3).boot(guest.config("run", netns))
    started = time.monotonic()
    await vm.destroy()
    assert time.monotonic() - started >= 0.3
    assert not vm.alive()
    assert processes_of(fake) == []
    await vm.destroy()


async def test_a_socket_that_never_appears_times_out(
    tmp_path: Path, fake: FakeFirecracker, netns: Path
) -> None:
    guest = Guest(tmp_path / "guest")
    fake.program([], startup={"sleep": 30})
    with pytest.raises(Timeout, match=r"did not appear within 0.5 s.*alive"):
        await make_driver(fake, tmp_path, start_timeout_s=0.5).boot(guest.config("run", netns))
    assert processes_of(fake) == []


async def test_a_stale_api_socket_is_replaced_and_adopted_vms_can_be_destroyed(
    tmp_path: Path, fake: FakeFirecracker, netns: Path
) -> None:
    guest = Guest(tmp_path / "guest")
    run = guest.root / "run"
    run.mkdir()
    with socket.socket(socket.AF_UNIX) as stale:  # left by a crashed run; Firecracker refuses the path
        stale.bind(str(run / "firecracker.sock"))
    fake.program([*guest.boot_plan(tmp_path / "vm"), call("GET", "/")])
    driver = make_driver(fake, tmp_path)
    vm = await driver.boot(guest.config("run", netns))
    adopted = driver.adopt(vm.config, ProcessRef.of(vm.pid))
    assert await adopted.status() == "running"
    await adopted.destroy()
    assert not vm.alive()
    fake.assert_served_exactly()


async def test_a_cancelled_boot_leaves_nothing_running(
    tmp_path: Path, fake: FakeFirecracker, netns: Path
) -> None:
    guest = Guest(tmp_path / "guest")
    plan = guest.boot_plan(tmp_path / "vm")
    plan[3]["delay"] = 20
    fake.program(plan)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(1.0):
            await make_driver(fake, tmp_path).boot(guest.config("run", netns))
    assert len(fake.events("start")) == 1
    assert processes_of(fake) == []
    assert not (guest.root / "run" / "firecracker.sock").exists()
