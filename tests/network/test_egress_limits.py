"""What a slot's own policy cannot change: never-ranges, the DNS exception, and the connection limits.

Real packets from a fake guest to an "internet" namespace that also holds the cloud metadata address and
a resolver's address (routed there for the slots' traffic only, see ``Internet.routed_from``).
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator, Iterator

import pytest
from tests.network.conftest import guest_on, own_network
from tests.network.fakeguest import DNS, METADATA, Echo, FakeGuest, Internet, counter, received, udp_send

from wrenbox.network import EgressPolicy, Network, NetworkConfig, call_in_netns
from wrenbox.network.firewall import slot_ruleset

pytestmark = [pytest.mark.root, pytest.mark.anyio]

DENY_ALL = EgressPolicy(deny=["0.0.0.0/0"])  # what allow_internet_access=False becomes


@contextlib.asynccontextmanager
async def guest_with(
    internet: Internet, egress: EgressPolicy, **config: object
) -> AsyncIterator[tuple[Network, FakeGuest]]:
    """A network of its own with ``config``, one guest with ``egress``, METADATA and DNS routed out."""
    async with own_network(**config) as network, guest_on(network, 1, "alpha", egress) as (_, guest):
        with internet.routed_from(network.config.transfer_range):
            yield network, guest


@contextlib.contextmanager
def echo_at(internet: Internet, port: int) -> Iterator[Echo]:
    echo = Echo(internet.netns, "outside", port)
    try:
        yield echo
    finally:
        echo.stop()


# -- never-ranges (finding 11) ---------------------------------------------------------------------


async def test_an_allow_list_cannot_open_the_metadata_service(internet: Internet) -> None:
    opened = EgressPolicy(allow=[f"{METADATA}/32", internet.public])
    with echo_at(internet, 80):
        # The attack, where nothing is never-reachable: the tenant's allow entry reaches the service.
        async with guest_with(internet, opened, never_ranges=()) as (_, guest):
            assert guest.probe(METADATA, 80) == f"outside {METADATA} {internet.host_address}"
        async with guest_with(internet, opened) as (network, guest):  # the default never-ranges
            before = counter(network.config.prefix, "never reachable", netns=guest.slot.netns)
            assert guest.probe(METADATA, 80) == "timeout"
            assert counter(network.config.prefix, "never reachable", netns=guest.slot.netns) > before
            assert guest.probe(internet.public, internet.echo.port).startswith("internet ")  # control


async def test_operator_never_ranges_beat_allow_lists(internet: Internet) -> None:
    never = ["169.254.0.0/16", f"{internet.public}/32"]  # e.g. the host's LAN
    async with guest_with(internet, EgressPolicy(allow=["0.0.0.0/0"]), never_ranges=never) as (_, guest):
        assert guest.probe(internet.public, internet.echo.port) == "timeout"
        assert guest.probe(internet.private, internet.echo.port).startswith("internet ")  # control


def test_never_ranges_precede_every_egress_rule() -> None:
    config = NetworkConfig()
    rules = slot_ruleset(config, config.slot(1), EgressPolicy(allow=[METADATA])).split("chain egress {")[1]
    assert rules.index("@never") < rules.index("@dns") < rules.index("@allow") < rules.index("@deny")
    assert "elements = { 169.254.0.0/16 }" in slot_ruleset(config, config.slot(1), EgressPolicy())


# -- DNS under deny-all (note 16) --------------------------------------------------------------------


def _dns_server(internet: Internet, port: int) -> socket.socket:
    return internet.udp_socket(DNS, port)


async def test_dns_to_the_resolvers_survives_a_deny_all_policy(internet: Internet) -> None:
    async with guest_with(internet, DENY_ALL) as (network, guest):
        prefix, slot_ns = network.config.prefix, guest.slot.netns
        with _dns_server(internet, 53) as dns, _dns_server(internet, 5353) as other:
            assert exchange(guest, dns) == b"answer"
            before = counter(prefix, "deny list", netns=slot_ns)
            assert exchange(guest, other) is None  # the same host on another port stays denied
            assert counter(prefix, "deny list", netns=slot_ns) > before
        with echo_at(internet, 53):  # DNS over TCP too
            assert guest.probe(DNS, 53) == f"outside {DNS} {internet.host_address}"
        assert guest.probe(DNS, internet.echo.port) == "timeout"
        assert guest.probe(internet.public, internet.echo.port) == "timeout"  # deny-all holds


async def test_the_operator_can_close_the_dns_exception(internet: Internet) -> None:
    async with guest_with(internet, DENY_ALL, dns_always_allowed=False) as (_, guest):
        with _dns_server(internet, 53) as dns:
            assert exchange(guest, dns) is None


async def test_dns_exception_is_only_for_the_configured_resolvers(internet: Internet) -> None:
    async with guest_with(internet, DENY_ALL, dns_servers=["1.1.1.1"]) as (_, guest):
        with _dns_server(internet, 53) as dns:
            assert exchange(guest, dns) is None


def exchange(guest: FakeGuest, server: socket.socket) -> bytes | None:
    """A query from the guest to ``server``, answered if it arrives: the guest's answer, or None."""
    with udp_send(guest.netns, DNS, server.getsockname()[1], b"query") as client:
        query = received(server)
        if query is None:
            return None
        server.sendto(b"answer", query[1])
        answer = received(client)
    return answer[0] if answer else None


