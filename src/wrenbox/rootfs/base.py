"""The copy-on-write root disk interface, the disk record, and base-image fingerprints.

A *base image* is a raw filesystem image that wrenbox never writes to. A *disk* is one sandbox's
writable view of a base image, at least as large as the base (the guest grows its filesystem online).
Every backend turns ``create(base, disk_id, size)`` into a :class:`Disk` record that the manager
persists; the record is all a later ``persist`` / ``restore`` / ``flatten`` / ``remove`` / ``reclaim``
needs, in this process or after a restart.

Base images are fingerprinted at create: size, inode, mtime and a SHA-256 content digest (see
:func:`wrenbox.rootfs.sparse.content_digest`; it skips holes, so a sparse 5 GiB image costs what its data
costs). ``restore`` checks the cheap part first and re-hashes only when it differs, so an image that was
modified is refused with :class:`~wrenbox.errors.CorruptData` instead of corrupting the disks built on it.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import os
import stat
from collections.abc import AsyncIterator, Awaitable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from wrenbox.command import Completed, arun
from wrenbox.errors import AlreadyExists, CommandFailed, CorruptData, InvalidArgument, NotFound
from wrenbox.fileio import publish, temp_sibling
from wrenbox.names import validate_name
from wrenbox.rootfs.sparse import content_digest
from wrenbox.vmm.base import DiskFormat, Drive

__all__ = [
    "MAX_DISK_SIZE",
    "SECTOR",
    "BaseImage",
    "Disk",
    "DiskFormat",
    "Fingerprints",
    "RootfsBackend",
    "RootfsConfig",
    "Runner",
]

SECTOR = 512
MAX_DISK_SIZE = 64 << 40  # far beyond any sandbox; catches unit mistakes (MiB passed as bytes, ...)


class Runner(Protocol):
    """How backends run host programs: :func:`wrenbox.command.arun` (tests inject a recording fake)."""

    def __call__(
        self,
        argv: Sequence[str],
        *,
        input: bytes | None = None,
        timeout: float | None = ...,
        check: bool = ...,
    ) -> Awaitable[Completed]: ...


@dataclass(frozen=True, slots=True)
class RootfsConfig:
    """Where disks live and how patient device teardown is.

    ``disks_dir`` holds every per-sandbox file (overlays, clones, CoW stores). For ``reflink`` it must
    be on the same xfs/btrfs filesystem as the base images. ``image_roots`` are directories whose
    files are base images wrenbox owns: read-only loop devices on them are reclaimed when unused.
    """

    disks_dir: Path
    image_roots: tuple[Path, ...] = ()
    dm_prefix: str = "wrenbox-"
    remove_attempts: int = 5
    remove_retry_delay: float = 0.2
    command_timeout: float = 60.0
    flatten_timeout: float = 3600.0

    def __post_init__(self) -> None:
        # Records store absolute paths: a later change of working directory must not move disks.
        object.__setattr__(self, "disks_dir", absolute(self.disks_dir))
        object.__setattr__(self, "image_roots", tuple(absolute(r) for r in self.image_roots))
        if self.remove_attempts < 1 or self.remove_retry_delay < 0:
            raise InvalidArgument("remove_attempts must be >= 1 and remove_retry_delay >= 0")
        if not self.dm_prefix or "/" in self.dm_prefix or "@" in self.dm_prefix:
            raise InvalidArgument(f"invalid dm_prefix {self.dm_prefix!r}")


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class BaseImage(_Record):
    """Identity of a base image: where it is, what it contains, and a cheap change detector."""

    path: Path
    size: int = Field(gt=0)
    digest: str = Field(pattern=r"^sha256-blocks64k:[0-9a-f]{64}$")
    device: int
    inode: int
    mtime_ns: int

    def same_file_as(self, st: os.stat_result) -> bool:
        """The fast path: nothing that writing to or replacing the file would change has changed."""
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) == (
            self.device,
            self.inode,
            self.size,
            self.mtime_ns,
        )


class Disk(_Record):
    """A sandbox's root disk, as persisted by the manager (``model_dump_json`` / :meth:`from_json`).

    ``path`` is what the VMM opens, in ``format``; ``store`` is the file holding the sandbox's own
    data (the same file for qcow2/reflink/copy, the CoW store behind a dm device for dmsnapshot).
    """

    backend: str
    id: str
    path: Path
    format: DiskFormat
    store: Path
    size: int = Field(gt=0)
    base: BaseImage

    @classmethod
    def from_json(cls, text: str | bytes) -> Disk:
        try:
            return cls.model_validate_json(text)
        except ValidationError as exc:
            raise CorruptData(f"unreadable disk record: {exc}") from exc

    def drive(self) -> Drive:
        """The disk as a VM sees it: a virtio block device on :attr:`path`, in :attr:`format`."""
        backing = self.base.path if self.format is DiskFormat.QCOW2 else None
        return Drive(self.path, self.format, backing=backing)


@dataclass(slots=True)
class Fingerprints:
    """Computes base-image fingerprints, hashing each file version once per process."""

    _known: dict[tuple[int, int, int, int], str] = field(default_factory=dict)

    async def of(self, path: Path) -> BaseImage:
        """Fingerprint the base image at ``path`` (NotFound / InvalidArgument when it is not one)."""
        path = absolute(path)
        st = _stat_image(path)
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        digest = self._known.get(key)
        if digest is None:
            digest = await asyncio.to_thread(content_digest, path)
            self._known[key] = digest
        return BaseImage(
            path=path,
            size=st.st_size,
            digest=digest,
            device=st.st_dev,
            inode=st.st_ino,
            mtime_ns=st.st_mtime_ns,
        )

    async def verify(self, base: BaseImage) -> BaseImage:
        """Check ``base`` still holds what it held when recorded; CorruptData if it changed.

        Returns the record with the current inode/mtime (a byte-identical copy put in its place
        passes the full hash and is accepted).
        """
        st = _stat_image(base.path)
        if base.same_file_as(st):
            return base
        current = await self.of(base.path)
        if current.digest != base.digest or current.size != base.size:
            raise CorruptData(
                f"base image {base.path} changed since the disk was created "
                f"(size {base.size} -> {current.size}, digest {base.digest} -> {current.digest}); "
                f"disks built on it cannot be used"
            )
        return current


def absolute(path: str | os.PathLike[str]) -> Path:
    """``path`` made absolute against the working directory (symlinks kept, no I/O)."""
    return Path(path).absolute()


def _stat_image(path: Path) -> os.stat_result:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise NotFound(f"base image {path} does not exist") from None
    if not stat.S_ISREG(st.st_mode):
        raise InvalidArgument(f"base image {path} is not a regular file")
    if st.st_size == 0 or st.st_size % SECTOR:
        raise InvalidArgument(f"base image {path} has size {st.st_size}; expected a multiple of {SECTOR}")
    return st


def check_size(size: int | None, base: BaseImage) -> int:
    """The disk size for ``base``: ``size`` when valid, the base's size when None."""
    if size is None:
        return base.size
    if isinstance(size, bool) or not isinstance(size, int):
        raise InvalidArgument(f"disk size must be an integer number of bytes, not {size!r}")
    if size < base.size:
        raise InvalidArgument(f"disk size {size} is smaller than its base image ({base.size} bytes)")
    if size % SECTOR:
        raise InvalidArgument(f"disk size {size} is not a multiple of {SECTOR} bytes")
    if size > MAX_DISK_SIZE:
        raise InvalidArgument(f"disk size {size} exceeds the maximum of {MAX_DISK_SIZE} bytes")
    return size


