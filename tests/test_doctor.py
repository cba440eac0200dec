"""The host probe (``wrenbox.probe``) and ``wrenbox doctor``, against this real host."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from wrenbox.cli import app
from wrenbox.config import Settings
from wrenbox.errors import InvalidArgument, Unsupported
from wrenbox.probe import Choice, HostCapabilities
from wrenbox.probe import probes as host_probes
from wrenbox.probe.capabilities import QemuInfo, _choose_vmm
from wrenbox.probe.kvm import KvmVerdict, real_mode_probe_firmware, watch_console
from wrenbox.service import probe_host, vmm_driver
from wrenbox.vmm import DRIVERS, driver_for
from wrenbox.vmm.qemu import QemuDriver

PVM_HOST = Path("/sys/module/kvm_pvm").exists()
pytestmark = pytest.mark.root  # netns probes, /dev/kvm, /dev/kmsg, loop mounts


@pytest.fixture(scope="module")
def probed(guest_image) -> HostCapabilities:  # type: ignore[no-untyped-def]
    """A probe of the test data dir, where the guest image (and so a guest kernel for KVM) exists."""
    from tests.support.images import image_settings

    return probe_host(image_settings(), refresh=True)


def test_kvm_verdict_is_proved_with_a_guest_kernel(probed: HostCapabilities) -> None:
    assert probed.kvm.method == "guest-kernel"  # the image's kernel was really booted under KVM
    assert probed.kvm.detail
    if PVM_HOST:
        # This machine kind: /dev/kvm exists but an ordinary guest kernel hangs.
        assert Path("/dev/kvm").exists()
        assert probed.kvm.usable is False
        assert "Linux version" in probed.kvm.detail
        assert probed.vmm.name == "qemu"
        assert probed.accel == "tcg"
    else:
        assert probed.vmm.name == "qemu"  # Firecracker is not run by the product yet, even where it could
        assert probed.accel == ("kvm" if probed.kvm.usable else "tcg")


def test_probe_values_are_sane(probed: HostCapabilities) -> None:
    assert probed.qemu is not None
    assert re.fullmatch(r"\d+\.\d+(\.\d+)?", probed.qemu.version)
    assert (
        probed.qemu.version
        in subprocess.run([probed.qemu.path, "--version"], capture_output=True, text=True).stdout
    )
    # The TSC frequency agrees with what /proc/cpuinfo says the CPU runs at (within 5 %).
    cpuinfo = re.search(r"^cpu MHz\s*:\s*([\d.]+)", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
    assert probed.tsc_khz is not None
    assert cpuinfo is not None
    assert abs(probed.tsc_khz - float(cpuinfo.group(1)) * 1000) / probed.tsc_khz < 0.05
    misc = Path("/proc/misc").read_text()
    assert probed.device_mapper.ok == ("device-mapper" in misc)
    assert probed.userfaultfd.ok, probed.userfaultfd.detail  # this machine kind has it (DESIGN §1)
    for name, check in probed.network:
        assert check.ok, f"{name}: {check.detail}"
    assert probed.data_dir_fs == host_probes.filesystem_type(Path(probed.data_dir))
    assert 0 < probed.resources.memory_available_bytes <= probed.resources.memory_total_bytes
    assert probed.resources.disk_free_bytes > 0
    assert not probed.missing_tools, probed.missing_tools
    # Nothing of the network probe is left behind.
    assert not list(Path("/run/netns").glob("wbprobe-*"))


def test_probe_is_cached_for_this_boot(probed: HostCapabilities) -> None:
    from tests.support.images import image_settings

    start = time.monotonic()
    again = probe_host(image_settings())
    assert time.monotonic() - start < 1.0  # no KVM boot, no namespaces: read from the cache
    assert again.model_dump(exclude={"resources"}) == probed.model_dump(exclude={"resources"})


def test_real_mode_probe_firmware_runs_under_tcg() -> None:
    """The fallback KVM probe's firmware is real code: under TCG it prints its marker."""
    qemu = shutil.which("qemu-system-x86_64")
    assert qemu is not None
    firmware = Path(os.environ.get("TMPDIR", "/tmp")) / f"wrenbox-probe-{os.getpid()}.bin"
    firmware.write_bytes(real_mode_probe_firmware())
    try:
        seen, console, _ = watch_console(qemu, ["-bios", str(firmware)], b"WRENBOX-KVM-PROBE-OK", accel="tcg")
    finally:
        firmware.unlink()
    assert seen, console


def test_without_an_image_kvm_is_not_claimed(tmp_path: Path) -> None:
    """No guest kernel to try: real-mode code proves too little, so wrenbox stays on TCG."""
    caps = probe_host(Settings(data_dir=tmp_path))
    if Path("/dev/kvm").exists():
        assert caps.kvm.method == "real-mode"
    assert caps.kvm.usable is False
    assert (caps.vmm.name, caps.accel) == ("qemu", "tcg")
    assert (tmp_path / "host" / "kvm.json").is_file()


