"""Tenancy through the API, with raw HTTP and real VMs: another team's sandboxes and templates do not
exist for a key, quotas answer 429, and the guest agent's token never travels with a template."""

from __future__ import annotations

import httpx
import pytest

from .conftest import TEMPLATE, Server
from .test_rest import SANDBOX_ROUTES, error_of

pytestmark = [pytest.mark.vm, pytest.mark.root, pytest.mark.slow]


def envd(server: Server, sandbox_id: str, token: str) -> httpx.Response:
    """``GET /envs`` of the sandbox's agent through the proxy, as E2B's SDK reaches it."""
    headers = {"E2b-Sandbox-Id": sandbox_id, "E2b-Sandbox-Port": "49983", "X-Access-Token": token}
    with server.http(team=None) as http:
        return http.get("/envs", headers=headers)


def created(response: httpx.Response) -> dict[str, str]:
    assert response.status_code == 201, response.text
    return response.json()


def test_another_teams_sandboxes_and_templates_do_not_exist_and_tokens_stay_home(server: Server) -> None:
    with server.http("owner") as owner, server.http("intruder") as intruder:
        parent = created(owner.post("/v2/sandboxes", json={"templateID": TEMPLATE}))
        sid, parent_token = parent["sandboxID"], parent["envdAccessToken"]
        try:
            for method, path, body in SANDBOX_ROUTES:
                r = intruder.request(method, path.format(id=sid), json=body)
                assert error_of(r)[0] == 404, (method, path, r.text)
            assert owner.get(f"/sandboxes/{sid}").json()["state"] == "running"  # untouched
            assert intruder.get("/v2/sandboxes").json() == []

            snap = created(owner.post(f"/sandboxes/{sid}/snapshots", json={"name": "owners-snap"}))
            name = snap["snapshotID"]
            assert error_of(intruder.get(f"/templates/{name}"))[0] == 404
            assert error_of(intruder.post("/v2/sandboxes", json={"templateID": name}))[0] == 404
            assert error_of(intruder.delete(f"/templates/{name}"))[0] == 404
            assert intruder.get("/snapshots").json() == []
            assert error_of(intruder.get(f"/templates/aliases/{name}"))[0] == 403  # E2B's: name taken
            for path in (f"/templates/{name}", "/templates", "/snapshots"):  # the manifest never shows
                shown = owner.get(path)
                assert shown.status_code == 200
                assert parent_token not in shown.text

            # Finding 10: the template's agent started with the parent's token, which authenticated
            # the child's first /init and nothing since.
            child = created(owner.post("/v2/sandboxes", json={"templateID": name}))
            try:
                assert child["envdAccessToken"] != parent_token
                assert envd(server, child["sandboxID"], parent_token).status_code == 401
                assert envd(server, child["sandboxID"], child["envdAccessToken"]).status_code == 200
            finally:
                owner.delete(f"/sandboxes/{child['sandboxID']}")

            # A template holds the parent's token: the parent gets a new one when it resumes.
            assert envd(server, sid, parent_token).status_code == 200
            assert owner.post(f"/sandboxes/{sid}/pause", json={}).status_code == 204
            resumed = owner.post(f"/sandboxes/{sid}/connect", json={"timeout": 60})
            new_token = created(resumed)["envdAccessToken"]
            assert new_token != parent_token
            assert owner.get(f"/sandboxes/{sid}").json()["envdAccessToken"] == new_token
            assert envd(server, sid, parent_token).status_code == 401
            assert envd(server, sid, new_token).status_code == 200
            assert owner.delete(f"/templates/{name}").status_code == 204
        finally:
            owner.delete(f"/sandboxes/{sid}")


def test_a_team_out_of_quota_is_refused_with_429_that_says_why(server: Server) -> None:
    # "frugal" may keep no paused sandbox and no template (tests/api/conftest.py).
    with server.http("frugal") as frugal:
        # E2B's API has no way to choose a sandbox's id, nor has wrenbox's: the field is ignored.
        asked = {"templateID": TEMPLATE, "sandboxID": "chosen0by0caller"}
        sid = created(frugal.post("/v2/sandboxes", json=asked))["sandboxID"]
        try:
            assert sid != asked["sandboxID"]
            for path in (f"/sandboxes/{sid}/snapshots", f"/sandboxes/{sid}/pause"):
                r = frugal.post(path, json={})
                status, message = error_of(r)
                assert status == 429, r.text
                assert "frugal" in message
                assert "at most 0" in message
                assert r.headers["should-retry"] == "false"  # E2B's SDK gives up at once
                assert "retry-after" not in r.headers
            assert frugal.get(f"/sandboxes/{sid}").json()["state"] == "running"
            assert frugal.get("/snapshots").json() == []
        finally:
            frugal.delete(f"/sandboxes/{sid}")


def test_a_teams_sandbox_token_opens_only_its_own_sandbox_through_the_proxy(server: Server) -> None:
    """The proxy routes by sandbox id, not by key: what guards a sandbox's agent is its own token. Another
    team's token (valid, for that team's own sandbox) or key opens nothing of it."""
    with server.http("owner") as owner, server.http("intruder") as intruder:
        mine = created(owner.post("/v2/sandboxes", json={"templateID": TEMPLATE}))
        theirs = created(intruder.post("/v2/sandboxes", json={"templateID": TEMPLATE}))
        try:
            assert envd(server, theirs["sandboxID"], theirs["envdAccessToken"]).status_code == 200  # control
            assert envd(server, mine["sandboxID"], mine["envdAccessToken"]).status_code == 200  # control
            assert envd(server, mine["sandboxID"], theirs["envdAccessToken"]).status_code == 401
            headers = {
                "E2b-Sandbox-Id": mine["sandboxID"],
                "E2b-Sandbox-Port": "49983",
                "X-API-KEY": server.key("intruder"),
            }
            assert intruder.get("/envs", headers=headers).status_code == 401  # a key is no token
        finally:
            owner.delete(f"/sandboxes/{mine['sandboxID']}")
            intruder.delete(f"/sandboxes/{theirs['sandboxID']}")
