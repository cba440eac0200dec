"""Real image builds (debootstrap, apt, mkfs): the shared test image, caching, rebuilds, failures."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

import wrenbox
from wrenbox.errors import CommandFailed
from wrenbox.images import Image, StepEvent, build_image, load_image
from wrenbox.images.manifest import MANIFEST

pytestmark = [pytest.mark.root, pytest.mark.slow]


def _debugfs(image: Path, request: str) -> str:
    return subprocess.run(
        ["debugfs", "-R", request, str(image)], capture_output=True, text=True, check=True
    ).stdout


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def test_kernel_version_is_recorded(guest_image: Image) -> None:
    kernel = guest_image.manifest.kernel
    show = subprocess.run(
        ["apt-cache", "show", "--no-all-versions", kernel.metapackage],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert f"{kernel.package} (= {kernel.version})" in show  # what the metapackage depends on
    assert kernel.release == kernel.package.removeprefix("linux-image-")
    # The file is that kernel: its embedded version string names the release.
    assert kernel.release.encode() in guest_image.kernel.read_bytes()[:0x10000]  # bzImage setup header


def test_manifest_hashes_match_the_files(guest_image: Image) -> None:
    files = guest_image.manifest.files
    assert set(files) == {"kernel", "initramfs", "rootfs"}
    for info in files.values():
        path = guest_image.path / info.name
        assert _sha256(path) == info.sha256
        assert path.stat().st_size == info.size
    guest_image.verify()
    assert (guest_image.path / MANIFEST).is_file()
    assert guest_image.manifest.agent_port == 49983


def test_rootfs_has_the_user_the_init_and_the_agent(guest_image: Image) -> None:
    rootfs = guest_image.rootfs
    assert "user:x:1000:1000::/home/user:/bin/bash" in _debugfs(rootfs, "cat /etc/passwd")
    assert "NOPASSWD" in _debugfs(rootfs, "cat /etc/sudoers.d/user")
    assert "/usr/local/bin/busybox" in _debugfs(rootfs, "stat /sbin/init")  # busybox init is PID 1
    inittab = _debugfs(rootfs, "cat /etc/inittab")
    assert "python3 -m wrenbox.guest --listen 0.0.0.0:49983" in inittab
    site = "/usr/local/lib/python3.11/dist-packages"
    main = _debugfs(rootfs, f"cat {site}/wrenbox/guest/__main__.py")
    assert main == (Path(wrenbox.__file__).parent / "guest/__main__.py").read_text()
    assert ".cpython-311.pyc" in _debugfs(rootfs, f"ls {site}/h11/__pycache__")  # precompiled
    assert "python3.11" in _debugfs(rootfs, "ls /usr/bin")
    # Not in the image: apt's package lists and the man pages (trimmed from the base layer).
    assert "Packages" not in _debugfs(rootfs, "ls /var/lib/apt/lists")


@pytest.fixture
def scratch_images(tmp_path: Path) -> Path:
    """An images dir of its own that shares the test cache's layers (so debootstrap is not repeated)."""
    return tmp_path / "images"


def _changed_agent(tmp_path: Path, marker: str) -> Path:
    copy = tmp_path / f"agent-{marker}" / "wrenbox"
    shutil.copytree(Path(wrenbox.__file__).parent, copy, ignore=shutil.ignore_patterns("__pycache__"))
    main = copy / "guest" / "__main__.py"
    main.write_text(main.read_text() + f"\n# {marker}\n")
    return copy


def test_an_agent_change_rebuilds_only_the_top_layer(
    guest_image: Image, scratch_images: Path, tmp_path: Path
) -> None:
    from tests.support.images import image_config

    config = image_config(images_dir=scratch_images, agent_source=_changed_agent(tmp_path, "change-1"))
    events: list[StepEvent] = []
    start = time.monotonic()
    result = build_image(config, "minimal", on_step=events.append)
    elapsed = time.monotonic() - start
    status = {e.step: e.status for e in events if e.status != "start"}
    assert status == {
        "resolve": "done",
        "kernel": "cached",
        "initramfs": "cached",
        "debootstrap": "cached",
        "rootfs": "done",
        "manifest": "done",
    }
    assert elapsed < 60, elapsed
    new, old = result.image.manifest, guest_image.manifest
    assert {k: new.layers[k] for k in ("kernel", "initramfs", "base")} == {
        k: old.layers[k] for k in ("kernel", "initramfs", "base")
    }
    assert new.layers["top"] != old.layers["top"]
    assert new.files["initramfs"].sha256 == old.files["initramfs"].sha256
    assert new.files["rootfs"].sha256 != old.files["rootfs"].sha256
    site = "/usr/local/lib/python3.11/dist-packages"
    assert "# change-1" in _debugfs(result.image.rootfs, f"cat {site}/wrenbox/guest/__main__.py")
    assert (scratch_images / "minimal").is_symlink()
    assert load_image(scratch_images, "minimal").path == result.image.path


