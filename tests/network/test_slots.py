"""Network slots in real namespaces, with a fake guest behind each slot's tap0 (see fakeguest.py).

Every "dropped" assertion is a connect that times out *and* a drop counter of the responsible rule
that went up; every isolation check has a control that shows the same path works where it should.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import anyio
import pytest
from pyroute2 import IPRoute
from tests.network.conftest import MakeGuest, leftovers, unique_config
from tests.network.fakeguest import (
    GUEST_PORT,
    Echo,
    FakeGuest,
    Internet,
    counter,
    host_link,
    host_listener,
    off_loop,
    probe,
)

from wrenbox.command import run
from wrenbox.errors import AlreadyExists, CommandFailed, Conflict, InvalidArgument, NotFound, Unavailable
from wrenbox.network import (
    GATEWAY_IP,
    GUEST_IP,
    TAP,
    TAP_MAC,
    EgressPolicy,
    Network,
    NetworkSlot,
    call_in_netns,
)
from wrenbox.network.links import add_veth_pair, overlapping_routes
from wrenbox.network.netns import NETNS_DIR, create_netns, list_netns, open_netns

pytestmark = [pytest.mark.root, pytest.mark.anyio]

THREAD_NETNS = Path("/proc/thread-self/ns/net")
ALLOW_ALL = EgressPolicy(allow=["0.0.0.0/0"])  # the slot lets everything out: only the host rules remain


def host_state(network: Network) -> dict[str, object]:
    """Everything of ``network``'s on the host: namespaces, links, routes, and its table (no counters)."""
    config = network.config
    return {
        "names": leftovers(config.prefix),
        "routes": off_loop(overlapping_routes, (config.host_range, config.transfer_range), lambda dev: False),
        "table": run(["nft", "-s", "list", "table", "inet", config.prefix]).text,
    }


def in_ns(netns: str, *argv: str) -> str:
    return call_in_netns(netns, run, list(argv)).text


# -- reachability --------------------------------------------------------------------------------


async def test_host_reaches_guest_at_its_host_ip(network: Network, make_guest: MakeGuest) -> None:
    slot, _ = await make_guest(1, "alpha")
    # The guest sees the connection come from the host end of the veth.
    assert probe(None, slot.host_ip, GUEST_PORT) == f"alpha {GUEST_IP} {slot.host_veth_ip}"


async def test_guest_reaches_internet_through_masquerade(
    network: Network, internet: Internet, make_guest: MakeGuest
) -> None:
    _, guest = await make_guest(1, "alpha")
    reply = guest.probe(internet.public, internet.echo.port)
    assert reply == f"internet {internet.public} {internet.host_address}"


async def test_two_slots_each_reach_their_own_guest(network: Network, make_guest: MakeGuest) -> None:
    a, _ = await make_guest(1, "alpha")
    b, _ = await make_guest(2, "beta")
    assert probe(None, a.host_ip, GUEST_PORT).startswith("alpha ")
    assert probe(None, b.host_ip, GUEST_PORT).startswith("beta ")


# -- isolation -----------------------------------------------------------------------------------


async def test_guest_cannot_reach_the_host(
    network: Network, internet: Internet, make_guest: MakeGuest
) -> None:
    slot, guest = await make_guest(1, "alpha", egress=ALLOW_ALL)
    prefix = network.config.prefix
    with host_listener() as api:  # listens on every host address, like the wrenbox API port
        host_addresses = [slot.host_veth_ip, internet.host_address]
        for address in host_addresses:  # control: the port is open to the host itself
            assert probe(None, address, api.port).startswith("host ")
        before = counter(prefix, "guest to host")
        for address in host_addresses:
            assert guest.probe(address, api.port) == "timeout"
        assert counter(prefix, "guest to host") >= before + len(host_addresses)


