"""The pieces of the image builder that need no root: module resolution, the cpio writer, boot arguments,
the guest's Python packages, the layer cache, tool checks."""

from __future__ import annotations

import gzip
import io
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

import wrenbox
from wrenbox.errors import InvalidArgument, MissingTool, NotFound
from wrenbox.images import ImageConfig, build_image, guest_kernel_args
from wrenbox.images.agent import GUEST_REQUIREMENTS, guest_packages
from wrenbox.images.cache import LayerCache
from wrenbox.images.initramfs import (
    CpioEntry,
    build_initramfs,
    is_static_executable,
    resolve_modules,
    write_cpio,
)


def _modules_tree(root: Path) -> Path:
    moddir = root / "lib/modules/6.1.0-test"
    (moddir / "kernel/drivers").mkdir(parents=True)
    for name in (
        "virtio_ring",
        "virtio",
        "virtio_mmio",
        "virtio_blk",
        "failover",
        "net_failover",
        "virtio_net",
    ):
        (moddir / f"kernel/drivers/{name}.ko").write_bytes(name.encode())
    (moddir / "kernel/drivers/virtio-rng.ko").write_bytes(b"rng")
    (moddir / "modules.dep").write_text(
        "kernel/drivers/virtio_ring.ko:\n"
        "kernel/drivers/virtio.ko: kernel/drivers/virtio_ring.ko\n"
        "kernel/drivers/virtio_mmio.ko: kernel/drivers/virtio.ko kernel/drivers/virtio_ring.ko\n"
        "kernel/drivers/virtio_blk.ko: kernel/drivers/virtio.ko kernel/drivers/virtio_ring.ko\n"
        "kernel/drivers/failover.ko:\n"
        "kernel/drivers/net_failover.ko: kernel/drivers/failover.ko\n"
        "kernel/drivers/virtio_net.ko: kernel/drivers/net_failover.ko kernel/drivers/failover.ko "
        "kernel/drivers/virtio.ko kernel/drivers/virtio_ring.ko\n"
        "kernel/drivers/virtio-rng.ko: kernel/drivers/virtio.ko kernel/drivers/virtio_ring.ko\n"
    )
    (moddir / "modules.builtin").write_text("kernel/fs/ext4/ext4.ko\nkernel/fs/jbd2/jbd2.ko\n")
    return moddir


def test_modules_resolve_dependencies_first_and_skip_builtins(tmp_path: Path) -> None:
    moddir = _modules_tree(tmp_path)
    order = resolve_modules(moddir, ["virtio_mmio", "virtio_blk", "virtio_net", "virtio_rng", "ext4"])
    names = [p.rsplit("/", 1)[-1] for p in order]
    assert names == [
        "virtio_ring.ko",
        "virtio.ko",
        "virtio_mmio.ko",
        "virtio_blk.ko",
        "failover.ko",
        "net_failover.ko",
        "virtio_net.ko",
        "virtio-rng.ko",  # asked for as virtio_rng: '-' and '_' are the same in module names
    ]
    with pytest.raises(NotFound, match="no module 'nosuch'"):
        resolve_modules(moddir, ["nosuch"])


