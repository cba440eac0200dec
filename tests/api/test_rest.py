"""The REST API's contract with raw HTTP: status codes, ``{"code", "message"}`` bodies on every error,
authentication, and that a refused request changes nothing."""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Iterator
from typing import Any, cast

import pytest

from wrenbox.api.app import create_app
from wrenbox.api.keys import KeyStore
from wrenbox.manager import Sandboxes

from .conftest import TEMPLATE, Server

pytestmark = [pytest.mark.vm, pytest.mark.root, pytest.mark.slow]

SANDBOX_ROUTES = [
    ("GET", "/sandboxes/{id}", None),
    ("DELETE", "/sandboxes/{id}", None),
    ("POST", "/sandboxes/{id}/timeout", {"timeout": 30}),
    ("POST", "/sandboxes/{id}/pause", {}),
    ("POST", "/sandboxes/{id}/connect", {"timeout": 30}),
    ("POST", "/v2/sandboxes/{id}/connect", {}),
    ("POST", "/sandboxes/{id}/fork", {}),
    ("POST", "/sandboxes/{id}/snapshots", {}),
    ("POST", "/sandboxes/{id}/refreshes", {}),
    ("PUT", "/sandboxes/{id}/network", {"denyOut": ["0.0.0.0/0"]}),
    ("POST", "/sandboxes/{id}/resume", {}),
    ("GET", "/sandboxes/{id}/metrics", None),
    ("GET", "/sandboxes/{id}/logs", None),
]


def error_of(response) -> tuple[int, str]:  # type: ignore[no-untyped-def]
    body = response.json()
    assert set(body) >= {"code", "message"}, body
    assert body["code"] == response.status_code
    assert isinstance(body["message"], str)
    assert body["message"]
    return response.status_code, body["message"]


def sandbox_ids(server: Server) -> set[str]:
    with server.http() as http:
        return {s["sandboxID"] for s in http.get("/v2/sandboxes").json()}


# Documented as public (README): the server's health and metrics, and the API's own description.
PUBLIC = {"/health", "/metrics", "/openapi.json", "/docs", "/docs/oauth2-redirect"}


def app_routes(router: Any) -> Iterator[tuple[str, str]]:
    """(method, path) of every route the server's app serves, included routers too."""
    for route in router.routes:
        inner = getattr(route, "original_router", None)  # FastAPI's wrapper of an included router
        if inner is not None:
            yield from app_routes(inner)
        else:
            path = re.sub(r"\{(\w+):\w+\}", r"{\1}", route.path)  # {name:path} is {name} on the wire
            yield from ((m, path) for m in sorted(route.methods - {"HEAD"}))


def served_routes() -> list[tuple[str, str]]:
    """What the app serves, found from the app itself: a new route is covered without being listed."""
    app = create_app(cast(Sandboxes, None), cast(KeyStore, None)).rest
    found = sorted(set(app_routes(app)))
    assert {path for _, path in found} >= set(app.openapi()["paths"]), "the walk missed routes"
    return found


def test_the_route_list_is_complete() -> None:
    """Every route about one sandbox is in SANDBOX_ROUTES (which the tenancy tests try as an intruder)."""
    listed = {(m, p.replace("{id}", "{sandbox_id}")) for m, p, _ in SANDBOX_ROUTES}
    about_one = {(m, p) for m, p in served_routes() if "{sandbox_id}" in p}
    assert about_one - listed == set()


@pytest.mark.parametrize("key", [None, "", "e2b_" + "0" * 40, "not a key"])
def test_every_route_wants_a_valid_key(server: Server, key: str | None) -> None:
    placeholders = {"sandbox_id": "abc123", "template_id": TEMPLATE, "alias": TEMPLATE}
    headers = {} if key is None else {"X-API-KEY": key}
    routes = [(m, p) for m, p in served_routes() if p not in PUBLIC]
    assert len(routes) >= 20  # the walk found the API
    with server.http(team=None) as http:
        for method, path in routes:
            body = {"templateID": TEMPLATE} if method in ("POST", "PUT", "PATCH") else None
            r = http.request(method, path.format(**placeholders), json=body, headers=headers)
            assert error_of(r)[0] == 401, (method, path, r.text)
        for path in sorted(PUBLIC):  # control: the public ones answer without a key
            assert http.get(path).status_code == 200, path
    assert sandbox_ids(server) == set()


