"""Fixtures for the network slot tests: a Network with a prefix and ranges of its own per module (so
runs never collide with each other or with a real wrenbox), an "internet" namespace, fake guests."""

from __future__ import annotations

import random
import secrets
import string
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import anyio
import pytest
from tests.network.fakeguest import FakeGuest, Internet, off_loop

from wrenbox.network import EgressPolicy, Network, NetworkConfig, NetworkSlot
from wrenbox.network.links import link_names
from wrenbox.network.netns import list_netns

MakeGuest = Callable[..., Awaitable[tuple[NetworkSlot, FakeGuest]]]


def unique_config(**overrides: object) -> NetworkConfig:
    prefix = "wt" + "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(4))
    a, b = random.randrange(200, 250), random.randrange(256)
    kwargs = {"prefix": prefix, "host_range": f"10.{a}.{b}.0/28", "transfer_range": f"10.{a}.{b}.16/28"}
    return NetworkConfig(**(kwargs | overrides))  # type: ignore[arg-type]


def leftovers(prefix: str) -> list[str]:
    """Every namespace or host link whose name starts with ``prefix`` (callable from async tests)."""
    return [n for n in list_netns() + off_loop(link_names) if n.startswith(prefix)]


@pytest.fixture(scope="module")
def network() -> Iterator[Network]:
    network = Network(unique_config())
    anyio.run(network.setup)
    try:
        yield network
    finally:
        anyio.run(network.teardown)
    assert leftovers(network.config.prefix) == []


@pytest.fixture(scope="module")
def internet(network: Network) -> Iterator[Internet]:
    world = Internet(network.config.prefix, random.randrange(10_000))
    try:
        yield world
    finally:
        world.close()


@pytest.fixture
async def make_guest(network: Network) -> AsyncIterator[MakeGuest]:
    """``await make_guest(index, name, egress=None, spoof=None)`` → a created slot with a fake guest in it."""
    made: list[tuple[NetworkSlot, FakeGuest | None]] = []

    async def make(
        index: int, name: str, egress: EgressPolicy | None = None, spoof: str | None = None
    ) -> tuple[NetworkSlot, FakeGuest]:
        slot = network.slot(index)
        await network.create(slot, egress)
        made.append((slot, None))
        guest = await anyio.to_thread.run_sync(lambda: FakeGuest(slot, name, spoof))
        made[-1] = (slot, guest)
        return slot, guest

    try:
        yield make
    finally:
        for slot, guest in reversed(made):
            if guest is not None:
                guest.close()
            await network.remove(slot)
