"""Slot addressing, configuration checks and egress policy parsing (no privileges needed)."""

from __future__ import annotations

import json
from ipaddress import IPv4Address, IPv4Network

import pytest

from wrenbox.config import load_settings
from wrenbox.errors import InvalidArgument
from wrenbox.network import EgressPolicy, NetworkConfig, NetworkSlot, kernel_ip_arg
from wrenbox.network.plan import GUEST_IP, GUEST_NETWORK


def test_default_plan_matches_the_seed_layout() -> None:
    config = NetworkConfig()
    slot = config.slot(7)
    assert slot.netns == "wrenbox-ns-7"
    assert slot.host_veth == "wrenbox-v7"
    assert slot.host_veth_ip == IPv4Address("10.12.0.14")
    assert slot.ns_veth_ip == IPv4Address("10.12.0.15")
    assert slot.host_ip == IPv4Address("10.11.0.7")
    assert config.capacity == 32767  # the /16 transfer range holds 32767 /31s after the unused first one


def test_every_slot_has_distinct_addresses_and_short_link_names() -> None:
    config = NetworkConfig(host_range="10.40.0.0/22", transfer_range="10.41.0.0/21")
    slots = [config.slot(i) for i in range(1, config.capacity + 1)]
    assert config.capacity == 1022
    addresses = [a for s in slots for a in (s.host_ip, s.host_veth_ip, s.ns_veth_ip)]
    assert len(set(addresses)) == len(addresses)
    for s in slots:
        assert s.host_ip in config.host_range
        assert s.host_ip not in (config.host_range[0], config.host_range[-1])
        pair = IPv4Network(f"{s.host_veth_ip}/31")
        assert s.ns_veth_ip in pair
        assert pair.subnet_of(config.transfer_range)
    longest = NetworkConfig(
        prefix="abcdefgh", max_slots=99_999, host_range="10.0.0.0/8", transfer_range="11.0.0.0/8"
    )
    assert len(longest.slot(longest.capacity).host_veth) <= 15


@pytest.mark.parametrize("index", [0, -1, 32768, True, "1", 1.0])
def test_out_of_range_slot_is_refused(index: object) -> None:
    with pytest.raises(InvalidArgument):
        NetworkConfig().slot(index)  # type: ignore[arg-type]


def test_max_slots_caps_capacity() -> None:
    config = NetworkConfig(max_slots=3)
    assert config.capacity == 3
    config.slot(3)
    with pytest.raises(InvalidArgument):
        config.slot(4)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"prefix": "Wrenbox"},
        {"prefix": "9box"},
        {"prefix": "toolongpfx"},
        {"prefix": "a-b"},
        {"prefix": "../x"},
        {"host_range": "10.11.0.1/16"},  # host bits set
        {"host_range": "fd00::/64"},
        {"host_range": "not a network"},
        {"host_range": "10.0.0.0/8", "transfer_range": "10.12.0.0/16"},  # overlap
        {"host_range": "169.254.0.0/24"},  # overlaps the guest network
        {"transfer_range": "10.12.0.0/31"},  # no room for one slot
        {"max_slots": 0},
        {"deny_ranges": "10.0.0.0/8"},  # a string, not a list
        {"never_ranges": ["169.254.169.254/16"]},
        {"dns_servers": ["8.8.8.0/24"]},  # a network, not a resolver
        {"dns_servers": ["2001:4860:4860::8888"]},
        {"dns_servers": ["169.254.1.1"]},  # inside the default never-ranges: unreachable
        {"dns_servers": ["9.9.9.9"], "never_ranges": ["9.0.0.0/8"]},
        {"max_connections": 0},
        {"new_connections_per_s": -1},
        {"new_connections_burst": True},
        {"dns_always_allowed": "yes"},
    ],
)
def test_bad_config_is_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(InvalidArgument):
        NetworkConfig(**kwargs)  # type: ignore[arg-type]


def test_names_of_other_prefixes_are_not_ours() -> None:
    config = NetworkConfig(prefix="wb")
    assert config.index_of_netns("wb-ns-12") == 12
    assert config.index_of_veth("wb-v3") == 3
    for name in ("wb-ns-", "wb-ns-012", "wb-ns-1x", "wbx-ns-1", "xwb-ns-1", "wb-ns-123456", "wb-v-1"):
        assert config.index_of_netns(name) is None
        assert config.index_of_veth(name) is None


def test_slot_round_trips_through_json() -> None:
    slot = NetworkConfig().slot(42)
    assert NetworkSlot.from_dict(json.loads(json.dumps(slot.to_dict()))) == slot


@pytest.mark.parametrize(
    "change",
    [
        {"netns": "../../etc/passwd"},
        {"host_veth": "eth0"},
        {"host_ip": "fd00::1"},
        {"host_ip": "nonsense"},
        {"index": "7"},
    ],
)
def test_tampered_persisted_slot_is_refused(change: dict[str, object]) -> None:
    data = NetworkConfig().slot(7).to_dict() | change
    with pytest.raises(InvalidArgument):
        NetworkSlot.from_dict(data)


def test_missing_field_in_persisted_slot_is_refused() -> None:
    data = NetworkConfig().slot(7).to_dict()
    del data["host_ip"]
    with pytest.raises(InvalidArgument):
        NetworkSlot.from_dict(data)


def test_egress_policy_parses_addresses_and_cidrs() -> None:
    policy = EgressPolicy(allow=["1.1.1.1", "8.8.0.0/16"], deny=["0.0.0.0/0"])
    assert policy.allow == (IPv4Network("1.1.1.1/32"), IPv4Network("8.8.0.0/16"))
    assert policy.deny == (IPv4Network("0.0.0.0/0"),)


@pytest.mark.parametrize(
    "kwargs",
    [{"allow": ["8.8.8.8/8"]}, {"deny": ["::/0"]}, {"allow": ["example.com"]}, {"deny": "1.2.3.4"}],
)
def test_bad_egress_policy_is_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(InvalidArgument):
        EgressPolicy(**kwargs)  # type: ignore[arg-type]


def test_kernel_ip_arg_configures_the_fixed_guest_address() -> None:
    fields = kernel_ip_arg().removeprefix("ip=").split(":")
    assert IPv4Address(fields[0]) == GUEST_IP
    assert IPv4Network(f"{fields[0]}/{fields[3]}", strict=False) == GUEST_NETWORK
    assert fields[5:] == ["eth0", "off"]


def test_hardening_settings_have_safe_defaults_and_load_from_settings() -> None:
    config = NetworkConfig()
    assert config.never_ranges == (IPv4Network("169.254.0.0/16"),)  # cloud metadata, whatever allow says
    assert config.dns_servers == (IPv4Address("8.8.8.8"), IPv4Address("8.8.4.4"))
    assert config.dns_always_allowed is True
    assert (config.max_connections, config.new_connections_per_s, config.new_connections_burst) == (
        4096,
        1000,
        1000,
    )
    network = {
        "never_ranges": ["169.254.0.0/16", "10.0.0.0/8"],
        "dns_servers": ["9.9.9.9"],
        "max_connections": 64,
    }
    loaded = load_settings(network=network | {"dns_always_allowed": False}).network
    assert loaded.never_ranges == (IPv4Network("169.254.0.0/16"), IPv4Network("10.0.0.0/8"))
    assert loaded.dns_servers == (IPv4Address("9.9.9.9"),)
    assert (loaded.dns_always_allowed, loaded.max_connections) == (False, 64)
