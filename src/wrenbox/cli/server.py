"""``wrenbox serve`` and ``wrenbox keys``: run the API server, and manage who may call it.

Keys are managed on the server's machine, in its data dir (not through the API): whoever can run this
can read the data dir anyway.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime
from typing import Annotated

import typer
from rich.table import Table

from wrenbox.cli.app import app, console, err_console, fail, load
from wrenbox.errors import InvalidArgument, WrenboxError

__all__ = ["keys_app"]

keys_app = typer.Typer(no_args_is_help=True, help="API keys: who may call the server, and for which team.")
app.add_typer(keys_app, name="keys")


def parse_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise InvalidArgument(
            f"--listen takes HOST:PORT (e.g. 127.0.0.1:3000; port 0: any free one), not {listen!r}"
        )
    return host.strip("[]") or "127.0.0.1", int(port)


class _Logfmt(logging.Formatter):
    """One line per record, ``key=value`` pairs (logfmt), that log shippers parse without a schema."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + self.formatException(record.exc_info)
        fields = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": message,
        }
        return " ".join(f"{k}={json.dumps(v) if k == 'msg' else v}" for k, v in fields.items())


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(_Logfmt())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # One line per proxied request is noise at info.
    for chatty in ("httpx", "httpcore"):
        logging.getLogger(chatty).setLevel(max(logging.WARNING, root.level))
    # The QMP library logs each refused connect while QEMU starts up as an error; the driver retries
    # and raises a wrenbox error of its own if QEMU never answers.
    logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)


@app.command()
def serve(
    listen: Annotated[
        str | None,
        typer.Option(
            "--listen", help="HOST:PORT to listen on (default: the settings' api; port 0: any free one)"
        ),
    ] = None,
) -> None:
    """Serve E2B's API and the sandbox proxy on one port until SIGTERM/SIGINT (sandboxes are paused then)."""
    import anyio

    from wrenbox.service import serve as run

    settings = load()
    configure_logging(settings.log_level)
    try:
        host, port = parse_listen(listen) if listen else (settings.api.host, settings.api.port)

        def ready(url: str) -> None:
            print(f"wrenbox serving on {url}", flush=True)

        anyio.run(lambda: run(settings, host=host, port=port, on_ready=ready))
    except WrenboxError as exc:
        fail(exc)


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Option("--name", help="What the key is for.")] = "",
    team: Annotated[str, typer.Option("--team", help="The team it acts for.")] = "default",
    as_json: Annotated[bool, typer.Option("--json", help='Print {"key": ...} only.')] = False,
) -> None:
    """Make a key. It is printed once and not kept (only its hash is)."""
    from wrenbox.api.keys import KeyStore

    try:
        with KeyStore(load().keys_db) as keys:
            made = keys.create(name=name, team=team)
    except WrenboxError as exc:
        fail(exc)
    if as_json:
        print(json.dumps({"key": made.secret, "id": made.key.id, "team": made.key.team}))
        return
    console.print(made.secret, highlight=False, soft_wrap=True)
    err_console.print(f"[dim]key {made.key.id} for team {made.key.team}; it is not shown again[/]")


@keys_app.command("list")
def keys_list(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """Every key (never the secrets), revoked ones marked."""
    from wrenbox.api.keys import KeyStore

    with KeyStore(load().keys_db) as keys:
        found = keys.list()
    if as_json:
        rows = [
            {
                "id": k.id,
                "name": k.name,
                "team": k.team,
                "created_at": k.created_at,
                "revoked_at": k.revoked_at,
            }
            for k in found
        ]
        print(json.dumps(rows))
        return
    table = Table("id", "name", "team", "created", "status")
    for k in found:
        created = datetime.fromtimestamp(k.created_at).strftime("%Y-%m-%d %H:%M")
        table.add_row(k.id, k.name, k.team, created, "active" if k.active else "[red]revoked[/]")
    console.print(table)


@keys_app.command("revoke")
def keys_revoke(
    key_id: Annotated[str, typer.Argument(help="The key's id (from keys list) or the key.")],
) -> None:
    """Revoke a key: it never authenticates again."""
    from wrenbox.api.keys import KeyStore

    try:
        with KeyStore(load().keys_db) as keys:
            revoked = keys.revoke(key_id)
    except WrenboxError as exc:
        fail(exc)
    console.print(f"revoked key {revoked.id} (team {revoked.team})", highlight=False)
