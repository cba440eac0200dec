"""The QEMU command line, machine validation and snapshot pinning: no VM runs here."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from wrenbox.errors import CorruptData, InvalidArgument, NotFound, Unsupported
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
from wrenbox.vmm.jail import Confinement
from wrenbox.vmm.qemu import QemuConfig, QemuDriver, jail_for, qemu_argv

GUEST_MAC = "02:fc:00:00:00:05"  # the network plan's guest MAC (vmm does not know the plan)
NIC = Nic(mac=GUEST_MAC, tap="tap0")

TCG = QemuConfig(accel="tcg", tsc_khz=2_100_000)


def _config(tmp_path: Path, **machine: object) -> VmConfig:
    return VmConfig(
        machine=Machine(
            vcpus=2,
            memory_mib=256,
            drives=(Drive(tmp_path / "root.qcow2", "qcow2"), Drive(tmp_path / "data.img", read_only=True)),
            **{"nics": (NIC,), **machine},  # type: ignore[arg-type]
        ),
        memory=MemoryFile(tmp_path / "ram"),
        run_dir=tmp_path / "run",
        kernel=Kernel(tmp_path / "vmlinuz", tmp_path / "initrd", "quiet wrenbox.ip=x"),
    )


def _option(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_boot_argv_under_tcg(tmp_path: Path) -> None:
    argv = qemu_argv(_config(tmp_path), TCG, incoming=False)
    assert argv[0] == "qemu-system-x86_64"
    assert _option(argv, "-M") == ["microvm,acpi=on,memory-backend=ram0"]
    # A capped translation cache: QEMU's default reserves up to 1 GiB of host memory per VM.
    assert _option(argv, "-accel") == ["tcg,tb-size=64"]
    assert _option(argv, "-cpu") == ["max"]
    assert _option(argv, "-sandbox") == [
        "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
    ]
    assert _option(argv, "-smp") == ["2"]
    assert _option(argv, "-m") == ["256M"]
    assert {"-nodefaults", "-no-user-config", "-no-reboot"} <= set(argv)
    objects = _option(argv, "-object")
    assert f"memory-backend-file,id=ram0,size=256M,mem-path={tmp_path}/ram,share=on" in objects
    assert _option(argv, "-drive") == [
        f"id=disk0,file={tmp_path}/root.qcow2,format=qcow2,if=none,werror=report",
        f"id=disk1,file={tmp_path}/data.img,format=raw,if=none,readonly=on",
    ]
    devices = _option(argv, "-device")
    assert devices == [
        "virtio-rng-device,rng=rng0",
        "virtio-blk-device,drive=disk0",
        "virtio-blk-device,drive=disk1",
        "virtio-net-device,netdev=net0,mac=02:fc:00:00:00:05",
        "virtio-balloon-device,free-page-reporting=on",
    ]
    assert _option(argv, "-netdev") == ["tap,id=net0,ifname=tap0,script=no,downscript=no"]
    assert _option(argv, "-qmp") == [f"unix:{tmp_path}/run/qmp.sock,server=on,wait=off"]
    # The console is a bounded ring inside QEMU: nothing a guest prints reaches the host's disk.
    assert _option(argv, "-chardev") == ["ringbuf,id=console,size=65536"]
    assert _option(argv, "-kernel") == [f"{tmp_path}/vmlinuz"]
    assert _option(argv, "-initrd") == [f"{tmp_path}/initrd"]
    (append,) = _option(argv, "-append")
    assert append == "console=ttyS0 reboot=t panic=-1 tsc_early_khz=2100000 tsc=reliable quiet wrenbox.ip=x"
    assert "-incoming" not in argv


def test_restore_argv_has_no_kernel_and_waits_for_state(tmp_path: Path) -> None:
    config = replace(_config(tmp_path), kernel=None, memory=MemoryFile(tmp_path / "ram2"))
    argv = qemu_argv(config, TCG, incoming=True)
    assert argv[-2:] == ["-incoming", "defer"]
    assert not {"-kernel", "-initrd", "-append"} & set(argv)
    assert f"memory-backend-file,id=ram0,size=256M,mem-path={tmp_path}/ram2,share=on" in _option(
        argv, "-object"
    )
    # Everything that shapes the machine is identical to the boot command line.
    restored = [a for a in argv if "mem-path" not in a][:-2]
    booted = [a for a in qemu_argv(_config(tmp_path), TCG, incoming=False) if "mem-path" not in a]
    assert restored == booted[: len(restored)]


def test_a_confined_vm_finds_its_ram_and_tap_at_the_jails_descriptors(tmp_path: Path) -> None:
    config = replace(
        _config(tmp_path),
        machine=replace(
            _config(tmp_path).machine,
            drives=(Drive(tmp_path / "root.qcow2", "qcow2", backing=tmp_path / "base.ext4"),),
        ),
        netns=tmp_path / "ns",
        confinement=Confinement(uid=2_000_000_007, gid=2_000_000_000),
    )
    argv = qemu_argv(config, TCG, incoming=True)
    assert "memory-backend-file,id=ram0,size=256M,mem-path=/proc/self/fd/20,share=on" in _option(
        argv, "-object"
    )
    assert _option(argv, "-netdev") == ["tap,id=net0,fd=23"]
    assert _option(argv, "-chardev") == [
        "ringbuf,id=console,size=65536,logfile=/proc/self/fd/22,logappend=on"
    ]
    spec = jail_for(config, config.confinement)
    assert spec.files == {20: tmp_path / "ram"}
    assert spec.taps == {23: "tap0"}
    assert spec.write == [tmp_path / "run", tmp_path / "root.qcow2"]
    assert spec.read == [tmp_path / "base.ext4", tmp_path / "vmlinuz", tmp_path / "initrd"]
    assert spec.root == tmp_path / "run.root"
    jailed = spec.argv(argv)
    assert jailed[1:3] == ["-I", "-S"]
    assert jailed[jailed.index("--") + 1 :] == argv


def test_kvm_uses_the_host_cpu_and_no_tsc_arguments(tmp_path: Path) -> None:
    argv = qemu_argv(_config(tmp_path), QemuConfig(accel="kvm"), incoming=False)
    assert _option(argv, "-accel") == ["kvm"]
    assert _option(argv, "-cpu") == ["host"]
    assert "tsc_early_khz" not in _option(argv, "-append")[0]


def test_commas_in_paths_are_escaped(tmp_path: Path) -> None:
    config = replace(_config(tmp_path), memory=MemoryFile(tmp_path / "a,b"))
    argv = qemu_argv(config, TCG, incoming=True)
    assert any(f"mem-path={tmp_path}/a,,b,share=on" in a for a in argv)


def test_no_balloon_no_nic(tmp_path: Path) -> None:
    argv = qemu_argv(_config(tmp_path, nics=(), balloon=False), TCG, incoming=True)
    assert "-netdev" not in argv
    assert _option(argv, "-device") == ["virtio-rng-device,rng=rng0"] + [
        f"virtio-blk-device,drive=disk{i}" for i in (0, 1)
    ]


def test_paged_memory_is_not_for_qemu(tmp_path: Path) -> None:
    config = replace(_config(tmp_path), memory=PagedMemory(tmp_path / "snap"))
    with pytest.raises(Unsupported, match="Firecracker"):
        qemu_argv(config, TCG, incoming=True)


def test_cold_boot_needs_a_kernel_and_under_tcg_the_tsc(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="kernel"):
        qemu_argv(replace(_config(tmp_path), kernel=None), TCG, incoming=False)
    with pytest.raises(Unsupported, match="TSC"):
        qemu_argv(_config(tmp_path), QemuConfig(accel="tcg"), incoming=False)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: Machine(vcpus=0), "vcpus"),
        (lambda: Machine(vcpus=True), "vcpus"),
        (lambda: Machine(memory_mib=63), "memory_mib"),
        (lambda: Machine(memory_mib=257), "memory_mib"),
        (lambda: Nic(tap="tap0", mac="02:FC:00:00:00:05"), "MAC"),
        (lambda: Nic(tap="tap0", mac="02:fc:00:00:00"), "MAC"),
        (lambda: Nic(mac=GUEST_MAC, tap="tap-name-too-long"), "longer than 15"),
        (lambda: Nic(mac=GUEST_MAC, tap="../x"), "tap device name"),
        (lambda: Drive(Path("x"), "vmdk"), "disk format"),  # type: ignore[arg-type]
        (lambda: QemuConfig(accel="hvf"), "accelerator"),  # type: ignore[arg-type]
        (lambda: QemuConfig(tsc_khz=0), "TSC"),
    ],
)
def test_bad_machine_is_refused(make: object, match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        make()  # type: ignore[operator]


def test_pinned_ignores_paths_but_not_hardware(tmp_path: Path) -> None:
    a = Machine(drives=(Drive(tmp_path / "a", "qcow2"),), nics=(NIC,))
    b = Machine(drives=(Drive(tmp_path / "b", "qcow2"),), nics=(Nic(mac=GUEST_MAC, tap="tap1"),))
    assert a.pinned() == b.pinned()
    assert a.pinned() != Machine(drives=(Drive(tmp_path / "a", "raw"),)).pinned()
    assert a.pinned() != replace(a, memory_mib=1024).pinned()


def _meta(driver: QemuDriver, machine: Machine, **changes: object) -> SnapshotMeta:
    meta = SnapshotMeta(
        vmm="qemu",
        vmm_version="7.2.22",
        kind="full",
        pinned=driver.pinned(machine),
        argv=("qemu-system-x86_64",),
        state_bytes=5,
    )
    return replace(meta, **changes)  # type: ignore[arg-type]


def _saved(tmp_path: Path, meta: SnapshotMeta, state: bytes = b"state") -> Snapshot:
    d = tmp_path / "snap"
    d.mkdir(exist_ok=True)
    (d / "vmstate").write_bytes(state)
    return Snapshot.save(d, meta)


def test_snapshot_metadata_round_trips(tmp_path: Path) -> None:
    driver = QemuDriver(TCG)
    saved = _saved(tmp_path, _meta(driver, Machine(drives=(Drive(tmp_path / "d", "qcow2"),))))
    loaded = Snapshot.load(tmp_path / "snap")
    assert loaded == saved
    assert loaded.state_path == tmp_path / "snap" / "vmstate"
    assert not list((tmp_path / "snap").glob(".*"))  # no temporary left behind


def test_bad_snapshots_are_refused(tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        Snapshot.load(tmp_path)
    snap = _saved(tmp_path, _meta(QemuDriver(TCG), Machine()))
    (snap.dir / "vmstate").write_bytes(b"stat")
    with pytest.raises(CorruptData, match="4 bytes, 5 were written"):
        Snapshot.load(snap.dir)
    (snap.dir / "vmstate").unlink()
    with pytest.raises(CorruptData, match="no vmstate"):
        Snapshot.load(snap.dir)
    meta = json.loads((snap.dir / "snapshot.json").read_text())
    for broken in ({**meta, "kind": "sideways"}, {**meta, "state_bytes": "many"}, {"vmm": "qemu"}):
        (snap.dir / "snapshot.json").write_text(json.dumps(broken))
        with pytest.raises(CorruptData, match="unreadable snapshot metadata"):
            Snapshot.load(snap.dir)


def test_restorable_only_on_the_same_machine(tmp_path: Path) -> None:
    driver = QemuDriver(TCG)
    machine = Machine(memory_mib=256)
    snap = _saved(tmp_path, _meta(driver, machine))
    snap.check_restorable("qemu", "7.2.22", driver.pinned(machine))
    with pytest.raises(InvalidArgument, match=r"memory_mib: snapshot has 256, restore asked for 512"):
        snap.check_restorable("qemu", "7.2.22", driver.pinned(replace(machine, memory_mib=512)))
    with pytest.raises(InvalidArgument, match=r"accel: snapshot has 'tcg', restore asked for 'kvm'"):
        snap.check_restorable("qemu", "7.2.22", QemuDriver(QemuConfig(accel="kvm")).pinned(machine))
    with pytest.raises(InvalidArgument, match=r"qemu 7\.2\.22; this host runs qemu 8\.0\.0"):
        snap.check_restorable("qemu", "8.0.0", driver.pinned(machine))


@pytest.mark.anyio
async def test_version_is_asked_of_the_binary() -> None:
    version = await QemuDriver(TCG).version()
    assert version.split(".")[0].isdigit(), version


@pytest.mark.anyio
async def test_restore_refusals_start_nothing(tmp_path: Path) -> None:
    driver = QemuDriver(TCG)
    machine = Machine(memory_mib=256, nics=())
    snap = _saved(tmp_path, _meta(driver, machine, vmm_version=await driver.version()))
    config = VmConfig(machine=machine, memory=MemoryFile(tmp_path / "ram"), run_dir=tmp_path / "run")
    with pytest.raises(InvalidArgument, match="vcpus"):
        await driver.restore(replace(config, machine=replace(machine, vcpus=2)), snap)
    with pytest.raises(NotFound, match="RAM file"):
        await driver.restore(config, snap)
    (tmp_path / "ram").write_bytes(b"")
    with pytest.raises(NotFound, match="network namespace"):
        await driver.restore(replace(config, netns=tmp_path / "no-such-netns"), snap)
    with pytest.raises(InvalidArgument, match="too long for a unix socket"):
        await driver.restore(replace(config, run_dir=tmp_path / ("x" * 120)), snap)
    assert not (tmp_path / "run").exists()