def test_initramfs_is_a_valid_newc_archive(tmp_path: Path) -> None:
    moddir = _modules_tree(tmp_path)
    dest = tmp_path / "initramfs.cpio.gz"
    busybox = Path("/bin/busybox")
    modules = resolve_modules(moddir, ["virtio_blk"])
    build_initramfs(dest, busybox=busybox, modules_dir=moddir, modules=modules, init_script=b"#!/bin/sh\n")
    raw = gzip.decompress(dest.read_bytes())
    listing = subprocess.run(["cpio", "-itv"], input=raw, capture_output=True, check=True).stdout.decode()
    lines = {
        line.split()[-1] if "->" not in line else line.split()[-3]: line for line in listing.splitlines()
    }
    assert lines["dev/console"].startswith("crw-------")
    assert "5,   1" in lines["dev/console"] or "5, 1" in lines["dev/console"]
    assert lines["bin/sh"].startswith("lrwxrwxrwx")
    assert lines["init"].startswith("-rwxr-xr-x")
    extract = tmp_path / "x"
    extract.mkdir()
    subprocess.run(
        ["cpio", "-id", "--quiet", "--no-absolute-filenames", "--nonmatching", "dev/console"],
        input=raw,
        cwd=extract,
        check=True,
    )
    assert (extract / "bin/busybox").read_bytes() == busybox.read_bytes()
    assert (extract / "lib/modules/load.order").read_text() == "virtio_ring.ko\nvirtio.ko\nvirtio_blk.ko\n"
    assert (extract / "lib/modules/virtio_blk.ko").read_bytes() == b"virtio_blk"
    # Reproducible: the same inputs give the same bytes.
    again = tmp_path / "again.cpio.gz"
    build_initramfs(again, busybox=busybox, modules_dir=moddir, modules=modules, init_script=b"#!/bin/sh\n")
    assert again.read_bytes() == dest.read_bytes()


def test_cpio_pads_names_and_data_to_four_bytes() -> None:
    out = io.BytesIO()
    write_cpio(out, [CpioEntry("abc", stat.S_IFREG | 0o644, b"12345")])
    data = out.getvalue()
    assert data.startswith(b"070701")
    assert len(data) % 4 == 0
    assert data[110:116] == b"abc\0\0\0"  # 110-byte header + name + NUL = 114, padded to 116
    assert data[116:121] == b"12345"
    assert data[121:124] == b"\0\0\0"  # data padded to 124
    assert data[124:130] == b"070701"  # the trailer's header
    assert b"TRAILER!!!" in data


def test_static_executable_check() -> None:
    assert is_static_executable(Path("/bin/busybox"))  # Debian busybox-static
    assert not is_static_executable(Path(shutil.which("ls") or "/bin/ls"))


def test_kernel_args_take_the_network_from_the_caller() -> None:
    args = guest_kernel_args(
        ["console=ttyS0"], ip="169.254.0.21/30", gateway="169.254.0.22", dns=["1.1.1.1"], tsc_khz=2600000
    )
    assert args == [
        "console=ttyS0",
        "wrenbox.ip=169.254.0.21/30",
        "wrenbox.gw=169.254.0.22",
        "wrenbox.dns=1.1.1.1",
        "wrenbox.hostname=sandbox",
        "tsc_early_khz=2600000",
        "tsc=reliable",
    ]
    with pytest.raises(InvalidArgument, match="guest address"):
        guest_kernel_args([], ip="169.254.0.300/30")
    with pytest.raises(InvalidArgument, match="hostname"):
        guest_kernel_args([], hostname="bad host; rm")
    with pytest.raises(InvalidArgument, match="MTU"):
        guest_kernel_args([], mtu=10)


def test_rc_reads_every_parameter_the_host_passes() -> None:
    rc = (Path(wrenbox.__file__).parent / "images/guest/rc.sh").read_text()
    for word in guest_kernel_args([], ip="10.0.0.2/30", gateway="10.0.0.1", mtu=1400):
        key = word.split("=", 1)[0]
        assert f"{key}=*)" in rc, key


def test_guest_packages_are_the_agent_requirements_and_their_dependencies(tmp_path: Path) -> None:
    packages = guest_packages()
    assert set(GUEST_REQUIREMENTS) <= set(packages.versions)
    assert {"h11", "h2", "wsproto", "wrenbox"} <= set(packages.versions)
    assert not {"pydantic", "httpx", "typer", "rich"} & set(packages.versions)  # host-only dependencies
    rels = {str(rel) for _, rel in packages.files["wrenbox"]}
    assert "wrenbox/guest/__main__.py" in rels
    assert "wrenbox/images/guest/rc.sh" in rels
    assert not [r for r in rels if "__pycache__" in r]
    # The digest follows the source: change one file of a copy of the package, the digest changes.
    copy = tmp_path / "wrenbox"
    shutil.copytree(Path(wrenbox.__file__).parent, copy, ignore=shutil.ignore_patterns("__pycache__"))
    before = guest_packages(wrenbox_dir=copy).digest
    assert before == packages.digest
    (copy / "guest" / "__main__.py").write_text(
        (copy / "guest" / "__main__.py").read_text() + "\n# changed\n"
    )
    assert guest_packages(wrenbox_dir=copy).digest != before
    site = tmp_path / "site"
    count = guest_packages(wrenbox_dir=copy).install(site)
    assert count == sum(len(v) for v in packages.files.values())
    assert (site / "wrenbox/guest/__main__.py").read_text().endswith("# changed\n")
    assert (site / "h11/__init__.py").is_file()


