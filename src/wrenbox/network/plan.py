"""Addressing of network slots: what slot *i* is called and which addresses it uses.

Pure arithmetic, no side effects. Every sandbox gets a slot; a slot is a network namespace holding
the VM's ``tap0`` and the namespace end (``eth0``) of a veth pair whose other end sits on the host::

    host                         slot netns "wrenbox-ns-7"                 guest (VM)
    wrenbox-v7 10.12.0.14/31 ─── eth0 10.12.0.15/31
    route 10.11.0.7/32 via .15   DNAT 10.11.0.7 → 169.254.0.21
                                 tap0 169.254.0.22/30, TAP_MAC ─────────── 169.254.0.21/30, GUEST_MAC

The guest side is identical in every slot (addresses and both MACs): a snapshot taken in one slot
carries the guest's IP configuration and its ARP entry for the gateway, and must work unchanged when
restored into any other slot. Only the host side differs per slot.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, ip_address
from pathlib import Path

from wrenbox.cidrs import parse_cidr, parse_cidrs
from wrenbox.errors import InvalidArgument

__all__ = [
    "DEFAULT_DENY",
    "DEFAULT_DNS",
    "DEFAULT_NEVER",
    "GATEWAY_IP",
    "GUEST_IP",
    "GUEST_MAC",
    "GUEST_NETWORK",
    "NETNS_DIR",
    "NS_VETH",
    "TAP",
    "TAP_MAC",
    "NetworkConfig",
    "NetworkSlot",
    "check_index",
    "kernel_ip_arg",
]

GUEST_NETWORK = IPv4Network("169.254.0.20/30")
GUEST_IP = IPv4Address("169.254.0.21")
GATEWAY_IP = IPv4Address("169.254.0.22")
GUEST_MAC = "02:fc:00:00:00:05"
TAP_MAC = "02:fc:00:00:00:06"
TAP = "tap0"
NS_VETH = "eth0"
NETNS_DIR = Path("/run/netns")  # where named network namespaces are mounted (as ``ip netns`` does)

DEFAULT_HOST_RANGE = IPv4Network("10.11.0.0/16")
DEFAULT_TRANSFER_RANGE = IPv4Network("10.12.0.0/16")

# Egress a guest may not reach unless its allow list names it: the non-public IPv4 space (RFC 6890),
# which covers the host's LAN, cloud metadata (169.254.169.254) and wrenbox's own ranges.
DEFAULT_DENY: tuple[IPv4Network, ...] = tuple(
    IPv4Network(n)
    for n in (
        "0.0.0.0/8",
        "10.0.0.0/8",
        "100.64.0.0/10",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "172.16.0.0/12",
        "192.0.0.0/24",
        "192.168.0.0/16",
        "198.18.0.0/15",
        "224.0.0.0/4",
        "240.0.0.0/4",
    )
)

# Egress a guest never reaches, whatever its allow list says: link-local space holds the cloud
# metadata service (169.254.169.254) with the host's credentials.
DEFAULT_NEVER: tuple[IPv4Network, ...] = (IPv4Network("169.254.0.0/16"),)

# The resolvers a guest is told to use (``wrenbox.images.guest_kernel_args``' default).
DEFAULT_DNS: tuple[IPv4Address, ...] = (IPv4Address("8.8.8.8"), IPv4Address("8.8.4.4"))

# Short enough that "<prefix>-v<5 digits>" fits IFNAMSIZ (15 characters), and a valid nft identifier.
_PREFIX = re.compile(r"[a-z][a-z0-9]{0,7}")
_MAX_INDEX = 99_999
_NETNS_NAME = re.compile(r"[a-z][a-z0-9]{0,7}-ns-[1-9][0-9]{0,4}")
_VETH_NAME = re.compile(r"[a-z][a-z0-9]{0,7}-v[1-9][0-9]{0,4}")


def kernel_ip_arg(device: str = "eth0") -> str:
    """The guest kernel's ``ip=`` argument that configures the fixed guest address at boot."""
    mask = GUEST_NETWORK.netmask
    return f"ip={GUEST_IP}::{GATEWAY_IP}:{mask}::{device}:off"


