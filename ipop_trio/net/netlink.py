"""Interface configuration through pyroute2: the only pyroute2 user outside the lab.

Sets a TAP's MAC, MTU, address and link state. Everything goes through netlink; no `ip`
subprocesses.
"""

from __future__ import annotations

import ipaddress

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from ..errors import TapError


def _fmt_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def configure_tap(
    name: str, *, mac: bytes, mtu: int, address: ipaddress.IPv4Interface | ipaddress.IPv6Interface
) -> None:
    """Give the TAP its MAC, MTU and overlay address, then bring it up."""
    try:
        with IPRoute() as ipr:
            found = ipr.link_lookup(ifname=name)
            if not found:
                raise TapError(f"interface {name!r} vanished before it was configured")
            idx = found[0]
            ipr.link("set", index=idx, address=_fmt_mac(mac), mtu=mtu)
            ipr.addr("add", index=idx, address=str(address.ip), prefixlen=address.network.prefixlen)
            ipr.link("set", index=idx, state="up")
    except NetlinkError as exc:
        raise TapError(f"cannot configure {name}: {exc}") from None


def link_exists(name: str) -> bool:
    with IPRoute() as ipr:
        return bool(ipr.link_lookup(ifname=name))
