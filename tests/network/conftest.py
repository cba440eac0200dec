"""Fixtures for the network slot tests: a Network with a prefix and ranges of its own per module (so
runs never collide with each other or with a real wrenbox), an "internet" namespace, fake guests."""

from __future__ import annotations

import contextlib
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


@contextlib.asynccontextmanager
async def own_network(**overrides: object) -> AsyncIterator[Network]:
    """A set-up Network with a prefix and ranges of its own and ``overrides`` in its config."""
    network = Network(unique_config(**overrides))
    await network.setup()
    try:
        yield network
    finally:
        await network.teardown()
    assert leftovers(network.config.prefix) == []


@contextlib.asynccontextmanager
async def guest_on(
    network: Network, index: int, name: str, egress: EgressPolicy | None = None, spoof: str | None = None
) -> AsyncIterator[tuple[NetworkSlot, FakeGuest]]:
    """Slot ``index`` of ``network`` created, with a fake guest named ``name`` behind its tap0."""
    slot = network.slot(index)
    await network.create(slot, egress)
    try:
        guest = await anyio.to_thread.run_sync(lambda: FakeGuest(slot, name, spoof))
        try:
            yield slot, guest
        finally:
            guest.close()
    finally:
        await network.remove(slot)


@pytest.fixture
async def make_guest(network: Network) -> AsyncIterator[MakeGuest]:
    """``await make_guest(index, name, egress=None, spoof=None)`` → a created slot with a fake guest in it."""
    async with contextlib.AsyncExitStack() as stack:

        async def make(
            index: int, name: str, egress: EgressPolicy | None = None, spoof: str | None = None
        ) -> tuple[NetworkSlot, FakeGuest]:
            return await stack.enter_async_context(guest_on(network, index, name, egress, spoof))

        yield make