def check_index(index: object, capacity: int) -> int:
    """``index`` if it is a slot index in ``1 … capacity``, else InvalidArgument."""
    if not isinstance(index, int) or isinstance(index, bool) or not 1 <= index <= capacity:
        raise InvalidArgument(f"invalid network slot {index!r}: expected 1 … {capacity}")
    return index


@dataclass(frozen=True, slots=True)
class NetworkConfig:
    """Where slots live. Strings are accepted for the ranges and parsed.

    ``prefix`` names everything wrenbox creates on the host (namespaces ``<prefix>-ns-<i>``, host veths
    ``<prefix>-v<i>``, the nftables table ``inet <prefix>``), so reclaim can find exactly what is
    ours. ``host_range`` supplies one host-reachable address per slot, ``transfer_range`` one /31
    per slot for the veth pair. ``deny_ranges`` are the egress destinations refused unless a
    sandbox's allow list names them; ``never_ranges`` are refused even then (the operator's list:
    metadata, the host's LAN, ...).

    ``dns_servers`` are the resolvers guests use. With ``dns_always_allowed`` a guest reaches them
    on port 53 (UDP and TCP) whatever its egress policy says, so name resolution keeps working under
    a deny-all policy; that leaves DNS as a channel out of a "no internet" sandbox (queries carry
    data to whoever runs the zone), which an operator closes by turning it off.

    Per slot, ``max_connections`` caps the guest's concurrent connections out and
    ``new_connections_per_s`` (bursts up to ``new_connections_burst``) the rate it opens them: one
    guest must not fill the host's conntrack table, which every other tenant, the API and SSH share.
    """

    prefix: str = "wrenbox"
    host_range: IPv4Network = DEFAULT_HOST_RANGE
    transfer_range: IPv4Network = DEFAULT_TRANSFER_RANGE
    max_slots: int | None = None
    deny_ranges: tuple[IPv4Network, ...] = field(default=DEFAULT_DENY)
    never_ranges: tuple[IPv4Network, ...] = field(default=DEFAULT_NEVER)
    dns_servers: tuple[IPv4Address, ...] = field(default=DEFAULT_DNS)
    dns_always_allowed: bool = True
    max_connections: int = 4096
    new_connections_per_s: int = 1000
    new_connections_burst: int = 1000

    def __post_init__(self) -> None:
        if not isinstance(self.prefix, str) or not _PREFIX.fullmatch(self.prefix):
            raise InvalidArgument(
                f"invalid network prefix {self.prefix!r}: "
                "1-8 lowercase letters or digits, starting with a letter"
            )
        host = parse_cidr(self.host_range, "host_range")
        transfer = parse_cidr(self.transfer_range, "transfer_range")
        object.__setattr__(self, "host_range", host)
        object.__setattr__(self, "transfer_range", transfer)
        object.__setattr__(self, "deny_ranges", parse_cidrs(self.deny_ranges, "deny_ranges"))
        object.__setattr__(self, "never_ranges", parse_cidrs(self.never_ranges, "never_ranges"))
        object.__setattr__(self, "dns_servers", _dns_servers(self.dns_servers, self.never_ranges))
        for name in ("max_connections", "new_connections_per_s", "new_connections_burst"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InvalidArgument(f"invalid {name} {value!r}: expected a positive integer")
        if not isinstance(self.dns_always_allowed, bool):
            raise InvalidArgument(
                f"invalid dns_always_allowed {self.dns_always_allowed!r}: expected true or false"
            )
        for a, b in ((host, transfer), (host, GUEST_NETWORK), (transfer, GUEST_NETWORK)):
            if a.overlaps(b):
                raise InvalidArgument(f"network ranges {a} and {b} overlap")
        if self.max_slots is not None and (not isinstance(self.max_slots, int) or self.max_slots < 1):
            raise InvalidArgument(f"invalid max_slots {self.max_slots!r}: expected a positive integer")
        if self.capacity < 1:
            raise InvalidArgument(f"network ranges {host} and {transfer} are too small for a single slot")

    @property
    def capacity(self) -> int:
        """Number of slots; valid indices are ``1 … capacity``."""
        fits = min(
            self.host_range.num_addresses - 2,  # neither the network nor the broadcast address
            self.transfer_range.num_addresses // 2 - 1,  # the first /31 is left unused
            _MAX_INDEX,
        )
        return fits if self.max_slots is None else min(fits, self.max_slots)

    def check_index(self, index: object) -> int:
        return check_index(index, self.capacity)

    def netns_name(self, index: int) -> str:
        return f"{self.prefix}-ns-{index}"

    def veth_name(self, index: int) -> str:
        return f"{self.prefix}-v{index}"

    def index_of_netns(self, name: str) -> int | None:
        """The slot index of a namespace name that is ours, else None."""
        return _index(name, f"{self.prefix}-ns-")

    def index_of_veth(self, name: str) -> int | None:
        return _index(name, f"{self.prefix}-v")

    def slot(self, index: int) -> NetworkSlot:
        """The plan of slot ``index`` (InvalidArgument if out of range)."""
        self.check_index(index)
        pair = self.transfer_range.network_address + 2 * index
        return NetworkSlot(
            index=index,
            netns=self.netns_name(index),
            host_veth=self.veth_name(index),
            host_veth_ip=pair,
            ns_veth_ip=pair + 1,
            host_ip=self.host_range.network_address + index,
        )


def _dns_servers(values: object, never: tuple[IPv4Network, ...]) -> tuple[IPv4Address, ...]:
    nets = parse_cidrs(values, "dns_servers")  # type: ignore[arg-type]
    if any(n.prefixlen != 32 for n in nets):
        raise InvalidArgument(f"invalid dns_servers {values!r}: expected addresses, not networks")
    servers = tuple(n.network_address for n in nets)
    # Never-ranges win over the DNS exception (they come first), so such a resolver could not answer.
    unreachable = [str(a) for a in servers if any(a in n for n in never)]
    if unreachable:
        raise InvalidArgument(
            f"dns_servers {', '.join(unreachable)} lie in never_ranges: unreachable for guests"
        )
    return servers


def _index(name: str, prefix: str) -> int | None:
    digits = name.removeprefix(prefix)
    if digits == name or not digits.isdigit() or digits.startswith("0") or len(digits) > 5:
        return None
    return int(digits)


@dataclass(frozen=True, slots=True)
class NetworkSlot:
    """One slot's names and addresses. Persist it with :meth:`to_dict`; the guest side is in the constants."""

    index: int
    netns: str
    host_veth: str
    host_veth_ip: IPv4Address
    ns_veth_ip: IPv4Address
    host_ip: IPv4Address

    @property
    def netns_path(self) -> Path:
        """The namespace's mount point: what a VMM is started in."""
        return NETNS_DIR / self.netns

    @property
    def tap(self) -> str:
        """The tap device a VM attaches to, inside the namespace (the same name in every slot)."""
        return TAP

    @property
    def guest_mac(self) -> str:
        """The MAC the guest's NIC must have (the same in every slot; see the module doc)."""
        return GUEST_MAC

    def to_dict(self) -> dict[str, object]:
        return {
            "index": self.index,
            "netns": self.netns,
            "host_veth": self.host_veth,
            "host_veth_ip": str(self.host_veth_ip),
            "ns_veth_ip": str(self.ns_veth_ip),
            "host_ip": str(self.host_ip),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> NetworkSlot:
        """Rebuild a persisted slot; InvalidArgument if a field is missing or malformed."""
        try:
            index = data["index"]
            names = {k: data[k] for k in ("netns", "host_veth")}
            addrs = {k: ip_address(data[k]) for k in ("host_veth_ip", "ns_veth_ip", "host_ip")}  # type: ignore[arg-type]
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidArgument(f"invalid persisted network slot {dict(data)!r}: {exc}") from None
        if (
            not isinstance(index, int)
            or not isinstance(names["netns"], str)
            or not isinstance(names["host_veth"], str)
            or not _NETNS_NAME.fullmatch(names["netns"])
            or not _VETH_NAME.fullmatch(names["host_veth"])
        ):
            raise InvalidArgument(f"invalid persisted network slot {dict(data)!r}")
        if any(not isinstance(a, IPv4Address) for a in addrs.values()):
            raise InvalidArgument(f"invalid persisted network slot {dict(data)!r}: IPv4 only")
        return cls(index=index, **names, **addrs)  # type: ignore[arg-type]
