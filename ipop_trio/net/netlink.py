"""Interface configuration through pyroute2: the only pyroute2 user outside the lab.

Sets a TAP's MAC, MTU, address and link state. Everything goes through netlink; no `ip`
subprocesses.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from ..errors import TapError
from ..proto.cert import format_mac

IFA_F_NODAD = 0x02  # linux/if_addr.h
# Per-interface IPv6 settings of the TAP: no router advertisements taken from peers (the
# overlay has no router; a peer's RA would reroute the host); link-local addresses made from
# the MAC (EUI-64), so every peer computes ours from our certificate's key; and no duplicate
# address detection: every address on the TAP is the node's by certificate, and DAD would
# leave the link-local one tentative (unusable) for its first second or two.
TAP_IPV6_SYSCTLS = {"accept_ra": "0", "addr_gen_mode": "0", "accept_dad": "0"}


def configure_tap(
    name: str,
    *,
    mac: bytes,
    mtu: int,
    addresses: Sequence[ipaddress.IPv4Interface | ipaddress.IPv6Interface],
) -> None:
    """Give the TAP its MAC, MTU and overlay addresses (one, or one of each family), then
    bring it up. An IPv6 address is added without duplicate address detection: the CA
    certified it to this node alone, and a tentative address would be unusable for a second."""
    if any(a.version == 6 for a in addresses):
        _ipv6_sysctls(name)
    try:
        with IPRoute() as ipr:
            found = ipr.link_lookup(ifname=name)
            if not found:
                raise TapError(f"interface {name!r} vanished before it was configured")
            idx = found[0]
            ipr.link("set", index=idx, address=format_mac(mac), mtu=mtu)
            for address in addresses:
                flags = IFA_F_NODAD if address.version == 6 else 0
                ipr.addr(
                    "add",
                    index=idx,
                    address=str(address.ip),
                    prefixlen=address.network.prefixlen,
                    flags=flags,
                )
            ipr.link("set", index=idx, state="up")
    except NetlinkError as exc:
        raise TapError(f"cannot configure {name}: {exc}") from None


def _ipv6_sysctls(name: str) -> None:
    """`TAP_IPV6_SYSCTLS` on interface `name`, before it is up (link-local is made then)."""
    base = Path("/proc/sys/net/ipv6/conf") / name
    if not base.is_dir():
        raise TapError(
            f"{name}: the certificate holds an IPv6 address, but this host has IPv6 disabled "
            "(no /proc/sys/net/ipv6): enable it, or use an IPv4-only certificate"
        )
    for key, value in TAP_IPV6_SYSCTLS.items():
        try:
            (base / key).write_text(value)
        except OSError as exc:
            raise TapError(f"cannot set net.ipv6.conf.{name}.{key}={value}: {exc}") from None


def host_addresses(
    *, skip: frozenset[str] = frozenset(), version: int = 4
) -> list[tuple[str, str]]:
    """(interface, address) of every usable local address of IP `version`: interfaces that
    are up, not loopback, not in `skip` (the overlay TAP, ignored interfaces); no
    link-local IPv6. ICE's host candidates (RFC 8445 §5.1.1.1)."""
    family = socket.AF_INET if version == 4 else socket.AF_INET6
    out: list[tuple[str, str]] = []
    with IPRoute() as ipr:
        names: dict[int, str] = {}
        up: set[int] = set()
        for link in ipr.get_links():
            idx = link["index"]
            names[idx] = link.get_attr("IFLA_IFNAME") or ""
            flags = link["flags"]
            if flags & 0x1 and not flags & 0x8:  # IFF_UP and not IFF_LOOPBACK
                up.add(idx)
        for msg in ipr.get_addr(family=family):
            idx = msg["index"]
            name = names.get(idx, "")
            if idx not in up or name in skip:
                continue
            addr = msg.get_attr("IFA_ADDRESS")
            if addr is None:
                continue
            ip = ipaddress.ip_address(addr)
            if ip.is_loopback or ip.is_link_local or ip.is_multicast:
                continue
            out.append((name, str(ip)))
    return out


def path_mtu(destination: str) -> tuple[int, str] | None:
    """The MTU of the local route towards `destination` (an IP address): the route's own
    `mtu` metric when it has one, else its outgoing interface's MTU, whichever is smaller,
    with the interface's name. None when there is no route (or the address is not one)."""
    try:
        ip = ipaddress.ip_address(destination)
    except ValueError:
        return None
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    try:
        with IPRoute() as ipr:
            routes = ipr.route("get", dst=str(ip), family=family)
            if not routes:
                return None
            route = routes[0]
            oif = route.get_attr("RTA_OIF")
            if oif is None:
                return None
            links = ipr.get_links(oif)
            if not links:
                return None
            mtu = int(links[0].get_attr("IFLA_MTU") or 0)
            name = str(links[0].get_attr("IFLA_IFNAME") or f"if{oif}")
            metrics = route.get_attr("RTA_METRICS")
            route_mtu = int(metrics.get_attr("RTAX_MTU") or 0) if metrics is not None else 0
    except (NetlinkError, OSError):
        return None
    if route_mtu and (not mtu or route_mtu < mtu):
        mtu = route_mtu
    return (mtu, name) if mtu > 0 else None
