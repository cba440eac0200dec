"""Network slots: one namespace per sandbox, a veth to the host, ``tap0`` for the VM, NAT and isolation.

Owns the slots of its prefix end to end, as a pool (:class:`Network`: which are taken, building and
removing them, taking back what a crash left) and the host's nftables table. See
:mod:`wrenbox.network.plan` for the addressing and :mod:`wrenbox.network.firewall` for the rules.
"""

from wrenbox.network.allocator import SlotAllocator
from wrenbox.network.firewall import EgressPolicy
from wrenbox.network.netns import call_in_netns
from wrenbox.network.network import Network
from wrenbox.network.plan import (
    GATEWAY_IP,
    GUEST_IP,
    GUEST_MAC,
    GUEST_NETWORK,
    TAP,
    TAP_MAC,
    NetworkConfig,
    NetworkSlot,
    kernel_ip_arg,
)

__all__ = [
    "GATEWAY_IP",
    "GUEST_IP",
    "GUEST_MAC",
    "GUEST_NETWORK",
    "TAP",
    "TAP_MAC",
    "EgressPolicy",
    "Network",
    "NetworkConfig",
    "NetworkSlot",
    "SlotAllocator",
    "call_in_netns",
    "kernel_ip_arg",
]
