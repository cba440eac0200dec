"""``wrenbox demo``: the whole lifecycle once, through the server, the way a user does it, timing each step.

serve (start ``wrenbox serve`` on a free loopback port, or use the one that holds the data dir; make an
API key for the ``demo`` team) → create → exec (and a background counter) → write a file → pause →
resume → verify → snapshot into a template → create from it (the file is there) → fork that sandbox (the
file is there too) → destroy everything, and check that nothing is left → stop (revoke the key, which
must then be refused, and stop the server if the demo started it). Every call between serve and stop is
the official ``e2b`` SDK's against the server's REST API and sandbox proxy.

``verify`` proves what it says: the file is read back from the guest's disk after its page cache is
dropped (not from memory the snapshot kept); the counter is the same process (its PID is listed, and is
the one that writes the count) and runs after the resume (two reads after it, strictly increasing, the
last past the count read before the pause). ``destroy`` checks that the server lists none of them, and
that nothing of any sandbox is left on the host: not its VMM process, network namespace, RAM file, disk
or directory (as its ledger in the data dir named them), nor the snapshot's template directory. Every
check runs inside its step, so a failure is reported under the step that made it.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wrenbox.api.keys import KeyStore, NewKey
from wrenbox.config import Settings
from wrenbox.errors import WrenboxError
from wrenbox.localserver import LocalServer, listening_url, lock_holder, start_server
from wrenbox.manager.store import Store
from wrenbox.network.netns import netns_exists
from wrenbox.pids import ProcessRef
from wrenbox.records import SandboxRecord
from wrenbox.runtime.base import Resource as R

if TYPE_CHECKING:
    from e2b import Sandbox

__all__ = ["DEMO_TEAM", "STEPS", "Demo", "DemoFailed", "DemoStep", "run_demo", "traces_of"]

STEPS = (
    "serve",
    "create",
    "exec",
    "write_file",
    "pause",
    "resume",
    "verify",
    "snapshot",
    "create_from_snapshot",
    "fork",
    "destroy",
    "stop",
)
DEMO_TEAM = "demo"
# Its own PID and a count, written then renamed (a reader never catches the file empty between truncate
# and write): each read says which process counted. ``$$`` is the ``sh -c`` that envd started.
COUNTER = (
    "i=0; while true; do i=$((i+1)); echo $$ $i > /dev/shm/counter.new; "
    "mv /dev/shm/counter.new /dev/shm/counter; sleep 0.2; done"
)
DEMO_FILE = "/home/user/demo.txt"
LIFETIME_S = 600  # each sandbox's timeout: the whole demo takes minutes under TCG on a loaded host


@dataclass(frozen=True, slots=True)
class DemoStep:
    step: str
    seconds: float
    ok: bool
    detail: str = ""


class DemoFailed(WrenboxError):
    pass


def run_demo(
    settings: Settings,
    report: Callable[[DemoStep], None],
    progress: Callable[[str], None] | None = None,
    *,
    url: str | None = None,
    server_env: Mapping[str, str] | None = None,
) -> bool:
    """Run every step of :data:`STEPS`, calling ``report`` after each; stops at the first failure, then
    kills what it made, revokes its key and stops the server it started.

    ``url``: a server already running on ``settings``' data dir. Without it the demo uses the server that
    holds the data dir, or starts one with ``server_env`` (default: this process's environment, whose
    settings are ``settings``); ``progress`` hears that server's log."""
    demo = Demo(settings, report, progress)
    try:
        demo.run(url, server_env)
    except Exception as exc:
        detail = str(exc) if isinstance(exc, WrenboxError) else f"{type(exc).__name__}: {exc}"
        report(DemoStep(demo.current, demo.elapsed(), False, detail))
        demo.cleanup()
        return False
    except BaseException:
        demo.cleanup()
        raise
    return True


