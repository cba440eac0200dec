"""Every lifecycle operation of the manager on real VMs: create (restore, cold boot), destroy, pause,
resume, snapshot into a template, create from it, delete it, fork."""

from __future__ import annotations

import pytest

from wrenbox.config import Settings
from wrenbox.errors import AlreadyExists, InUse, InvalidArgument, NotFound, NotRunning
from wrenbox.manager import CreateRequest, SandboxManager
from wrenbox.names import new_sandbox_id
from wrenbox.records import SandboxState, TemplateState
from wrenbox.service import Host, ensure_template, open_manager

from .conftest import leftovers
from .guest import (
    Contents,
    agent_status,
    counter,
    process_tags,
    run,
    start_counter,
    upload,
    vm_cmdline,
)

pytestmark = [pytest.mark.anyio, pytest.mark.vm, pytest.mark.root]
S = SandboxState
RUNNING_HOLDS = {"slot", "disk", "memory", "vm"}
PAUSED_HOLDS = {"disk", "snapshot"}


def _name(prefix: str) -> str:
    return f"{prefix}-{new_sandbox_id()[:6]}"


async def test_create_restores_the_template_and_destroy_is_idempotent(
    manager: SandboxManager, settings: Settings
) -> None:
    template = manager.template("minimal")
    sb = await manager.create(CreateRequest(metadata={"owner": "t1"}, env={"GREETING": "hello there"}))
    assert sb.state is S.RUNNING
    assert sb.host_ip is not None
    assert (sb.template, sb.vcpus, sb.memory_mb) == ("minimal", template.vcpus, template.memory_mb)
    assert set(sb.resources) == RUNNING_HOLDS
    assert "-incoming" in vm_cmdline(manager, sb.id)  # restored from the template's snapshot, not booted
    assert await run(manager, sb.id, "echo $GREETING; id -un") == "hello there\nuser\n"

    await manager.destroy(sb.id)
    await manager.destroy(sb.id)
    gone = manager.get(sb.id)
    assert gone.state is S.DESTROYED
    assert gone.resources == {}
    assert gone.host_ip is None
    assert leftovers(settings) == {}
    with pytest.raises(NotFound):
        await manager.exec(sb.id, "true")
    with pytest.raises(NotFound):
        await manager.destroy(new_sandbox_id())


async def test_cold_boot_boots_the_image(manager: SandboxManager, settings: Settings) -> None:
    sb = await manager.create(CreateRequest(cold_boot=True, env={"MODE": "cold"}))
    assert sb.state is S.RUNNING
    assert set(sb.resources) == RUNNING_HOLDS
    argv = vm_cmdline(manager, sb.id)
    assert "-kernel" in argv
    assert "-incoming" not in argv
    assert await run(manager, sb.id, "echo $MODE") == "cold\n"
    # A booted VM pauses, resumes and forks like a restored one.
    contents = Contents.random(256 * 1024)
    await contents.write(manager, sb.id)
    await manager.pause(sb.id)
    await manager.resume(sb.id)
    assert await contents.check(manager, sb.id) == []
    [child] = await manager.fork(sb.id, 1)
    assert await contents.check(manager, child.id) == []
    assert await run(manager, child.id, "echo $MODE") == "cold\n"
    await manager.destroy(child.id)
    await manager.destroy(sb.id)
    assert leftovers(settings) == {}