def test_layer_cache_publishes_only_complete_layers(tmp_path: Path) -> None:
    cache = LayerCache(tmp_path)
    with pytest.raises(RuntimeError), cache.building("base", "k1") as tmp:
        (tmp / "half").write_text("x")
        raise RuntimeError("build failed")
    assert cache.get("base", "k1") is None
    assert list((tmp_path / "base").iterdir()) == []
    with cache.building("base", "k1") as tmp:
        (tmp / "done").write_text("y")
    layer = cache.get("base", "k1")
    assert layer is not None
    assert (layer / "done").read_text() == "y"
    # A crash mid-build leaves a temp dir; the next locked build removes it.
    (tmp_path / "base" / ".tmp-dead-1234").mkdir()
    assert cache.remove_stale() == [tmp_path / "base" / ".tmp-dead-1234"]
    assert cache.get("base", "k1") is not None


def test_missing_tool_names_the_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_which = shutil.which

    def which(name: str, *args: object, **kwargs: object) -> str | None:
        return None if name == "debootstrap" else real_which(name, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(shutil, "which", which)
    config = ImageConfig(images_dir=tmp_path / "images", cache_dir=tmp_path / "cache")
    with pytest.raises(MissingTool) as info:
        build_image(config)
    assert info.value.package == "debootstrap"
    assert "debootstrap" in info.value.message
    assert not (tmp_path / "images").exists()  # nothing was started


def test_a_dynamic_busybox_is_refused(tmp_path: Path) -> None:
    config = ImageConfig(
        images_dir=tmp_path / "images",
        cache_dir=tmp_path / "cache",
        busybox=Path(shutil.which("ls") or "/bin/ls"),
    )
    with pytest.raises(MissingTool, match="busybox-static"):
        build_image(config)


def test_bad_image_name_is_refused(tmp_path: Path) -> None:
    config = ImageConfig(images_dir=tmp_path / "images", cache_dir=tmp_path / "cache")
    with pytest.raises(InvalidArgument):
        build_image(config, "../evil")
    assert not (tmp_path / "images").exists()


def test_cli_image_build_reports_errors_with_meaningful_exit_codes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from wrenbox.cli import app

    env = {"WRENBOX_DATA_DIR": str(tmp_path)}
    bad_name = CliRunner().invoke(app, ["image", "build", "--name", "../x"], env=env)
    assert bad_name.exit_code == 2
    assert "invalid image name" in bad_name.stderr
    real_which = shutil.which

    def which(name: str, *args: object, **kwargs: object) -> str | None:
        return None if name == "depmod" else real_which(name, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(shutil, "which", which)
    missing = CliRunner().invoke(app, ["image", "build"], env=env)
    assert missing.exit_code == 3
    assert "'depmod'" in missing.stderr
    assert "'kmod'" in missing.stderr  # the Debian package to install


def test_an_unreadable_manifest_is_corrupt_data_and_gets_rebuilt_over(tmp_path: Path) -> None:
    from wrenbox.errors import CorruptData
    from wrenbox.images import load_image

    build = tmp_path / ".builds" / "minimal-old"
    build.mkdir(parents=True)
    (build / "manifest.json").write_text('{"format": 0}')
    (tmp_path / "minimal").symlink_to(".builds/minimal-old")
    with pytest.raises(CorruptData, match="manifest"):
        load_image(tmp_path, "minimal")
    with pytest.raises(NotFound, match="not built"):
        load_image(tmp_path, "other")
