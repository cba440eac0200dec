"""Test helpers: a fake guest (a namespace plugged in where the VM's tap would be), an "internet"
namespace routed from the host, TCP probes from any namespace, and readers for rule counters."""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any, TypeVar

from pyroute2 import IPRoute

from wrenbox.command import run
from wrenbox.network import GATEWAY_IP, GUEST_IP, GUEST_MAC, GUEST_NETWORK, TAP, TAP_MAC, NetworkSlot
from wrenbox.network.netns import call_in_netns, create_netns, open_netns, remove_netns

T = TypeVar("T")

ECHO = Path(__file__).with_name("echo_server.py")
GUEST_PORT = 8080


class Echo:
    """An echo server process started inside a namespace (or on the host when netns is None)."""

    def __init__(self, netns: str | None, name: str, port: int = 0) -> None:
        argv = [sys.executable, str(ECHO), name, str(port)]
        popen = subprocess.Popen
        if netns is None:
            self.proc = popen(argv, stdout=subprocess.PIPE, text=True)
        else:
            self.proc = call_in_netns(netns, popen, argv, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().split()
        assert line[:1] == ["ready"], f"echo server {name} did not start"
        self.port = int(line[1])

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def probe(netns: str | None, host: object, port: int, timeout: float = 0.4, source: str | None = None) -> str:
    """Connect from ``netns`` and return the server's line, ``timeout``, or the errno name."""

    def connect() -> str:
        try:
            src = (source, 0) if source else None
            with socket.create_connection((str(host), port), timeout=timeout, source_address=src) as sock:
                return sock.makefile().readline().strip()
        except TimeoutError:
            return "timeout"
        except OSError as exc:
            return errno.errorcode.get(exc.errno or 0, str(exc))

    return connect() if netns is None else call_in_netns(netns, connect)


def udp_send(netns: str, host: object, port: int, data: bytes, source: str | None = None) -> socket.socket:
    """Send one datagram from ``netns`` (from a fresh port: a new flow each time); returns the socket
    (the caller closes it), which receives any answer."""
    sock = call_in_netns(netns, socket.socket, socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((source or "0.0.0.0", 0))
    sock.sendto(data, (str(host), port))
    return sock


def received(sock: socket.socket, timeout: float = 0.4) -> tuple[bytes, tuple[str, int]] | None:
    """The next datagram on ``sock`` and its sender (address, port), or None if none comes in time."""
    sock.settimeout(timeout)
    try:
        data, sender = sock.recvfrom(2048)
    except TimeoutError:
        return None
    return data, sender


def counter(table: str, comment: str, netns: str | None = None) -> int:
    """Packets counted by the rule with ``comment`` in ``inet <table>`` (host or a namespace)."""

    def listing() -> str:
        return run(["nft", "-j", "list", "table", "inet", table]).text

    text = listing() if netns is None else call_in_netns(netns, listing)
    for item in json.loads(text)["nftables"]:
        rule = item.get("rule")
        if rule and rule.get("comment") == comment:
            return sum(e["counter"]["packets"] for e in rule["expr"] if "counter" in e)
    raise AssertionError(f"no rule {comment!r} in inet {table}")


def _configure_guest(with_source: str | None) -> None:
    with IPRoute() as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        eth = ipr.link_lookup(ifname="eth0")[0]
        ipr.link("set", index=eth, address=GUEST_MAC)
        ipr.addr("add", index=eth, address=str(GUEST_IP), prefixlen=GUEST_NETWORK.prefixlen)
        if with_source:
            ipr.addr("add", index=eth, address=with_source, prefixlen=32)
        ipr.link("set", index=eth, state="up")
        ipr.route("add", dst="0.0.0.0/0", gateway=str(GATEWAY_IP))


def _replace_tap(guest_fd: int) -> None:
    # A VM would attach to tap0; here a veth named tap0 leads to the guest namespace instead.
    with IPRoute() as ipr:
        ipr.link("del", index=ipr.link_lookup(ifname=TAP)[0])
        ipr.link("add", ifname=TAP, kind="veth", peer={"ifname": "eth0", "net_ns_fd": guest_fd})
        tap = ipr.link_lookup(ifname=TAP)[0]
        ipr.link("set", index=tap, address=TAP_MAC)
        ipr.addr("add", index=tap, address=str(GATEWAY_IP), prefixlen=GUEST_NETWORK.prefixlen)
        ipr.link("set", index=tap, state="up")


class FakeGuest:
    """A namespace configured exactly like the guest (fixed IP, MAC and gateway) behind ``slot``'s tap0,
    running an echo server named ``name`` on GUEST_PORT. ``spoof`` adds a second, foreign address."""

    def __init__(self, slot: NetworkSlot, name: str, spoof: str | None = None) -> None:
        self.slot, self.name, self.netns = slot, name, f"{slot.netns}g"
        create_netns(self.netns)
        try:
            fd = open_netns(self.netns)
            try:
                call_in_netns(slot.netns, _replace_tap, fd)
            finally:
                os.close(fd)
            call_in_netns(self.netns, _configure_guest, spoof)
            self.echo = Echo(self.netns, name, GUEST_PORT)
        except BaseException:
            remove_netns(self.netns)
            raise

    def probe(self, host: object, port: int, **kwargs: object) -> str:
        return probe(self.netns, host, port, **kwargs)  # type: ignore[arg-type]

    def close(self) -> None:
        self.echo.stop()
        remove_netns(self.netns)


METADATA = "169.254.169.254"  # the cloud metadata service
DNS = "8.8.8.8"  # the first of the default resolvers guests are told to use


class Internet:
    """A namespace standing for the outside world, routed from the host through its own veth.

    ``public`` is a public-looking address, ``private`` an RFC 1918 one; both live on its loopback and
    are served by one echo server named ``internet``. ``host_address`` is the host's end of the link
    (a host address that is not on any slot's veth). It also holds METADATA and DNS, which the host
    routes here only for slots (:meth:`routed_from`): the host's own traffic to them is never diverted."""

    def __init__(self, prefix: str, seed: int) -> None:
        self.netns, self.link, self.seed = f"{prefix}-inet", f"{prefix}i", seed
        self.host_address = f"203.0.113.{4 * (seed % 64) + 1}"
        self.peer = f"203.0.113.{4 * (seed % 64) + 2}"
        self.public = f"198.51.100.{seed % 250 + 1}"
        self.private = f"172.31.{seed % 250}.1"
        self.routes = [self.public, self.private]
        self.table = 20_000 + seed  # a routing table of its own for :meth:`routed_from`
        create_netns(self.netns)
        try:
            self._wire()
            self.echo = Echo(self.netns, "internet")
        except BaseException:
            self.close()
            raise

    def _wire(self) -> None:
        fd = open_netns(self.netns)
        try:
            with IPRoute() as ipr:
                ipr.link("add", ifname=self.link, kind="veth", peer={"ifname": "eth0", "net_ns_fd": fd})
                index = ipr.link_lookup(ifname=self.link)[0]
                ipr.addr("add", index=index, address=self.host_address, prefixlen=30)
                ipr.link("set", index=index, state="up")
        finally:
            os.close(fd)
        call_in_netns(self.netns, self._inside)
        with IPRoute() as ipr:
            for dst in self.routes:
                ipr.route("add", dst=f"{dst}/32", gateway=self.peer)

    def _inside(self) -> None:
        with IPRoute() as ipr:
            eth = ipr.link_lookup(ifname="eth0")[0]
            ipr.addr("add", index=eth, address=self.peer, prefixlen=30)
            ipr.link("set", index=eth, state="up")
            lo = ipr.link_lookup(ifname="lo")[0]  # this kernel has no dummy links
            for address in [*self.routes, METADATA, DNS]:
                ipr.addr("add", index=lo, address=address, prefixlen=32)
            ipr.link("set", index=lo, state="up")

    @contextlib.contextmanager
    def routed_from(self, source: IPv4Network) -> Iterator[None]:
        """Route METADATA and DNS here for packets from ``source`` (a network's transfer range) only."""
        rule = ["ip", "rule", "add", "from", str(source), "lookup", str(self.table)]
        run(rule)
        try:
            for address in (METADATA, DNS):
                run(["ip", "route", "add", address, "via", self.peer, "table", str(self.table)])
            yield
        finally:
            run(["ip", "route", "flush", "table", str(self.table)], check=False)
            run(["ip", "rule", "del", *rule[3:]])

    def udp_socket(self, address: str, port: int = 0) -> socket.socket:
        """A UDP socket inside this namespace, bound to ``address``:``port``."""
        sock = call_in_netns(self.netns, socket.socket, socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((address, port))
        return sock

    def close(self) -> None:
        with contextlib.suppress(AttributeError):
            self.echo.stop()
        _del_link(self.link)  # takes its routes with it
        remove_netns(self.netns)


def off_loop(fn: Callable[..., T], *args: Any) -> T:
    """Run blocking netlink code from an async test: pyroute2's sync API cannot run on an event loop."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(fn, *args).result()


def _add_veth(name: str) -> int:
    with IPRoute() as ipr:
        ipr.link("add", ifname=name, kind="veth", peer={"ifname": f"{name}p"})
        return int(ipr.link_lookup(ifname=name)[0])


def _del_link(name: str) -> None:
    with IPRoute() as ipr:
        for found in ipr.link_lookup(ifname=name):
            ipr.link("del", index=found)


@contextlib.contextmanager
def host_link(name: str) -> Iterator[int]:
    """A link on the host named ``name`` that wrenbox did not make (a veth; this kernel has no dummy)."""
    index = off_loop(_add_veth, name)
    try:
        yield index
    finally:
        off_loop(_del_link, name)


@contextlib.contextmanager
def host_listener() -> Iterator[Echo]:
    """An echo server on the host, on all addresses, standing for the wrenbox API port."""
    echo = Echo(None, "host")
    try:
        yield echo
    finally:
        echo.stop()
