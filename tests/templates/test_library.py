"""The template library: what a build publishes, immutability, names, deletion, and a boot that fails."""

from __future__ import annotations

import shutil
import stat
from functools import partial
from pathlib import Path

import anyio
import pytest
from tests.templates.conftest import GUEST_MEMORY_MIB, processes_using

from wrenbox.errors import AlreadyExists, CorruptData, InvalidArgument, NotFound, Unavailable
from wrenbox.images import Image
from wrenbox.launch import LaunchConfig, Launcher
from wrenbox.network import Network
from wrenbox.rootfs import RootfsBackend
from wrenbox.templates import Template, TemplateBuilder, TemplateLibrary
from wrenbox.vmm.base import Snapshot

pytestmark = [pytest.mark.root, pytest.mark.vm, pytest.mark.slow]


def test_a_build_publishes_an_immutable_template(
    template: Template, library: TemplateLibrary, guest_image: Image, rootfs: RootfsBackend
) -> None:
    m = template.manifest
    assert (m.name, m.image, m.image_build_key) == ("minimal", "minimal", guest_image.manifest.build_key)
    assert (m.vcpus, m.memory_mib, m.disk_format) == (1, GUEST_MEMORY_MIB, "qcow2")
    assert (m.source, m.parent) == (None, None)
    assert m.agent_token is not None
    assert len(m.agent_token) >= 32  # the agent's bootstrap token: random, made for this build
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
    assert stat.S_IMODE((template.path / "manifest.json").stat().st_mode) == 0o400  # it holds the token
    assert anyio.run(rootfs.fingerprints.verify, template.rootfs_image()).path == template.rootfs

    assert [t.name for t in library.list()] == ["minimal"]
    assert not [p for p in library.root.iterdir() if p.name.startswith(".")]


def test_names_are_checked_before_anything_happens(
    template: Template,
    library: TemplateLibrary,
    builder: TemplateBuilder,
    guest_image: Image,
    network: Network,
) -> None:
    def build(name: str) -> None:
        anyio.run(partial(builder.build, name, guest_image, vcpus=1, memory_mib=GUEST_MEMORY_MIB))

    with pytest.raises(AlreadyExists, match="immutable"):
        build("minimal")
    for bad in ("", "../minimal", "a/b", ".hidden", "x" * 65):
        with pytest.raises(InvalidArgument, match="template name"):
            build(bad)
        with pytest.raises(InvalidArgument):
            library.get(bad)
    with pytest.raises(NotFound, match="template 'other' does not exist"):
        library.get("other")
    assert [t.name for t in library.list()] == ["minimal"]
    assert network.in_use() == frozenset()  # no slot was taken for any of them


def lookalike(template: Template, path: Path) -> None:
    """A template directory with the manifest and snapshot of ``template`` (enough to be listed)."""
    path.mkdir()
    shutil.copy(template.path / "manifest.json", path)
    shutil.copytree(template.path / "snapshot", path / "snapshot")


def test_delete_and_reclaim(template: Template, library: TemplateLibrary) -> None:
    lookalike(template, library.root / "copy")
    (library.root / ".build-half-1234").mkdir()
    (library.root / ".trash-gone-5678").mkdir()
    assert [t.name for t in library.list()] == ["copy", "minimal"]
    library.delete("copy")
    assert not (library.root / "copy").exists()
    assert [t.name for t in library.list()] == ["minimal"]
    with pytest.raises(NotFound):
        library.delete("copy")
    assert sorted(library.reclaim()) == [".build-half-1234", ".trash-gone-5678"]
    assert sorted(p.name for p in library.root.iterdir()) == ["minimal"]


def test_a_corrupt_template_is_refused(template: Template, library: TemplateLibrary) -> None:
    broken = library.root / "broken"
    lookalike(template, broken)
    try:
        (broken / "manifest.json").chmod(0o644)
        (broken / "manifest.json").write_text('{"name": "broken"}')
        with pytest.raises(CorruptData, match="unreadable manifest"):
            library.get("broken")
        meta = broken / "snapshot" / "snapshot.json"
        meta.write_text(meta.read_text().replace('"state_bytes"', '"state_bytes_"'))
        with pytest.raises(CorruptData, match="unreadable snapshot metadata"):
            Snapshot.load(broken / "snapshot")
    finally:
        shutil.rmtree(broken)


def test_a_boot_that_fails_says_why_and_leaves_nothing(
    template: Template,
    library: TemplateLibrary,
    launcher: Launcher,
    rootfs: RootfsBackend,
    guest_image: Image,
    network: Network,
    data_dir: Path,
) -> None:
    # An image whose initramfs has no such init: the kernel panics and QEMU exits (-no-reboot).
    args = [*guest_image.manifest.kernel_args, "rdinit=/no-such-init"]
    broken = Image(
        guest_image.name, guest_image.path, guest_image.manifest.model_copy(update={"kernel_args": args})
    )
    fast = Launcher(launcher.driver, LaunchConfig(boot_timeout_s=120))
    quick = TemplateBuilder(library, launcher=fast, rootfs=rootfs, network=network)
    build = partial(quick.build, "broken", broken, vcpus=1, memory_mib=GUEST_MEMORY_MIB)
    with pytest.raises(Unavailable, match=r"(?s)exited before its agent answered.*Kernel panic"):
        anyio.run(build)
    assert network.in_use() == frozenset()  # its slot went back to the pool
    assert [t.name for t in library.list()] == ["minimal"]
    assert not [p for p in library.root.iterdir() if p.name.startswith(".")]
    assert list((data_dir / "disks").iterdir()) == []
    assert processes_using(data_dir) == []
