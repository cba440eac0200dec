"""What the Firecracker driver refuses before any process starts, its configuration, and its launcher.

No root needed: nothing here launches Firecracker (the fake binary only answers ``--version``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.vmm.fake_firecracker import FakeFirecracker

from wrenbox.errors import CorruptData, InvalidArgument, MissingTool, NotFound, Unsupported
from wrenbox.memory.format import HEADER_NAME
from wrenbox.memory.process import process_full
from wrenbox.probe.capabilities import HostCapabilities
from wrenbox.probe.kvm import KvmVerdict
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
from wrenbox.vmm.firecracker.launch import launch_argv

GUEST_MAC = "02:fc:00:00:00:05"  # the network plan's guest MAC (vmm does not know the plan)
NIC = Nic(mac=GUEST_MAC, tap="tap0")

pytestmark = pytest.mark.anyio

MiB = 1 << 20
MACHINE = Machine(memory_mib=64, drives=(), nics=(NIC,))


@pytest.fixture
def fake(tmp_path: Path) -> FakeFirecracker:
    return FakeFirecracker(tmp_path / "fc")


@pytest.fixture
def driver(fake: FakeFirecracker, tmp_path: Path) -> FirecrackerDriver:
    return FirecrackerDriver(FirecrackerConfig(binary=str(fake.binary), vm_dir=tmp_path / "vm"))


def config(tmp_path: Path, machine: Machine = MACHINE, **changes: object) -> VmConfig:
    (tmp_path / "vmlinux").write_bytes(b"kernel")
    settings: dict = {
        "machine": machine,
        "memory": MemoryFile(tmp_path / "ram"),
        "run_dir": tmp_path / "run",
        "kernel": Kernel(tmp_path / "vmlinux"),
        **changes,
    }
    return VmConfig(**settings)


def snapshot_of(directory: Path, driver: FirecrackerDriver, machine: Machine, **meta: object) -> Snapshot:
    directory.mkdir()
    (directory / "vmstate").write_bytes(b"{}")
    fields: dict = {
        "vmm": "firecracker",
        "vmm_version": "1.7.0",
        "kind": "full",
        "pinned": driver.pinned(machine),
        "argv": (),
        "state_bytes": 2,
        **meta,
    }
    return Snapshot.save(directory, SnapshotMeta(**fields))


def test_configuration_is_checked() -> None:
    for vm_dir in ("relative/dir", "/", "/run/../etc"):
        with pytest.raises(InvalidArgument, match="vm_dir"):
            FirecrackerConfig(vm_dir=Path(vm_dir))
    with pytest.raises(InvalidArgument, match="api_timeout_s"):
        FirecrackerConfig(api_timeout_s=0)
    with pytest.raises(InvalidArgument, match="per_gib"):
        FirecrackerConfig(snapshot_timeout_per_gib_s=-1)


def test_snapshot_deadlines_are_a_floor_plus_an_allowance_per_gib() -> None:
    fc = FirecrackerConfig(snapshot_timeout_s=10, snapshot_timeout_per_gib_s=20)
    assert fc.snapshot_timeout(512) == 20
    assert fc.snapshot_timeout(8192) == 170
    assert FirecrackerConfig().snapshot_timeout(32768) > 10 * FirecrackerConfig().snapshot_timeout(512)


def test_from_host_needs_a_binary_and_working_kvm() -> None:
    kvm = KvmVerdict(usable=True, method="guest-kernel", detail="a guest booted")
    no_kvm = KvmVerdict(usable=False, method="guest-kernel", detail="the guest hung (nested PVM)")
    with pytest.raises(MissingTool, match=r"firecracker.*not packaged in Debian"):
        FirecrackerConfig.from_host(HostCapabilities.model_construct(firecracker=None, kvm=kvm))
    with pytest.raises(Unsupported, match="nested PVM"):
        FirecrackerConfig.from_host(HostCapabilities.model_construct(firecracker="/usr/bin/fc", kvm=no_kvm))
    fc = FirecrackerConfig.from_host(HostCapabilities.model_construct(firecracker="/usr/bin/fc", kvm=kvm))
    assert fc.binary == "/usr/bin/fc"


def test_the_launcher_gets_every_value_as_an_argument_never_as_script_text(tmp_path: Path) -> None:
    disk = tmp_path / "a disk; $(reboot) `id` 'x'.ext4"
    argv = launch_argv(
        ["/opt/fc/firecracker", "--api-sock", "/run/x/firecracker.sock"],
        vm_dir=Path("/run/wrenbox-fc"),
        disks=[disk, tmp_path / "data.img"],
        netns=Path("/run/netns/wrenbox-ns-3"),
    )
    other = launch_argv(["/bin/true"], vm_dir=Path("/elsewhere"), disks=[], netns=None)
    c = argv.index("-c")
    assert argv[1:c] == ["--mount", "--propagation", "private", "--", "/bin/sh"]
    assert argv[c + 1] == other[other.index("-c") + 1]  # one constant script, whatever the values
    rest = argv[c + 2 :]
    assert rest[0] == "wrenbox-fc"  # $0
    assert rest[1].endswith("/mount")
    assert rest[2].endswith("/ln")
    links = ["rootfs.ext4", str(disk), "drive1", str(tmp_path / "data.img")]
    assert rest[3:9] == ["/run/wrenbox-fc", *links, "--"]
    assert rest[9].endswith("/nsenter")
    command = ["/opt/fc/firecracker", "--api-sock", "/run/x/firecracker.sock"]
    assert rest[10:] == ["--net=/run/netns/wrenbox-ns-3", "--", *command]


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"machine": Machine(vcpus=33, memory_mib=64, nics=())}, InvalidArgument, "at most 32 vCPUs"),
        ({"machine": Machine(memory_mib=64, drives=(Drive(Path("/d.qcow2"), format="qcow2"),))},
         Unsupported, "raw disks only"),
        ({"machine": Machine(memory_mib=64, drives=(Drive(Path("/no/disk.ext4")),))}, NotFound, "disk"),
        ({"kernel": None}, InvalidArgument, "needs a kernel"),
        ({"kernel": Kernel(Path("/nonexistent/vmlinux"))}, NotFound, "kernel file"),
        ({"netns": Path("/run/netns/wrenbox-no-such-ns")}, NotFound, "network namespace"),
        ({"run_dir": Path("/tmp/" + "r" * 100)}, InvalidArgument, "too long for a unix socket"),
    ],
)  # fmt: skip
async def test_boot_refuses_what_firecracker_cannot_run(
    tmp_path: Path,
    fake: FakeFirecracker,
    driver: FirecrackerDriver,
    change: dict,
    error: type[Exception],
    match: str,
) -> None:
    with pytest.raises(error, match=match):
        await driver.boot(config(tmp_path, **change))
    assert fake.events("start") == []


async def test_nothing_of_a_vm_may_lie_in_its_private_directory(
    tmp_path: Path, fake: FakeFirecracker, driver: FirecrackerDriver
) -> None:
    (tmp_path / "vm").mkdir()
    (tmp_path / "vm" / "disk.ext4").write_bytes(b"")
    shadowed = Machine(memory_mib=64, drives=(Drive(tmp_path / "vm" / "disk.ext4"),))
    with pytest.raises(InvalidArgument, match="mounts over"):
        await driver.boot(config(tmp_path, shadowed))
    with pytest.raises(InvalidArgument, match="mounts over"):
        await driver.boot(config(tmp_path, run_dir=tmp_path / "vm" / "run"))
    assert fake.events("start") == []


async def test_restore_refuses_another_machine_or_firecracker(
    tmp_path: Path, fake: FakeFirecracker, driver: FirecrackerDriver
) -> None:
    (tmp_path / "ram").write_bytes(bytes(64 * MiB))
    bigger = Machine(memory_mib=128, drives=(), nics=(NIC,))
    other_tap = Machine(memory_mib=64, drives=(), nics=(Nic(mac=GUEST_MAC, tap="tap7"),))
    snapshot = snapshot_of(tmp_path / "s", driver, MACHINE)
    with pytest.raises(InvalidArgument, match=r"memory_mib: snapshot has 64, restore asked for 128"):
        await driver.restore(config(tmp_path, bigger), snapshot)
    with pytest.raises(InvalidArgument, match=r"taps: snapshot has \['tap0'\], restore asked for \['tap7'\]"):
        await driver.restore(config(tmp_path, other_tap), snapshot)
    old = snapshot_of(tmp_path / "old", driver, MACHINE, vmm_version="1.4.1")
    with pytest.raises(InvalidArgument, match=r"firecracker 1\.4\.1.*runs firecracker 1\.7\.0"):
        await driver.restore(config(tmp_path), old)
    qemu = snapshot_of(tmp_path / "q", driver, MACHINE, vmm="qemu", vmm_version="7.2.22")
    with pytest.raises(InvalidArgument, match="taken with qemu"):
        await driver.restore(config(tmp_path), qemu)
    moved = FirecrackerDriver(FirecrackerConfig(binary=str(fake.binary), vm_dir=tmp_path / "elsewhere"))
    with pytest.raises(InvalidArgument, match="vm_dir"):
        await moved.restore(config(tmp_path), snapshot)
    assert fake.events("start") == []


def damage(chain: Path) -> None:
    """Flip the first byte of the chain's data file."""
    victim = next(p for p in chain.iterdir() if p.name != HEADER_NAME)
    with open(victim, "r+b") as f:
        f.write(b"\2")


