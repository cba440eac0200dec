"""Directory watches on inotify (through ctypes: no dependency, loaded only when first used).

A :class:`Watcher` follows one directory (and, when recursive, every directory below it, including
ones created later) and queues events named relative to its root. Streams read them as they come
(``WatchDir``); polling clients take them in batches (``CreateWatcher`` / ``GetWatcherEvents``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import secrets
import stat
import struct
from collections import deque
from dataclasses import dataclass
from typing import Literal, TypeAlias

from wrenbox.errors import InvalidArgument, NotFound, Unavailable

from .paths import error_from_os, safe_text

__all__ = ["Event", "EventKind", "Watcher", "Watchers"]

EventKind: TypeAlias = Literal["create", "write", "remove", "rename", "chmod"]

IN_MODIFY = 0x2
IN_ATTRIB = 0x4
IN_MOVED_FROM = 0x40
IN_MOVED_TO = 0x80
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_Q_OVERFLOW = 0x4000
IN_IGNORED = 0x8000
IN_ONLYDIR = 0x01000000
IN_DONT_FOLLOW = 0x02000000
IN_EXCL_UNLINK = 0x04000000
IN_ISDIR = 0x40000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC

WATCH_MASK = (
    (IN_MODIFY | IN_ATTRIB | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE | IN_DELETE_SELF)
    | IN_ONLYDIR
    | IN_DONT_FOLLOW
    | IN_EXCL_UNLINK
)
_HEADER = struct.Struct("iIII")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]


@dataclass(frozen=True, slots=True)
class Event:
    name: str  # relative to the watcher's root
    kind: EventKind


class Watcher:
    def __init__(self, root: str, recursive: bool, include_entry: bool, max_events: int) -> None:
        self.id = secrets.token_hex(8)
        self.root = root
        self.recursive = recursive
        self.include_entry = include_entry
        self._events: deque[Event] = deque(maxlen=max_events)
        self._wakeup = asyncio.Event()
        self._dirs: dict[int, str] = {}  # watch descriptor -> directory relative to root
        self._fd = _libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if self._fd < 0:
            raise Unavailable(f"cannot create an inotify instance: {os.strerror(ctypes.get_errno())}")
        self._loop = asyncio.get_running_loop()
        try:
            self._add_tree("", announce=False)
        except BaseException:
            os.close(self._fd)
            raise
        self._loop.add_reader(self._fd, self._read)

    async def next_events(self, timeout: float | None) -> list[Event]:
        """Queued events, waiting up to ``timeout`` seconds for the first; [] if none came."""
        if not self._events:
            self._wakeup.clear()
            try:
                async with asyncio.timeout(timeout):
                    await self._wakeup.wait()
            except TimeoutError:
                return []
        return self.take_events()

    def take_events(self) -> list[Event]:
        events = list(self._events)
        self._events.clear()
        return events

    def close(self) -> None:
        if self._fd >= 0:
            self._loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = -1

    def _add_tree(self, relative: str, *, announce: bool) -> None:
        """Watch ``relative`` (and below it when recursive); ``announce`` entries found as created."""
        self._add_watch(relative)
        if not self.recursive:
            return
        try:
            entries = list(os.scandir(os.path.join(self.root, relative)))
        except OSError:
            return
        for entry in entries:
            child = os.path.join(relative, entry.name) if relative else entry.name
            if announce:
                self._push(Event(child, "create"))
            if entry.is_dir(follow_symlinks=False):
                self._add_tree(child, announce=announce)

    def _add_watch(self, relative: str) -> None:
        path = os.path.join(self.root, relative) if relative else self.root
        wd = _libc.inotify_add_watch(self._fd, os.fsencode(path), WATCH_MASK)
        if wd < 0:
            err = ctypes.get_errno()
            if not relative:
                raise error_from_os(OSError(err, os.strerror(err)), path)
            if err == 28:  # ENOSPC: the per-user watch limit
                raise Unavailable("too many directories to watch (fs.inotify.max_user_watches)")
            return  # a subdirectory that vanished or is unreadable: skip it
        self._dirs[wd] = relative

    def _read(self) -> None:
        try:
            data = os.read(self._fd, 64 * 1024)
        except BlockingIOError:
            return
        offset = 0
        while offset + _HEADER.size <= len(data):
            wd, mask, _cookie, length = _HEADER.unpack_from(data, offset)
            raw_name = data[offset + _HEADER.size : offset + _HEADER.size + length].rstrip(b"\0")
            offset += _HEADER.size + length
            self._handle(wd, mask, os.fsdecode(raw_name))

    def _handle(self, wd: int, mask: int, name: str) -> None:
        if mask & IN_IGNORED:
            self._dirs.pop(wd, None)
            return
        if mask & IN_Q_OVERFLOW or wd not in self._dirs:
            return
        directory = self._dirs[wd]
        relative = os.path.join(directory, name) if name else directory
        if mask & IN_DELETE_SELF:
            if not directory:
                self._push(Event(relative or ".", "remove"))
            return
        kind = _kind(mask)
        if kind is None:
            return
        self._push(Event(relative, kind))
        if self.recursive and mask & IN_ISDIR and mask & (IN_CREATE | IN_MOVED_TO):
            # Out of watches: events from that subtree are lost; the rest keeps working.
            with contextlib.suppress(Unavailable):
                self._add_tree(relative, announce=True)

    def _push(self, event: Event) -> None:
        # A large write is a burst of IN_MODIFY: one event per burst is what clients want.
        if not (self._events and self._events[-1] == event):
            self._events.append(event)
        self._wakeup.set()


def _kind(mask: int) -> EventKind | None:
    if mask & (IN_CREATE | IN_MOVED_TO):
        return "create"
    if mask & IN_MODIFY:
        return "write"
    if mask & IN_DELETE:
        return "remove"
    if mask & IN_MOVED_FROM:
        return "rename"
    if mask & IN_ATTRIB:
        return "chmod"
    return None


class Watchers:
    """Every open watcher, by id; bounded so a forgetful client cannot exhaust inotify."""

    def __init__(self, max_watchers: int, max_events: int) -> None:
        self._max_watchers = max_watchers
        self._max_events = max_events
        self._by_id: dict[str, Watcher] = {}

    def open(self, path: str, recursive: bool, *, include_entry: bool = False) -> Watcher:
        try:
            mode = os.stat(path).st_mode
        except OSError as err:
            raise error_from_os(err, path) from None
        if not stat.S_ISDIR(mode):
            raise InvalidArgument(f"path {safe_text(path)!r} is not a directory")
        if len(self._by_id) >= self._max_watchers:
            raise Unavailable(f"too many open watchers ({self._max_watchers}); remove some first")
        watcher = Watcher(path, recursive, include_entry, self._max_events)
        self._by_id[watcher.id] = watcher
        return watcher

    def get(self, watcher_id: str) -> Watcher:
        try:
            return self._by_id[watcher_id]
        except KeyError:
            raise NotFound(f"no watcher with id {watcher_id!r}") from None

    def close(self, watcher: Watcher) -> None:
        self._by_id.pop(watcher.id, None)
        watcher.close()

    def close_all(self) -> None:
        for watcher in list(self._by_id.values()):
            self.close(watcher)