async def test_pause_and_resume_keep_everything_but_the_address(
    host: Host, manager: SandboxManager, settings: Settings
) -> None:
    req = CreateRequest(
        metadata={"k": "v", "team": "core"}, env={"SECRET": "s3"}, timeout_s=900, on_timeout="kill"
    )
    sb = await manager.create(req)
    await upload(manager, sb.id, "/home/user/note.txt", b"kept\n")

    paused = await manager.pause(sb.id)
    assert paused.state is S.PAUSED
    assert paused.host_ip is None
    assert set(paused.resources) == PAUSED_HOLDS
    left = leftovers(settings)
    assert set(left) == {"sandbox dirs", "disks"}, (
        f"a paused sandbox holds only its disk and snapshot: {left}"
    )
    with pytest.raises(NotRunning):
        await manager.exec(sb.id, "true")
    with pytest.raises(NotRunning):
        await manager.pause(sb.id)

    resumed = await manager.resume(sb.id)
    assert resumed.state is S.RUNNING
    assert resumed.host_ip is not None
    # the snapshot: the parent of the next pause's diff; the checkpoint: the disk as it was at the pause
    assert set(resumed.resources) == RUNNING_HOLDS | {"snapshot", "checkpoint"}
    kept = ("template", "vcpus", "memory_mb", "metadata", "env", "created_at", "timeout_s", "on_timeout")
    assert {k: getattr(resumed, k) for k in kept} == {k: getattr(sb, k) for k in kept}
    assert {k: getattr(host.store.get_sandbox(sb.id), k) for k in kept} == {k: getattr(sb, k) for k in kept}
    assert await run(manager, sb.id, "echo $SECRET; cat /home/user/note.txt") == "s3\nkept\n"
    assert [await agent_status(resumed, t) for t in (sb.access_token, None)] == [200, 401]
    assert await manager.resume(sb.id) == manager.get(sb.id)  # resuming a running sandbox changes nothing
    await manager.destroy(sb.id)
    assert leftovers(settings) == {}


async def test_snapshots_become_templates(manager: SandboxManager, settings: Settings) -> None:
    source = await manager.create(CreateRequest(env={"FROM": "source"}))
    contents = Contents.random(256 * 1024)
    await contents.write(manager, source.id)
    await start_counter(manager, source.id)

    # A running sandbox: it keeps running (and keeps counting) while and after it is snapshotted.
    running_tpl = await manager.snapshot(source.id, _name("snap-run"))
    assert manager.get(source.id).state is S.RUNNING
    assert "counter" in await process_tags(manager, source.id)
    assert (running_tpl.kind, running_tpl.state, running_tpl.parent) == (
        "snapshot",
        TemplateState.READY,
        "minimal",
    )
    assert running_tpl.source == source.id
    assert running_tpl.size_bytes > 0
    assert not list(settings.templates_dir.glob(".build-*"))
    with pytest.raises(AlreadyExists):
        await manager.snapshot(source.id, running_tpl.name)
    with pytest.raises(InvalidArgument):
        await manager.snapshot(source.id, "../escape")

    # A sandbox from it has the data, memory (the process) included.
    child = await manager.create(CreateRequest(template=running_tpl.name))
    assert child.template == running_tpl.name
    # The template's memory holds the source's agent token; the child's agent took a token of its own.
    assert child.access_token != source.access_token
    tokens = (child.access_token, source.access_token, None)
    assert [await agent_status(child, t) for t in tokens] == [200, 401, 401]
    assert await contents.check(manager, child.id) == []
    assert "counter" in await process_tags(manager, child.id)
    with pytest.raises(InUse):
        await manager.delete_template(running_tpl.name)
    assert manager.template(running_tpl.name).state is TemplateState.READY

    # A paused sandbox: stays paused, and resumes as it was.
    await manager.pause(source.id)
    paused_tpl = await manager.snapshot(source.id, _name("snap-paused"))
    assert manager.get(source.id).state is S.PAUSED
    grandchild = await manager.create(CreateRequest(template=paused_tpl.name))
    assert await contents.check(manager, grandchild.id) == []
    await manager.resume(source.id)
    assert await contents.check(manager, source.id) == []

    # A template does not depend on the sandbox it was made from.
    await manager.destroy(source.id)
    orphan = await manager.create(CreateRequest(template=paused_tpl.name))
    assert await contents.check(manager, orphan.id) == []

    # Deleting a template works once nothing uses it.
    for sandboxes, tpl in (([child], running_tpl), ([grandchild, orphan], paused_tpl)):
        for sb in sandboxes:
            await manager.destroy(sb.id)
        await manager.delete_template(tpl.name)
        with pytest.raises(NotFound):
            manager.template(tpl.name)
        assert not (settings.templates_dir / tpl.name).exists()
    with pytest.raises(NotFound):
        await manager.create(CreateRequest(template=running_tpl.name))
    assert leftovers(settings) == {}


