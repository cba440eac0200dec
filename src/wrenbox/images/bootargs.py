"""The kernel command line that boots an image: the image's own arguments plus what the host decides.

The guest's rc script reads ``wrenbox.ip=``, ``wrenbox.gw=``, ``wrenbox.dns=``, ``wrenbox.hostname=`` and
``wrenbox.mtu=``; the addresses are chosen by the host (``wrenbox.network``), never hard-coded in the image.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from wrenbox.errors import InvalidArgument

__all__ = ["guest_kernel_args"]


def guest_kernel_args(
    base: Sequence[str],
    *,
    ip: str | None = None,
    gateway: str | None = None,
    dns: Sequence[str] = ("8.8.8.8", "8.8.4.4"),
    hostname: str = "sandbox",
    mtu: int | None = None,
    tsc_khz: int | None = None,
) -> list[str]:
    """``base`` (the manifest's ``kernel_args``) + network + clock arguments, as a list of words.

    ``ip`` is an interface address with prefix (``169.254.0.21/30``). ``tsc_khz`` is the host's TSC
    frequency; under QEMU TCG on microvm the guest cannot calibrate its TSC and hangs without it
    (``tsc_early_khz``), and with more than one vCPU it needs ``tsc=reliable``.
    """
    args = list(base)
    if ip is not None:
        iface = _parse(ipaddress.ip_interface, ip, "guest address")
        args.append(f"wrenbox.ip={iface.with_prefixlen}")
    if gateway is not None:
        args.append(f"wrenbox.gw={_parse(ipaddress.ip_address, gateway, 'gateway')}")
    if dns:
        args.append(
            "wrenbox.dns=" + ",".join(str(_parse(ipaddress.ip_address, d, "DNS server")) for d in dns)
        )
    if not hostname.replace("-", "").isalnum() or len(hostname) > 63 or hostname.startswith("-"):
        raise InvalidArgument(f"invalid guest hostname {hostname!r}")
    args.append(f"wrenbox.hostname={hostname}")
    if mtu is not None:
        if not 68 <= mtu <= 65535:
            raise InvalidArgument(f"invalid MTU {mtu}: expected 68-65535")
        args.append(f"wrenbox.mtu={mtu}")
    if tsc_khz is not None:
        if tsc_khz <= 0:
            raise InvalidArgument(f"invalid TSC frequency {tsc_khz} kHz")
        args += [f"tsc_early_khz={tsc_khz}", "tsc=reliable"]
    return args


def _parse(parse, value: str, what: str):  # type: ignore[no-untyped-def]
    try:
        return parse(value)
    except ValueError:
        raise InvalidArgument(f"invalid {what} {value!r}") from None
