"""``wrenbox sandbox ...``: sandboxes through a wrenbox server, as a client (``wrenbox.client``).

The server is ``WRENBOX_URL`` (default ``http://127.0.0.1:3000``) and the key ``WRENBOX_API_KEY``. On the
server's own machine, without a key, the CLI makes itself one (team ``default``) and keeps it in
``<data dir>/cli.key`` (mode 0600), readable only by whoever can read the data dir anyway.

Tables for people, ``--json`` for scripts. ``exec`` and ``shell`` exit with the command's exit code; the
others with the CLI's codes (2 bad input, 4 not found, 5 no server, 1 anything else).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from rich.table import Column, Table

from wrenbox.cli.app import app, console, err_console, load
from wrenbox.cli.app import fail as fail_with
from wrenbox.client import FILE_URL_LIFETIME_S, ClientConfig, ServerClient, ServerUnreachable
from wrenbox.errors import InvalidArgument, WrenboxError

__all__ = ["sandbox_app"]

T = TypeVar("T")
sandbox_app = typer.Typer(no_args_is_help=True, help="Sandboxes, through a wrenbox server (WRENBOX_URL).")
app.add_typer(sandbox_app, name="sandbox")

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]
NO_SERVER_EXIT = 5


# -- connecting ------------------------------------------------------------------------------------------


def local_key() -> str | None:
    """This machine's CLI key, made on first use when the data dir is ours to write."""
    settings = load()
    path = settings.data_dir / "cli.key"
    with contextlib.suppress(OSError):
        return path.read_text().strip()
    if not os.access(settings.data_dir, os.W_OK):
        return None
    from wrenbox.api.keys import KeyStore

    with KeyStore(settings.keys_db) as keys:
        made = keys.create(name="wrenbox CLI on this machine")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(made.secret + "\n")
    return made.secret


def fail(exc: WrenboxError) -> NoReturn:
    if isinstance(exc, ServerUnreachable):
        err_console.print(f"[bold red]error:[/] {exc.message}", highlight=False)
        raise typer.Exit(NO_SERVER_EXIT)
    fail_with(exc)


@contextlib.contextmanager
def server() -> Iterator[ServerClient]:
    config = ClientConfig.from_env()
    if not config.api_key:
        config = ClientConfig(config.url, local_key(), config.timeout_s)
    try:
        with ServerClient(config) as client:
            yield client
    except WrenboxError as exc:
        fail(exc)


def _progress(message: str, work: Callable[[], T]) -> T:
    """Run ``work`` under a spinner (on stderr, so --json output stays clean)."""
    with err_console.status(message):
        return work()


def _pairs(values: list[str], what: str) -> dict[str, str]:
    out = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidArgument(f"{what} takes KEY=VALUE, not {item!r}")
        out[key] = value
    return out


def _when(stamp: str | None) -> str:
    if not stamp:
        return ""
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _table(rows: list[dict[str, Any]]) -> None:
    table = Table("template", "state", "started", "ends", "cpu", "memory", "metadata")
    table.columns.insert(0, Column("id", no_wrap=True, min_width=20))  # ids are what people copy
    for r in rows:
        meta = " ".join(f"{k}={v}" for k, v in (r.get("metadata") or {}).items())
        table.add_row(
            r["sandboxID"],
            r.get("templateID", ""),
            r.get("state", "running"),
            _when(r.get("startedAt")),
            _when(r.get("endAt")),
            str(r.get("cpuCount", "")),
            f"{r.get('memoryMB', '')} MiB",
            meta,
        )
    console.print(table)


def _print(data: Any, as_json: bool, human: Callable[[], None]) -> None:
    if as_json:
        print(json.dumps(data, indent=None))
    else:
        human()


# -- commands --------------------------------------------------------------------------------------------