async def test_fork_makes_independent_children_and_keeps_the_source_running(
    manager: SandboxManager, settings: Settings
) -> None:
    source = await manager.create(CreateRequest(metadata={"role": "source"}, env={"E": "1"}))
    contents = Contents.random(256 * 1024)
    await contents.write(manager, source.id)
    await start_counter(manager, source.id)
    before = await counter(manager, source.id)

    children = await manager.fork(source.id, 2)
    assert len(children) == 2
    assert len({c.id for c in children} | {source.id}) == 3
    assert manager.get(source.id).state is S.RUNNING
    fork_tpl = manager.template(children[0].template)
    assert fork_tpl.kind == "fork"
    assert fork_tpl.source == source.id
    for child in children:
        assert child.state is S.RUNNING
        assert child.template == fork_tpl.name
        assert (child.metadata, child.env) == (source.metadata, source.env)
        assert await agent_status(child, source.access_token) == 401
        assert await contents.check(manager, child.id) == []
        assert "counter" in await process_tags(manager, child.id)
    assert await counter(manager, source.id) > before  # the source kept running through the fork

    # Independent: what one writes, neither the other nor the source sees.
    await run(manager, children[0].id, "echo first > /home/user/who && echo first > /dev/shm/who")
    for other in (children[1].id, source.id):
        assert (
            await run(manager, other, "cat /home/user/who /dev/shm/who 2>/dev/null || echo none") == "none\n"
        )
    assert await contents.check(manager, source.id) == []

    with pytest.raises(InvalidArgument):
        await manager.fork(source.id, 0)
    # The fork template lives as long as a child does.
    await manager.destroy(children[0].id)
    assert manager.template(fork_tpl.name).state is TemplateState.READY
    await manager.destroy(children[1].id)
    with pytest.raises(NotFound):
        manager.template(fork_tpl.name)
    assert not (settings.templates_dir / fork_tpl.name).exists()

    await manager.pause(source.id)
    with pytest.raises(NotRunning):
        await manager.fork(source.id, 1)
    await manager.destroy(source.id)
    assert leftovers(settings) == {}


async def test_forks_of_forks_and_repeated_forks(manager: SandboxManager, settings: Settings) -> None:
    source = await manager.create(CreateRequest())
    contents = Contents.random(256 * 1024)
    await contents.write(manager, source.id)

    [child] = await manager.fork(source.id, 1)
    [grandchild] = await manager.fork(child.id, 1)  # a fork of a sandbox restored from a fork
    [second] = await manager.fork(source.id, 1)  # the same VM snapshotted in place a second time
    for rec in (child, grandchild, second):
        assert await contents.check(manager, rec.id) == [], rec.id
    fork_templates = {child.template, grandchild.template, second.template}
    assert len(fork_templates) == 3

    for rec in (child, grandchild, second):
        await manager.destroy(rec.id)
    assert [t.name for t in manager.templates() if t.kind == "fork"] == []
    assert [p.name for p in settings.templates_dir.iterdir() if p.name in fork_templates] == []

    # The source, snapshotted in place twice, still pauses and resumes with its data.
    await manager.pause(source.id)
    await manager.resume(source.id)
    assert await contents.check(manager, source.id) == []
    await manager.destroy(source.id)
    assert leftovers(settings) == {}


async def test_a_graceful_restart_pauses_and_keeps_sandboxes(settings: Settings) -> None:
    """Leaving ``open_manager`` pauses what runs (``on_shutdown="pause"``); the next manager resumes it."""
    pausing = settings.model_copy(update={"on_shutdown": "pause"})
    contents = Contents.random(1 << 20)
    async with open_manager(pausing, reaper=False) as mgr:
        await ensure_template(mgr, pausing)
        sb = await mgr.create(CreateRequest(metadata={"restart": "yes"}))
        await contents.write(mgr, sb.id)
        await start_counter(mgr, sb.id)
    assert set(leftovers(settings)) == {"sandbox dirs", "disks"}  # no VM, slot or RAM file while closed

    async with open_manager(pausing, reaper=False) as mgr:
        rec = mgr.get(sb.id)
        assert (rec.state, rec.metadata) == (S.PAUSED, {"restart": "yes"})
        await mgr.resume(sb.id)
        assert await contents.check(mgr, sb.id) == []
        assert "counter" in await process_tags(mgr, sb.id)
        await mgr.destroy(sb.id)
    assert leftovers(settings) == {}