class Demo:
    def __init__(
        self,
        settings: Settings,
        report: Callable[[DemoStep], None],
        progress: Callable[[str], None] | None = None,
    ) -> None:
        self.settings = settings
        self.report = report
        self.progress = progress
        self.current = ""
        self.started = 0.0
        self.detail = ""
        self.server: LocalServer | None = None
        self.key: NewKey | None = None
        self.opts: dict[str, Any] = {}
        self.sandboxes: list[str] = []
        self.snapshot: str | None = None

    def elapsed(self) -> float:
        return round(time.monotonic() - self.started, 3)

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        self.current, self.started, self.detail = name, time.monotonic(), ""
        yield
        self.report(DemoStep(name, self.elapsed(), True, self.detail))
        self.current = f"after {name}"  # all the work is in steps: nothing is blamed on the last one

    def run(self, url: str | None = None, server_env: Mapping[str, str] | None = None) -> None:
        from e2b import Sandbox, SandboxState

        content = secrets.token_hex(4096).encode()
        with self.step("serve"):
            self.connect(url, server_env)
        with self.step("create"):
            sb = Sandbox.create(
                self.settings.defaults.template, timeout=LIFETIME_S, metadata={"purpose": "demo"}, **self.opts
            )
            self.sandboxes.append(sb.sandbox_id)
        with self.step("exec"):
            result = sb.commands.run("echo hello from $(hostname)")
            _check(result.exit_code == 0 and "hello" in result.stdout, f"exec said {result!r}")
            counting = sb.commands.run(COUNTER, background=True)
            counting.disconnect()  # it runs on in the guest; the demo reads its file, not its output
            counter_pid = counting.pid
        with self.step("write_file"):
            sb.files.write(DEMO_FILE, content)
        with self.step("pause"):
            before = self.counter(sb, counter_pid)
            _check(sb.pause() is True, "the server did not pause it (it says it was paused already)")
            state = Sandbox.get_info(sb.sandbox_id, **self.opts).state
            _check(state == SandboxState.PAUSED, f"the server shows it {state} after the pause")
        with self.step("resume"):
            sb = Sandbox.connect(sb.sandbox_id, timeout=LIFETIME_S, **self.opts)
        with self.step("verify"):
            self.check_file(sb, content, from_disk=True)
            self.check_counting(sb, counter_pid, before)
        with self.step("snapshot"):
            snap = sb.create_snapshot(name=f"demo-{sb.sandbox_id[:8]}", **self.opts)
            self.snapshot = snap.snapshot_id
            listed = [
                s.snapshot_id
                for s in Sandbox.list_snapshots(sandbox_id=sb.sandbox_id, **self.opts).next_items()
            ]
            _check(snap.snapshot_id in listed, f"snapshot {snap.snapshot_id} is not listed: {listed}")
        with self.step("create_from_snapshot"):
            child = Sandbox.create(snap.snapshot_id, timeout=LIFETIME_S, **self.opts)
            self.sandboxes.append(child.sandbox_id)
            self.check_file(child, content)
        with self.step("fork"):
            forks = child.fork(count=1, timeout=LIFETIME_S, **self.opts)
            self.sandboxes += [f.sandbox_id for f in forks if not isinstance(f, Exception)]
            _check(len(forks) == 1 and not isinstance(forks[0], Exception), f"the fork failed: {forks}")
            self.check_file(forks[0], content)  # type: ignore[arg-type]  (checked just above)
        with self.step("destroy"):
            self.destroy_all()
        with self.step("stop"):
            self.stop()

    # -- serve and stop -------------------------------------------------------------------------------

    def connect(self, url: str | None, server_env: Mapping[str, str] | None) -> None:
        """Find or start the server, and make the demo team's key."""
        data_dir = self.settings.data_dir
        if url is not None:
            self.detail = f"the server at {url}"
        elif (holder := lock_holder(data_dir)) is not None:
            found = listening_url(holder) if holder else None
            _check(
                found is not None,
                f"the data dir {data_dir} is in use by another wrenbox process (pid {holder}) that serves no "
                "API here: stop it, or pass the URL of the server on this data dir (--url)",
            )
            url = found
            self.detail = f"the server that holds {data_dir} (pid {holder}) at {url}"
        else:
            self.server = start_server(server_env or self.own_server_env(), self.progress)
            url = self.server.url
            holder = lock_holder(data_dir)
            _check(
                holder == self.server.pid,
                f"the server it started (pid {self.server.pid}) does not hold {data_dir} (pid {holder} "
                "does): its settings name another data dir",
            )
            self.detail = f"started wrenbox serve (pid {self.server.pid}) at {url}"
        with KeyStore(self.settings.keys_db) as keys:
            self.key = keys.create(name="wrenbox demo", team=DEMO_TEAM)
        self.detail += f"; key {self.key.key.id} for team {DEMO_TEAM}"
        assert url is not None
        self.opts = {
            "api_key": self.key.secret,
            "api_url": url,
            "sandbox_url": url,
            "domain": self.settings.api.domain,
            "debug": False,  # E2B_DEBUG would send the SDK to localhost:49983 instead of the proxy
        }

    def own_server_env(self) -> dict[str, str]:
        """This process's environment (its settings are ``settings``), but the server builds only the
        template the demo uses when it first starts (the others of ``[api] templates`` when a server of
        the operator's next starts): a fresh machine's first demo waits for one template, not all."""
        return {**os.environ, "WRENBOX_API__TEMPLATES": json.dumps([self.settings.defaults.template])}

    def stop(self) -> None:
        """Revoke the demo's key (the server must refuse it from then on) and stop the server the demo
        started (it must exit 0 and let go of the data dir)."""
        from e2b import AuthenticationException, Sandbox

        self.revoke()
        try:
            Sandbox.list(**self.opts).next_items()
        except AuthenticationException:
            pass
        else:
            raise DemoFailed("the server still takes the demo's key after it was revoked")
        if self.server is None:
            self.detail = "key revoked; the server was running before the demo: left running"
            return
        server, self.server = self.server, None
        code = server.stop()
        _check(code == 0, f"wrenbox serve (pid {server.pid}) exited {code}:\n" + "\n".join(server.log))
        holder = lock_holder(self.settings.data_dir)
        _check(
            holder is None, f"{self.settings.data_dir} is still held after the server stopped (pid {holder})"
        )
        self.detail = f"key revoked; wrenbox serve (pid {server.pid}) stopped"

    def revoke(self) -> None:
        if self.key is not None:
            with KeyStore(self.settings.keys_db) as keys:
                keys.revoke(self.key.key.id)
            self.key = None

    # -- destroy and clean up -------------------------------------------------------------------------

    def destroy_all(self) -> None:
        """Kill every sandbox and delete the snapshot through the API, then check the server lists none
        of them and nothing of them is left on the host."""
        from e2b import Sandbox

        held, template_dir = self.ledgers()
        for sid in reversed(self.sandboxes):
            _check(Sandbox.kill(sid, **self.opts), f"the server did not find sandbox {sid} to kill")
        ids, self.sandboxes = set(self.sandboxes), []
        snapshot, self.snapshot = self.snapshot, None
        if snapshot is not None:
            gone = Sandbox.delete_snapshot(snapshot, **self.opts)
            _check(gone, f"the server did not find snapshot {snapshot} to delete")
        left = [s.sandbox_id for s in Sandbox.list(**self.opts).next_items() if s.sandbox_id in ids]
        _check(not left, f"the server still lists sandboxes after destroy: {left}")
        snapshots = [s.snapshot_id for s in Sandbox.list_snapshots(**self.opts).next_items()]
        _check(snapshot not in snapshots, f"the server still lists snapshot {snapshot} after destroy")
        traces = [f"sandbox {r.id}: {t}" for r in held for t in traces_of(r, self.settings.sandboxes_dir)]
        if template_dir is not None and template_dir.exists():
            traces.append(f"the snapshot's template directory {template_dir}")
        _check(not traces, f"left on the host after destroy: {traces}")

    def ledgers(self) -> tuple[list[SandboxRecord], Path | None]:
        """What each sandbox holds and where the snapshot's template lives, as the data dir's store (the
        server's ledger) says now."""
        with Store(self.settings.state_db) as store:
            held = [store.get_sandbox(sid) for sid in self.sandboxes]
            name = None if self.snapshot is None else self.snapshot.partition(":")[0]
            template = None if name is None else Path(store.get_template(name).path)
        return held, template

    def cleanup(self) -> None:
        """After a failure: kill what the demo made, revoke its key, stop the server it started. Each part
        is tried whatever became of the others; what fails is told to ``progress``."""
        from e2b import Sandbox

        def attempt(what: str, action: Callable[[], object]) -> None:
            try:
                action()
            except Exception as exc:
                if self.progress is not None:
                    self.progress(f"cleanup: could not {what}: {exc}")

        for sid in reversed(self.sandboxes):
            attempt(f"kill sandbox {sid}", lambda sid=sid: Sandbox.kill(sid, **self.opts))
        self.sandboxes.clear()
        if (snapshot := self.snapshot) is not None:
            attempt(f"delete snapshot {snapshot}", lambda: Sandbox.delete_snapshot(snapshot, **self.opts))
            self.snapshot = None
        attempt("revoke the demo's key", self.revoke)
        if (server := self.server) is not None:
            attempt(f"stop wrenbox serve (pid {server.pid})", server.stop)
            self.server = None

    # -- the checks -----------------------------------------------------------------------------------

    def check_file(self, sb: Sandbox, content: bytes, *, from_disk: bool = False) -> None:
        """The demo file in the guest hashes as ``content`` does; ``from_disk``: read from the disk,
        the guest's page cache dropped first (not from memory a snapshot kept)."""
        from e2b import CommandExitException

        drop = "sync && echo 3 > /proc/sys/vm/drop_caches && " if from_disk else ""
        try:
            result = sb.commands.run(f"{drop}sha256sum {DEMO_FILE}", user="root")
        except CommandExitException as exc:
            raise DemoFailed(f"could not hash {DEMO_FILE}: {exc.stderr!r}") from None
        want = hashlib.sha256(content).hexdigest()
        _check(result.stdout.split()[:1] == [want], f"{DEMO_FILE} differs: {result.stdout!r}")

    def check_counting(self, sb: Sandbox, pid: int, before: int) -> None:
        """Process ``pid`` is still listed and counts after the resume: two reads after it, both by that
        PID, strictly increasing, and the last past ``before`` (read before the pause)."""
        pids = [p.pid for p in sb.commands.list()]
        _check(pid in pids, f"the counter (pid {pid}) is gone after the resume: {pids}")
        resumed = self.counter(sb, pid)
        time.sleep(0.5)  # two ticks and more
        after = self.counter(sb, pid)
        _check(
            resumed < after and before < after,
            f"the counter did not go on counting after the resume ({before} before the pause, then "
            f"{resumed} and {after})",
        )

    def counter(self, sb: Sandbox, pid: int) -> int:
        """The count, which must have been written by process ``pid``."""
        fields = sb.commands.run("cat /dev/shm/counter").stdout.split()
        _check(len(fields) == 2, f"the counter wrote {fields!r}")
        _check(int(fields[0]) == pid, f"the counter file is written by pid {fields[0]}, not {pid}")
        return int(fields[1])


def traces_of(rec: SandboxRecord, sandboxes_dir: Path) -> list[str]:
    """What of sandbox ``rec`` is still on this host: its VMM process, network namespace, RAM file and
    disk as its ledger named them (``rec`` read while it ran), and its directory."""
    res = rec.resources
    if missing := {R.SLOT, R.DISK, R.MEMORY, R.VM} - set(res):
        return [f"its ledger names no {', '.join(sorted(missing))}: nothing to check that against"]
    vm, netns, ram = res[R.VM], res[R.SLOT]["netns"], Path(res[R.MEMORY])
    found = []
    if ProcessRef(vm["pid"], vm["start_time"]).alive():
        found.append(f"its VMM, pid {vm['pid']}")
    if netns_exists(netns):
        found.append(f"its network namespace {netns}")
    paths = [ram, Path(res[R.DISK]["path"]), Path(res[R.DISK]["store"]), sandboxes_dir / rec.id]
    found += [str(p) for p in dict.fromkeys(paths) if p.exists()]
    return found


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise DemoFailed(message)