async def test_restore_refuses_memory_that_cannot_be_the_guests(
    tmp_path: Path, fake: FakeFirecracker, driver: FirecrackerDriver
) -> None:
    diff = snapshot_of(tmp_path / "d", driver, MACHINE, kind="diff")
    (diff.dir / "memfile.raw").write_bytes(bytes(64 * MiB))
    with pytest.raises(InvalidArgument, match="only the pages written since the previous snapshot"):
        await driver.restore(config(tmp_path, memory=MemoryFile(diff.dir / "memfile.raw")), diff)
    full = snapshot_of(tmp_path / "f", driver, MACHINE)
    with pytest.raises(NotFound, match="memory file"):
        await driver.restore(config(tmp_path, memory=MemoryFile(tmp_path / "absent")), full)
    (tmp_path / "short").write_bytes(bytes(32 * MiB))
    with pytest.raises(InvalidArgument, match="has 33554432 bytes; the guest has 64 MiB"):
        await driver.restore(config(tmp_path, memory=MemoryFile(tmp_path / "short")), full)

    (tmp_path / "small-chain").mkdir()
    process_full(tmp_path / "short", tmp_path / "small-chain")
    with pytest.raises(InvalidArgument, match="has 33554432 bytes; the guest has 67108864"):
        await driver.restore(config(tmp_path, memory=PagedMemory(tmp_path / "small-chain")), full)
    (tmp_path / "raw").write_bytes(b"\1" * (64 * MiB))
    (tmp_path / "chain").mkdir()
    process_full(tmp_path / "raw", tmp_path / "chain")
    damage(tmp_path / "chain")
    with pytest.raises(CorruptData):
        await driver.restore(config(tmp_path, memory=PagedMemory(tmp_path / "chain")), full)
    assert not (tmp_path / "run" / "uffd.sock").exists()
    assert fake.events("start") == []


async def test_a_version_it_cannot_read_is_unsupported(tmp_path: Path) -> None:
    liar = tmp_path / "firecracker"
    liar.write_text("#!/bin/sh\necho 'cloud-hypervisor v40.0'\n")
    liar.chmod(0o755)
    with pytest.raises(Unsupported, match="cannot tell the version"):
        await FirecrackerDriver(FirecrackerConfig(binary=str(liar))).version()
