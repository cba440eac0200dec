"""A property-based fuzz of the REST API, from the OpenAPI document the server serves: whatever a caller
sends to any route (bodies of any JSON shape, odd ids, odd query values), the server answers without a 5xx,
with E2B's ``{"code", "message"}`` body on errors, and a refused request (4xx) changes nothing.

``WRENBOX_FUZZ_EXAMPLES`` sets how many requests (default 120: a minute; CI's default run), e.g. 5000 for
a long soak.
"""

from __future__ import annotations

import os
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .conftest import TEMPLATE, Server

pytestmark = [pytest.mark.vm, pytest.mark.root, pytest.mark.slow]

EXAMPLES = int(os.environ.get("WRENBOX_FUZZ_EXAMPLES", "120"))
FIELDS = [
    "templateID",
    "timeout",
    "secure",
    "allow_internet_access",
    "metadata",
    "envVars",
    "autoPause",
    "autoPauseMemory",
    "autoResume",
    "memory",
    "requireHealthyGuest",
    "name",
    "count",
    "duration",
    "network",
    "mcp",
]
ODD_IDS = ["nonexistingsandbox", "a", "x" * 300, "..", "%2e%2e", "a-b-c", "UPPER", "id with space", "0"]

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**40), max_value=2**40)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=12), inner, max_size=3),
    max_leaves=8,
)
bodies = st.one_of(
    st.none(),
    json_values,
    st.fixed_dictionaries({}, optional={f: json_values for f in FIELDS}),
    st.fixed_dictionaries(
        {"templateID": st.sampled_from([TEMPLATE, "nosuch", "", "a/b:c"])},
        optional={f: json_values for f in FIELDS if f != "templateID"},
    ),
)
queries = st.dictionaries(
    st.sampled_from(
        [
            "metadata",
            "state",
            "template",
            "order",
            "startedAfter",
            "limit",
            "nextToken",
            "start",
            "end",
            "sandboxID",
            "name",
        ]
    ),
    st.text(max_size=40) | st.integers(min_value=-5, max_value=500).map(str),
    max_size=4,
)


def routes(server: Server) -> list[tuple[str, str]]:
    with server.http(team=None) as http:
        spec = http.get("/openapi.json").json()
    out = []
    for path, methods in spec["paths"].items():
        for method in methods:
            if path not in ("/health", "/metrics"):
                out.append((method.upper(), path))
    return sorted(out)


def world(http: httpx.Client) -> Any:
    """What a refused request must not change."""
    sandboxes = http.get("/v2/sandboxes").json()
    shown = sorted((s["sandboxID"], s["state"], sorted(s["metadata"].items()), s["endAt"]) for s in sandboxes)
    templates = sorted(t["templateID"] for t in http.get("/templates").json())
    snapshots = sorted(s["snapshotID"] for s in http.get("/snapshots").json())
    return shown, templates, snapshots


def test_no_request_breaks_the_server_or_changes_anything_it_refuses(server: Server) -> None:
    all_routes = routes(server)
    assert len(all_routes) >= 15
    with server.http() as http:
        target = http.post("/v2/sandboxes", json={"templateID": TEMPLATE, "metadata": {"fuzz": "target"}})
        assert target.status_code == 201
        ids = [*ODD_IDS, target.json()["sandboxID"]]
        try:
            _fuzz(http, all_routes, ids)
        finally:
            for sb in http.get("/v2/sandboxes").json():
                http.delete(f"/sandboxes/{sb['sandboxID']}")
            for snap in http.get("/snapshots").json():
                http.delete(f"/templates/{snap['snapshotID']}")


def _fuzz(http: httpx.Client, all_routes: list[tuple[str, str]], ids: list[str]) -> None:
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
        database=None,
    )
    @given(
        route=st.sampled_from(all_routes),
        sandbox_id=st.sampled_from(ids),
        template_id=st.sampled_from(["nosuch", TEMPLATE, "x%2Fy%3Adefault", "..", "a" * 300]),
        body=bodies,
        query=queries,
    )
    def one_request(
        route: tuple[str, str], sandbox_id: str, template_id: str, body: Any, query: dict[str, str]
    ) -> None:
        method, path = route
        url = path.replace("{sandbox_id}", sandbox_id).replace("{template_id}", template_id)
        url = url.replace("{alias}", template_id)
        before = world(http)
        kwargs: dict[str, Any] = {"params": query}
        if method in ("POST", "PUT", "PATCH"):
            kwargs["json"] = body
        response = http.request(method, url, **kwargs)
        assert response.status_code < 500, (method, url, body, query, response.text)
        if response.status_code >= 400:
            error = response.json()
            assert error["code"] == response.status_code, error
            assert isinstance(error["message"], str), error
            assert world(http) == before, (method, url, body, query, response.status_code)
        for made in _sandboxes_made(response):
            http.delete(f"/sandboxes/{made}")  # a valid create or fork: keep the world small

    one_request()


def _sandboxes_made(response: httpx.Response) -> list[str]:
    if response.status_code != 201:
        return []
    data = response.json()
    if isinstance(data, dict) and "sandboxID" in data and response.request.url.path.endswith("sandboxes"):
        return [data["sandboxID"]]
    if isinstance(data, list):
        return [e["sandbox"]["sandboxID"] for e in data if isinstance(e, dict) and e.get("sandbox")]
    return []