@contextlib.asynccontextmanager
async def atomic_output(dest: Path) -> AsyncIterator[Path]:
    """A temporary path beside ``dest``; when the block succeeds it becomes ``dest``, complete and durable.

    AlreadyExists if ``dest`` exists (images are immutable, never overwritten). On failure, or if the
    block leaves nothing at the temporary path, the temporary is removed and ``dest`` never appears.
    """
    dest = absolute(dest)
    if not dest.parent.is_dir():
        raise NotFound(f"directory {dest.parent} does not exist")
    if dest.exists() or dest.is_symlink():
        raise AlreadyExists(f"{dest} already exists")
    tmp = temp_sibling(dest)
    try:
        yield tmp
        await asyncio.to_thread(publish, tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


class RootfsBackend(abc.ABC):
    """One copy-on-write strategy. Methods are safe to call again after a crash (idempotent)."""

    name: ClassVar[str]
    format: ClassVar[DiskFormat]

    def __init__(
        self,
        config: RootfsConfig,
        *,
        runner: Runner = arun,
        fingerprints: Fingerprints | None = None,
    ) -> None:
        self.config = config
        self._runner = runner
        self.fingerprints = fingerprints or Fingerprints()

    @abc.abstractmethod
    async def create(self, base: Path | BaseImage, disk_id: str, size: int | None = None) -> Disk:
        """A new disk of ``size`` bytes (default: the base's size) showing ``base``'s content.

        ``base`` is a path (fingerprinted here) or a :class:`BaseImage` recorded earlier (verified).
        AlreadyExists if ``disk_id`` has a disk; on failure nothing is left behind.
        """

    @abc.abstractmethod
    async def persist(self, disk: Disk) -> Disk:
        """Make the disk durable and independent of the VM process (called on pause, VM stopped)."""

    @abc.abstractmethod
    async def restore(self, disk: Disk) -> Disk:
        """Make a persisted disk usable again at ``disk.path`` (on resume), after verifying its base."""

    @abc.abstractmethod
    async def flatten(self, disk: Disk, dest: Path) -> BaseImage:
        """Write the disk's merged content to ``dest`` as a standalone sparse raw image (templates).

        The disk must not be in use by a VM. ``dest`` appears only complete (atomically).
        """

    @abc.abstractmethod
    async def remove(self, disk: Disk) -> None:
        """Release everything the disk holds and delete its data. Removing twice is fine."""

    @abc.abstractmethod
    async def reclaim(self, in_use: Iterable[Disk]) -> list[str]:
        """After a crash: release this backend's disks and devices not in ``in_use``; say what went."""

    # Checkpoints ----------------------------------------------------------------------------------
    # A resume continues the VM before it can know the resume succeeded; if it then fails (or the host
    # dies), the sandbox goes back to its paused memory, and its disk must go back too, or the guest's
    # page cache and its filesystem disagree. So a resume checkpoints the disk first.

    @abc.abstractmethod
    async def checkpoint(self, disk: Disk) -> None:
        """Remember the disk's content now (no VM may be using it); replaces an older checkpoint."""

    @abc.abstractmethod
    async def revert(self, disk: Disk) -> None:
        """Put the disk back to its checkpoint and forget the checkpoint (no VM may be using the disk).
        Without a checkpoint, nothing happens."""

    @abc.abstractmethod
    async def drop_checkpoint(self, disk: Disk) -> None:
        """Forget the checkpoint, keeping the disk as it is now. Idempotent."""

    # Shared helpers -----------------------------------------------------------------------------

    async def _base(self, base: Path | BaseImage) -> BaseImage:
        if isinstance(base, BaseImage):
            return await self.fingerprints.verify(base)
        return await self.fingerprints.of(base)

    def _check_id(self, disk_id: str) -> str:
        return validate_name(disk_id, what="disk id")

    def _check_own(self, disk: Disk) -> None:
        if disk.backend != self.name:
            raise InvalidArgument(
                f"disk {disk.id} belongs to the {disk.backend!r} backend, not {self.name!r}"
            )
        self._check_id(disk.id)

    async def _try(
        self, argv: Sequence[str], *, input: bytes | None = None, timeout: float | None = None
    ) -> Completed:
        """Run a command whose failure the caller interprets (exit status, stderr)."""
        timeout = timeout or self.config.command_timeout
        return await self._runner(argv, input=input, timeout=timeout, check=False)

    async def _run(
        self, argv: Sequence[str], *, input: bytes | None = None, timeout: float | None = None
    ) -> Completed:
        """Run a command; CommandFailed (with its stderr) when it exits non-zero."""
        done = await self._try(argv, input=input, timeout=timeout)
        if done.returncode != 0:
            raise CommandFailed(argv, done.returncode, done.stderr.decode(errors="replace"))
        return done