# -- connection limits (finding 8) -------------------------------------------------------------------


async def test_concurrent_connections_are_capped_per_slot(internet: Internet) -> None:
    async with guest_with(internet, EgressPolicy(), max_connections=3) as (network, guest):
        prefix, slot_ns, port = network.config.prefix, guest.slot.netns, internet.echo.port
        held = [
            call_in_netns(guest.netns, socket.create_connection, (internet.public, port), 2.0)
            for _ in range(3)
        ]
        try:
            for sock in held:  # the first three work (each stays open on the guest's side)
                assert sock.makefile().readline().startswith("internet ")
            before = counter(prefix, "connection count", netns=slot_ns)
            assert guest.probe(internet.public, port) == "timeout"
            assert guest.probe(DNS, port) == "timeout"  # per slot, not per destination
            assert counter(prefix, "connection count", netns=slot_ns) >= before + 2
        finally:
            for sock in held:
                sock.close()
        # A cap on concurrent connections, not on the total: closed ones no longer count.
        assert guest.probe(internet.public, port).startswith("internet ")


async def test_new_connections_are_rate_limited_per_slot(internet: Internet) -> None:
    limits = {"new_connections_per_s": 1, "new_connections_burst": 5}
    async with guest_with(internet, EgressPolicy(), **limits) as (network, guest):
        prefix, slot_ns = network.config.prefix, guest.slot.netns
        before = counter(prefix, "new connection rate", netns=slot_ns)
        with internet.udp_socket(internet.public) as server, contextlib.ExitStack() as clients:
            port = server.getsockname()[1]
            for i in range(20):  # twenty new flows at once (UDP from fresh ports)
                clients.enter_context(udp_send(guest.netns, internet.public, port, b"%d" % i))
            arrived = 0
            while received(server, timeout=0.3) is not None:
                arrived += 1
        assert 5 <= arrived <= 7  # the burst, and what the rate refilled meanwhile
        assert counter(prefix, "new connection rate", netns=slot_ns) - before == 20 - arrived


def test_every_accepted_egress_path_goes_through_the_limits() -> None:
    config = NetworkConfig()
    ruleset = slot_ruleset(config, config.slot(1), EgressPolicy(allow=["1.1.1.1"]))
    egress = ruleset.split("chain egress {")[1].split("}")[0]
    assert "accept" not in egress  # every way out of it is "goto admit" or a drop
    admit = ruleset.split("chain admit {")[1].split("}")[0].strip().splitlines()
    assert [line.strip() for line in admit] == [
        "ct state new limit rate over 1000/second burst 1000 packets"
        ' counter drop comment "new connection rate"',
        'ct state new ct count over 4096 counter drop comment "connection count"',
        "accept",
    ]
