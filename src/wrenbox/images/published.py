"""Published image builds on disk: ``<images_dir>/<name>`` is a symlink to an immutable build directory.

Publishing is an atomic symlink replace, so a reader sees the old build or the new one, never a mix.
Older builds are kept while a process still has one of their files open (a VM's kernel or disk).
"""

from __future__ import annotations

import contextlib
import secrets
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from wrenbox.errors import Conflict, CorruptData, NotFound
from wrenbox.fileio import publish
from wrenbox.images.cache import remove_tree
from wrenbox.images.manifest import MANIFEST, Manifest, file_info
from wrenbox.names import validate_name

__all__ = ["FILES", "Image", "current_image", "load_image", "make_current", "prune"]

FILES = {"kernel": "vmlinuz", "initramfs": "initramfs.cpio.gz", "rootfs": "rootfs.ext4"}


@dataclass(frozen=True, slots=True)
class Image:
    """A published image. ``path`` is the resolved, immutable build directory."""

    name: str
    path: Path
    manifest: Manifest

    @property
    def kernel(self) -> Path:
        return self.path / FILES["kernel"]

    @property
    def initramfs(self) -> Path:
        return self.path / FILES["initramfs"]

    @property
    def rootfs(self) -> Path:
        return self.path / FILES["rootfs"]

    def verify(self) -> None:
        """Re-hash every file; CorruptData if one differs from the manifest."""
        for role, expected in self.manifest.files.items():
            actual = file_info(self.path / expected.name)
            if actual.sha256 != expected.sha256 or actual.size != expected.size:
                raise CorruptData(f"image {self.name}: {role} {expected.name} does not match its manifest")


def load_image(images_dir: Path, name: str) -> Image:
    validate_name(name, what="image name")
    link = images_dir / name
    try:
        path = link.resolve(strict=True)
        manifest = Manifest.model_validate_json((path / MANIFEST).read_bytes())
    except FileNotFoundError:
        raise NotFound(f"image {name!r} is not built (wrenbox image build --name {name})") from None
    except ValidationError as exc:
        raise CorruptData(
            f"image {name!r}: unreadable {MANIFEST} in {path}: {exc.error_count()} errors"
        ) from None
    return Image(name, path, manifest)


def current_image(images_dir: Path, name: str) -> Image | None:
    try:
        image = load_image(images_dir, name)
    except (NotFound, CorruptData):
        return None  # rebuilt and published over
    for info in image.manifest.files.values():  # cheap check; verify() re-hashes
        path = image.path / info.name
        if not path.is_file() or path.stat().st_size != info.size:
            return None
    return image


def make_current(images_dir: Path, name: str, build: Path) -> None:
    """Point ``<images_dir>/<name>`` at ``build`` (an atomic symlink swap)."""
    link = images_dir / name
    if link.exists() and not link.is_symlink():
        raise Conflict(f"{link} is not a wrenbox-managed image link; move it away")
    tmp = images_dir / f".tmp-link-{name}-{secrets.token_hex(4)}"
    tmp.symlink_to(build.relative_to(images_dir))
    publish(tmp, link, replace=True)  # readers see the old build or the new one


def prune(builds: Path, name: str, *, keep: int, current: Path) -> None:
    """Remove builds of ``name`` beyond the newest ``keep`` (names sort by build time), except any that
    a running process (a VM using the kernel or the disk) still has open."""
    mine = sorted(p for p in builds.glob(f"{name}-*") if p.is_dir() and p.name.rsplit("-", 2)[0] == name)
    candidates = [old for old in mine[: max(0, len(mine) - keep)] if old != current]
    if not candidates:
        return
    in_use = _open_files()
    for old in candidates:
        prefix = f"{old.resolve()}/"
        if not any(path.startswith(prefix) for path in in_use):
            remove_tree(old)


def _open_files() -> set[str]:
    """Paths of the files open in any process on this host (the ones we are allowed to see)."""
    paths = set()
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        with contextlib.suppress(OSError):
            for fd in fd_dir.iterdir():
                with contextlib.suppress(OSError):
                    paths.add(str(fd.readlink()))
    return paths
