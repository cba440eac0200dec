"""The ``filesystem.Filesystem`` Connect service: stat, list, create, move, remove and watch paths."""

from __future__ import annotations

import grp
import os
import pwd
import stat
from collections.abc import AsyncIterator, Iterator

from connectrpc.request import RequestContext
from protobuf import Oneof
from protobuf.wkt.google.protobuf.timestamp_pb import Timestamp

from wrenbox.errors import AlreadyExists, InvalidArgument, NotFound, PermissionDenied
from wrenbox.proto.filesystem import filesystem_pb as pb

from .agent import Agent
from .paths import ensure_dir, ensure_parent_dirs, error_from_os, resolve, safe_text
from .rpc import StreamClock, acting_user, connect_errors, deadline_error
from .watch import Event, EventKind, Watcher

__all__ = ["FilesystemService", "entry_info"]

METADATA_XATTR = b"user.e2b."
MAX_LIST_ENTRIES = 100_000  # a listing is one message; this bounds its size

_EVENT_TYPES: dict[EventKind, pb.EventType] = {
    "create": pb.EventType.CREATE,
    "write": pb.EventType.WRITE,
    "remove": pb.EventType.REMOVE,
    "rename": pb.EventType.RENAME,
    "chmod": pb.EventType.CHMOD,
}


class FilesystemService:
    def __init__(self, agent: Agent) -> None:
        self._agent = agent

    def _path(self, raw: str, ctx: RequestContext) -> str:
        return resolve(raw, acting_user(self._agent, ctx), self._agent.default_workdir)

    async def stat(self, request: pb.StatRequest, ctx: RequestContext) -> pb.StatResponse:
        with connect_errors(request.path):
            return pb.StatResponse(entry=entry_info(self._path(request.path, ctx)))

    async def make_dir(self, request: pb.MakeDirRequest, ctx: RequestContext) -> pb.MakeDirResponse:
        with connect_errors(request.path):
            user = acting_user(self._agent, ctx)
            path = resolve(request.path, user, self._agent.default_workdir)
            if ensure_dir(path, user):
                raise AlreadyExists(f"directory {safe_text(path)!r} already exists")
            return pb.MakeDirResponse(entry=entry_info(path))

    async def move(self, request: pb.MoveRequest, ctx: RequestContext) -> pb.MoveResponse:
        with connect_errors(request.source):
            user = acting_user(self._agent, ctx)
            source = resolve(request.source, user, self._agent.default_workdir)
            destination = resolve(request.destination, user, self._agent.default_workdir)
            if not os.path.lexists(source):
                raise NotFound(f"path {safe_text(source)!r} does not exist")
            ensure_parent_dirs(destination, user)
            try:
                os.rename(source, destination)
            except OSError as err:
                raise error_from_os(err, destination) from None
            return pb.MoveResponse(entry=entry_info(destination))

    async def list_dir(self, request: pb.ListDirRequest, ctx: RequestContext) -> pb.ListDirResponse:
        with connect_errors(request.path):
            path = self._path(request.path, ctx)
            try:
                st = os.stat(path)
            except OSError as err:
                raise error_from_os(err, path) from None
            if not stat.S_ISDIR(st.st_mode):
                raise InvalidArgument(f"path {safe_text(path)!r} is not a directory")
            entries = []
            for entry_path in _walk(path, max(request.depth, 1)):
                entries.append(entry_info(entry_path))
                if len(entries) >= MAX_LIST_ENTRIES:
                    raise InvalidArgument(f"more than {MAX_LIST_ENTRIES} entries: list with a smaller depth")
            return pb.ListDirResponse(entries=entries)

    async def remove(self, request: pb.RemoveRequest, ctx: RequestContext) -> pb.RemoveResponse:
        with connect_errors(request.path):
            path = self._path(request.path, ctx)
            try:
                if os.path.isdir(path) and not os.path.islink(path):
                    import shutil

                    shutil.rmtree(path)
                else:
                    os.unlink(path)
            except FileNotFoundError:
                pass  # as envd (os.RemoveAll): removing what is not there succeeds
            except OSError as err:
                raise error_from_os(err, err.filename or path) from None
            return pb.RemoveResponse()

    async def watch_dir(
        self, request: pb.WatchDirRequest, ctx: RequestContext
    ) -> AsyncIterator[pb.WatchDirResponse]:
        with connect_errors(request.path):
            path = self._path(request.path, ctx)
            watcher = self._agent.watchers.open(path, request.recursive)
        clock = StreamClock(ctx, self._agent.config.keepalive)
        try:
            yield pb.WatchDirResponse(event=Oneof("start", pb.WatchDirResponse.StartEvent()))
            while True:
                with connect_errors(path):
                    events = await watcher.next_events(clock.wait())
                if not events:
                    if clock.expired():
                        raise deadline_error("the watch has ended")
                    yield pb.WatchDirResponse(event=Oneof("keepalive", pb.WatchDirResponse.KeepAlive()))
                for event in events:
                    message = _event(watcher, event, request.include_entry)
                    yield pb.WatchDirResponse(event=Oneof("filesystem", message))
        finally:
            self._agent.watchers.close(watcher)

    async def create_watcher(
        self, request: pb.CreateWatcherRequest, ctx: RequestContext
    ) -> pb.CreateWatcherResponse:
        with connect_errors(request.path):
            path = self._path(request.path, ctx)
            watcher = self._agent.watchers.open(path, request.recursive, include_entry=request.include_entry)
            return pb.CreateWatcherResponse(watcher_id=watcher.id)

    async def get_watcher_events(
        self, request: pb.GetWatcherEventsRequest, ctx: RequestContext
    ) -> pb.GetWatcherEventsResponse:
        with connect_errors():
            watcher = self._agent.watchers.get(request.watcher_id)
            events = watcher.take_events()
            return pb.GetWatcherEventsResponse(
                events=[_event(watcher, e, watcher.include_entry) for e in events]
            )

    async def remove_watcher(
        self, request: pb.RemoveWatcherRequest, ctx: RequestContext
    ) -> pb.RemoveWatcherResponse:
        with connect_errors():
            self._agent.watchers.close(self._agent.watchers.get(request.watcher_id))
            return pb.RemoveWatcherResponse()


