"""Links, addresses and routes of a slot, over netlink (pyroute2).

Each function opens its own netlink socket in the calling thread's namespace: the host-side ones run
on any worker thread, :func:`configure_slot_netns` runs inside the slot (through ``call_in_netns``).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
from collections.abc import Callable, Iterable, Iterator
from ipaddress import IPv4Network

from pyroute2 import IPRoute, NetlinkError

from wrenbox.errors import AlreadyExists, Unsupported, WrenboxError
from wrenbox.network.plan import GATEWAY_IP, GUEST_NETWORK, NS_VETH, TAP, TAP_MAC, NetworkSlot

__all__ = [
    "add_veth_pair",
    "configure_host_veth",
    "configure_slot_netns",
    "delete_link",
    "link_names",
    "overlapping_routes",
]


_LOOPBACK = 1  # the kernel gives "lo" ifindex 1 in every namespace


@contextlib.contextmanager
def _netlink(what: str) -> Iterator[IPRoute]:
    """An rtnetlink socket in the calling thread's namespace; netlink errors become wrenbox errors."""
    if _loop_running():
        # pyroute2's sync API drives its own asyncio loop, which cannot run inside another one.
        raise RuntimeError(f"{what}: blocking netlink call on an event loop; use anyio.to_thread.run_sync")
    try:
        with IPRoute() as ipr:
            yield ipr
    except NetlinkError as exc:
        message = f"{what}: {exc.args[1] if len(exc.args) > 1 else exc}"
        if exc.code == errno.EPERM:
            raise Unsupported(f"{message}; network slots need root (CAP_NET_ADMIN)") from exc
        if exc.code == errno.EEXIST:
            raise AlreadyExists(message) from exc
        raise WrenboxError(message) from exc


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _index(ipr: IPRoute, name: str) -> int:
    found = ipr.link_lookup(ifname=name)
    if not found:
        raise WrenboxError(f"link {name!r} vanished while it was being configured")
    return int(found[0])


def add_veth_pair(slot: NetworkSlot, netns_fd: int) -> None:
    """Create the host veth with its peer already inside the slot namespace, named ``eth0``."""
    with _netlink(f"create veth {slot.host_veth}") as ipr:
        ipr.link("add", ifname=slot.host_veth, kind="veth", peer={"ifname": NS_VETH, "net_ns_fd": netns_fd})


def configure_host_veth(slot: NetworkSlot) -> None:
    """Address and bring up the host end; route the slot's host IP through it."""
    with _netlink(f"configure {slot.host_veth}") as ipr:
        index = _index(ipr, slot.host_veth)
        ipr.addr("add", index=index, address=str(slot.host_veth_ip), prefixlen=31)
        ipr.link("set", index=index, state="up")
        ipr.route("add", dst=f"{slot.host_ip}/32", gateway=str(slot.ns_veth_ip), oif=index)


def configure_slot_netns(slot: NetworkSlot) -> None:
    """Inside the slot namespace: ``lo``, ``eth0``, ``tap0`` (fixed MAC, gateway address), default route."""
    with _netlink(f"configure namespace {slot.netns}") as ipr:
        ipr.link("set", index=_LOOPBACK, state="up")
        eth = _index(ipr, NS_VETH)
        ipr.addr("add", index=eth, address=str(slot.ns_veth_ip), prefixlen=31)
        ipr.link("set", index=eth, state="up")
        # A persistent tap that QEMU attaches to by name; the flags match what QEMU asks for.
        flags = {"no_pi": True, "vnet_hdr": True, "one_queue": False, "multi_queue": False}
        ipr.link("add", ifname=TAP, kind="tuntap", mode="tap", ifr=flags)
        tap = _index(ipr, TAP)
        ipr.addr("add", index=tap, address=str(GATEWAY_IP), prefixlen=GUEST_NETWORK.prefixlen)
        ipr.link("set", index=tap, address=TAP_MAC, state="up")
        ipr.route("add", dst="0.0.0.0/0", gateway=str(slot.host_veth_ip), oif=eth)


def delete_link(name: str) -> bool:
    """Delete a link (a veth takes its peer with it); False if it does not exist."""
    with _netlink(f"delete link {name}") as ipr:
        found = ipr.link_lookup(ifname=name)
        if not found:
            return False
        try:
            ipr.link("del", index=found[0])
        except NetlinkError as exc:
            if exc.code == errno.ENODEV:  # deleted meanwhile (its peer's namespace went away)
                return False
            raise
    return True


def link_names() -> list[str]:
    """Names of the links in the calling thread's namespace."""
    with _netlink("list links") as ipr:
        return [str(link.get_attr("IFLA_IFNAME")) for link in ipr.get_links()]


def overlapping_routes(networks: Iterable[IPv4Network], ours: Callable[[str], bool]) -> list[str]:
    """Routes (any table, default routes aside) that overlap ``networks`` and do not use one of our links."""
    networks = tuple(networks)
    found = []
    with _netlink("list routes") as ipr:
        names = {link["index"]: str(link.get_attr("IFLA_IFNAME")) for link in ipr.get_links()}
        for route in ipr.get_routes(family=socket.AF_INET):
            if route["dst_len"] == 0:
                continue
            dst = IPv4Network(f"{route.get_attr('RTA_DST')}/{route['dst_len']}", strict=False)
            dev = names.get(route.get_attr("RTA_OIF"), "?")
            if ours(dev):
                continue
            table = route.get_attr("RTA_TABLE") or route["table"]
            clash = [net for net in networks if dst.overlaps(net)]
            found += [f"{dst} dev {dev} (table {table}) overlaps {net}" for net in clash]
    return found
