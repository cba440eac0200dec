"""Network slots: how long creating and removing one takes, against a one-process-per-step baseline.

In the same run, with a prefix and address ranges of its own:

* ``netslot_create_ms_p50`` / ``_p95`` and ``netslot_remove_ms_p50`` through ``wrenbox.network``
  (netlink in-process, one ``nft`` per slot);
* the baseline: the same slot (same links, addresses, routes, sysctl and nft ruleset) built with one
  ``ip``/``nft`` process per step, as the seed does (``netslot_create_ip_cli_ms_p50``), and
  ``netslot_create_vs_ip_cli_ratio`` (ours / baseline; below 1 is faster); its removal the same way
  (``ip link del`` and ``ip netns del``, which takes the namespace's nft tables with it:
  ``netslot_remove_ip_cli_ms_p50``, ``netslot_remove_vs_ip_cli_ratio``).

Needs root. Prints JSON lines ``{"figure", "value", "unit"}``.

    python bench/network.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import string
import sys
import time
from collections.abc import Callable

import anyio

from wrenbox.command import run
from wrenbox.network import GATEWAY_IP, GUEST_NETWORK, TAP, TAP_MAC, EgressPolicy, Network, NetworkConfig
from wrenbox.network.firewall import slot_ruleset
from wrenbox.network.plan import NetworkSlot


def emit(figure: str, value: float, unit: str) -> None:
    print(json.dumps({"figure": figure, "value": round(value, 3), "unit": unit}), flush=True)


def ms(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] * 1000


def create_with_ip_cli(config: NetworkConfig, slot: NetworkSlot) -> None:
    """The slot that ``Network.create`` builds, one host process per step."""
    ns, veth = slot.netns, slot.host_veth
    steps = [
        ["ip", "netns", "add", ns],
        ["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns],
        ["ip", "-n", ns, "link", "set", "lo", "up"],
        ["ip", "-n", ns, "addr", "add", f"{slot.ns_veth_ip}/31", "dev", "eth0"],
        ["ip", "-n", ns, "link", "set", "eth0", "up"],
        ["ip", "-n", ns, "tuntap", "add", "dev", TAP, "mode", "tap", "vnet_hdr"],
        ["ip", "-n", ns, "link", "set", TAP, "address", TAP_MAC],
        ["ip", "-n", ns, "addr", "add", f"{GATEWAY_IP}/{GUEST_NETWORK.prefixlen}", "dev", TAP],
        ["ip", "-n", ns, "link", "set", TAP, "up"],
        ["ip", "-n", ns, "route", "add", "default", "via", str(slot.host_veth_ip)],
    ]
    for argv in steps:
        run(argv)
    run(
        ["ip", "netns", "exec", ns, "nft", "-f", "-"],
        input=slot_ruleset(config, slot, EgressPolicy()).encode(),
    )
    run(["ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.ip_forward=1"])
    run(["ip", "addr", "add", f"{slot.host_veth_ip}/31", "dev", veth])
    run(["ip", "link", "set", veth, "up"])
    run(["ip", "route", "add", f"{slot.host_ip}/32", "via", str(slot.ns_veth_ip), "dev", veth])


def remove_with_ip_cli(slot: NetworkSlot) -> None:
    run(["ip", "link", "del", slot.host_veth])
    run(["ip", "netns", "del", slot.netns])


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


async def main(n: int) -> None:
    prefix = "wbb" + "".join(secrets.choice(string.ascii_lowercase) for _ in range(3))
    network = Network(
        NetworkConfig(prefix=prefix, host_range="10.249.0.0/24", transfer_range="10.249.2.0/23")
    )
    await network.setup()
    try:
        slots = [network.slot(i) for i in range(1, n + 1)]
        create, remove, baseline, baseline_remove = [], [], [], []
        for slot in slots:  # alternate so both see the same machine load
            start = time.perf_counter()
            await network.create(slot)
            create.append(time.perf_counter() - start)
            start = time.perf_counter()
            await network.remove(slot)
            remove.append(time.perf_counter() - start)
            baseline.append(timed(lambda slot=slot: create_with_ip_cli(network.config, slot)))
            baseline_remove.append(timed(lambda slot=slot: remove_with_ip_cli(slot)))
    finally:
        await network.teardown()
    emit("netslot_create_ms_p50", ms(create, 0.5), "ms")
    emit("netslot_create_ms_p95", ms(create, 0.95), "ms")
    emit("netslot_remove_ms_p50", ms(remove, 0.5), "ms")
    emit("netslot_create_ip_cli_ms_p50", ms(baseline, 0.5), "ms")
    emit("netslot_create_vs_ip_cli_ratio", ms(create, 0.5) / ms(baseline, 0.5), "ratio")
    emit("netslot_remove_ip_cli_ms_p50", ms(baseline_remove, 0.5), "ms")
    emit("netslot_remove_vs_ip_cli_ratio", ms(remove, 0.5) / ms(baseline_remove, 0.5), "ratio")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="5 slots instead of 20")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/network.py needs root (network namespaces, nftables)")
    anyio.run(main, 5 if args.quick else 20)