def test_reflink_is_false_on_ext4(tmp_path: Path) -> None:
    if host_probes.filesystem_type(tmp_path) != "ext4":
        pytest.skip(f"{tmp_path} is not on ext4")
    check = host_probes.probe_reflink(tmp_path)
    assert check.ok is False
    assert "ext4" in check.detail
    assert list(tmp_path.iterdir()) == []  # the probe's temp files are gone


@pytest.fixture(params=["btrfs", "xfs"])
def reflink_fs(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    fstype = request.param
    image = tmp_path / f"{fstype}.img"
    mount = tmp_path / "mnt"
    mount.mkdir()
    with open(image, "wb") as f:
        f.truncate(320 * 2**20)  # xfs needs 300 MiB
    mkfs = {"btrfs": ["mkfs.btrfs", "-q"], "xfs": ["mkfs.xfs", "-q"]}[fstype]
    subprocess.run([*mkfs, str(image)], check=True, capture_output=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(mount)], check=True, capture_output=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_reflink_is_true_on_btrfs_and_xfs(reflink_fs: Path) -> None:
    check = host_probes.probe_reflink(reflink_fs)
    assert check.ok, check.detail
    caps = probe_host(Settings(data_dir=reflink_fs / "data"))
    assert caps.reflink.ok
    assert caps.rootfs.name == "reflink"
    assert caps.data_dir_fs in {"btrfs", "xfs"}


def test_doctor_json(probed: HostCapabilities) -> None:
    from tests.support.images import TEST_DATA_DIR

    result = CliRunner().invoke(app, ["doctor", "--json"], env={"WRENBOX_DATA_DIR": str(TEST_DATA_DIR)})
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["vmm"]["name"] == probed.vmm.name
    assert data["rootfs"]["name"] == probed.rootfs.name
    assert data["kvm"]["usable"] == probed.kvm.usable
    assert data["tsc_khz"] == probed.tsc_khz
    assert {t["name"] for t in data["tools"]} >= {"qemu-system-x86_64", "debootstrap", "nft"}


def test_doctor_table(probed: HostCapabilities) -> None:
    from tests.support.images import TEST_DATA_DIR

    env = {"WRENBOX_DATA_DIR": str(TEST_DATA_DIR), "COLUMNS": "200"}
    result = CliRunner().invoke(app, ["doctor"], env=env)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert f"vmm:    qemu ({probed.accel.upper()}) — " in out
    assert f"rootfs: {probed.rootfs.name}" in out
    assert "KVM runs a Linux guest" in out
    assert "busybox-static" in out  # tools are listed with their Debian package


def test_doctor_names_the_package_of_a_missing_tool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_which = shutil.which

    def which(name: str, *args: object, **kwargs: object) -> str | None:
        return None if name == "nft" else real_which(name, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(shutil, "which", which)
    caps = probe_host(Settings(data_dir=tmp_path))
    assert [(t.name, t.package) for t in caps.missing_tools] == [("nft", "nftables")]
    assert caps.network.nftables.ok is False
    assert "nftables" in caps.network.nftables.detail
    env = {"WRENBOX_DATA_DIR": str(tmp_path), "COLUMNS": "200"}
    result = CliRunner().invoke(app, ["doctor"], env=env)
    assert "apt-get install nftables" in result.stdout


def test_the_vmm_doctor_names_is_the_driver_the_product_builds(probed: HostCapabilities) -> None:
    """Where Firecracker is installed and KVM works, the probe still says QEMU (the runtime cannot run
    Firecracker yet), says why, and the product builds exactly the driver the probe names."""
    kvm = KvmVerdict(usable=True, method="guest-kernel", detail="a guest booted")
    qemu = QemuInfo(path=probed.qemu.path, version=probed.qemu.version)  # type: ignore[union-attr]
    choice = _choose_vmm(qemu, "/usr/local/bin/firecracker", kvm)
    assert choice.name == "qemu"
    assert "does not run sandboxes on Firecracker yet" in choice.why
    with_kvm = probed.model_copy(
        update={"vmm": choice, "kvm": kvm, "firecracker": "/usr/local/bin/firecracker"}
    )
    driver = vmm_driver(with_kvm)
    assert isinstance(driver, QemuDriver)
    assert driver.config.accel == "kvm"
    assert vmm_driver(probed).name == probed.vmm.name
    assert set(DRIVERS) == {"qemu", "firecracker"}
    with pytest.raises(Unsupported, match="no usable VMM"):
        driver_for("none", probed.model_copy(update={"vmm": Choice(name="none", why="nothing")}))
    with pytest.raises(InvalidArgument, match="unknown VMM driver"):
        driver_for("bochs", probed)
