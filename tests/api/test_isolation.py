"""Isolation seen from inside a real guest: from a sandbox's own shell, the host (the API port on every host
address a guest could name), another sandbox and the cloud metadata address are unreachable, even for a
sandbox whose egress policy lets everything out (so only the host's own rules stand between them).

Every "unreachable" is a connect that timed out *and* the drop counter of the rule responsible going up;
every target has a control that shows it answers where it should (the host reaches its listener and the
other sandbox's agent), and the same probe from the same guest reaches the "internet". ``allowOut`` and
``denyOut`` from inside the guest are in test_network.py.
"""

from __future__ import annotations

import json
import random
import sqlite3
import subprocess
from collections.abc import Iterator

import httpx
import pytest
from e2b import Sandbox
from tests.network.fakeguest import METADATA, Internet, counter, host_listener, probe

from wrenbox.envd import ENVD_PORT
from wrenbox.network import NetworkSlot

from .conftest import TEMPLATE, Server

pytestmark = [pytest.mark.vm, pytest.mark.root, pytest.mark.slow]

# Connects to every host:port given, at once, and prints "host:port what-happened" for each: the first
# line the peer sent, or the error (a timeout is what a dropped SYN looks like).
PROBE = """
import socket, sys, threading
def one(target):
    host, port = target.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=3) as s:
            said = s.makefile().readline().strip() or "connected"
    except socket.timeout:
        said = "timeout"
    except OSError as e:
        said = type(e).__name__
    print(target, said, flush=True)
threads = [threading.Thread(target=one, args=(t,)) for t in sys.argv[1:]]
for t in threads: t.start()
for t in threads: t.join()
"""
EVERYTHING = {"allow_out": ["0.0.0.0/0"]}


@pytest.fixture
def internet(server: Server) -> Iterator[Internet]:
    world = Internet(server.settings.network.prefix, random.randrange(10_000))
    try:
        with world.routed_from(server.settings.network.transfer_range):  # metadata exists, for slots
            yield world
    finally:
        world.close()


def slot_of(server: Server, sandbox_id: str) -> NetworkSlot:
    """The sandbox's network slot, as the server recorded it."""
    uri = f"file:{server.settings.state_db}?mode=ro"
    with sqlite3.connect(uri, uri=True) as db:
        (resources,) = db.execute("SELECT resources FROM sandboxes WHERE id = ?", (sandbox_id,)).fetchone()
    return NetworkSlot.from_dict(json.loads(resources)["slot"])


def uplink_addresses() -> list[str]:
    """The addresses of the host's interfaces with a default route (its LAN or public addresses)."""
    routes = json.loads(
        subprocess.run(["ip", "-j", "-4", "route", "show", "default"], capture_output=True, check=True).stdout
    )
    found = []
    for dev in {r["dev"] for r in routes}:
        out = subprocess.run(
            ["ip", "-j", "-4", "addr", "show", "dev", dev], capture_output=True, check=True
        ).stdout
        found += [a["local"] for i in json.loads(out) for a in i["addr_info"]]
    return found


def guest_probe(sandbox: Sandbox, targets: list[str]) -> dict[str, str]:
    out = sandbox.commands.run(f"python3 -c '{PROBE}' " + " ".join(targets), timeout=60).stdout
    said = dict(line.split(" ", 1) for line in out.splitlines())
    assert sorted(said) == sorted(targets), out
    return said


def test_a_guest_reaches_neither_the_host_nor_another_sandbox_nor_metadata(
    e2b_env: Server, internet: Internet
) -> None:
    prefix = e2b_env.settings.network.prefix
    a = Sandbox.create(TEMPLATE, network=EVERYTHING)
    b = Sandbox.create(TEMPLATE, network=EVERYTHING)
    slot_a, slot_b = slot_of(e2b_env, a.sandbox_id), slot_of(e2b_env, b.sandbox_id)
    with host_listener() as api:  # on every host address, as `wrenbox serve --listen 0.0.0.0:PORT` is
        host = sorted(
            {str(slot_a.host_veth_ip), str(slot_b.host_veth_ip), internet.host_address, *uplink_addresses()}
        )
        for address in host:  # control: the port is open to the host itself on each
            assert probe(None, address, api.port).startswith("host "), address
        other = [f"{slot_b.host_ip}:{ENVD_PORT}", f"{slot_b.ns_veth_ip}:{ENVD_PORT}"]
        # control: the other sandbox's agent answers the host
        assert httpx.get(f"http://{slot_b.host_ip}:{ENVD_PORT}/health", timeout=10).status_code < 500
        metadata = [f"{METADATA}:80"]
        reachable = f"{internet.public}:{internet.echo.port}"

        counts = {
            "guest to host": counter(prefix, "guest to host"),
            "slot to slot": counter(prefix, "slot to slot"),
            "never reachable": counter(prefix, "never reachable", netns=slot_a.netns),
        }
        said = guest_probe(a, [*(f"{h}:{api.port}" for h in host), *other, *metadata, reachable])

    assert said.pop(reachable).startswith("internet "), "control: the guest's probe reaches the internet"
    assert said == dict.fromkeys(said, "timeout")
    after = {
        "guest to host": counter(prefix, "guest to host"),
        "slot to slot": counter(prefix, "slot to slot"),
        "never reachable": counter(prefix, "never reachable", netns=slot_a.netns),
    }
    assert after["guest to host"] >= counts["guest to host"] + len(host)
    assert after["slot to slot"] > counts["slot to slot"]
    assert after["never reachable"] > counts["never reachable"]