def test_second_build_is_a_cache_hit(guest_image: Image, scratch_images: Path, tmp_path: Path) -> None:
    from tests.support.images import image_config

    # A frozen copy of the agent source: the checkout may change under a running test session.
    config = image_config(images_dir=scratch_images, agent_source=_changed_agent(tmp_path, "frozen"))
    first = build_image(config, "minimal")
    assert not first.cached
    events: list[StepEvent] = []
    start = time.monotonic()
    again = build_image(config, "minimal", on_step=events.append)
    elapsed = time.monotonic() - start
    assert again.cached
    assert again.image.path == first.image.path
    assert elapsed < 5.0, elapsed
    assert [e.step for e in events if e.status != "start"] == ["resolve"]  # nothing else ran
    forced = build_image(config, "minimal", force=True)
    assert not forced.cached
    assert forced.image.manifest.build_key == first.image.manifest.build_key


def test_a_failed_build_leaves_the_previous_image(scratch_images: Path, tmp_path: Path) -> None:
    from tests.support.images import image_config

    good = build_image(image_config(images_dir=scratch_images, agent_source=_changed_agent(tmp_path, "good")))
    # An unreachable mirror (nothing listens on port 9 here) makes the base layer fail quickly.
    bad = image_config(images_dir=scratch_images, mirror="http://127.0.0.1:9/debian")
    with pytest.raises(CommandFailed, match="debootstrap"):
        build_image(bad, "minimal")
    current = load_image(scratch_images, "minimal")
    assert current.path == good.image.path
    current.verify()
    cache = bad.cache_dir
    assert not list(cache.glob("*/.tmp-*"))  # no half-built layer
    assert not list((scratch_images / ".builds").glob(".tmp-*"))
    mounts = Path("/proc/self/mountinfo").read_text()
    assert str(cache) not in mounts
    assert str(scratch_images) not in mounts


def test_old_builds_are_pruned_beyond_keep(scratch_images: Path, tmp_path: Path) -> None:
    from tests.support.images import image_config

    paths = []
    for i in range(3):
        config = image_config(images_dir=scratch_images, agent_source=_changed_agent(tmp_path, f"gen-{i}"))
        paths.append(build_image(config).image.path)
        time.sleep(1.1)  # build directories are named by the second they were built in
    builds = sorted(p for p in (scratch_images / ".builds").iterdir())
    assert builds == paths[1:]  # keep_builds=2: the current and the one before
    assert load_image(scratch_images, "minimal").path == paths[-1]
    # A build that a process still has open (a VM's disk) is not pruned.
    with open(paths[1] / "rootfs.ext4", "rb"):
        time.sleep(1.1)
        config = image_config(images_dir=scratch_images, agent_source=_changed_agent(tmp_path, "gen-3"))
        newest = build_image(config).image.path
    assert sorted((scratch_images / ".builds").iterdir()) == [paths[1], paths[2], newest]


def test_cli_image_build_json(guest_image: Image) -> None:
    from tests.support.images import TEST_DATA_DIR
    from typer.testing import CliRunner

    from wrenbox.cli import app

    result = CliRunner().invoke(
        app, ["image", "build", "--json"], env={"WRENBOX_DATA_DIR": str(TEST_DATA_DIR)}
    )
    assert result.exit_code == 0, result.output
    manifest = json.loads(result.stdout)
    assert manifest["kernel"] == guest_image.manifest.kernel.model_dump()
    assert manifest["layers"]["base"] == guest_image.manifest.layers["base"]
    built = load_image(TEST_DATA_DIR / "images", "minimal")
    assert manifest["build_key"] == built.manifest.build_key
    assert "✓ resolve" in result.stderr  # progress goes to stderr when stdout carries JSON
