"""Signed /files URLs: the agent takes what E2B's SDK makes (with or without an expiration), while
wrenbox's own client and CLI only ever make URLs that expire (finding 16)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from typer.testing import CliRunner

from wrenbox.cli import app
from wrenbox.client import FILE_URL_LIFETIME_S, MAX_FILE_URL_LIFETIME_S, ClientConfig, ServerClient
from wrenbox.errors import InvalidArgument
from wrenbox.guest.auth import file_signature

from .conftest import RunningAgent

TOKEN = "s3cret"
SANDBOX = {"sandboxID": "sb-signed", "envdAccessToken": TOKEN}


@pytest.fixture
def secured(fresh_agent: RunningAgent) -> RunningAgent:
    assert httpx.post(fresh_agent.url + "/init", json={"accessToken": TOKEN}).status_code == 204
    return fresh_agent


@pytest.fixture
def client(secured: RunningAgent) -> Iterator[ServerClient]:
    # The agent serves /files at its root, as the server's proxy does for signed URLs.
    with ServerClient(ClientConfig(url=secured.url, api_key="unused")) as c:
        yield c


def query_of(url: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}


def test_the_agent_takes_unexpiring_and_far_future_signatures_as_envd_does(
    secured: RunningAgent, workdir: Path
) -> None:
    # E2B's SDK leaves the expiration out unless asked, and envd sets no upper bound: refusing either
    # would break SDK users. Only wrenbox's own URLs are held to an expiry.
    (workdir / "f").write_text("compatible")
    path = str(workdir / "f")
    unexpiring = {"path": path, "signature": file_signature(path, "read", "", TOKEN, None)}
    assert httpx.get(secured.url + "/files", params=unexpiring).text == "compatible"
    year_9999 = 253402300799
    far = {
        "path": path,
        "signature": file_signature(path, "read", "", TOKEN, year_9999),
        "signature_expiration": str(year_9999),
    }
    assert httpx.get(secured.url + "/files", params=far).text == "compatible"


def test_client_urls_work_until_they_expire(
    client: ServerClient, secured: RunningAgent, workdir: Path
) -> None:
    (workdir / "f").write_text("for a while")
    path = str(workdir / "f")

    default = query_of(client.file_url(SANDBOX, path))
    assert abs(int(default["signature_expiration"]) - (time.time() + FILE_URL_LIFETIME_S)) <= 2

    upload = client.file_url(SANDBOX, str(workdir / "up"), write=True, expires_in_s=60)
    sent = httpx.post(upload, files={"file": ("ignored-name", b"uploaded")})
    assert sent.status_code == 200, sent.text
    assert (workdir / "up").read_bytes() == b"uploaded"
    assert httpx.get(upload).status_code == 401  # a write URL reads nothing

    short = client.file_url(SANDBOX, path, expires_in_s=2)
    assert short.startswith(secured.url + "/files?")
    assert httpx.get(short).text == "for a while"
    deadline = time.monotonic() + 6
    while (refused := httpx.get(short)).status_code == 200 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert (refused.status_code, refused.json()["message"]) == (401, "signature is already expired")


def test_client_refuses_urls_that_never_expire(client: ServerClient, workdir: Path) -> None:
    path = str(workdir / "f")
    for lifetime in (0, -1, MAX_FILE_URL_LIFETIME_S + 1):
        with pytest.raises(InvalidArgument, match="must expire"):
            client.file_url(SANDBOX, path, expires_in_s=lifetime)
    with pytest.raises(InvalidArgument, match="no access token"):
        client.file_url({"sandboxID": "open", "envdAccessToken": None}, path)
    with pytest.raises(InvalidArgument, match="needs a path"):
        client.file_url(SANDBOX, "", write=True)
    assert query_of(client.file_url(SANDBOX, path, expires_in_s=MAX_FILE_URL_LIFETIME_S))


class _OneSandboxApi(BaseHTTPRequestHandler):
    """The one REST call ``wrenbox sandbox url`` makes, answered for SANDBOX and the key "k"."""

    def do_GET(self) -> None:
        if self.path != f"/sandboxes/{SANDBOX['sandboxID']}" or self.headers.get("x-api-key") != "k":
            self.send_error(404)
            return
        body = json.dumps(SANDBOX).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def api_url() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _OneSandboxApi)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    thread.join()
    httpd.server_close()


def test_cli_prints_only_expiring_urls(
    api_url: str, secured: RunningAgent, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WRENBOX_URL", api_url)
    monkeypatch.setenv("WRENBOX_API_KEY", "k")
    (workdir / "f").write_text("via the CLI")
    path = str(workdir / "f")
    cli = CliRunner()

    made = cli.invoke(app, ["sandbox", "url", SANDBOX["sandboxID"], path, "--expires", "120"])
    assert made.exit_code == 0, made.output
    url = made.stdout.strip()
    assert url.startswith(api_url + "/files?")
    query = query_of(url)
    assert abs(int(query["signature_expiration"]) - (time.time() + 120)) <= 2
    assert httpx.get(secured.url + "/files?" + urlsplit(url).query).text == "via the CLI"

    refused = cli.invoke(app, ["sandbox", "url", SANDBOX["sandboxID"], path, "--expires", "0"])
    assert (refused.exit_code, refused.stdout) == (2, "")
    assert "must expire" in refused.stderr
