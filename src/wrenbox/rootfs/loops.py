"""Loop devices for dm-snapshot disks: the ``losetup`` command lines, and the shared base-image registry.

Every dm-snapshot disk needs its base image as a read-only block device. One loop device per base image
is shared by all disks on it and counted by *holder* (a disk id), so acquiring or releasing twice for the
same holder changes nothing. The kernel is the source of truth: a base image that already has a
read-only loop (from an earlier run of wrenbox) is found again with ``losetup --associated`` and adopted
instead of attaching another one, so a restart leaks nothing.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from wrenbox.command import Completed
from wrenbox.errors import CommandFailed, WrenboxError

__all__ = ["LoopDevice", "LoopRegistry", "Losetup", "parse_losetup_json"]

log = logging.getLogger(__name__)

_COLUMNS = "NAME,BACK-FILE,RO"
_DELETED = " (deleted)"


@dataclass(frozen=True, slots=True)
class LoopDevice:
    device: str
    backing_file: str
    read_only: bool


def parse_losetup_json(text: str) -> list[LoopDevice]:
    """Parse ``losetup --list --json --output NAME,BACK-FILE,RO`` (empty output: no devices)."""
    if not text.strip():
        return []
    loops = []
    for entry in json.loads(text).get("loopdevices", []):
        backing = entry.get("back-file") or ""
        if backing.endswith(_DELETED):
            backing = backing.removesuffix(_DELETED)
        # util-linux prints booleans in JSON; older releases printed "0"/"1".
        ro = entry.get("ro")
        loops.append(LoopDevice(entry["name"], backing, ro is True or ro in (1, "1")))
    return loops


class Losetup:
    """The losetup command lines wrenbox uses, run through the backend's command runner."""

    def __init__(self, run: Callable[[Sequence[str]], Awaitable[Completed]]) -> None:
        self._run = run

    async def _parse(self, argv: list[str]) -> list[LoopDevice]:
        done = await self._run(argv)
        try:
            return parse_losetup_json(done.text)
        except (ValueError, KeyError, AttributeError) as exc:
            raise CommandFailed(argv, 0, f"unexpected output {done.text[:200]!r}: {exc}") from exc

    async def list_all(self) -> list[LoopDevice]:
        return await self._parse(["losetup", "--list", "--json", "--output", _COLUMNS])

    async def associated(self, file: Path) -> list[LoopDevice]:
        """The loop devices whose backing file is ``file`` (compared by inode, like ``losetup -j``)."""
        return await self._parse(
            ["losetup", "--list", "--json", "--output", _COLUMNS, "--associated", str(file)]
        )

    async def attach(self, file: Path, *, read_only: bool) -> str:
        argv = ["losetup", *(["--read-only"] if read_only else []), "--find", "--show", str(file)]
        device = (await self._run(argv)).text.strip()
        if not device.startswith("/dev/loop"):
            raise CommandFailed(argv, 0, f"unexpected output {device!r}")
        return device

    async def detach(self, device: str) -> None:
        await self._run(["losetup", "--detach", device])


@dataclass(slots=True)
class _Shared:
    device: str
    holders: set[str] = field(default_factory=set)


class LoopRegistry:
    """Read-only loop devices of base images, shared by the disks built on each image."""

    def __init__(self, losetup: Losetup) -> None:
        self._losetup = losetup
        self._images: dict[str, _Shared] = {}
        self._lock = asyncio.Lock()

    async def acquire(self, image: Path, holder: str) -> str:
        """The read-only loop device of ``image``, now also held by ``holder``."""
        key = _key(image)
        async with self._lock:
            shared = self._images.get(key)
            if shared is None:
                existing = [lo for lo in await self._losetup.associated(image) if lo.read_only]
                if existing:
                    device = existing[0].device
                    log.info("adopting existing loop device %s for %s", device, image)
                else:
                    device = await self._losetup.attach(image, read_only=True)
                shared = self._images[key] = _Shared(device)
            shared.holders.add(holder)
            return shared.device

    async def release(self, image: Path, holder: str) -> None:
        """``holder`` no longer needs ``image``; the last holder's release detaches the loop device."""
        key = _key(image)
        async with self._lock:
            shared = self._images.get(key)
            if shared is None or holder not in shared.holders:
                return
            shared.holders.discard(holder)
            if shared.holders:
                return
            del self._images[key]
            try:
                await self._losetup.detach(shared.device)
            except WrenboxError as exc:
                # Detaching fails only while something still uses the device; reclaim retries it.
                log.warning("could not detach loop device %s of %s: %s", shared.device, image, exc)

    def device_of(self, image: Path) -> str | None:
        shared = self._images.get(_key(image))
        return shared.device if shared else None

    def holders_of(self, image: Path) -> frozenset[str]:
        shared = self._images.get(_key(image))
        return frozenset(shared.holders) if shared else frozenset()


def _key(image: Path) -> str:
    # losetup reports canonical paths; so does the registry, whatever path a record holds
    return os.path.realpath(image)
