"""IPv4 networks as wrenbox accepts them, for every place that takes them from a user or a setting: the
network's ranges and deny lists, and a sandbox's egress rules at the manager's face. One parser, so what
the face accepts is exactly what the firewall can load."""

from __future__ import annotations

from collections.abc import Iterable
from ipaddress import IPv4Network, ip_network

from wrenbox.errors import InvalidArgument

__all__ = ["parse_cidr", "parse_cidrs"]


def parse_cidr(value: object, what: str) -> IPv4Network:
    """An IPv4 address or CIDR (``"1.2.3.4"`` is ``1.2.3.4/32``; host bits must be zero)."""
    try:
        net = ip_network(value, strict=True)  # type: ignore[arg-type]
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(
            f"invalid {what} {value!r}: expected an IPv4 CIDR like 10.0.0.0/8; {exc}"
        ) from None
    if not isinstance(net, IPv4Network):
        raise InvalidArgument(f"invalid {what} {value!r}: only IPv4 is supported")
    return net


def parse_cidrs(values: Iterable[object], what: str, limit: int = 4096) -> tuple[IPv4Network, ...]:
    """Parse IPv4 addresses or CIDRs (``"1.2.3.4"`` is ``1.2.3.4/32``); InvalidArgument on anything else."""
    if isinstance(values, str | bytes):
        raise InvalidArgument(f"invalid {what}: expected a list of CIDRs, got a single string")
    nets = tuple(parse_cidr(v, what) for v in values)
    if len(nets) > limit:
        raise InvalidArgument(f"too many entries in {what}: {len(nets)} > {limit}")
    return nets
