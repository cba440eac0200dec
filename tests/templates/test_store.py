"""The template store: what a build publishes, immutability, names, deletion, and a boot that fails."""

from __future__ import annotations

import shutil
import stat
from dataclasses import replace
from pathlib import Path

import anyio
import pytest
from tests.templates.conftest import processes_using

from wrenbox.errors import AlreadyExists, CorruptData, InvalidArgument, NotFound, Unavailable
from wrenbox.images import Image
from wrenbox.network import Network
from wrenbox.rootfs import RootfsBackend
from wrenbox.templates import Template, Templates
from wrenbox.vmm.base import Snapshot

pytestmark = [pytest.mark.root, pytest.mark.vm, pytest.mark.slow]


def test_a_build_publishes_an_immutable_template(
    template: Template, templates: Templates, guest_image: Image, rootfs: RootfsBackend
) -> None:
    m = template.manifest
    assert (m.name, m.image, m.image_build_key) == ("minimal", "minimal", guest_image.manifest.build_key)
    assert (m.vcpus, m.memory_mib, m.disk_format) == (1, templates.config.memory_mib, "qcow2")
    assert m.kernel_release == guest_image.manifest.kernel.release
    assert set(m.timings) >= {"disk", "boot", "flatten"}

    snapshot = template.snapshot()
    assert snapshot.meta.pinned["memory_mib"] == m.memory_mib
    assert snapshot.meta.state_bytes == m.state_bytes < 1 << 20
    # Free page reporting keeps the RAM file near what the guest uses, far below its size.
    size = template.memory.stat().st_size
    assert size == m.memory_mib << 20
    assert 0 < m.memory_allocated < size * 0.8

    for path in (template.memory, template.rootfs, template.path / "manifest.json"):
        assert stat.S_IMODE(path.stat().st_mode) & 0o222 == 0, f"{path} is writable"
    assert anyio.run(rootfs.fingerprints.verify, template.rootfs_image()).path == template.rootfs

    assert [t.name for t in templates.store.list()] == ["minimal"]
    assert not [p for p in templates.store.root.iterdir() if p.name.startswith(".")]


def test_names_are_checked_before_anything_happens(
    template: Template, templates: Templates, guest_image: Image, network: Network
) -> None:
    slot = network.slot(9)  # never created: a build that got past the checks would fail on it
    with pytest.raises(AlreadyExists, match="immutable"):
        anyio.run(templates.build, "minimal", guest_image, slot)
    for bad in ("", "../minimal", "a/b", ".hidden", "x" * 65):
        with pytest.raises(InvalidArgument, match="template name"):
            anyio.run(templates.build, bad, guest_image, slot)
        with pytest.raises(InvalidArgument):
            templates.store.get(bad)
    with pytest.raises(NotFound, match="wrenbox template build other"):
        templates.store.get("other")
    assert [t.name for t in templates.store.list()] == ["minimal"]


def lookalike(template: Template, path: Path) -> None:
    """A template directory with the manifest and snapshot of ``template`` (enough to be listed)."""
    path.mkdir()
    shutil.copy(template.path / "manifest.json", path)
    shutil.copytree(template.path / "snapshot", path / "snapshot")


def test_delete_and_reclaim(template: Template, templates: Templates) -> None:
    lookalike(template, templates.store.root / "copy")
    (templates.store.root / ".build-half-1234").mkdir()
    (templates.store.root / ".trash-gone-5678").mkdir()
    assert [t.name for t in templates.store.list()] == ["copy", "minimal"]
    templates.store.delete("copy")
    assert not (templates.store.root / "copy").exists()
    assert [t.name for t in templates.store.list()] == ["minimal"]
    with pytest.raises(NotFound):
        templates.store.delete("copy")
    assert sorted(templates.store.reclaim()) == [".build-half-1234", ".trash-gone-5678"]
    assert sorted(p.name for p in templates.store.root.iterdir()) == ["minimal"]


def test_a_corrupt_template_is_refused(template: Template, templates: Templates) -> None:
    broken = templates.store.root / "broken"
    lookalike(template, broken)
    try:
        (broken / "manifest.json").chmod(0o644)
        (broken / "manifest.json").write_text('{"name": "broken"}')
        with pytest.raises(CorruptData, match="unreadable manifest"):
            templates.store.get("broken")
        meta = broken / "snapshot" / "snapshot.json"
        meta.write_text(meta.read_text().replace('"state_bytes"', '"state_bytes_"'))
        with pytest.raises(CorruptData, match="unreadable snapshot metadata"):
            Snapshot.load(broken / "snapshot")
    finally:
        shutil.rmtree(broken)


def test_a_boot_that_fails_says_why_and_leaves_nothing(
    template: Template, templates: Templates, guest_image: Image, network: Network, data_dir: Path
) -> None:
    # An image whose initramfs has no such init: the kernel panics and QEMU exits (-no-reboot).
    args = [*guest_image.manifest.kernel_args, "rdinit=/no-such-init"]
    broken = Image(
        guest_image.name, guest_image.path, guest_image.manifest.model_copy(update={"kernel_args": args})
    )
    fast = Templates(
        replace(templates.config, boot_timeout_s=120), driver=templates.driver, rootfs=templates.rootfs
    )

    async def build() -> None:
        slot = network.slot(10)
        await network.create(slot)
        try:
            await fast.build("broken", broken, slot)
        finally:
            await network.remove(slot)

    with pytest.raises(Unavailable, match=r"(?s)exited before its agent answered.*Kernel panic"):
        anyio.run(build)
    assert [t.name for t in templates.store.list()] == ["minimal"]
    assert not [p for p in templates.store.root.iterdir() if p.name.startswith(".")]
    assert list((data_dir / "disks").iterdir()) == []
    assert processes_using(data_dir) == []
