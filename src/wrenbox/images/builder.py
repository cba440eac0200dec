"""``wrenbox image build``: kernel + initramfs + rootfs.ext4 + manifest.json under ``<images_dir>/<name>``.

Every input is hashed into a layer key; a build reuses every layer whose key is unchanged, and when the
image's own key is unchanged it does nothing at all. Changing the agent's source therefore rebuilds only
the top layer (copy of the base tree + agent + mkfs: seconds), not the debootstrap base (a minute).

On disk::

    images/
      minimal -> .builds/minimal-20250101T120000-3f2a9c01     the published build (a symlink)
      .builds/minimal-…/{vmlinuz, initramfs.cpio.gz, rootfs.ext4, manifest.json}   immutable
      .cache/{kernel,base,initramfs,debs}/…                   layers (see wrenbox.images.cache)

A build is written to a temp dir, fsync'd and renamed; the name is then switched to it by an atomic
symlink replace. A failed build leaves the previous image untouched. Older builds stay for a while (a
sandbox's disk may still be based on one) and are pruned beyond ``keep_builds``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from wrenbox.command import require_tool
from wrenbox.errors import MissingTool
from wrenbox.fileio import publish
from wrenbox.images import initramfs, kernel, rootfs
from wrenbox.images.agent import GuestPackages, guest_packages
from wrenbox.images.cache import LayerCache, exclusive_lock, remove_tree
from wrenbox.images.manifest import MANIFEST, KernelInfo, Manifest, file_info
from wrenbox.images.published import FILES, Image, current_image, make_current, prune
from wrenbox.names import validate_name

__all__ = [
    "AGENT_PORT",
    "DEFAULT_MODULES",
    "IMAGE_PACKAGES",
    "BuildResult",
    "ImageConfig",
    "StepEvent",
    "build_image",
]

AGENT_PORT = 49983
# What the initramfs loads: the virtio-mmio transport (microvm and Firecracker have no PCI), the root
# disk, the NIC, entropy and the balloon (free page reporting). ext4 is built into Debian's kernel.
DEFAULT_MODULES = ("virtio_mmio", "virtio_blk", "virtio_net", "virtio_rng", "virtio_balloon", "ext4")
BASE_KERNEL_ARGS = ("console=ttyS0", "reboot=t", "panic=-1", "quiet")
# Bump when the code that assembles a layer changes in a way its inputs do not show.
_INITRAMFS_REVISION = 1
_TOP_REVISION = 2
_REQUIRED_TOOLS = ("apt-get", "apt-cache", "dpkg-deb", "depmod", "debootstrap", "mkfs.ext4", "chroot", "cp")


# What a named image holds beyond ``ImageConfig.packages``. ``base`` is E2B's default template: what
# E2B's own tests and users' code expect to find (bash, coreutils, python3 and ``python``, pip, curl, git
# with ``git daemon``, ``ps``/``pgrep``, ``ss``, ``tput``, CA certificates, passwordless sudo for ``user``).
IMAGE_PACKAGES: dict[str, tuple[str, ...]] = {
    "minimal": (),
    "base": (
        "bash",
        "coreutils",
        "curl",
        "git",
        "iproute2",
        "ncurses-bin",
        "procps",
        "python-is-python3",
        "python3-pip",
        "python3-venv",
    ),
}


@dataclass(frozen=True, slots=True)
class ImageConfig:
    images_dir: Path
    cache_dir: Path
    suite: str = "bookworm"
    mirror: str = "http://deb.debian.org/debian"
    packages: tuple[str, ...] = ("python3", "sudo", "e2fsprogs", "ca-certificates")  # in every image
    kernel_package: str = "linux-image-cloud-amd64"
    modules: tuple[str, ...] = DEFAULT_MODULES
    busybox: Path = Path("/bin/busybox")  # Debian busybox-static
    headroom_mib: int = 128  # free space in rootfs.ext4; a sandbox's disk may be larger still
    keep_builds: int = 2  # the current build and the one before it
    agent_source: Path | None = None  # the wrenbox package to install in the guest; default: this one


@dataclass(frozen=True, slots=True)
class StepEvent:
    step: str
    status: Literal["start", "done", "cached"]
    seconds: float = 0.0


OnStep = Callable[[StepEvent], None]


@dataclass(frozen=True, slots=True)
class BuildResult:
    image: Image
    cached: bool  # nothing was built: the published image already had this build key
    timings: dict[str, float] = field(default_factory=dict)


def build_image(
    config: ImageConfig, name: str = "minimal", *, force: bool = False, on_step: OnStep | None = None
) -> BuildResult:
    """Build (or reuse) image ``name``. MissingTool names the Debian package of anything missing."""
    validate_name(name, what="image name")
    for tool in _REQUIRED_TOOLS:
        require_tool(tool)
    _check_static(config.busybox)
    steps = _Steps(on_step)
    builds = config.images_dir / ".builds"
    with steps.step("resolve"):
        inputs = _Inputs.gather(config, name)
    # Publishing is an atomic symlink switch, so an up-to-date image can be recognised without the lock.
    current = current_image(config.images_dir, name)
    if current is not None and not force and current.manifest.build_key == inputs.build_key:
        return BuildResult(current, cached=True, timings=steps.timings)
    with exclusive_lock(config.images_dir / ".lock"), exclusive_lock(config.cache_dir / ".lock"):
        cache = LayerCache(config.cache_dir)
        cache.remove_stale()
        for stale in builds.glob(".tmp-*"):
            remove_tree(stale)
        for link in config.images_dir.glob(".tmp-link-*"):
            link.unlink()
        current = current_image(config.images_dir, name)  # another builder may have finished meanwhile
        if current is not None and not force and current.manifest.build_key == inputs.build_key:
            return BuildResult(current, cached=True, timings=steps.timings)
        builds.mkdir(parents=True, exist_ok=True)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
        final = builds / f"{name}-{stamp}-{inputs.build_key[:8]}"
        tmp = builds / f".tmp-{name}-{secrets.token_hex(4)}"
        tmp.mkdir()
        try:
            manifest = _build(config, name, inputs, cache, tmp, steps)
            publish(tmp, final)
        finally:
            if tmp.exists():
                remove_tree(tmp)
        make_current(config.images_dir, name, final)
        prune(builds, name, keep=config.keep_builds, current=final)
    return BuildResult(Image(name, final, manifest), cached=False, timings=steps.timings)


@dataclass(frozen=True, slots=True)
class _Inputs:
    """Everything a build depends on, and the keys derived from it."""

    kernel: kernel.KernelPackage
    recipe: rootfs.BaseRecipe
    packages: GuestPackages
    base_key: str
    initramfs_key: str
    top_key: str
    build_key: str

    @classmethod
    def gather(cls, config: ImageConfig, name: str) -> _Inputs:
        pkg = kernel.resolve_kernel(config.kernel_package)
        wanted = set(config.packages) | set(IMAGE_PACKAGES.get(name, ()))
        recipe = rootfs.BaseRecipe(config.suite, config.mirror, tuple(sorted(wanted)))
        packages = guest_packages(wrenbox_dir=config.agent_source)
        busybox = _sha256(config.busybox.read_bytes())
        base_key = _key(recipe.suite, recipe.mirror, recipe.packages, recipe.revision)
        init_key = _key(
            pkg.cache_key, config.modules, rootfs.guest_file("init.sh"), busybox, _INITRAMFS_REVISION
        )
        top_key = _key(
            base_key,
            packages.digest,
            rootfs.guest_file("rc.sh"),
            rootfs.guest_file("inittab"),
            busybox,
            config.headroom_mib,
            _TOP_REVISION,
        )
        build_key = _key(pkg.cache_key, init_key, top_key, BASE_KERNEL_ARGS)
        return cls(pkg, recipe, packages, base_key, init_key, top_key, build_key)


def _build(
    config: ImageConfig, name: str, inputs: _Inputs, cache: LayerCache, out: Path, steps: _Steps
) -> Manifest:
    with steps.step("kernel") as s:
        tree, s.cached = kernel.fetch_kernel(cache, inputs.kernel)
        shutil.copyfile(tree.vmlinuz, out / FILES["kernel"])
    modules = initramfs.resolve_modules(tree.modules_dir, config.modules)
    with steps.step("initramfs") as s:
        layer = cache.get("initramfs", inputs.initramfs_key)
        s.cached = layer is not None
        if layer is None:
            with cache.building("initramfs", inputs.initramfs_key) as tmp:
                initramfs.build_initramfs(
                    tmp / FILES["initramfs"],
                    busybox=config.busybox,
                    modules_dir=tree.modules_dir,
                    modules=modules,
                    init_script=rootfs.guest_file("init.sh"),
                )
            layer = cache.root / "initramfs" / inputs.initramfs_key
        shutil.copyfile(layer / FILES["initramfs"], out / FILES["initramfs"])
    with steps.step("debootstrap") as s:
        base, s.cached = rootfs.build_base(cache, inputs.base_key, inputs.recipe)
    with steps.step("rootfs"):
        stage = out / "stage"
        try:
            rootfs.build_rootfs(
                base,
                out / FILES["rootfs"],
                stage=stage,
                busybox=config.busybox,
                packages=inputs.packages,
                headroom_mib=config.headroom_mib,
            )
        finally:
            if stage.exists():
                remove_tree(stage)
    with steps.step("manifest"):
        manifest = Manifest(
            name=name,
            build_key=inputs.build_key,
            created_at=datetime.now(UTC),
            kernel=KernelInfo(
                metapackage=config.kernel_package,
                package=inputs.kernel.name,
                version=inputs.kernel.version,
                release=inputs.kernel.release,
                deb_sha256=tree.deb_sha256,
            ),
            files={role: file_info(out / fname) for role, fname in FILES.items()},
            modules=[m.rsplit("/", 1)[-1] for m in modules],
            layers={
                "kernel": inputs.kernel.cache_key,
                "initramfs": inputs.initramfs_key,
                "base": inputs.base_key,
                "top": inputs.top_key,
            },
            suite=config.suite,
            packages=list(inputs.recipe.packages),
            guest_python=inputs.packages.versions,
            kernel_args=list(BASE_KERNEL_ARGS),
            agent_port=AGENT_PORT,
            timings=steps.timings,
        )
        (out / MANIFEST).write_text(manifest.model_dump_json(indent=2) + "\n")
    return manifest


def _check_static(busybox: Path) -> None:
    """The initramfs has no libc: busybox must be the static build."""
    if not busybox.is_file():
        raise MissingTool(str(busybox), "busybox-static")
    if not initramfs.is_static_executable(busybox):
        raise MissingTool(f"{busybox} (statically linked)", "busybox-static")


class _Steps:
    def __init__(self, on_step: OnStep | None) -> None:
        self.on_step = on_step or (lambda event: None)
        self.timings: dict[str, float] = {}

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[_StepState]:
        state = _StepState()
        self.on_step(StepEvent(name, "start"))
        start = time.monotonic()
        yield state
        seconds = time.monotonic() - start
        self.timings[name] = round(seconds, 3)
        self.on_step(StepEvent(name, "cached" if state.cached else "done", seconds))


@dataclass
class _StepState:
    cached: bool = False


def _key(*parts: object) -> str:
    h = hashlib.sha256()
    for part in parts:
        data = part if isinstance(part, bytes) else json.dumps(part, sort_keys=True).encode()
        h.update(len(data).to_bytes(8, "little") + data)
    return h.hexdigest()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