def _event(watcher: Watcher, event: Event, include_entry: bool) -> pb.FilesystemEvent:
    entry = None
    if include_entry and event.kind not in ("remove", "rename"):
        try:
            entry = entry_info(os.path.join(watcher.root, event.name))
        except (NotFound, InvalidArgument, OSError):
            entry = None  # gone again already
    return pb.FilesystemEvent(name=safe_text(event.name), type=_EVENT_TYPES[event.kind], entry=entry)


def _walk(root: str, depth: int) -> Iterator[str]:
    """Paths under ``root`` down to ``depth`` levels; symbolic links are listed, never followed."""
    try:
        with os.scandir(root) as it:
            children = sorted(it, key=lambda e: e.name)
    except OSError as err:
        raise error_from_os(err, root) from None
    for child in children:
        yield child.path
        if depth > 1 and child.is_dir(follow_symlinks=False):
            try:
                yield from _walk(child.path, depth - 1)
            except (NotFound, InvalidArgument, PermissionDenied):
                continue  # removed meanwhile or unreadable: list what can be listed


def entry_info(path: str) -> pb.EntryInfo:
    """EntryInfo of ``path`` itself (a symbolic link is described, with its target's type)."""
    try:
        st = os.lstat(path)
    except OSError as err:
        raise error_from_os(err, path) from None
    is_link = stat.S_ISLNK(st.st_mode)
    target = None
    kind_mode = st.st_mode
    if is_link:
        try:
            target = os.path.normpath(os.path.join(os.path.dirname(path), os.readlink(path)))
            kind_mode = os.stat(path).st_mode
        except OSError:  # dangling link or a loop: describe the link itself
            kind_mode = st.st_mode
    return pb.EntryInfo(
        name=safe_text(os.path.basename(path) or path),
        type=_file_type(kind_mode),
        path=safe_text(path),
        size=st.st_size,
        mode=stat.S_IMODE(st.st_mode),
        permissions=stat.filemode(st.st_mode),
        owner=_owner(st.st_uid),
        group=_group(st.st_gid),
        modified_time=Timestamp(
            seconds=st.st_mtime_ns // 1_000_000_000, nanos=st.st_mtime_ns % 1_000_000_000
        ),
        symlink_target=safe_text(target) if target is not None else None,
        metadata=_metadata(path) if not is_link else {},
        is_symlink=is_link,
    )


def _file_type(mode: int) -> pb.FileType:
    if stat.S_ISDIR(mode):
        return pb.FileType.DIRECTORY
    if stat.S_ISLNK(mode):
        return pb.FileType.SYMLINK
    return pb.FileType.FILE


def _owner(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _metadata(path: str) -> dict[str, str]:
    try:
        names = os.listxattr(path)
    except OSError:
        return {}
    metadata = {}
    for name in names:
        raw = name.encode("utf-8", "surrogateescape")
        if raw.startswith(METADATA_XATTR):
            try:
                metadata[safe_text(name[len(METADATA_XATTR) :])] = os.getxattr(path, name).decode(
                    "utf-8", "replace"
                )
            except OSError:
                continue
    return metadata