async def test_guest_cannot_reach_its_slot_namespace(network: Network, make_guest: MakeGuest) -> None:
    slot, guest = await make_guest(1, "alpha", egress=ALLOW_ALL)
    service = Echo(slot.netns, "slot")  # something listening in the slot namespace, e.g. a VMM port
    try:
        assert probe(None, slot.ns_veth_ip, service.port).startswith("slot ")  # control: host reaches it
        before = counter(network.config.prefix, "guest to slot namespace", netns=slot.netns)
        for address in (slot.ns_veth_ip, GATEWAY_IP):
            assert guest.probe(address, service.port) == "timeout"
        assert counter(network.config.prefix, "guest to slot namespace", netns=slot.netns) >= before + 2
    finally:
        service.stop()


async def test_slots_cannot_reach_each_other(network: Network, make_guest: MakeGuest) -> None:
    a, guest_a = await make_guest(1, "alpha", egress=ALLOW_ALL)
    b, guest_b = await make_guest(2, "beta", egress=ALLOW_ALL)
    prefix = network.config.prefix
    before = counter(prefix, "slot to slot")
    assert guest_a.probe(b.host_ip, GUEST_PORT) == "timeout"
    assert guest_b.probe(a.host_ip, GUEST_PORT) == "timeout"
    assert guest_a.probe(b.ns_veth_ip, GUEST_PORT) == "timeout"
    assert guest_a.probe(a.host_ip, GUEST_PORT) == "timeout"  # hairpin through its own host IP
    assert counter(prefix, "slot to slot") >= before + 4
    # Control: both guests are up and reachable from the host.
    assert probe(None, a.host_ip, GUEST_PORT).startswith("alpha ")
    assert probe(None, b.host_ip, GUEST_PORT).startswith("beta ")


async def test_outside_world_cannot_open_connections_into_a_slot(
    network: Network, internet: Internet, make_guest: MakeGuest
) -> None:
    slot, _ = await make_guest(1, "alpha")

    def route_host_range_to_host() -> None:
        run(["ip", "route", "replace", str(network.config.host_range), "via", internet.host_address])

    call_in_netns(internet.netns, route_host_range_to_host)  # a LAN neighbour routing slot IPs to us
    before = counter(network.config.prefix, "unsolicited traffic into a slot")
    assert probe(internet.netns, slot.host_ip, GUEST_PORT) == "timeout"
    assert counter(network.config.prefix, "unsolicited traffic into a slot") > before
    assert probe(None, slot.host_ip, GUEST_PORT).startswith("alpha ")  # control: the host still can


async def test_egress_default_deny_and_per_sandbox_lists(
    network: Network, internet: Internet, make_guest: MakeGuest
) -> None:
    slot, guest = await make_guest(1, "alpha")
    prefix, port = network.config.prefix, internet.echo.port
    served = f"internet {{}} {internet.host_address}"

    before = counter(prefix, "default deny", netns=slot.netns)
    assert guest.probe(internet.private, port) == "timeout"  # RFC 1918
    assert guest.probe(slot.host_veth_ip, port) == "timeout"  # wrenbox's own range
    assert counter(prefix, "default deny", netns=slot.netns) >= before + 2
    before = counter(prefix, "never reachable", netns=slot.netns)
    assert guest.probe("169.254.169.254", 80) == "timeout"  # cloud metadata: a never-range by default
    assert counter(prefix, "never reachable", netns=slot.netns) > before

    await network.set_egress(slot, EgressPolicy(allow=[internet.private]))
    assert guest.probe(internet.private, port) == served.format(internet.private)

    await network.set_egress(slot, EgressPolicy(deny=[internet.public]))
    before = counter(prefix, "deny list", netns=slot.netns)
    assert guest.probe(internet.public, port) == "timeout"
    assert guest.probe(internet.private, port) == "timeout"  # the allow list was replaced
    assert counter(prefix, "deny list", netns=slot.netns) > before

    await network.set_egress(slot, EgressPolicy(deny=["0.0.0.0/0"], allow=[internet.public]))
    assert guest.probe(internet.public, port) == served.format(internet.public)  # allow wins over deny


