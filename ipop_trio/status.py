"""Human-readable rendering of a node's status (the `ipop-trio status` table)."""

from __future__ import annotations

import time
from typing import Any


def _bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def _ago(ts: float | None, now: float) -> str:
    if not ts:
        return "never"
    d = max(0.0, now - ts)
    if d < 120:
        return f"{d:.0f}s ago"
    return f"{d / 60:.0f}m ago"


def _left(not_after: float, now: float) -> str:
    """A certificate's time left: "364d", "5h", "expired"."""
    left = not_after - now
    if left <= 0:
        return "expired"
    return f"{left / 86400:.0f}d" if left >= 86400 else f"{left / 3600:.0f}h"


def _day(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(timestamp))


def _path(peer: dict[str, Any]) -> str:
    """The ICE path type (host / srflx / prflx / relay); "direct" for a configured peer."""
    path = peer.get("path")
    if path:
        return str(path.get("type"))
    return "direct" if peer.get("endpoint") and not peer.get("ice") else "-"


def _rtt(peer: dict[str, Any]) -> str:
    path = peer.get("path") or {}
    rtt = path.get("rtt_ms")
    return "-" if rtt is None else f"{rtt:.1f}ms"


def _addresses(node: dict[str, Any]) -> str:
    """`10.77.0.2/24`, or `10.77.0.2/24 fd77::2/64` on a dual-stack node."""
    return " ".join(str(node[k]) for k in ("address", "address6") if node.get(k)) or "None"


def format_status(status: dict[str, Any], now: float | None = None) -> str:
    now = time.time() if now is None else now
    node = status.get("node", {})
    lines = [
        f"node {node.get('name')}  overlay {node.get('overlay')}  address {_addresses(node)}  "
        f"tap {node.get('tap')} ({node.get('mac')})  listen {node.get('listen')}",
    ]
    if node.get("mtu"):
        lines.append(f"mtu {node['mtu']} ({node.get('mtu_why')})")
    cert = node.get("cert")
    if cert:
        cas = node.get("ca") or []
        trust = ", ".join(f"{c['fingerprint'][:16]} ({_left(c['not_after'], now)})" for c in cas)
        lines.append(
            f"certificate {cert['fingerprint'][:16]} expires {_day(cert['not_after'])} "
            f"({_left(cert['not_after'], now)})  CA{'s' if len(cas) > 1 else ''} {trust}"
        )
    if node.get("datapath"):
        off = f" ({node['datapath_why']})" if node.get("datapath_why") else ""
        lines.append(f"datapath {node['datapath']}{off}  cipher {node.get('cipher')}")
    sg = status.get("signalling")
    if sg:
        lines.append(
            f"signalling {sg.get('url')}  {sg.get('state')}  members {sg.get('members')}  "
            f"links {sg.get('learned_links')}/{sg.get('max_links')}"
        )
        if sg.get("refused"):  # the server's reason (certificate revoked, address in use, ...)
            lines.append(f"  refused by the server: {sg.get('last_error')}")
    ice = status.get("ice")
    if ice:
        turn = ", ".join(
            f"{t['server']} {t['state']}"
            + (f" relays at {t['relayed']}" if t["relayed"] else "")
            + (f" ({t['error']})" if t.get("error") else "")
            for t in ice.get("turn", [])
        )
        lines.append(
            f"ice {len(ice.get('candidates', []))} candidates"
            + (f"  stun {', '.join(ice['stun'])}" if ice.get("stun") else "")
            + (f"  turn {turn}" if turn else "")
        )
    dns = status.get("dns")
    if dns:
        lines.append(f"dns {dns.get('domain')} on {dns.get('listen')}")
    header = (
        "PEER", "ADDRESS", "STATE", "MODE", "LEARNED", "ENDPOINT", "PATH", "RTT", "TX", "RX",
        "DROPS", "HANDSHAKE", "CERT",
    )  # fmt: skip
    rows = [header]
    for p in status.get("peers", []):
        rows.append(
            (
                str(p.get("name")),
                " ".join(str(p[k]) for k in ("address", "address6") if p.get(k)) or "-",
                str(p.get("state")),
                str(p.get("mode") or "-"),
                str(p.get("learned") or "-"),
                str(p.get("endpoint") or "-"),
                _path(p),
                _rtt(p),
                _bytes(int(p.get("tx_bytes", 0))),
                _bytes(int(p.get("rx_bytes", 0))),
                str(p.get("drops", 0)),
                _ago(p.get("last_handshake"), now),
                "-" if not p.get("cert") else _left(p["cert"]["not_after"], now),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for r in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    # Only worth a line when selective security is in play (not just our `always` policy).
    why = [
        f"  {p.get('name')}: {p['mode']}, {p['mode_reason']}"
        for p in status.get("peers", [])
        if p.get("mode") and p.get("mode_reason") not in (None, "policy always (this node)")
    ]
    if why:
        lines.append("link modes (selective security):")
        lines += why
    pairs = [
        f"  {p.get('name')}: {p['path']['local']} -> {p['path']['remote']}"
        + (f" via {p['via']}" if p.get("via") else "")
        for p in status.get("peers", [])
        if p.get("path")
    ]
    if pairs:
        lines.append("ICE pairs (local -> remote):")
        lines += pairs
    refused = [
        f"  {p.get('name')}: {p['refused']}" for p in status.get("peers", []) if p.get("refused")
    ]
    narrow = [
        f"  {p.get('name')}: {p['path_mtu']} ({p.get('path_mtu_why')})"
        for p in status.get("peers", [])
        if p.get("path_mtu")
    ]
    if narrow:  # larger packets to these peers are answered with ICMP 'fragmentation needed'
        lines.append("narrower paths (largest IP packet):")
        lines += narrow
    if refused:  # a revoked certificate, an address another key holds, a name mismatch, ...
        lines.append("refused peers:")
        lines += refused
    lines += _firewall(status.get("firewall"))
    drops = status.get("stats", {}).get("drops", {})
    if drops:
        lines.append("drops: " + ", ".join(f"{k}={v}" for k, v in sorted(drops.items())))
    return "\n".join(lines)


def _firewall(fw: dict[str, Any] | None) -> list[str]:
    """The firewall's rules with the packets each decided, and what each default refused."""
    if not fw:
        return []
    ct = fw.get("conntrack", {})
    lines = [
        f"firewall: conntrack {ct.get('entries')}/{ct.get('max')} flows"
        f" (created {ct.get('created')}, evicted {ct.get('evicted')}, expired {ct.get('expired')})"
    ]
    for direction in ("inbound", "outbound"):
        d = fw.get(direction) or {}
        rules = d.get("rules", [])
        refused = d.get("refused", {})
        if not rules:
            lines.append(f"  {direction}: no rules, everything passes (flows tracked)")
            continue
        other = "".join(
            f", {refused[k]} {k.replace('_', '-')}"
            for k in ("non_ipv4", "malformed")
            if refused.get(k)
        )
        lines.append(
            f"  {direction}: {len(rules)} rules, default deny: {refused.get('default', 0)} refused"
            + other
        )
        for i, r in enumerate(rules):
            what = "refused" if r.get("action") == "deny" else "flows opened"
            lines.append(f"    {direction}[{i}] {r.get('rule')}: {r.get('hits', 0)} {what}")
    return lines