@sandbox_app.command("create")
def create(
    template: Annotated[
        str, typer.Option("--template", "-t", help="Template (or snapshot) to start.")
    ] = "base",
    timeout: Annotated[int | None, typer.Option("--timeout", help="Seconds it lives (default 300).")] = None,
    metadata: Annotated[
        list[str] | None, typer.Option("--metadata", "-m", help="KEY=VALUE, repeatable.")
    ] = None,
    env: Annotated[list[str] | None, typer.Option("--env", "-e", help="KEY=VALUE for every process.")] = None,
    pause_on_timeout: Annotated[
        bool, typer.Option("--pause-on-timeout", help="Pause at the end instead of being killed.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Start a sandbox from a template; prints its id."""
    with server() as api:
        try:
            meta, envs = _pairs(metadata or [], "--metadata"), _pairs(env or [], "--env")
        except WrenboxError as exc:
            fail(exc)
        made = _progress(
            f"creating a sandbox from {template}…",
            lambda: api.create(
                template=template,
                timeout_s=timeout,
                metadata=meta,
                env=envs,
                on_timeout="pause" if pause_on_timeout else "kill",
            ),
        )
    _print(made, as_json, lambda: console.print(made["sandboxID"], highlight=False))


@sandbox_app.command("list")
def list_(
    state: Annotated[str | None, typer.Option("--state", help="running, paused, or both (comma).")] = None,
    metadata: Annotated[list[str] | None, typer.Option("--metadata", "-m", help="KEY=VALUE filter.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Your team's sandboxes, newest first."""
    with server() as api:
        try:
            rows = api.list(state=state, metadata=_pairs(metadata or [], "--metadata"))
        except WrenboxError as exc:
            fail(exc)
    _print(rows, as_json, lambda: _table(rows))


@sandbox_app.command("info")
def info(sandbox_id: str, as_json: JsonOpt = False) -> None:
    """One sandbox, in detail."""
    with server() as api:
        detail = api.get(sandbox_id)
    shown = {k: v for k, v in detail.items() if k != "envdAccessToken"}
    _print(detail, as_json, lambda: _table([shown]))


@sandbox_app.command("exec", context_settings={"allow_interspersed_args": False})
def exec_(
    sandbox_id: str,
    command: Annotated[list[str], typer.Argument(help="The command and its arguments (after --).")],
    cwd: Annotated[str | None, typer.Option("--cwd", help="Working directory.")] = None,
    user: Annotated[str | None, typer.Option("--user", help="Run as this user.")] = None,
) -> None:
    """Run a command, streaming its output; exits with its exit code."""
    import anyio

    if command[:1] == ["--"]:  # the separator, when options come after the sandbox id
        command = command[1:]

    from wrenbox.envd.models import Exited, PtyOutput, Stderr, Stdout

    async def run(api: ServerClient, sandbox: dict[str, Any]) -> int:
        async with (
            api.agent(sandbox) as envd,
            envd.processes.exec_stream(command, cwd=cwd, user=user) as proc,
        ):
            async for event in proc:
                match event:
                    case Stdout(data) | PtyOutput(data):
                        sys.stdout.buffer.write(data)
                        sys.stdout.flush()
                    case Stderr(data):
                        sys.stderr.buffer.write(data)
                        sys.stderr.flush()
                    case Exited(code, error):
                        if code < 0 and error:
                            err_console.print(f"[red]{error}[/]", highlight=False)
                        return code if code >= 0 else 128 + signal.SIGKILL
        return 1

    with server() as api:
        sandbox = api.get(sandbox_id)
        try:
            code = anyio.run(run, api, sandbox)
        except WrenboxError as exc:
            fail(exc)
    raise typer.Exit(code)


@sandbox_app.command("shell")
def shell(
    sandbox_id: str,
    user: Annotated[str | None, typer.Option("--user", help="Log in as this user.")] = None,
) -> None:
    """An interactive login shell (a PTY: resizes follow the terminal, Ctrl-C goes to the sandbox);
    exits with the shell's exit code."""
    import anyio

    from wrenbox.cli.terminal import run_shell

    with server() as api:
        sandbox = api.get(sandbox_id)
        try:
            code = anyio.run(run_shell, api, sandbox, user)
        except WrenboxError as exc:
            fail(exc)
    raise typer.Exit(code)


@sandbox_app.command("url")
def url(
    sandbox_id: str,
    path: str,
    write: Annotated[
        bool, typer.Option("--write", help="An upload URL (POST multipart/form-data) instead.")
    ] = False,
    user: Annotated[str | None, typer.Option("--user", help="Read or write as this user.")] = None,
    expires: Annotated[
        int, typer.Option("--expires", help="Seconds it works, at most a week (there is no 'never').")
    ] = FILE_URL_LIFETIME_S,
) -> None:
    """A URL that downloads one file of a sandbox (or uploads to it) with no key or header: anyone who
    holds it can, until it expires."""
    with server() as api:
        made = api.file_url(api.get(sandbox_id), path, write=write, user=user, expires_in_s=expires)
    print(made)


@sandbox_app.command("pause")
def pause(
    sandbox_id: str,
    disk_only: Annotated[
        bool, typer.Option("--disk-only", help="Keep only its disk (it boots again on resume).")
    ] = False,
) -> None:
    """Pause a sandbox to disk, with its memory unless --disk-only."""
    with server() as api:
        _progress(f"pausing {sandbox_id}…", lambda: api.pause(sandbox_id, memory=not disk_only))
    console.print(f"paused {sandbox_id}", highlight=False)


@sandbox_app.command("resume")
def resume(
    sandbox_id: str,
    timeout: Annotated[int | None, typer.Option("--timeout", help="Seconds it lives from now.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Resume a paused sandbox (connecting to a running one gives it at least --timeout more)."""
    with server() as api:
        sandbox = _progress(f"resuming {sandbox_id}…", lambda: api.connect(sandbox_id, timeout_s=timeout))
    _print(sandbox, as_json, lambda: console.print(f"running {sandbox_id}", highlight=False))


@sandbox_app.command("kill")
def kill(sandbox_id: str) -> None:
    """Destroy a sandbox, running or paused."""
    with server() as api:
        api.kill(sandbox_id)
    console.print(f"killed {sandbox_id}", highlight=False)


@sandbox_app.command("snapshot")
def snapshot(
    sandbox_id: str,
    name: Annotated[str | None, typer.Option("--name", help="The snapshot's name.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Snapshot a sandbox into a template (it goes on running); prints the snapshot's id."""
    with server() as api:
        made = _progress(f"snapshotting {sandbox_id}…", lambda: api.snapshot(sandbox_id, name))
    _print(made, as_json, lambda: console.print(made["snapshotID"], highlight=False))


@sandbox_app.command("fork")
def fork(
    sandbox_id: str,
    count: Annotated[int, typer.Option("--count", "-n", help="How many copies.")] = 1,
    as_json: JsonOpt = False,
) -> None:
    """Copies of a running sandbox, memory and all; prints their ids."""
    with server() as api:
        made = _progress(f"forking {sandbox_id}…", lambda: api.fork(sandbox_id, count))
    _print(made, as_json, lambda: [console.print(s["sandboxID"], highlight=False) for s in made])


@sandbox_app.command("logs")
def logs(sandbox_id: str, as_json: JsonOpt = False) -> None:
    """What happened to a sandbox (created, paused, resumed, expired, ...)."""
    with server() as api:
        entries = api.logs(sandbox_id)

    def human() -> None:
        for e in entries:
            console.print(f"{_when(e['timestamp'])}  {e['message']}", highlight=False)

    _print(entries, as_json, human)


@sandbox_app.command("metrics")
def metrics(sandbox_id: str, as_json: JsonOpt = False) -> None:
    """CPU, memory and disk of a running sandbox, sampled every few seconds."""
    with server() as api:
        samples = api.metrics(sandbox_id)

    def human() -> None:
        table = Table("time", "cpu %", "memory", "disk")
        for m in samples:
            table.add_row(
                _when(m["timestamp"]),
                f"{m['cpuUsedPct']:.1f}",
                f"{m['memUsed'] >> 20} / {m['memTotal'] >> 20} MiB",
                f"{m['diskUsed'] >> 20} / {m['diskTotal'] >> 20} MiB",
            )
        console.print(table)

    _print(samples, as_json, human)