async def test_guest_cannot_spoof_its_source(
    network: Network, internet: Internet, make_guest: MakeGuest
) -> None:
    _, guest = await make_guest(1, "alpha", spoof="100.64.7.7")
    before = counter(network.config.prefix, "dropped by policy", netns=guest.slot.netns)
    assert guest.probe(internet.public, internet.echo.port, source="100.64.7.7") == "timeout"
    assert counter(network.config.prefix, "dropped by policy", netns=guest.slot.netns) > before
    assert guest.probe(internet.public, internet.echo.port).startswith("internet ")  # control


async def test_egress_policy_given_at_create(
    network: Network, internet: Internet, make_guest: MakeGuest
) -> None:
    _, guest = await make_guest(1, "alpha", egress=EgressPolicy(deny=[internet.public]))
    assert guest.probe(internet.public, internet.echo.port) == "timeout"


# -- the slot itself -----------------------------------------------------------------------------


async def test_slot_layout(network: Network) -> None:
    slot = network.slot(3)
    await network.create(slot)
    try:
        assert in_ns(slot.netns, "cat", "/proc/sys/net/ipv4/ip_forward").strip() == "1"
        assert run(["cat", "/proc/sys/net/ipv4/ip_forward"]).text.strip() == "1"
        tap = in_ns(slot.netns, "ip", "-d", "link", "show", TAP)
        assert TAP_MAC in tap
        assert "tun type tap" in tap
        assert "persist on" in tap
        route = run(["ip", "route", "show", f"{slot.host_ip}/32"]).text
        assert f"via {slot.ns_veth_ip} dev {slot.host_veth}" in route
        assert f"default via {slot.host_veth_ip} dev eth0" in in_ns(slot.netns, "ip", "route")
    finally:
        await network.remove(slot)


@pytest.mark.vm
async def test_qemu_attaches_to_the_slot_tap(network: Network) -> None:
    slot = network.slot(3)
    await network.create(slot)
    argv = [
        "qemu-system-x86_64", "-M", "microvm", "-nodefaults", "-no-user-config", "-display", "none", "-S",
        "-netdev", f"tap,id=n0,ifname={TAP},script=no,downscript=no",
        "-device", "virtio-net-device,netdev=n0,mac=02:fc:00:00:00:05",
    ]  # fmt: skip
    qemu = call_in_netns(slot.netns, subprocess.Popen, argv, stderr=subprocess.PIPE)
    try:
        with anyio.fail_after(20):
            while "LOWER_UP" not in in_ns(slot.netns, "ip", "link", "show", TAP):
                assert qemu.poll() is None, qemu.stderr.read() if qemu.stderr else ""
                await anyio.sleep(0.05)
    finally:
        qemu.kill()
        qemu.wait()
        await network.remove(slot)


async def test_call_in_netns_runs_inside_and_comes_back(network: Network) -> None:
    slot = network.slot(4)
    await network.create(slot)
    try:

        def netns_inode() -> int:
            return THREAD_NETNS.stat().st_ino

        here = netns_inode()
        inside = call_in_netns(slot.netns, netns_inode)
        assert inside == (NETNS_DIR / slot.netns).stat().st_ino != here
        child = call_in_netns(
            slot.netns, subprocess.run, ["readlink", "/proc/self/ns/net"], capture_output=True
        )
        assert child.stdout.decode().strip() == f"net:[{inside}]"
        assert netns_inode() == here
        with pytest.raises(ZeroDivisionError):
            call_in_netns(slot.netns, lambda: 1 / 0)
    finally:
        await network.remove(slot)
    with pytest.raises(NotFound):
        call_in_netns(slot.netns, print)


# -- remove, failures, reclaim -------------------------------------------------------------------


async def test_remove_leaves_nothing_and_is_idempotent(network: Network, make_guest: MakeGuest) -> None:
    before = host_state(network)
    for index in (1, 2):
        slot = network.slot(index)
        await network.create(slot)
        assert host_state(network) != before
        await network.remove(slot)
        await network.remove(slot)
    assert host_state(network) == before


