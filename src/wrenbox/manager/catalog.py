"""The template rows: the one road by which templates enter, change in and leave the store.

A template enters as a ``building`` row (which also reserves its name), is made by the runtime — built
from an image, or derived from a sandbox by a snapshot or a fork — and becomes ``ready`` with the facts of
its files; a failure drops the row. A template belongs to a team (``team``) or, built by the operator,
to nobody: then every team may use it, and only the operator may delete it. A team asking for another
team's template gets NotFound, as if it did not exist. At start, :meth:`TemplateCatalog.sync` brings the
rows in line with the template files the runtime finds (a build a crash interrupted after publishing is
finished, one interrupted before is dropped, files without a row are registered). Each change happens
under the template's lock and is written to the event log.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

import anyio

from wrenbox.errors import AlreadyExists, InUse, NotFound, PermissionDenied
from wrenbox.manager.store import Store
from wrenbox.names import validate_name
from wrenbox.records import TemplateRecord, TemplateState
from wrenbox.runtime.base import Runtime

__all__ = ["TemplateCatalog"]

log = logging.getLogger(__name__)
T = TemplateState


class TemplateCatalog:
    """Template rows of one manager. ``admission`` is the manager's lock around inserting new sandboxes:
    a deletion checks that nothing uses the template under it, so no create slips in between."""

    def __init__(self, store: Store, runtime: Runtime, *, admission: anyio.Lock) -> None:
        self._store = store
        self._runtime = runtime
        self._admission = admission
        self._locks: dict[str, anyio.Lock] = {}

    def list(self, team: str | None = None) -> list[TemplateRecord]:
        """The templates ``team`` may use: its own and the operator's (every one for the operator)."""
        return [t for t in self._store.list_templates() if _visible(t, team)]

    def get(self, name: str, team: str | None = None) -> TemplateRecord:
        template = self._store.get_template(validate_name(name, what="template name"))
        if not _visible(template, team):
            raise NotFound(f"template {name} not found")  # the store's words: nothing tells it exists
        return template

    def ready(self, name: str, team: str | None = None) -> TemplateRecord:
        """Template ``name`` if ``team`` may start sandboxes from it now; NotFound otherwise."""
        template = self.get(name, team)
        if template.state is not T.READY:
            raise NotFound(f"template {name} is {template.state.value}, not ready")
        return template

    def lock(self, name: str) -> anyio.Lock:
        return self._locks.setdefault(validate_name(name, what="template name"), anyio.Lock())

    def check_free(self, name: str) -> None:
        try:
            self.get(name)
        except NotFound:
            return
        raise AlreadyExists(f"a template named {name} already exists")

    def begin(
        self,
        name: str,
        *,
        kind: str,
        vcpus: int,
        memory_mb: int,
        source: str | None = None,
        parent: str | None = None,
        team: str | None = None,
    ) -> TemplateRecord:
        """Reserve ``name`` with a ``building`` row (AlreadyExists if it is taken); caller holds its lock."""
        self.check_free(name)
        row = TemplateRecord(
            name=name,
            kind=kind,
            path="",
            vcpus=vcpus,
            memory_mb=memory_mb,
            source=source,
            parent=parent,
            team=team,
        )
        self._store.insert_template(row)
        return row

    def abandon(self, name: str) -> None:
        """The template was not made: drop its row."""
        self._store.delete_template(name)

    def finish(self, row: TemplateRecord, built: TemplateRecord, *, event: str) -> TemplateRecord:
        """The runtime published ``row``'s files (described by ``built``): the template is ready."""
        row.path, row.size_bytes, row.created_at = built.path, built.size_bytes, built.created_at
        row.vcpus, row.memory_mb, row.disk_mb = built.vcpus, built.memory_mb, built.disk_mb
        row.state = T.READY
        self._store.save_template(row)
        self._store.record_event(event, row.source, template=row.name, template_kind=row.kind)
        return row

    async def build(
        self,
        name: str,
        *,
        image: str,
        vcpus: int,
        memory_mb: int,
        disk_mb: int,
        on_step: Callable[[str], None] | None = None,
        team: str | None = None,
    ) -> TemplateRecord:
        validate_name(name, what="template name")
        validate_name(image, what="image name")
        self.check_free(name)  # at once, rather than after a build of that name
        async with self.lock(name):
            row = self.begin(name, kind="base", vcpus=vcpus, memory_mb=memory_mb, source=image, team=team)
            try:
                built = await self._runtime.build_template(
                    name, image=image, vcpus=vcpus, memory_mb=memory_mb, disk_mb=disk_mb, on_step=on_step
                )
            except BaseException:  # cancelled too
                self.abandon(name)
                raise
            return self.finish(row, built, event="template_created")

    async def delete(self, name: str, team: str | None = None) -> None:
        """Delete template ``name``, which ``team`` must own (the operator may delete any)."""
        async with self.lock(name):
            template = self.get(name, team)
            if team is not None and template.team is None:
                raise PermissionDenied(f"template {name} is the operator's; only the operator deletes it")
            async with self._admission:
                users = self._store.template_users(name)
                if users:
                    raise InUse(f"template {name} is in use by {', '.join(users[:5])}")
                if template.state is T.BUILDING:
                    raise InUse(f"template {name} is being built")
                template.state = T.DELETING
                self._store.save_template(template)
            await self._runtime.delete_template(name)
            self._store.delete_template(name)
            self._store.record_event("template_deleted", None, template=name)

    async def sync(self) -> None:
        """At start (after the sandboxes are settled): rows follow the published files on disk; a
        half-built template is never listed."""
        on_disk = {t.name: t for t in self._runtime.list_templates()}
        for row in self._store.list_templates():
            found = on_disk.pop(row.name, None)
            if row.state is T.DELETING:  # a deletion was interrupted: finish it
                await self._runtime.delete_template(row.name)
                self._store.delete_template(row.name)
                self._store.record_event("template_deleted", None, template=row.name)
            elif found is not None and row.state is T.BUILDING:  # published, then interrupted
                self.finish(row, found, event="template_created")
            elif found is None and row.state is T.READY and self._store.template_users(row.name):
                log.error("template %s is in use but its files are gone", row.name)
            elif found is None:
                self.abandon(row.name)
        for found in on_disk.values():  # files without a row (built by an older wrenbox, copied in)
            with contextlib.suppress(AlreadyExists):
                self._store.insert_template(found)
                self._store.record_event("template_registered", None, template=found.name)


def _visible(template: TemplateRecord, team: str | None) -> bool:
    return team is None or template.team in (None, team)
