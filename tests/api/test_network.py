"""Outbound rules through the API, enforced by the slot's firewall on a real VM: ``allow_internet_access``,
``network.allowOut``/``denyOut`` at create, and ``PUT /sandboxes/{id}/network`` on a running sandbox.

"The internet" is a namespace of this test's own (``tests.network.fakeguest.Internet``) routed from the
host, so nothing leaves the machine.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest
from e2b import Sandbox
from tests.network.fakeguest import Internet

from .conftest import TEMPLATE, Server

pytestmark = [pytest.mark.vm, pytest.mark.root, pytest.mark.slow]

PROBE = (
    "python3 -c 'import socket, sys\n"
    "try:\n"
    "    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2)\n"
    "    print(s.makefile().readline().strip())\n"
    "except OSError as e:\n"
    "    print(type(e).__name__)' "
)


@pytest.fixture
def internet(server: Server) -> Iterator[Internet]:
    world = Internet(server.settings.network.prefix, random.randrange(10_000))
    try:
        yield world
    finally:
        world.close()


def reaches(sb: Sandbox, internet: Internet) -> bool:
    said = sb.commands.run(PROBE + f"{internet.public} {internet.echo.port}").stdout.strip()
    assert said.startswith("internet") or said in ("TimeoutError", "OSError", "ConnectionRefusedError"), said
    return said.startswith("internet")


def test_outbound_rules_are_enforced_and_changeable(e2b_env: Server, internet: Internet) -> None:
    open_sb = Sandbox.create(TEMPLATE)
    closed = Sandbox.create(TEMPLATE, allow_internet_access=False)
    assert reaches(open_sb, internet)  # the default: the internet is open
    assert not reaches(closed, internet)
    with e2b_env.http() as http:
        detail = http.get(f"/sandboxes/{closed.sandbox_id}").json()
        assert detail["allowInternetAccess"] is False
        assert detail["network"] == {"allowOut": [], "denyOut": ["0.0.0.0/0"]}

        # Changed on the running sandbox: one address allowed, the rest still denied.
        r = http.put(
            f"/sandboxes/{closed.sandbox_id}/network",
            json={"allowOut": [internet.public], "denyOut": ["0.0.0.0/0"]},
        )
        assert r.status_code == 204, r.text
        assert reaches(closed, internet)
        assert (
            http.put(
                f"/sandboxes/{open_sb.sandbox_id}/network", json={"denyOut": [internet.public]}
            ).status_code
            == 204
        )
        assert not reaches(open_sb, internet)

        # Kept across a pause.
        open_sb.pause()
        Sandbox.connect(open_sb.sandbox_id)
        assert not reaches(open_sb, internet)

        # Bad rules change nothing.
        before = http.get(f"/sandboxes/{open_sb.sandbox_id}").json()["network"]
        for bad in ({"allowOut": ["example.com"]}, {"denyOut": "0.0.0.0/0"}, {"allowOut": ["1.2.3.4/99"]}):
            assert http.put(f"/sandboxes/{open_sb.sandbox_id}/network", json=bad).status_code == 400
        assert http.get(f"/sandboxes/{open_sb.sandbox_id}").json()["network"] == before
        assert not reaches(open_sb, internet)
        created = http.post("/v2/sandboxes", json={"templateID": TEMPLATE, "network": {"allowOut": ["nope"]}})
        assert created.status_code == 400


def test_network_rules_at_create(e2b_env: Server, internet: Internet) -> None:
    only_one = Sandbox.create(TEMPLATE, network={"allow_out": [internet.public], "deny_out": ["0.0.0.0/0"]})
    assert reaches(only_one, internet)
    denied = Sandbox.create(TEMPLATE, network={"deny_out": [f"{internet.public}/32"]})
    assert not reaches(denied, internet)