async def test_remove_of_half_created_slots(network: Network) -> None:
    before = host_state(network)
    only_netns = network.slot(1)
    create_netns(only_netns.netns)
    netns_and_veth = network.slot(2)
    create_netns(netns_and_veth.netns)
    fd = open_netns(netns_and_veth.netns)
    try:
        off_loop(add_veth_pair, netns_and_veth, fd)
    finally:
        os.close(fd)
    stale_file = network.slot(3)  # a crash between creating the mount point and mounting on it
    (NETNS_DIR / stale_file.netns).touch()
    for slot in (only_netns, netns_and_veth, stale_file, network.slot(5)):
        await network.remove(slot)
    assert host_state(network) == before


async def test_failed_create_rolls_back_and_keeps_what_it_did_not_make(network: Network) -> None:
    slot = network.slot(1)
    with host_link(slot.host_veth):  # someone else's link already has the slot's veth name
        with pytest.raises(AlreadyExists) as failure:
            await network.create(slot)
        assert failure.value.leftovers == []  # type: ignore[attr-defined]
        assert slot.netns not in leftovers(network.config.prefix)
        assert slot.host_veth in leftovers(network.config.prefix)


async def test_create_of_an_existing_slot_changes_nothing(network: Network, make_guest: MakeGuest) -> None:
    slot, _ = await make_guest(1, "alpha")
    with pytest.raises(AlreadyExists):
        await network.create(slot)
    assert probe(None, slot.host_ip, GUEST_PORT).startswith("alpha ")


async def test_cancelled_create_is_all_or_nothing(network: Network) -> None:
    before = host_state(network)
    slot = network.slot(1)
    created = False
    with anyio.move_on_after(0.001) as scope:
        await network.create(slot)
        created = True
        await anyio.sleep(1)  # the cancellation lands here if it waited for create to finish
    assert scope.cancelled_caught
    if created:
        assert run(["ip", "route", "show", f"{slot.host_ip}/32"]).text  # the last step of create ran
        await network.remove(slot)
    assert host_state(network) == before


async def test_create_refuses_to_run_without_the_host_table() -> None:
    network = Network(unique_config())  # setup never ran: nothing would isolate the guest
    with pytest.raises(Unavailable, match="host firewall table"):
        await network.create(network.slot(1))
    assert leftovers(network.config.prefix) == []


async def test_foreign_or_mismatched_slots_are_refused(network: Network) -> None:
    other = unique_config().slot(1)
    with pytest.raises(InvalidArgument):
        await network.create(other)
    with pytest.raises(InvalidArgument):
        await network.remove(other)
    moved = NetworkSlot.from_dict(network.slot(1).to_dict() | {"host_ip": "192.0.2.99"})
    with pytest.raises(InvalidArgument):
        await network.create(moved)


async def test_reclaim_after_a_crash(network: Network) -> None:
    before = host_state(network)
    crashed = Network(network.config)  # the previous process, which died with three slots up
    for index in (1, 2, 3):
        await crashed.create(crashed.slot(index))
    kept = crashed.slot(2)
    guest = await anyio.to_thread.run_sync(FakeGuest, kept, "kept")
    other = Network(unique_config())  # another prefix: never ours to reclaim
    await other.setup()
    try:
        (NETNS_DIR / network.config.netns_name(6)).touch()  # died between mount point and mount
        del crashed
        await other.create(other.slot(1))
        restarted = Network(network.config)
        restarted.adopt({2})
        assert await restarted.reclaim() == [1, 3, 6]
        assert probe(None, kept.host_ip, GUEST_PORT) == f"kept {GUEST_IP} {kept.host_veth_ip}"
        left = set(leftovers(network.config.prefix)) - set(before["names"])  # type: ignore[arg-type]
        assert left == {kept.netns, guest.netns, kept.host_veth}
        guest.close()
        assert await restarted.reclaim() == []  # adopted: still held
        await restarted.give_back(kept)
        assert restarted.in_use() == frozenset()
        assert await restarted.reclaim() == []
        assert host_state(network) == before
        assert other.slot(1).netns in leftovers(other.config.prefix)
    finally:
        guest.close()
        await other.teardown()


