"""A stand-in for the ``firecracker`` binary that checks every API request (a test helper).

Tests hand :class:`FakeFirecracker.binary` to the driver as Firecracker. Started with ``--api-sock PATH``
it serves Firecracker's API on that socket and holds each request against the next entry of its plan:
method, path and JSON body must be exactly equal, and anything else is answered with a 400 whose
``fault_message`` says what was expected (so the driver under test raises) and is journalled as not ok.
Entries are consumed in order, so the order of calls is checked too.

Beyond matching, it behaves like Firecracker where the driver depends on it:

* a small state machine (``Not started`` → ``Running`` ⇄ ``Paused``) answering ``GET /``; pausing before
  ``InstanceStart``, a snapshot of a running VM, a load after configuring and a Diff without dirty page
  tracking are refused like Firecracker refuses them;
* ``PUT /snapshot/create`` writes the state file and the memory file: all of ``memory_image`` (Full), or
  only the entry's ``dirty_pages`` (Diff) into a new sparse file, merged into an existing file of the
  right size as Firecracker does;
* ``PUT /snapshot/load`` with a ``Uffd`` backend does the real hand-off (``tests/memory/uffd_vmm.py``:
  mmap, userfaultfd, register, JSON + fd over the socket); the next ``Resumed`` touches every page and
  compares it with ``expected_memory``, journalling the mismatches; a ``File`` backend is hashed;
* it refuses an API socket path that exists, and writes its output (the "log") to stdout.

Plan entries may add ``status``+``fault`` (answer with an error), ``delay`` (seconds before answering),
``exit`` (exit with that code instead of answering, after printing ``message``). Plan options:
``startup`` (``{"exit": code, "message": ...}`` or ``{"sleep": seconds}``), ``ignore_sigterm``,
``vm_dir`` (journal what the VM's directory holds, as seen from inside its mount namespace).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

PAGE = 4096
VERSION = "1.7.0"
HERE = Path(__file__).resolve()
UFFD_VMM = HERE.parent.parent / "memory" / "uffd_vmm.py"


class FakeFirecracker:
    """The test side: writes the plan and the executable, reads the journal."""

    def __init__(self, root: Path, *, version: str = VERSION) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.binary = root / "firecracker"
        self.plan_path = root / "plan.json"
        self.journal = root / "journal.jsonl"
        self.expected: list[dict[str, Any]] = []
        self.version = version
        self.binary.write_text(
            f"#!{sys.executable}\n"
            "import runpy\n"
            f"runpy.run_path({str(HERE)!r}, init_globals={{'PLAN': {str(self.plan_path)!r}}}, "
            "run_name='__main__')\n"
        )
        self.binary.chmod(0o755)
        self.program([])

    def program(self, expect: list[dict[str, Any]], **options: Any) -> None:
        """What the next Firecracker started will expect, in order; resets the journal."""
        self.expected = expect
        plan = {"journal": str(self.journal), "version": self.version, "expect": expect, **options}
        self.plan_path.write_text(json.dumps(plan))
        self.journal.unlink(missing_ok=True)

    def events(self, event: str | None = None) -> list[dict[str, Any]]:
        try:
            lines = self.journal.read_text().splitlines()
        except FileNotFoundError:
            return []
        found = [json.loads(line) for line in lines]
        return [e for e in found if event is None or e["event"] == event]

    def assert_served_exactly(self) -> None:
        """Every request matched its expectation and every expectation was met."""
        requests = self.events("request")
        unexpected = [r for r in requests if not r["ok"]]
        assert not unexpected, f"unexpected requests: {unexpected}"
        served = [(r["method"], r["path"]) for r in requests]
        wanted = [(e["method"], e["path"]) for e in self.expected]
        assert served == wanted, f"served {served}, expected {wanted}"
        assert not self.events("violation"), self.events("violation")


def call(method: str, path: str, body: Any = None, **extra: Any) -> dict[str, Any]:
    """One plan entry."""
    return {"method": method, "path": path, "body": body, **extra}


# --- the fake binary --------------------------------------------------------------------------------


class Server:
    def __init__(self, plan: dict[str, Any]) -> None:
        self.plan = plan
        self.expect: list[dict[str, Any]] = plan["expect"]
        self.next = 0
        self.state = "Not started"
        self.configured = False
        self.mem_size = 0
        self.track_dirty = False
        self.vmm: Any = None  # the uffd_vmm.Vmm of a Uffd load, until the first resume touched it

    def journal(self, event: str, **fields: Any) -> None:
        with open(self.plan["journal"], "a") as f:
            f.write(json.dumps({"event": event, **fields}) + "\n")

    def handle(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        expected = self.expect[self.next] if self.next < len(self.expect) else None
        ok = expected is not None and (expected["method"], expected["path"], expected["body"]) == (
            method,
            path,
            body,
        )
        self.journal("request", method=method, path=path, body=body, ok=ok, index=self.next)
        if not ok:
            wanted = "nothing more" if expected is None else json.dumps(expected)
            got = json.dumps({"method": method, "path": path, "body": body})
            return 400, {"fault_message": f"fake firecracker: unexpected request {got}; expected {wanted}"}
        self.next += 1
        time.sleep(expected.get("delay", 0))
        if "exit" in expected:
            print(expected.get("message", "fake firecracker: exiting"), flush=True)
            os._exit(expected["exit"])
        if "fault" in expected:
            return expected.get("status", 400), {"fault_message": expected["fault"]}
        try:
            return self.emulate(method, path, body, expected)
        except Refused as exc:
            self.journal("violation", method=method, path=path, why=str(exc))
            return 400, {"fault_message": str(exc)}

    def emulate(self, method: str, path: str, body: Any, entry: dict[str, Any]) -> tuple[int, Any]:
        if (method, path) == ("GET", "/"):
            info = {"app_name": "Firecracker", "id": "anonymous-instance", "state": self.state}
            return 200, {**info, "vmm_version": self.plan["version"]}
        if method == "PUT" and path == "/actions":
            self.require(self.state == "Not started", "InstanceStart: the microVM is already running")
            self.state = "Running"
        elif method == "PATCH" and path == "/vm":
            self.require(self.state != "Not started", "the microVM is not started")
            self.state = "Paused" if body["state"] == "Paused" else "Running"
            if body["state"] == "Resumed" and self.vmm is not None:
                self.touch()
        elif method == "PUT" and path == "/snapshot/create":
            self.create_snapshot(body, entry)
        elif method == "PUT" and path == "/snapshot/load":
            self.load_snapshot(body)
        elif method == "PUT":
            self.require(self.state == "Not started", f"{path} is a pre-boot resource")
            self.configured = True
            if path == "/machine-config":
                self.mem_size = body["mem_size_mib"] << 20
                self.track_dirty = body.get("track_dirty_pages", False)
            if path.startswith("/drives/"):
                self.journal(
                    "drive", path=body["path_on_host"], resolves=os.path.realpath(body["path_on_host"])
                )
        return 204, None

    def require(self, condition: bool, why: str) -> None:
        if not condition:
            raise Refused(why)

    def create_snapshot(self, body: dict[str, Any], entry: dict[str, Any]) -> None:
        self.require(self.state == "Paused", "Cannot create a snapshot of a running microVM")
        diff = body.get("snapshot_type", "Full") == "Diff"
        self.require(not diff or self.track_dirty, "Diff snapshots need dirty page tracking")
        with open(body["snapshot_path"], "w") as f:
            json.dump({"mem_size": self.mem_size, "fake": True}, f)
        with open(self.plan["memory_image"], "rb") as f:
            image = f.read()
        assert len(image) == self.mem_size, "memory_image must be as large as the guest's memory"
        path = Path(body["mem_file_path"])
        existed = path.exists()
        with open(path, "r+b" if existed else "wb") as f:
            if not (existed and os.fstat(f.fileno()).st_size == self.mem_size):
                f.truncate(0)
                f.truncate(self.mem_size)
            pages = entry["dirty_pages"] if diff else range(self.mem_size // PAGE)
            for page in pages:
                f.seek(page * PAGE)
                f.write(image[page * PAGE : (page + 1) * PAGE])

    def load_snapshot(self, body: dict[str, Any]) -> None:
        self.require(self.state == "Not started" and not self.configured, "load after configuring")
        with open(body["snapshot_path"]) as f:
            self.mem_size = json.load(f)["mem_size"]
        self.track_dirty = body.get("track_dirty_pages", False)
        backend = body["mem_backend"]
        if backend["backend_type"] == "File":
            size = Path(backend["backend_path"]).stat().st_size
            self.require(size == self.mem_size, f"memory file has {size} bytes, not {self.mem_size}")
            with open(backend["backend_path"], "rb") as f:
                self.journal("file_backend", sha256=hashlib.sha256(f.read()).hexdigest())
        else:
            self.vmm = uffd_vmm().Vmm(
                {
                    "socket": backend["backend_path"],
                    "file": self.plan["expected_memory"],
                    "regions": [{"size": self.mem_size, "offset": 0}],
                }
            )
            try:
                self.vmm.handoff()
            except OSError as exc:
                self.vmm = None
                raise Refused(f"cannot hand guest memory to {backend['backend_path']}: {exc}") from exc
            self.journal("handoff", socket=backend["backend_path"])
        self.state = "Running" if body.get("resume_vm") else "Paused"

    def touch(self) -> None:
        touched = self.vmm.touch(pattern="random", threads=2, seed=3)
        self.journal("touch", **touched, **self.vmm.verify())
        self.vmm = None


class Refused(Exception):
    pass


def uffd_vmm() -> Any:
    spec = importlib.util.spec_from_file_location("uffd_vmm", UFFD_VMM)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def serve(listener: socket.socket, server: Server) -> None:
    import h11

    while True:
        conn, _ = listener.accept()
        with conn:
            http = h11.Connection(h11.SERVER)
            try:
                while exchange(conn, http, server):
                    http.start_next_cycle()
            except (OSError, h11.ProtocolError):
                pass  # the client gave up (a timeout) or hung up


def exchange(conn: socket.socket, http: Any, server: Server) -> bool:
    """Answer one request; False when the client closed the connection."""
    import h11

    request, body = None, b""
    while True:
        event = http.next_event()
        if event is h11.NEED_DATA:
            http.receive_data(conn.recv(65536))
        elif isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            break
        elif isinstance(event, h11.ConnectionClosed):
            return False
    assert request is not None
    status, answer = server.handle(
        request.method.decode(), request.target.decode(), json.loads(body) if body else None
    )
    payload = b"" if answer is None else json.dumps(answer).encode()
    headers = [("Content-Type", "application/json"), ("Content-Length", str(len(payload)))]
    if status == 204:
        headers = []
    conn.sendall(http.send(h11.Response(status_code=status, headers=headers)))
    if payload:
        conn.sendall(http.send(h11.Data(data=payload)))
    conn.sendall(http.send(h11.EndOfMessage()))
    return True


def inspect_vm_dir(server: Server, vm_dir: str) -> None:
    """What this process's mount namespace shows in the VM's directory (a private tmpfs with links)."""
    with open("/proc/self/mountinfo") as f:
        fstypes = [line.split(" - ")[1].split()[0] for line in f if line.split()[4] == vm_dir]
    links = {p.name: str(p.readlink()) for p in sorted(Path(vm_dir).iterdir())}
    server.journal("vm_dir", fstypes=fstypes, links=links)


def main(plan_path: str) -> None:
    with open(plan_path) as f:
        plan = json.load(f)
    args = sys.argv[1:]
    if args == ["--version"]:
        print(f"Firecracker v{plan['version']}\n\nSupported snapshot data format versions: 1.0.0")
        return
    server = Server(plan)
    server.journal(
        "start",
        pid=os.getpid(),
        argv=args,
        mnt_ns=str(Path("/proc/self/ns/mnt").readlink()),
        net_ns=str(Path("/proc/self/ns/net").readlink()),
    )
    if plan.get("vm_dir"):
        inspect_vm_dir(server, plan["vm_dir"])
    if plan.get("ignore_sigterm"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    startup = plan.get("startup", {})
    time.sleep(startup.get("sleep", 0))
    if "exit" in startup:
        print(startup.get("message", "fake firecracker: startup failed"), flush=True)
        sys.exit(startup["exit"])
    if len(args) != 2 or args[0] != "--api-sock":
        print(f"fake firecracker: unexpected arguments {args}", flush=True)
        sys.exit(2)
    if os.path.lexists(args[1]):
        print(f"Failed to open the API socket at {args[1]}: Address in use", flush=True)
        sys.exit(1)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(args[1])
    listener.listen(4)
    print(f"Running Firecracker v{plan['version']}", flush=True)
    serve(listener, server)


if __name__ == "__main__":
    main(globals()["PLAN"])
