"""What the envd client returns: plain frozen records, independent of the wire messages."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from wrenbox.proto.filesystem import filesystem_pb
from wrenbox.proto.process import process_pb

__all__ = [
    "EntryInfo",
    "ExecResult",
    "Exited",
    "FileType",
    "Metrics",
    "ProcessEvent",
    "ProcessInfo",
    "PtyOutput",
    "Started",
    "Stderr",
    "Stdout",
    "WatchEvent",
    "WatchEventType",
    "WriteInfo",
]


@dataclass(frozen=True, slots=True)
class Started:
    pid: int


@dataclass(frozen=True, slots=True)
class Stdout:
    data: bytes


@dataclass(frozen=True, slots=True)
class Stderr:
    data: bytes


@dataclass(frozen=True, slots=True)
class PtyOutput:
    data: bytes


@dataclass(frozen=True, slots=True)
class Exited:
    """The process ended. ``exit_code`` is -1 when it was killed by a signal; ``error`` says why."""

    exit_code: int
    error: str | None = None


ProcessEvent = Started | Stdout | Stderr | PtyOutput | Exited
"""One event of a process stream, in the order the agent saw them."""


@dataclass(frozen=True, slots=True)
class ExecResult:
    """A finished command. Output beyond the cap was dropped and the matching flag set."""

    pid: int
    exit_code: int
    stdout: bytes
    stderr: bytes
    duration: float
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


@dataclass(frozen=True, slots=True)
class ProcessInfo:
    pid: int
    tag: str | None
    cmd: str
    args: tuple[str, ...]
    envs: dict[str, str]
    cwd: str | None

    @classmethod
    def from_pb(cls, info: process_pb.ProcessInfo) -> ProcessInfo:
        config = info.config or process_pb.ProcessConfig()
        return cls(
            pid=info.pid,
            tag=info.tag,
            cmd=config.cmd,
            args=tuple(config.args),
            envs=dict(config.envs),
            cwd=config.cwd,
        )


class FileType(enum.StrEnum):
    FILE = "file"
    DIRECTORY = "directory"
    SYMLINK = "symlink"
    UNKNOWN = "unknown"


_FILE_TYPES = {
    filesystem_pb.FileType.FILE: FileType.FILE,
    filesystem_pb.FileType.DIRECTORY: FileType.DIRECTORY,
    filesystem_pb.FileType.SYMLINK: FileType.SYMLINK,
}


@dataclass(frozen=True, slots=True)
class EntryInfo:
    """A path in the guest, as ``lstat`` sees it (a symlink is reported as one, with its target)."""

    name: str
    path: str
    type: FileType
    size: int
    mode: int
    permissions: str
    owner: str
    group: str
    modified_time: datetime | None
    symlink_target: str | None

    @classmethod
    def from_pb(cls, entry: filesystem_pb.EntryInfo) -> EntryInfo:
        return cls(
            name=entry.name,
            path=entry.path,
            type=_FILE_TYPES.get(entry.type, FileType.UNKNOWN),
            size=entry.size,
            mode=entry.mode,
            permissions=entry.permissions,
            owner=entry.owner,
            group=entry.group,
            modified_time=entry.modified_time.to_datetime() if entry.modified_time else None,
            symlink_target=entry.symlink_target,
        )


class WatchEventType(enum.StrEnum):
    CREATE = "create"
    WRITE = "write"
    REMOVE = "remove"
    RENAME = "rename"
    CHMOD = "chmod"
    UNKNOWN = "unknown"


_EVENT_TYPES = {
    filesystem_pb.EventType.CREATE: WatchEventType.CREATE,
    filesystem_pb.EventType.WRITE: WatchEventType.WRITE,
    filesystem_pb.EventType.REMOVE: WatchEventType.REMOVE,
    filesystem_pb.EventType.RENAME: WatchEventType.RENAME,
    filesystem_pb.EventType.CHMOD: WatchEventType.CHMOD,
}


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """A change under a watched directory; ``name`` is relative to it."""

    name: str
    type: WatchEventType

    @classmethod
    def from_pb(cls, event: filesystem_pb.FilesystemEvent) -> WatchEvent:
        return cls(name=event.name, type=_EVENT_TYPES.get(event.type, WatchEventType.UNKNOWN))


@dataclass(frozen=True, slots=True)
class WriteInfo:
    """A file written by an upload."""

    name: str
    path: str

    @classmethod
    def from_json(cls, data: Any) -> WriteInfo:
        return cls(name=str(data.get("name", "")), path=str(data.get("path", "")))


@dataclass(frozen=True, slots=True)
class Metrics:
    """The guest's resource use, as the agent sampled it."""

    timestamp: int
    cpu_count: int
    cpu_used_pct: float
    mem_total: int
    mem_used: int
    disk_total: int
    disk_used: int

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Metrics:
        return cls(
            timestamp=int(data.get("ts", 0)),
            cpu_count=int(data.get("cpu_count", 0)),
            cpu_used_pct=float(data.get("cpu_used_pct", 0.0)),
            mem_total=int(data.get("mem_total", 0)),
            mem_used=int(data.get("mem_used", 0)),
            disk_total=int(data.get("disk_total", 0)),
            disk_used=int(data.get("disk_used", 0)),
        )
