"""The host table survives a flush of the host's ruleset, and confines forwarded traffic of wrenbox's ranges.

Only our own table is ever deleted or flushed here (``nft flush ruleset`` would take every other table on
this host with it): for our table that is exactly what a ``systemctl restart nftables`` does.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from ipaddress import IPv4Network

import anyio
import pytest
from tests.network.conftest import MakeGuest, unique_config
from tests.network.fakeguest import Internet, counter, off_loop, received, udp_send

from wrenbox.command import run
from wrenbox.manager.reaper import Reaper, ReaperConfig
from wrenbox.network import Network, call_in_netns
from wrenbox.network.firewall import host_table_listing
from wrenbox.records import SandboxRecord

pytestmark = [pytest.mark.root, pytest.mark.anyio]


def listing(network: Network) -> str | None:
    return off_loop(host_table_listing, network.config)


def nft(*command: str) -> None:
    run(["nft", *command])


def held_listener() -> socket.socket:
    """A TCP listener on every host address that keeps what it accepts (the echo server hangs up)."""
    return socket.create_server(("0.0.0.0", 0))


def delivered(conn: socket.socket, data: bytes, sender: socket.socket) -> bool:
    """Whether ``data`` sent on ``sender`` arrives on ``conn`` within half a second."""
    sender.sendall(data)
    conn.settimeout(0.5)
    try:
        return conn.recv(100) == data
    except TimeoutError:
        return False


@pytest.mark.parametrize("damage", ["delete table", "flush table"])
async def test_ensure_host_table_puts_back_a_deleted_or_flushed_table(network: Network, damage: str) -> None:
    config = network.config
    installed = listing(network)
    assert installed is not None
    assert 'comment "guest to host"' in installed
    assert await network.ensure_host_table() is False  # intact: nothing to do

    nft(*damage.split(), "inet", config.prefix)
    assert listing(network) != installed
    assert await network.ensure_host_table() is True
    assert listing(network) == installed
    assert await network.ensure_host_table() is False


async def test_ensure_host_table_does_nothing_before_setup() -> None:
    network = Network(unique_config())
    assert await network.ensure_host_table() is False
    assert listing(network) is None


async def test_guest_reaches_the_host_while_the_table_is_gone_and_is_cut_off_when_it_is_back(
    network: Network, internet: Internet, make_guest: MakeGuest
) -> None:
    _, guest = await make_guest(1, "alpha")  # default policy: the host's public-looking address is allowed
    host = internet.host_address
    with held_listener() as server:
        port = server.getsockname()[1]
        assert guest.probe(host, port) == "timeout"  # isolated

        nft("delete", "table", "inet", network.config.prefix)  # what a reload of nftables.conf does
        held = call_in_netns(guest.netns, socket.create_connection, (host, port), 2.0)  # the attack works
        conn, _ = server.accept()
        try:
            assert delivered(conn, b"before", held)

            assert await network.ensure_host_table() is True
            before = counter(network.config.prefix, "guest to host")
            assert guest.probe(host, port) == "timeout"  # new connections are refused again ...
            assert not delivered(conn, b"after", held)  # ... and the one opened meanwhile is cut
            assert counter(network.config.prefix, "guest to host") > before
        finally:
            conn.close()
            held.close()


class _NoSandboxes:
    def list_running(self) -> list[SandboxRecord]:
        return []

    async def expire(self, sandbox_id: str, action: str) -> None:
        raise AssertionError("nothing runs")


async def test_the_reaper_repairs_the_host_table(network: Network, caplog: pytest.LogCaptureFixture) -> None:
    installed = listing(network)
    repaired = anyio.Event()

    async def watch() -> None:
        if await network.ensure_host_table():
            repaired.set()

    reaper = Reaper(_NoSandboxes(), ReaperConfig(watch_interval_s=0.1), watches=[watch])
    with caplog.at_level(logging.WARNING, logger="wrenbox.network"):
        async with anyio.create_task_group() as tg:
            tg.start_soon(reaper.run)
            await anyio.sleep(0.2)
            nft("delete", "table", "inet", network.config.prefix)
            with anyio.fail_after(5):
                await repaired.wait()
            tg.cancel_scope.cancel()
    assert listing(network) == installed
    assert any("was missing" in r.getMessage() for r in caplog.records)


async def test_a_failing_watch_does_not_stop_the_reaper(caplog: pytest.LogCaptureFixture) -> None:
    calls = 0

    async def broken() -> None:
        nonlocal calls
        calls += 1
        raise RuntimeError("nft is gone")

    reaper = Reaper(_NoSandboxes(), ReaperConfig(watch_interval_s=0.01), watches=[broken])
    with caplog.at_level(logging.ERROR, logger="wrenbox.manager.reaper"):
        with anyio.move_on_after(0.3):
            await reaper.run()
    assert calls >= 3
    assert "nft is gone" in caplog.text


# -- forwarding (ip_forward is on host-wide) --------------------------------------------------------


@pytest.fixture
def lan(network: Network, internet: Internet) -> Iterator[Internet]:
    """A LAN neighbour that uses this host as its router (a second outside namespace)."""
    neighbour = Internet(f"{network.config.prefix}l", internet.seed + 1)  # other addresses, other table
    subnet = str(IPv4Network(f"{neighbour.peer}/30", strict=False))
    call_in_netns(neighbour.netns, run, ["ip", "route", "add", "default", "via", neighbour.host_address])
    back = ["ip", "route", "add", subnet, "via", internet.host_address]  # the internet answers it
    call_in_netns(internet.netns, run, back)
    try:
        yield neighbour
    finally:
        call_in_netns(internet.netns, run, ["ip", "route", "del", subnet])
        neighbour.close()


def _add_local(address: str) -> None:
    run(["ip", "addr", "add", f"{address}/32", "dev", "lo"])


async def test_host_does_not_forward_wrenbox_sources_from_outside(
    network: Network, internet: Internet, lan: Internet
) -> None:
    spoofed = str(network.config.transfer_range[-2])
    call_in_netns(lan.netns, _add_local, spoofed)
    with internet.udp_socket(internet.public) as server:
        port = server.getsockname()[1]
        # Control: the neighbour is routed to the internet through the host with its own address.
        with udp_send(lan.netns, internet.public, port, b"own") as client:
            assert received(server) == (b"own", (lan.peer, client.getsockname()[1]))
        # With a source from the slots' range the host would masquerade it like a guest's traffic
        # (arriving from the host's own address): an open relay.
        before = counter(network.config.prefix, "wrenbox source from outside")
        with udp_send(lan.netns, internet.public, port, b"spoofed", source=spoofed):
            assert received(server) is None
        assert counter(network.config.prefix, "wrenbox source from outside") > before