@pytest.mark.parametrize(("method", "path", "body"), SANDBOX_ROUTES)
def test_unknown_sandboxes_are_404(server: Server, method: str, path: str, body: object) -> None:
    with server.http() as http:
        for sandbox_id in ("nonexistingsandbox", "abc-6532622b"):
            r = http.request(method, path.format(id=sandbox_id), json=body)
            assert error_of(r)[0] == 404, (method, path, r.text)


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"templateID": ""},
        {"templateID": TEMPLATE, "timeout": "ten"},
        {"templateID": TEMPLATE, "timeout": 0},
        {"templateID": TEMPLATE, "timeout": -5},
        {"templateID": TEMPLATE, "metadata": {"k": 1}},
        {"templateID": TEMPLATE, "metadata": "x"},
        {"templateID": TEMPLATE, "envVars": ["A=b"]},
        {"templateID": TEMPLATE, "autoPause": "yes"},
        {"templateID": "minimal:v2"},
    ],
)
def test_bad_creates_are_400_and_make_nothing(server: Server, body: dict[str, object]) -> None:
    with server.http() as http:
        for path in ("/sandboxes", "/v2/sandboxes"):
            assert error_of(http.post(path, json=body))[0] == 400, (path, body)
        assert error_of(http.post("/v2/sandboxes", content=b"{not json"))[0] == 400
    assert sandbox_ids(server) == set()


def test_unknown_and_foreign_templates_are_404(server: Server) -> None:
    with server.http() as http:
        assert error_of(http.post("/v2/sandboxes", json={"templateID": "nosuch"}))[0] == 404
        assert http.get("/v2/sandboxes", params={"template": "nosuch"}).json() == []
        assert error_of(http.get("/templates/aliases/nosuch"))[0] == 404
        assert http.get(f"/templates/aliases/{TEMPLATE}").json() == {"templateID": TEMPLATE, "public": True}
        assert error_of(http.delete(f"/templates/{TEMPLATE}"))[0] == 403  # the operator's
        assert error_of(http.delete("/templates/team%2Fnosuch%3Adefault"))[0] == 404
    assert sandbox_ids(server) == set()


@pytest.mark.parametrize(
    "params",
    [
        {"state": "sleeping"},
        {"order": "sideways"},
        {"limit": 0},
        {"limit": 101},
        {"nextToken": "@@"},
        {"startedAfter": "yesterday"},
    ],
)
def test_bad_list_queries_are_400(server: Server, params: dict[str, object]) -> None:
    with server.http() as http:
        assert error_of(http.get("/v2/sandboxes", params=params))[0] == 400


def test_a_sandbox_refuses_bad_changes_and_keeps_its_state(server: Server) -> None:
    with server.http() as http:
        created = http.post("/v2/sandboxes", json={"templateID": TEMPLATE, "metadata": {"a": "b"}})
        assert created.status_code == 201, created.text
        sid = created.json()["sandboxID"]
        before = http.get(f"/sandboxes/{sid}").json()
        for method, path, body in [
            ("POST", "/sandboxes/{id}/timeout", {"timeout": -1}),
            ("POST", "/sandboxes/{id}/timeout", {}),
            ("POST", "/sandboxes/{id}/pause", {"memory": "no"}),
            ("POST", "/sandboxes/{id}/fork", {"count": 0}),
            ("POST", "/sandboxes/{id}/fork", {"count": 1000}),
            ("POST", "/sandboxes/{id}/snapshots", {"name": "../escape"}),
            ("POST", "/sandboxes/{id}/connect", {"timeout": "soon"}),
        ]:
            r = http.request(method, path.format(id=sid), json=body)
            assert error_of(r)[0] == 400, (method, path, body, r.text)
        after = http.get(f"/sandboxes/{sid}").json()
        assert {k: after[k] for k in ("state", "metadata", "endAt")} == {
            k: before[k] for k in ("state", "metadata", "endAt")
        }
        assert http.delete(f"/sandboxes/{sid}").status_code == 204
        assert error_of(http.delete(f"/sandboxes/{sid}"))[0] == 404


