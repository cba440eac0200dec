"""nftables rules: one static table on the host, one table per slot namespace.

The host table (``inet <prefix>``) matches slot veths by name wildcard (``<prefix>-v*``), so it never
changes when slots come and go: a half-created slot is filtered from its first packet, and removing or
reclaiming a slot leaves no rule or element behind. It enforces what a guest must never do,
whatever its own policy says: reach the host, reach another slot, or spoof its source. Only replies
are let back in (``ct direction reply``), so a connection a guest opened while the table was missing
is cut as soon as it is back.

Wrenbox turns on ``ip_forward`` for the whole host and leaves the host's own forward policy alone (it
is not ours). Instead the host table confines forwarded traffic of wrenbox's ranges to the slot
veths: a source in them must arrive on a slot veth and a destination in them must leave on one, so a
LAN neighbour can neither use the host as a NAT router with a slot's address nor reach a slot.

The host table lives in the host's ruleset, which others may flush (Debian's ``/etc/nftables.conf``
starts with ``flush ruleset``): :func:`host_table_listing` is its fingerprint, and the network
reinstalls it when that changes. (``flags owner`` would shield it from a flush, but an owned table is
deleted when its owner's netlink socket closes, i.e. whenever wrenbox restarts while VMs keep
running, and nft 1.0.6 cannot set ``persist``, which keeps it: so plain tables, watched.)

The slot table lives inside the slot namespace and disappears with it. It NATs host ↔ guest, and
holds the sandbox's egress policy, in this order: the operator's never-ranges (link-local and thus
cloud metadata by default; nothing opens them), the DNS exception (the configured resolvers on port
53), the sandbox's allow list, its deny list, then the configured default-deny ranges (private
space). So an allow entry can open a private range but never a never-range, and nothing in the slot
can open the host or another slot. Whatever passes goes through the per-slot connection limits (a
rate of new connections and a cap on concurrent ones) before it is accepted.

Rules are applied with one ``nft -f -`` transaction per operation (atomic: all or nothing).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

from pyroute2.nftables.main import NFTables

from wrenbox.cidrs import parse_cidrs
from wrenbox.command import run
from wrenbox.network.plan import GUEST_IP, NS_VETH, TAP, NetworkConfig, NetworkSlot

__all__ = [
    "EgressPolicy",
    "apply_egress",
    "apply_slot_rules",
    "host_ruleset",
    "host_table_listing",
    "host_table_present",
    "install_host_table",
    "remove_host_table",
    "slot_ruleset",
]


@dataclass(frozen=True, slots=True)
class EgressPolicy:
    """A sandbox's outbound rules, as IPv4 CIDRs (strings are parsed). Allow wins over deny."""

    allow: tuple[IPv4Network, ...] = ()
    deny: tuple[IPv4Network, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "allow", parse_cidrs(self.allow, "egress allow list"))
        object.__setattr__(self, "deny", parse_cidrs(self.deny, "egress deny list"))


_NFPROTO_INET = 1


def _elements(nets: Iterable[IPv4Network]) -> str:
    return ", ".join(str(n.network_address) if n.prefixlen == 32 else str(n) for n in nets)


def _set(name: str, nets: Iterable[IPv4Network]) -> str:
    items = _elements(nets)
    elements = f" elements = {{ {items} }};" if items else ""
    return f"set {name} {{ type ipv4_addr; flags interval; auto-merge;{elements} }}"


def _nft(ruleset: str) -> None:
    run(["nft", "-f", "-"], input=ruleset.encode(), timeout=30.0)


def _drop_table(name: str) -> str:
    # Declaring the table first makes the delete valid when it does not exist yet.
    return f"table inet {name} {{}}\ndelete table inet {name}\n"


def _replace_table(name: str, body: str) -> str:
    # One transaction: the table is never seen missing or half-built.
    return f"{_drop_table(name)}table inet {name} {{\n{body}}}\n"


def host_ruleset(config: NetworkConfig) -> str:
    veths = f'"{config.prefix}-v*"'
    transfer, host = config.transfer_range, config.host_range
    return _replace_table(
        config.prefix,
        f"""\
  chain input {{
    type filter hook input priority filter; policy accept;
    iifname {veths} ct direction reply ct state established,related accept
    iifname {veths} counter drop comment "guest to host"
  }}
  chain output {{
    type filter hook output priority filter; policy accept;
    ip daddr {{ {host}, {transfer} }} meta skuid != 0 counter drop comment "local users to sandboxes"
  }}
  chain forward {{
    type filter hook forward priority filter; policy accept;
    iifname {veths} oifname {veths} counter drop comment "slot to slot"
    oifname {veths} ct direction reply ct state established,related accept
    oifname {veths} counter drop comment "unsolicited traffic into a slot"
    iifname {veths} meta nfproto != ipv4 counter drop comment "guest ipv6"
    iifname {veths} ip saddr != {transfer} counter drop comment "spoofed source"
    iifname {veths} ip daddr {{ {host}, {transfer} }} counter drop comment "wrenbox ranges"
    iifname != {veths} ip saddr {{ {host}, {transfer} }} counter drop comment "wrenbox source from outside"
    oifname != {veths} ip daddr {{ {host}, {transfer} }} counter drop comment "wrenbox destination outside"
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    ip saddr {transfer} oifname != {veths} masquerade
  }}
""",
    )


