"""The network of a wrenbox host: set it up once, then create and remove slots.

``Network`` owns the slots of its prefix end to end, as a pool: which indices are taken, building and
removing them, and taking back what a crash left. Typical use by the host runtime::

    network = Network(NetworkConfig())
    await network.setup()                      # at start: checks ranges, host table, ip_forward
    network.adopt({...})                       # at start: the slots the persisted sandboxes still hold
    await network.reclaim()                    # ... and drop every other slot of this prefix
    slot = network.reserve()                   # an index from the pool (write it down), then build it:
    await network.create(slot, EgressPolicy(deny=["0.0.0.0/0"], allow=["1.1.1.1"]))
    ...                                        # QEMU runs inside slot.netns, host talks to slot.host_ip
    await network.give_back(slot)              # removed, and its index free again
    await network.ensure_host_table()          # every few seconds: put the host table back if flushed

``take()`` is ``reserve()`` + ``create()`` for callers with nothing to write down in between (template
builds, which take the highest free slot, out of the way of sandboxes, which take the lowest).

The methods are async and run the (short, blocking) netlink and nft work on a worker thread. They
are not interruptible: a cancellation waits for the step to finish and is delivered afterwards, so a
caller never has to guess whether a slot half-exists.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from functools import partial
from pathlib import Path

import anyio

from wrenbox.command import require_tool
from wrenbox.errors import Conflict, InvalidArgument, Unavailable, WrenboxError
from wrenbox.network.allocator import SlotAllocator
from wrenbox.network.firewall import (
    EgressPolicy,
    apply_egress,
    apply_slot_rules,
    host_table_listing,
    host_table_present,
    install_host_table,
    remove_host_table,
)
from wrenbox.network.links import (
    add_veth_pair,
    configure_host_veth,
    configure_slot_netns,
    delete_link,
    link_names,
    overlapping_routes,
)
from wrenbox.network.netns import (
    call_in_netns,
    create_netns,
    list_netns,
    open_netns,
    remove_netns,
    write_sysctl,
)
from wrenbox.network.plan import NetworkConfig, NetworkSlot
from wrenbox.rollback import Rollback

__all__ = ["Network"]

log = logging.getLogger(__name__)

_IP_FORWARD = "net/ipv4/ip_forward"


class Network:
    """The slots of one host (one ``NetworkConfig``, one prefix): the pool, setup, create, remove,
    reclaim."""

    def __init__(self, config: NetworkConfig | None = None) -> None:
        self.config = config or NetworkConfig()
        self._pool = SlotAllocator(self.config.capacity)
        self._host_listing: str | None = None  # the host table as installed: its fingerprint

    def slot(self, index: int) -> NetworkSlot:
        """The plan of slot ``index`` (names and addresses; nothing is created)."""
        return self.config.slot(index)

    # -- the pool -------------------------------------------------------------------------------

    def reserve(self, *, highest: bool = False) -> NetworkSlot:
        """A free slot, taken from the pool but not built yet (:meth:`create` it): the caller can write
        it down first, so that a crash while building leaves a slot someone knows about. Unavailable
        when every slot is taken."""
        return self.slot(self._pool.allocate(highest=highest))

    async def take(self, egress: EgressPolicy | None = None, *, highest: bool = False) -> NetworkSlot:
        """:meth:`reserve` and :meth:`create` a slot; if building it fails, its index goes back."""
        slot = self.reserve(highest=highest)
        try:
            await self.create(slot, egress)
        except BaseException:
            self._pool.release(slot.index)
            raise
        return slot

    async def give_back(self, slot: NetworkSlot) -> None:
        """Remove ``slot`` (whatever of it exists) and return it to the pool. If the removal fails the
        slot stays taken, so it is never handed out half-removed. Idempotent."""
        await self.remove(slot)
        self._pool.release(slot.index)

    def adopt(self, indices: Iterable[int]) -> None:
        """At start: the slots records still hold (made by a previous process) are taken."""
        self._pool.adopt(indices)

    def in_use(self) -> frozenset[int]:
        return self._pool.in_use()

    async def setup(self) -> None:
        """Check the ranges against the host's routes, enable forwarding, install the host table.

        Conflict if a host route overlaps a wrenbox range. Idempotent.
        """
        await anyio.to_thread.run_sync(self._setup)

    async def ensure_host_table(self) -> bool:
        """Reinstall the host table if it is missing or differs from what was installed (someone ran
        ``systemctl restart nftables`` or ``nft flush ruleset``); True if it had to, with a warning
        logged. Until then guests could reach the host. Costs ~3 ms: run it every few seconds. Does
        nothing before :meth:`setup` or after :meth:`teardown`."""
        return await anyio.to_thread.run_sync(self._ensure_host_table)

    async def teardown(self) -> None:
        """Remove every slot of this prefix and the host table (uninstall; the inverse of ``setup``)."""
        await anyio.to_thread.run_sync(self._teardown)

    async def create(self, slot: NetworkSlot, egress: EgressPolicy | None = None) -> None:
        """Build ``slot``: namespace, veth pair, tap, routes, NAT and filtering.

        AlreadyExists (and nothing changed) if its namespace exists; Unavailable if the host table
        that isolates guests is missing. On failure everything built so far is removed again.
        """
        await anyio.to_thread.run_sync(self._create, slot, egress or EgressPolicy())

    async def remove(self, slot: NetworkSlot) -> None:
        """Remove ``slot``; works on half-created and already-removed slots. Every step is attempted."""
        await anyio.to_thread.run_sync(self._remove, slot)

    async def reclaim(self) -> list[int]:
        """Remove every slot of this prefix that the pool does not hold; return their indices.

        Run it at start, after :meth:`adopt`: a slot another process is building would be removed.
        Slots the pool holds are left exactly as they are.
        """
        return await anyio.to_thread.run_sync(self._reclaim, self._pool.in_use())

    async def set_egress(self, slot: NetworkSlot, egress: EgressPolicy) -> None:
        """Replace the slot's egress allow/deny lists atomically (open connections are not cut)."""
        self._check_names(slot)
        await anyio.to_thread.run_sync(partial(call_in_netns, slot.netns, apply_egress, self.config, egress))

    # -- blocking work, on a worker thread ------------------------------------------------------

    def _setup(self) -> None:
        require_tool("nft")
        config = self.config
        clashes = overlapping_routes(
            (config.host_range, config.transfer_range),
            ours=lambda dev: config.index_of_veth(dev) is not None,
        )
        if clashes:
            raise Conflict(
                "wrenbox network ranges collide with host routes: "
                + "; ".join(clashes)
                + ". Choose other host_range/transfer_range in the network settings."
            )
        if Path("/proc/sys", _IP_FORWARD).read_text().strip() != "1":
            log.info("enabling IPv4 forwarding on the host (sandbox egress needs it)")
            write_sysctl(_IP_FORWARD, "1")
        self._install_host_table()

    def _install_host_table(self) -> None:
        install_host_table(self.config)
        self._host_listing = host_table_listing(self.config)

    def _ensure_host_table(self) -> bool:
        if self._host_listing is None:
            return False  # not set up (or torn down): nothing to guard
        found = host_table_listing(self.config)
        if found is not None and found == self._host_listing:
            return False
        log.warning(
            "the host firewall table 'inet %s' was %s (nftables reloaded or flushed?); reinstalling it",
            self.config.prefix,
            "missing" if found is None else "changed",
        )
        self._install_host_table()
        return True

    def _teardown(self) -> None:
        self._reclaim(frozenset())
        remove_host_table(self.config)
        self._host_listing = None

    def _create(self, slot: NetworkSlot, egress: EgressPolicy) -> None:
        if slot != self.config.slot(slot.index):
            raise InvalidArgument(f"network slot {slot!r} does not match this host's network configuration")
        if not host_table_present(self.config):
            # Without it a guest could reach the host and other slots: refuse rather than run unisolated.
            raise Unavailable(
                f"the host firewall table 'inet {self.config.prefix}' is missing (network setup not run, or "
                "the nftables ruleset was flushed); refusing to create an unisolated slot"
            )
        with Rollback(f"network slot {slot.index}") as rollback:
            create_netns(slot.netns)
            rollback.push(f"network namespace {slot.netns}", remove_netns, slot.netns)
            fd = open_netns(slot.netns)
            try:
                add_veth_pair(slot, fd)
            finally:
                os.close(fd)
            rollback.push(f"link {slot.host_veth}", delete_link, slot.host_veth)
            call_in_netns(slot.netns, self._configure_inside, slot, egress)
            configure_host_veth(slot)
            rollback.commit()

    def _configure_inside(self, slot: NetworkSlot, egress: EgressPolicy) -> None:
        configure_slot_netns(slot)
        apply_slot_rules(self.config, slot, egress)
        write_sysctl(_IP_FORWARD, "1")  # per namespace: lets the slot route tap0 <-> eth0

    def _remove(self, slot: NetworkSlot) -> None:
        self._check_names(slot)
        self._remove_names(slot.netns, slot.host_veth)

    def _remove_names(self, netns: str, veth: str) -> None:
        # Deleting the veth first cuts the slot off at once, even while a VM still holds the namespace.
        errors: list[WrenboxError] = []
        for step, name in ((delete_link, veth), (remove_netns, netns)):
            try:
                step(name)
            except WrenboxError as exc:
                errors.append(exc)
        if errors:
            raise WrenboxError("; ".join(e.message for e in errors)) from errors[0]

    def _reclaim(self, in_use: frozenset[int]) -> list[int]:
        config = self.config
        found = {config.index_of_netns(name) for name in list_netns()}
        found |= {config.index_of_veth(name) for name in link_names()}
        stale = sorted(i for i in found if i is not None and i not in in_use)
        for index in stale:
            log.info("reclaiming stale network slot %d", index)
            self._remove_names(config.netns_name(index), config.veth_name(index))
        return stale

    def _check_names(self, slot: NetworkSlot) -> None:
        config = self.config
        ours = config.index_of_netns(slot.netns) == config.index_of_veth(slot.host_veth) == slot.index
        if not ours:
            raise InvalidArgument(f"network slot {slot!r} was not made with prefix {config.prefix!r}")