def test_the_proxy_answers_502_for_sandboxes_it_cannot_reach(server: Server) -> None:
    with server.http(team=None) as http:
        r = http.get("/health", headers={"E2b-Sandbox-Id": "nonexisting", "E2b-Sandbox-Port": "49983"})
        assert r.status_code == 502
        assert r.json()["message"] == "The sandbox was not found"
        unsigned = http.get("/files", params={"path": "/etc/passwd", "signature": "v1_forged"})
        assert unsigned.status_code == 502


def test_health_metrics_and_openapi_need_no_key(server: Server) -> None:
    with server.http(team=None) as http:
        assert http.get("/health").json() == {"status": "ok"}
        metrics = http.get("/metrics")
        assert metrics.status_code == 200
        assert 'wrenbox_sandboxes{state="running"}' in metrics.text
        assert "wrenbox_api_request_seconds_bucket" in metrics.text
        spec = http.get("/openapi.json").json()
        assert {"/v2/sandboxes", "/sandboxes/{sandbox_id}/pause", "/snapshots"} <= set(spec["paths"])


def test_a_team_over_its_limit_gets_429_and_others_go_on(server: Server) -> None:
    made: list[str] = []
    with server.http("limited") as limited, server.http("bystander") as bystander:
        try:
            for _ in range(4):
                r = limited.post("/v2/sandboxes", json={"templateID": TEMPLATE})
                assert r.status_code == 201, r.text
                made.append(r.json()["sandboxID"])
            over = limited.post("/v2/sandboxes", json={"templateID": TEMPLATE})
            assert error_of(over)[0] == 429
            assert int(over.headers["retry-after"]) >= 1
            assert len(limited.get("/v2/sandboxes").json()) == 4  # nothing was made
            assert error_of(limited.post(f"/sandboxes/{made[0]}/fork", json={}))[0] == 429
            other = bystander.post("/v2/sandboxes", json={"templateID": TEMPLATE})
            assert other.status_code == 201  # another team is not held up
            made.append(other.json()["sandboxID"])
            assert limited.post(f"/sandboxes/{made[0]}/pause", json={}).status_code == 204
            again = limited.post("/v2/sandboxes", json={"templateID": TEMPLATE})  # room again
            assert again.status_code == 201
            made.append(again.json()["sandboxID"])
        finally:
            for sid in made:
                for http in (limited, bystander):
                    http.delete(f"/sandboxes/{sid}")


def test_an_idle_keep_alive_connection_is_not_closed_under_a_client(server: Server) -> None:
    """A client that waits a few seconds between calls reuses its connection: the server must not be
    closing it at that moment (uvicorn's default 5 s keep-alive reset E2B's SDK after a 5 s sleep)."""
    request = f"GET /health HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n\r\n".encode()
    body = b'{"status":"ok"}'

    def answer(sock: socket.socket) -> bytes:
        got = b""
        while not got.endswith(body):
            chunk = sock.recv(4096)
            if not chunk:
                return got  # closed by the server
            got += chunk
        return got

    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(request)
        assert answer(sock).startswith(b"HTTP/1.1 200")
        time.sleep(6)
        sock.sendall(request)
        assert answer(sock).startswith(b"HTTP/1.1 200")  # nothing if the server had closed it