def _addresses(name: str, addresses: Iterable[IPv4Address]) -> str:
    items = ", ".join(str(a) for a in addresses)
    elements = f" elements = {{ {items} }};" if items else ""
    return f"set {name} {{ type ipv4_addr;{elements} }}"


def _egress_rules(config: NetworkConfig) -> str:
    rules = ['ip daddr @never counter drop comment "never reachable"']
    if config.dns_always_allowed and config.dns_servers:
        # Ahead of the sandbox's lists: a deny-all policy must not break name resolution.
        rules.append("ip daddr @dns meta l4proto { tcp, udp } th dport 53 goto admit")
    rules += [
        "ip daddr @allow goto admit",
        'ip daddr @deny counter drop comment "deny list"',
        'ip daddr @default_deny counter drop comment "default deny"',
        "goto admit",
    ]
    return "".join(f"    {rule}\n" for rule in rules)


def slot_ruleset(config: NetworkConfig, slot: NetworkSlot, egress: EgressPolicy) -> str:
    # Created once in a fresh namespace, so no replace prelude: the delete in it triples the commit time.
    eth, tap = f'"{NS_VETH}"', f'"{TAP}"'
    rate = f"{config.new_connections_per_s}/second burst {config.new_connections_burst} packets"
    return f"""table inet {config.prefix} {{
  {_set("allow", egress.allow)}
  {_set("deny", egress.deny)}
  {_set("default_deny", config.deny_ranges)}
  {_set("never", config.never_ranges)}
  {_addresses("dns", config.dns_servers)}
  chain prerouting {{
    type nat hook prerouting priority dstnat; policy accept;
    iifname {eth} ip daddr {slot.host_ip} dnat ip to {GUEST_IP}
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    oifname {eth} ip saddr {GUEST_IP} snat ip to {slot.ns_veth_ip}
  }}
  chain input {{
    type filter hook input priority filter; policy accept;
    iifname {tap} ct state established,related accept
    iifname {tap} counter drop comment "guest to slot namespace"
  }}
  chain forward {{
    type filter hook forward priority filter; policy drop;
    ct state established,related accept
    iifname {eth} oifname {tap} ip daddr {GUEST_IP} ct status dnat accept
    iifname {tap} oifname {eth} ip saddr {GUEST_IP} jump egress
    counter comment "dropped by policy"
  }}
  chain egress {{
{_egress_rules(config)}  }}
  chain admit {{
    ct state new limit rate over {rate} counter drop comment "new connection rate"
    ct state new ct count over {config.max_connections} counter drop comment "connection count"
    accept
  }}
}}
"""


def install_host_table(config: NetworkConfig) -> None:
    """Create or atomically replace the host table (idempotent)."""
    _nft(host_ruleset(config))


def host_table_listing(config: NetworkConfig) -> str | None:
    """The host table as nft lists it without counters, or None if it does not exist (~4 ms): equal
    listings mean equal rules, whoever changed what in between."""
    if not host_table_present(config):
        return None
    return run(["nft", "-s", "list", "table", "inet", config.prefix], timeout=30.0).text


def host_table_present(config: NetworkConfig) -> bool:
    """Whether the host table exists (in-process netlink, ~1 ms: cheap enough to check on every create)."""
    with NFTables(nfgen_family=_NFPROTO_INET) as nft:
        return any(t.get_attr("NFTA_TABLE_NAME") == config.prefix for t in nft.get_tables())


def remove_host_table(config: NetworkConfig) -> None:
    """Delete the host table if it exists (idempotent). Never touches any other table."""
    _nft(_drop_table(config.prefix))


def apply_slot_rules(config: NetworkConfig, slot: NetworkSlot, egress: EgressPolicy) -> None:
    """Install the slot table. Call inside the slot namespace."""
    _nft(slot_ruleset(config, slot, egress))


def apply_egress(config: NetworkConfig, egress: EgressPolicy) -> None:
    """Replace the allow and deny lists in one transaction. Call inside the slot namespace."""
    table = f"inet {config.prefix}"
    lines = [f"flush set {table} allow", f"flush set {table} deny"]
    lines += [
        f"add element {table} {name} {{ {_elements(nets)} }}"
        for name, nets in (("allow", egress.allow), ("deny", egress.deny))
        if nets
    ]
    _nft("\n".join(lines) + "\n")
