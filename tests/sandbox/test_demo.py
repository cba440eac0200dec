"""``wrenbox demo`` (what ``make demo`` runs) on real VMs, through a real ``wrenbox serve`` and E2B's SDK:
every step passes, in order, and leaves nothing (no sandbox, snapshot, server or active key); and each of
its checks can fail: a wrong hash, a counter stopped or gone, what a live sandbox holds on the host, a data
dir held by a wrenbox process that serves no API, and a failing step is reported under its own name with
nothing left behind (and a server the demo did not start is left running)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import httpx
import pytest
from e2b import Sandbox
from tests.api.conftest import server_env

from wrenbox import demo as demo_mod
from wrenbox.api.keys import KeyStore
from wrenbox.config import Settings
from wrenbox.demo import COUNTER, DEMO_FILE, DEMO_TEAM, STEPS, Demo, DemoFailed, DemoStep, run_demo, traces_of
from wrenbox.localserver import LocalServer, lock_holder, start_server
from wrenbox.manager.store import Store
from wrenbox.service import Host

from .conftest import leftovers

pytestmark = [pytest.mark.vm, pytest.mark.root, pytest.mark.slow]


def demo_env(settings: Settings) -> dict[str, str]:
    """The environment of a server on the session's data dir (tests/api's), building only ``minimal``
    (the sandbox suite's tests expect no other template there)."""
    return server_env(settings) | {"WRENBOX_API__TEMPLATES": json.dumps(["minimal"])}


def demo_keys(settings: Settings) -> list[bool]:
    """Whether each key the demo made is still active."""
    with KeyStore(settings.keys_db) as keys:
        return [k.active for k in keys.list() if k.team == DEMO_TEAM]


def templates(settings: Settings) -> list[str]:
    with Store(settings.state_db) as store:
        return [t.name for t in store.list_templates()]


def test_the_demo_runs_every_step(settings: Settings) -> None:
    assert lock_holder(settings.data_dir) is None
    steps: list[DemoStep] = []
    ok = run_demo(settings, steps.append, server_env=demo_env(settings))
    assert ok, steps[-1]
    assert [(s.step, s.ok) for s in steps] == [(name, True) for name in STEPS]
    assert steps[0].detail.startswith("started wrenbox serve (pid ")
    assert steps[-1].detail.endswith("stopped")
    assert lock_holder(settings.data_dir) is None  # the server it started is gone
    assert demo_keys(settings) == [False]  # its key made and revoked
    assert templates(settings) == ["minimal"]  # its snapshot deleted
    assert leftovers(settings) == {}


@pytest.mark.anyio
async def test_a_data_dir_held_by_a_process_that_serves_nothing_is_refused(
    host: Host, settings: Settings
) -> None:
    # This process holds the data dir (``host``) and listens on no port: the demo says so, at "serve".
    keys = demo_keys(settings)
    steps: list[DemoStep] = []
    assert not run_demo(settings, steps.append)
    ((step, ok, detail),) = [(s.step, s.ok, s.detail) for s in steps]
    assert (step, ok) == ("serve", False)
    assert f"in use by another wrenbox process (pid {os.getpid()}) that serves no API" in detail
    assert demo_keys(settings) == keys  # no key made


def test_a_server_that_cannot_start_is_reported_at_serve(settings: Settings) -> None:
    # A server whose settings are bad exits before it listens: its own words are in the report.
    steps: list[DemoStep] = []
    env = demo_env(settings) | {"WRENBOX_API__PORT": "not a port"}
    assert not run_demo(settings, steps.append, server_env=env)
    ((step, ok, detail),) = [(s.step, s.ok, s.detail) for s in steps]
    assert (step, ok) == ("serve", False)
    assert "wrenbox serve exited (2) before it listened" in detail
    assert "api.port" in detail or "API__PORT" in detail.upper(), detail
    assert lock_holder(settings.data_dir) is None


@pytest.fixture(scope="module")
def serving(settings: Settings) -> Iterator[LocalServer]:
    """A server on the session's data dir that the demo did not start (it must find it and leave it)."""
    server = start_server(demo_env(settings))
    try:
        yield server
    finally:
        code = server.stop()
    assert code == 0, "\n".join(server.log)
    assert not any("Traceback" in line for line in server.log), "\n".join(server.log)


def test_each_verify_check_can_fail(serving: LocalServer, settings: Settings) -> None:
    demo = Demo(settings, lambda step: None)
    demo.connect(None, None)
    assert demo.detail.startswith(f"the server that holds {settings.data_dir} (pid {serving.pid}) at ")
    assert demo.opts["api_url"] == serving.url
    sb = Sandbox.create("minimal", timeout=300, **demo.opts)
    demo.sandboxes.append(sb.sandbox_id)
    try:
        sb.files.write(DEMO_FILE, b"the file")
        counting = sb.commands.run(COUNTER, background=True)
        counting.disconnect()
        pid = counting.pid
        sb.commands.run("sleep 0.5")
        before = demo.counter(sb, pid)

        demo.check_file(sb, b"the file", from_disk=True)
        with pytest.raises(DemoFailed, match="differs"):
            demo.check_file(sb, b"another file", from_disk=True)
        with pytest.raises(DemoFailed, match="written by pid"):
            demo.counter(sb, pid + 1)

        demo.check_counting(sb, pid, before)
        with pytest.raises(DemoFailed, match="did not go on counting"):  # it has not counted to 10**6 yet
            demo.check_counting(sb, pid, 10**6)
        sb.commands.run(f"kill -STOP {pid}", user="root")  # there, but frozen
        with pytest.raises(DemoFailed, match="did not go on counting"):
            demo.check_counting(sb, pid, before)
        sb.commands.run(f"kill -KILL {pid}", user="root")
        with pytest.raises(DemoFailed, match="is gone"):
            demo.check_counting(sb, pid, before)

        (held,), _ = demo.ledgers()
        traces = traces_of(held, settings.sandboxes_dir)
        netns = held.resources["slot"]["netns"]
        assert [t.split(",")[0] for t in traces[:2]] == ["its VMM", f"its network namespace {netns}"]
        assert len(traces) >= 4, traces  # and its RAM file, disk and directory
    finally:
        demo.cleanup()  # kills it, revokes the key, leaves the server (not the demo's) running
    assert traces_of(held, settings.sandboxes_dir) == []
    assert demo_keys(settings)[-1] is False
    assert lock_holder(settings.data_dir) == serving.pid
    assert httpx.get(f"{serving.url}/health").json() == {"status": "ok"}


def test_a_failing_step_is_reported_by_name_and_leaves_nothing(
    serving: LocalServer, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A counter that counts once, then stops: the pause and resume go well, "verify" must not.
    monkeypatch.setattr(demo_mod, "COUNTER", "echo $$ 1 > /dev/shm/counter; sleep 1000")
    steps: list[DemoStep] = []
    assert not run_demo(settings, steps.append)
    assert [(s.step, s.ok) for s in steps] == [(n, True) for n in STEPS[:6]] + [("verify", False)]
    assert "did not go on counting" in steps[-1].detail
    assert leftovers(settings) == {}
    assert templates(settings) == ["minimal"]
    assert demo_keys(settings)[-1] is False
    assert lock_holder(settings.data_dir) == serving.pid  # not the demo's server: left running