# -- the pool ------------------------------------------------------------------------------------


async def test_pool_hands_out_lowest_to_sandboxes_and_highest_to_builds(network: Network) -> None:
    pool = Network(network.config)  # a pool of its own over the module's prefix
    before = host_state(network)
    first, second = await pool.take(), await pool.take()
    build = await pool.take(highest=True)
    try:
        assert (first.index, second.index, build.index) == (1, 2, network.config.capacity)
        assert {first.netns, second.netns, build.netns} <= set(list_netns())
        assert pool.in_use() == {1, 2, network.config.capacity}
        await pool.give_back(first)
        assert first.netns not in list_netns()
        reserved = pool.reserve()  # the freed index comes back, nothing is built for it yet
        assert reserved.index == 1
        assert reserved.netns not in list_netns()
        await pool.give_back(reserved)  # giving back a slot that was never built is fine
    finally:
        for slot in (second, build):
            await pool.give_back(slot)
    assert pool.in_use() == frozenset()
    assert host_state(network) == before


async def test_pool_take_that_fails_gives_the_index_back(network: Network) -> None:
    pool = Network(network.config)
    slot = pool.slot(1)
    with host_link(slot.host_veth), pytest.raises(AlreadyExists):  # slot 1 cannot be built
        await pool.take()
    assert pool.in_use() == frozenset()
    taken = await pool.take()
    assert taken.index == 1
    await pool.give_back(taken)


async def test_pool_runs_dry_with_unavailable(network: Network) -> None:
    pool = Network(network.config)
    pool.adopt(range(1, network.config.capacity + 1))
    with pytest.raises(Unavailable, match="no free network slots"):
        pool.reserve()
    with pytest.raises(Unavailable):
        await pool.take()


# -- setup ---------------------------------------------------------------------------------------


async def test_setup_is_idempotent(network: Network) -> None:
    before = host_state(network)
    await network.setup()
    assert host_state(network) == before


@pytest.mark.parametrize("clash", ["address", "route"])
async def test_setup_refuses_ranges_that_collide_with_host_routes(clash: str) -> None:
    config = unique_config()
    network = Network(config)
    dummy = f"{config.prefix}x"

    def occupy(index: int) -> None:
        with IPRoute() as ipr:
            ipr.link("set", index=index, state="up")
            if clash == "address":
                ipr.addr("add", index=index, address=str(config.host_range[5]), prefixlen=32)
            else:
                ipr.route("add", dst=f"{config.transfer_range[4]}/30", oif=index)

    with host_link(dummy) as index:
        off_loop(occupy, index)
        with pytest.raises(Conflict, match=dummy):
            await network.setup()
        with pytest.raises(CommandFailed):
            run(["nft", "list", "table", "inet", config.prefix])  # nothing was installed


async def test_a_local_user_other_than_root_cannot_reach_a_sandbox(
    network: Network, make_guest: MakeGuest
) -> None:
    """Agents answer whoever holds their token, and tokens are not the only secret on a host: the host
    table's output chain keeps every local user but root (wrenbox) off the sandboxes' addresses."""
    slot, _ = await make_guest(5, "alpha")
    assert probe(None, slot.host_ip, GUEST_PORT).startswith("alpha ")
    script = (
        "import socket, sys\n"
        "try:\n"
        f"    socket.create_connection(({str(slot.host_ip)!r}, {GUEST_PORT}), timeout=1).recv(10)\n"
        "    print('reached')\n"
        "except OSError as exc:\n"
        "    print('refused', exc.errno)\n"
    )
    for address in (slot.host_ip, slot.ns_veth_ip):
        as_nobody = run(
            [
                "runuser",
                "-u",
                "nobody",
                "--",
                "/usr/bin/python3",
                "-I",
                "-c",
                script.replace(str(slot.host_ip), str(address)),
            ]
        )
        assert as_nobody.text.split()[0] == "refused", as_nobody.text
