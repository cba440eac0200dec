"""The template library: a data dir's template directories; reading, publishing (through drafts),
deleting, and reclaiming what a crash left.

A template is written as a :class:`Draft` under a temporary name and published in one rename when the
``draft``/``derive`` block succeeds; nothing else in wrenbox knows a template's file names.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio
from pydantic import BaseModel, ConfigDict, ValidationError

from wrenbox.errors import AlreadyExists, CorruptData, InvalidArgument, NotFound
from wrenbox.fileio import clone_or_copy, fsync_path, publish
from wrenbox.images import Image
from wrenbox.names import validate_name
from wrenbox.rootfs import BaseImage
from wrenbox.vmm.base import Snapshot

__all__ = ["Draft", "Template", "TemplateLibrary", "TemplateManifest"]

MANIFEST = "manifest.json"
SNAPSHOT_DIR = "snapshot"
MEMORY = "memory"
ROOTFS = "rootfs.ext4"
_BUILD_PREFIX = ".build-"
_TRASH_PREFIX = ".trash-"


class TemplateManifest(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    format: int = 1
    name: str
    created_at: datetime
    image: str
    image_build_key: str
    kernel_release: str
    vcpus: int
    memory_mib: int
    disk_format: str
    rootfs: BaseImage  # fingerprint of rootfs.ext4 (its path as it was at build time)
    memory_allocated: int  # bytes of guest RAM on disk (the rest are holes: never touched or freed)
    memory_sha256: str  # nothing may ever write to the RAM file of a template; this proves it
    state_bytes: int
    timings: dict[str, float]
    # Made from a sandbox: which one, and the template that sandbox came from.
    source: str | None = None
    parent: str | None = None
    # The token the guest agent in this template's memory demands: a random bootstrap token baked at the
    # build, or the token of the sandbox it was made from. It authenticates the first /init of every
    # sandbox restored from it, which gives that sandbox's agent a token of its own. Never shown: the
    # manifest is root's only. None: a template from before bootstrap tokens (its agent takes any /init).
    agent_token: str | None = None


@dataclass(frozen=True, slots=True)
class Template:
    """A published template directory (immutable)."""

    name: str
    path: Path
    manifest: TemplateManifest

    @property
    def memory(self) -> Path:
        return self.path / MEMORY

    @property
    def rootfs(self) -> Path:
        return self.path / ROOTFS

    def rootfs_image(self) -> BaseImage:
        """The recorded fingerprint of :attr:`rootfs`, for creating sandbox disks without re-hashing it."""
        return self.manifest.rootfs.model_copy(update={"path": self.rootfs})

    def snapshot(self) -> Snapshot:
        return Snapshot.load(self.path / SNAPSHOT_DIR)

    def copy_memory(self, dest: Path) -> None:
        """Give a VM its own copy of the template's RAM at ``dest`` (which must not exist): a reflink
        where the filesystem can, else a kernel copy of the data extents, holes kept. Blocking.

        A VM never maps the template's file itself, not even privately: QEMU 7.2 punches holes into a
        ``share=off`` backing file when the guest frees memory, which would change the template under
        every other VM made from it (seen in this project's tests).
        """
        if dest.exists():
            raise AlreadyExists(f"{dest} exists; a VM's RAM file must be new")
        clone_or_copy(self.memory, dest)

    def size_bytes(self) -> int:
        """Bytes the template's files occupy on disk."""
        return sum(p.stat().st_blocks * 512 for p in self.path.rglob("*") if p.is_file())


@dataclass(slots=True)
class Draft:
    """A template being written. Whoever builds it fills :attr:`memory` (guest RAM at the snapshot),
    :attr:`snapshot_dir` (the VMM's snapshot) and :attr:`rootfs` (the flattened root disk), and sets
    :attr:`rootfs_image` to the fingerprint the flatten returned; the library publishes it when the block
    ends. :attr:`template` is the published template afterwards."""

    name: str
    path: Path
    origin: dict[str, Any]  # image, kernel and machine: the image's (a build) or the parent's (derived)
    rootfs_image: BaseImage | None = None
    agent_token: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    template: Template | None = None

    @property
    def memory(self) -> Path:
        return self.path / MEMORY

    @property
    def rootfs(self) -> Path:
        return self.path / ROOTFS

    @property
    def snapshot_dir(self) -> Path:
        return self.path / SNAPSHOT_DIR


class TemplateLibrary:
    """The published templates in ``root``: reading them needs no VMM."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def get(self, name: str) -> Template:
        path = self.root / validate_name(name, what="template name")
        try:
            raw = (path / MANIFEST).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"template {name!r} does not exist") from None
        try:
            return Template(name, path, TemplateManifest.model_validate_json(raw))
        except ValidationError as exc:
            raise CorruptData(f"template {name!r}: unreadable manifest: {exc}") from exc

    def exists(self, name: str) -> bool:
        return (self.root / validate_name(name, what="template name")).exists()

    def holding_token(self, token: str) -> list[str]:
        """The templates whose agent demands ``token`` (an unreadable manifest is skipped, not fatal)."""
        found = []
        for path in self._dirs():
            try:
                manifest = self.get(path.name).manifest
            except CorruptData:
                continue
            if manifest.agent_token is not None and hmac.compare_digest(manifest.agent_token, token):
                found.append(path.name)
        return found

    def _dirs(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return [p for p in sorted(self.root.iterdir()) if p.is_dir() and not p.name.startswith(".")]

    def list(self) -> list[Template]:
        return [self.get(p.name) for p in self._dirs()]

    def draft(
        self, name: str, image: Image, *, vcpus: int, memory_mib: int, disk_format: str
    ) -> AsyncIterator[Draft]:
        """A draft of template ``name`` booted from ``image`` on a machine of ``vcpus`` / ``memory_mib``."""
        origin = {
            "image": image.name,
            "image_build_key": image.manifest.build_key,
            "kernel_release": image.manifest.kernel.release,
            "vcpus": vcpus,
            "memory_mib": memory_mib,
            "disk_format": disk_format,
        }
        return self._draft(name, origin)

    def derive(self, name: str, parent: Template, *, source: str) -> AsyncIterator[Draft]:
        """A draft of template ``name`` made from sandbox ``source`` of template ``parent``: the same
        image, kernel and machine, new memory and disk."""
        m = parent.manifest
        origin = {
            "image": m.image,
            "image_build_key": m.image_build_key,
            "kernel_release": m.kernel_release,
            "vcpus": m.vcpus,
            "memory_mib": m.memory_mib,
            "disk_format": m.disk_format,
            "source": source,
            "parent": parent.name,
        }
        return self._draft(name, origin)

    @asynccontextmanager
    async def _draft(self, name: str, origin: dict[str, Any]) -> AsyncIterator[Draft]:
        """Write template ``name`` inside the block; it is published, complete, when the block ends
        without error (AlreadyExists if the name was taken meanwhile), and nothing is left otherwise."""
        validate_name(name, what="template name")
        if self.exists(name):
            raise AlreadyExists(f"template {name!r} already exists; templates are immutable")
        self.root.mkdir(parents=True, exist_ok=True)
        draft = Draft(name, self.root / f"{_BUILD_PREFIX}{name}-{secrets.token_hex(4)}", origin)
        draft.path.mkdir()
        draft.snapshot_dir.mkdir()
        try:
            yield draft
            draft.template = await self._seal(draft)
        finally:
            await anyio.to_thread.run_sync(shutil.rmtree, draft.path, True)

    async def _seal(self, draft: Draft) -> Template:
        if draft.rootfs_image is None:
            raise InvalidArgument(f"template draft {draft.name}: its root disk was never written")
        snapshot = Snapshot.load(draft.snapshot_dir)
        manifest = TemplateManifest(
            name=draft.name,
            created_at=datetime.now().astimezone(),
            rootfs=draft.rootfs_image,
            memory_allocated=draft.memory.stat().st_blocks * 512,
            memory_sha256=await anyio.to_thread.run_sync(_sha256, draft.memory),
            state_bytes=snapshot.meta.state_bytes,
            timings=draft.timings,
            agent_token=draft.agent_token,
            **draft.origin,
        )
        await anyio.to_thread.run_sync(self._publish, draft.path, manifest)
        return self.get(draft.name)

    def _publish(self, build: Path, manifest: TemplateManifest) -> None:
        """Manifest last, files read-only, then one rename: the template appears complete or not at all.
        Root alone reads them (a template made from a sandbox holds a tenant's memory and disk); a VMM
        that reads the root disk is let in through its group (:func:`wrenbox.vmm.jail.grant_read`)."""
        (build / MANIFEST).write_text(manifest.model_dump_json(indent=1))
        _give_to_root(build)  # the builder VM's VMM owned its RAM file and run directory
        for path in (build / MEMORY, build / ROOTFS, build / MANIFEST):
            path.chmod(0o400)
        try:
            publish(build, self.root / manifest.name)
        except AlreadyExists:
            raise AlreadyExists(
                f"template {manifest.name!r} already exists; templates are immutable"
            ) from None

    def delete(self, name: str) -> None:
        """Remove template ``name``. Whether anything still uses it is the caller's to check first."""
        path = self.get(name).path
        trash = self.root / f"{_TRASH_PREFIX}{name}-{secrets.token_hex(4)}"
        path.rename(trash)  # gone from listings at once, even if the removal below is interrupted
        fsync_path(self.root)
        shutil.rmtree(trash)

    def reclaim(self) -> list[str]:
        """Remove what interrupted builds and deletions left (run at start, when no build is running)."""
        if not self.root.is_dir():
            return []
        stale = [p for p in self.root.iterdir() if p.name.startswith((_BUILD_PREFIX, _TRASH_PREFIX))]
        for path in stale:
            shutil.rmtree(path, ignore_errors=True)
        return [p.name for p in stale]


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _give_to_root(tree: Path) -> None:
    for path in (tree, *tree.rglob("*")):
        if path.lstat().st_uid != 0:
            os.lchown(path, 0, 0)
