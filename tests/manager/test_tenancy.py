"""Tenancy in the manager (against the fake runtime and a real store): a team acts only on its own
sandboxes and on templates it may use, whatever the caller in front of the manager checks or forgets;
team quotas; the host's admission by memory and by room on the RAM filesystem."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.support.mounts import tmpfs

from wrenbox.errors import NotFound, PermissionDenied, QuotaExceeded, Unavailable
from wrenbox.manager import CreateRequest, Egress, SandboxManager
from wrenbox.manager.quotas import TeamQuota
from wrenbox.manager.store import Store
from wrenbox.records import SandboxState

from .conftest import make_manager
from .fakes import FakeRuntime

S = SandboxState
pytestmark = pytest.mark.anyio


async def stream(mgr: SandboxManager, sandbox_id: str, team: str) -> None:
    async for _ in mgr.exec_stream(sandbox_id, "true", team=team):
        pass


async def use(mgr: SandboxManager, sandbox_id: str, team: str) -> None:
    async with mgr.use(sandbox_id, team=team):
        pass


async def route(mgr: SandboxManager, sandbox_id: str, team: str) -> None:
    async with mgr.route(sandbox_id, 8080, team=team):
        pass


# Every call that acts on a sandbox, as team ``team`` on sandbox ``sid``.
SANDBOX_CALLS: dict[str, Callable[[SandboxManager, str, str], Awaitable[Any] | Any]] = {
    "get": lambda m, sid, team: m.get(sid, team=team),
    "destroy": lambda m, sid, team: m.destroy(sid, team=team),
    "pause": lambda m, sid, team: m.pause(sid, team=team),
    "resume": lambda m, sid, team: m.resume(sid, team=team),
    "connect": lambda m, sid, team: m.connect(sid, 60, team=team),
    "set_timeout": lambda m, sid, team: m.set_timeout(sid, 1, team=team),
    "set_egress": lambda m, sid, team: m.set_egress(sid, Egress(deny=("1.1.1.1",)), team=team),
    "ping": lambda m, sid, team: m.ping(sid, team=team),
    "snapshot": lambda m, sid, team: m.snapshot(sid, team=team),
    "fork": lambda m, sid, team: m.fork(sid, team=team),
    "use": use,
    "route": route,
    "exec": lambda m, sid, team: m.exec(sid, "true", team=team),
    "exec_stream": stream,
    "metrics": lambda m, sid, team: m.metrics(sid, team=team),
    "events": lambda m, sid, team: m.events(sandbox_id=sid, team=team),
}


async def call(fn: Callable[..., Any], *args: Any) -> Any:
    result = fn(*args)
    return await result if isinstance(result, Awaitable) else result


@pytest.mark.parametrize("name", sorted(SANDBOX_CALLS))
async def test_another_teams_sandbox_is_not_found_and_untouched(
    mgr: SandboxManager, runtime: FakeRuntime, name: str
) -> None:
    theirs = await mgr.create(CreateRequest(team="a", timeout_s=600))
    before = mgr.get(theirs.id)
    with pytest.raises(NotFound) as foreign:
        await call(SANDBOX_CALLS[name], mgr, theirs.id, "b")
    with pytest.raises(NotFound) as unknown:
        await call(SANDBOX_CALLS[name], mgr, "nosuchsandbox", "b")
    # Word for word what an unknown id gets: the answer does not tell that it exists.
    assert str(foreign.value) == str(unknown.value).replace("nosuchsandbox", theirs.id)
    after = mgr.get(theirs.id)
    assert (after.state, after.end_at, after.egress) == (before.state, before.end_at, before.egress)
    assert runtime.envd_client.calls == []
    assert runtime.pauses == []
    assert [t.name for t in mgr.templates()] == ["minimal"]  # no snapshot or fork template was made
    await call(SANDBOX_CALLS[name], mgr, theirs.id, "a")  # its own team may


async def test_lists_and_the_operator(mgr: SandboxManager) -> None:
    a = await mgr.create(CreateRequest(team="a"))
    b = await mgr.create(CreateRequest(team="b"))
    mine = await mgr.create(CreateRequest())  # the operator's: no team
    assert [r.id for r in mgr.list(team="a")] == [a.id]
    assert [r.id for r in mgr.list()] == [a.id, b.id, mine.id]
    with pytest.raises(NotFound):
        mgr.get(mine.id, team="a")  # the operator's sandboxes are nobody else's either
    await mgr.destroy(a.id)  # the operator acts on any
    with pytest.raises(NotFound):
        mgr.events(sandbox_id=a.id, team="b")


async def test_templates_belong_to_the_team_of_their_sandbox(
    mgr: SandboxManager, runtime: FakeRuntime
) -> None:
    src = await mgr.create(CreateRequest(team="a"))
    snap = await mgr.snapshot(src.id, "a-snap", team="a")
    assert snap.team == "a"
    assert [t.name for t in mgr.templates(team="a")] == ["minimal", "a-snap"]
    assert [t.name for t in mgr.templates(team="b")] == ["minimal"]
    with pytest.raises(NotFound) as foreign:
        mgr.template("a-snap", team="b")
    assert str(foreign.value) == "template a-snap not found"
    with pytest.raises(NotFound):
        await mgr.create(CreateRequest(template="a-snap", team="b"))
    with pytest.raises(NotFound):
        await mgr.delete_template("a-snap", team="b")
    assert mgr.list(team="b") == []
    assert "a-snap" in runtime.templates
    child = await mgr.create(CreateRequest(template="a-snap", team="a"))
    assert child.template == "a-snap"
    await mgr.destroy(child.id, team="a")
    await mgr.delete_template("a-snap", team="a")
    assert "a-snap" not in runtime.templates


async def test_a_team_cannot_delete_a_public_template(mgr: SandboxManager, runtime: FakeRuntime) -> None:
    await mgr.build_template("public")  # the operator's: every team may use it
    sb = await mgr.create(CreateRequest(template="public", team="a"))
    await mgr.destroy(sb.id, team="a")
    with pytest.raises(PermissionDenied):
        await mgr.delete_template("public", team="a")
    assert mgr.template("public").state.value == "ready"
    assert "public" in runtime.templates
    await mgr.delete_template("public")  # the operator may


async def test_a_teams_forks_are_its_own(mgr: SandboxManager) -> None:
    parent = await mgr.create(CreateRequest(team="a"))
    (child,) = await mgr.fork(parent.id, team="a")
    assert child.team == "a"
    assert mgr.template(child.template).team == "a"
    with pytest.raises(NotFound):
        mgr.template(child.template, team="b")


# -- quotas ----------------------------------------------------------------------------------------


@pytest.fixture
def tight(store: Store, runtime: FakeRuntime) -> SandboxManager:
    quota = TeamQuota(max_running=2, max_starting=4, max_paused=1, max_templates=1, max_disk_bytes=2000)
    return make_manager(store, runtime, quota=quota, team_quotas={"big": TeamQuota(max_running=3)})


async def test_running_quota_is_per_team_and_comes_back(tight: SandboxManager) -> None:
    a = [await tight.create(CreateRequest(team="a")) for _ in range(2)]
    with pytest.raises(Unavailable, match="team a has 2 running sandboxes") as over:
        await tight.create(CreateRequest(team="a"))
    assert not isinstance(over.value, QuotaExceeded)  # it frees itself: retry later
    assert len(tight.list(team="a")) == 2  # nothing was made
    with pytest.raises(Unavailable):
        await tight.fork(a[0].id, team="a")  # refused before the snapshot: no fork template
    assert [t.name for t in tight.templates()] == ["minimal"]
    for _ in range(3):
        await tight.create(CreateRequest(team="big"))  # its own quota
    await tight.create(CreateRequest())  # the operator has none
    await tight.pause(a[0].id, team="a")
    await tight.create(CreateRequest(team="a"))  # room again
    with pytest.raises(Unavailable, match="running"):
        await tight.resume(a[0].id, team="a")
    assert tight.get(a[0].id).state is S.PAUSED


async def test_paused_quota(tight: SandboxManager, runtime: FakeRuntime) -> None:
    one, two = [await tight.create(CreateRequest(team="a")) for _ in range(2)]
    await tight.pause(one.id, team="a")
    with pytest.raises(QuotaExceeded, match="team a has 1 paused sandboxes"):
        await tight.pause(two.id, team="a")
    assert tight.get(two.id).state is S.RUNNING
    assert runtime.pauses == [(one.id, True)]


async def test_an_expiring_sandbox_over_the_paused_quota_keeps_running(tight: SandboxManager) -> None:
    one = await tight.create(CreateRequest(team="a"))
    two = await tight.create(CreateRequest(team="a", timeout_s=1))
    await tight.pause(one.id, team="a")
    tight.clock = lambda: two.end_at + 1  # type: ignore[method-assign, operator]
    with pytest.raises(QuotaExceeded):
        await tight.expire(two.id, "pause")  # the reaper retries later, with backoff
    rec = tight.get(two.id)
    assert (rec.state, rec.pause_failures) == (S.RUNNING, 1)
    await tight.expire(two.id, "kill")  # its own choice of ending needs no room
    assert tight.get(two.id).state is S.DESTROYED


async def test_template_quota_counts_snapshots_not_forks(tight: SandboxManager, runtime: FakeRuntime) -> None:
    sb = await tight.create(CreateRequest(team="a"))
    await tight.snapshot(sb.id, "first", team="a")
    with pytest.raises(QuotaExceeded, match="team a has 1 templates"):
        await tight.snapshot(sb.id, "second", team="a")
    assert sorted(runtime.templates) == ["first"]
    assert tight.get(sb.id).state is S.RUNNING
    (child,) = await tight.fork(sb.id, team="a")  # transient: bytes only
    assert child.team == "a"


async def test_disk_quota_counts_paused_sandboxes_and_templates(store: Store, runtime: FakeRuntime) -> None:
    quota = TeamQuota(max_paused=5, max_templates=5, max_disk_bytes=2000)
    mgr = make_manager(store, runtime, quota=quota)
    one, two = [await mgr.create(CreateRequest(team="a")) for _ in range(2)]
    await mgr.pause(one.id, team="a")  # its disk and snapshot: 1100 bytes
    await mgr.snapshot(two.id, "crosses", team="a")  # 1100 < 2000: let through; 1234 bytes more
    with pytest.raises(QuotaExceeded, match="team a holds 2334 bytes of paused sandboxes and templates"):
        await mgr.pause(two.id, team="a")
    with pytest.raises(QuotaExceeded):
        await mgr.snapshot(two.id, "over", team="a")
    assert mgr.get(two.id).state is S.RUNNING
    assert sorted(runtime.templates) == ["crosses"]
    await mgr.delete_template("crosses", team="a")
    await mgr.pause(two.id, team="a")  # room again


# -- host admission --------------------------------------------------------------------------------


async def test_admission_counts_guest_memory(store: Store, runtime: FakeRuntime) -> None:
    mgr = make_manager(store, runtime, max_guest_memory_mb=600)  # templates here are 256 MiB
    first = await mgr.create(CreateRequest())
    await mgr.create(CreateRequest(team="a"))
    with pytest.raises(Unavailable, match="no room for 256 MiB more guest memory \\(512 of 600"):
        await mgr.create(CreateRequest(team="b"))
    assert len(mgr.list()) == 2
    await mgr.pause(first.id)  # a paused sandbox holds no guest memory
    await mgr.create(CreateRequest(team="b"))


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    with tmpfs(tmp_path / "ram", "size=300m") as mount:
        yield mount


async def test_admission_needs_room_on_the_ram_filesystem(
    store: Store, runtime: FakeRuntime, small_tmpfs: Path
) -> None:
    mgr = make_manager(store, runtime, ram_dir=small_tmpfs / "wrenbox")  # made by the runtime, later
    await mgr.create(CreateRequest())  # 256 MiB fit in 300
    (small_tmpfs / "ram-file").write_bytes(b"\1" * (100 << 20))  # the first one's guest touched memory
    with pytest.raises(Unavailable, match=f"RAM filesystem at {small_tmpfs}/wrenbox has 2.. MiB free"):
        await mgr.create(CreateRequest())
    assert len(mgr.list()) == 1
