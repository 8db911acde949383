"""An impaired underlay for the namespace lab: ``a — wire — b``, for the bench's loss rows
and the loss tests.

The lab's kernel has no netem, so loss and delay come from `ipop_trio.lab.wire`, a relay
process in a third namespace ``w``:

    a [a-if 10.198.0.1/24] --veth-- [w-a  labwire  w-b] --veth-- [b-if 10.198.0.2/24] b

Hosts a and b share one subnet (the wire is a cable, not a router): the per-link addresses
`Lab.connect` gave are flushed and replaced. The wire's namespace has no addresses and no
IPv6, so it neither answers nor originates anything. TSO, GSO and UDP segmentation are
turned off on all four interfaces, and GRO on the wire's two, so every frame on the wire is a
real Ethernet frame, lost or delayed on its own (see `ipop_trio.lab.wire`). Checksum offload
stays on: the wire carries each frame's virtio_net_hdr.

The endpoints a and b receive as hosts with a real NIC do: GRO on, and the NIC's interrupt
coalescing modelled by a GRO flush timeout (`RX_COALESCE_NS`). Without it the veth's NAPI
polls once per frame the wire sends (one frame per syscall), so GRO never merged anything:
every TCP segment of the direct rows and every UDP datagram of the overlay rows climbed the
receiver's stack alone. Measured (1% loss, 5 ms, 8 s iperf3, same run): overlay 221-242
Mbit/s, 45-49 node CPU-s/GB without; 396 Mbit/s, 21.7 CPU-s/GB with 20 us; the direct row
669-689 vs 649-658 Mbit/s.

`WiredOverlay` is an `Overlay` whose nodes are configured to reach each other at those
addresses. Everything is built through `Lab`'s public API (hosts, links, tracked processes),
so the lab's teardown removes it all. This module must never edit the lab's records, touch a
namespace the lab did not make, or leave the wire running past its lab.
"""

from __future__ import annotations

import ipaddress
import json
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

from ipop_trio.errors import LabError
from ipop_trio.lab.nat import nft
from ipop_trio.lab.netns import Host, Lab
from ipop_trio.lab.overlay import Overlay, OverlayNode
from ipop_trio.lab.wire import DEFAULT_LIMIT

WIRE_NETWORK = ipaddress.IPv4Network("10.198.0.0/24")
# Offloads that would put frames longer than the MTU on the wire (ethtool -K names).
OFFLOADS_OFF = ("tso", "gso", "gro", "tx-udp-segmentation", "tx-gso-list")
# An endpoint's receive coalescing: GRO holds what arrived for up to this long (the sysfs
# gro_flush_timeout), as a NIC's interrupt moderation batches frames (mlx5, ixgbe: ~8-50 us).
RX_COALESCE_NS = 20_000
WIRE_READY_TIMEOUT = 10.0
KERNEL_LOSS_SCALE = 100_000  # nftables: numgen random mod SCALE < loss * SCALE
REACHABLE_TIMEOUT = 10.0


def _percent(p: float) -> str:
    return f"{p * 100:g}%"


def _millis(seconds: float) -> str:
    return f"{seconds * 1000:g}ms"


@dataclass(frozen=True, slots=True)
class Impairment:
    """What the wire does to each frame, each way."""

    loss: float = 0.0  # probability a frame is lost
    delay: float = 0.0  # one-way delay, seconds
    seed: int | None = None
    limit: int = DEFAULT_LIMIT  # frames waiting per direction
    # In the kernel: w bridges its two ends and nftables (`numgen random`) drops `loss` of
    # the frames it forwards; no user-space relay in the way, no delay, no seed.
    kernel: bool = False

    def __post_init__(self) -> None:
        if self.kernel and (self.delay or self.seed is not None):
            raise LabError("in-kernel impairment: loss only (no netem here for delay)")
        if self.kernel and round(self.loss * KERNEL_LOSS_SCALE) != self.loss * KERNEL_LOSS_SCALE:
            raise LabError(f"in-kernel loss is in steps of 1/{KERNEL_LOSS_SCALE}")

    @property
    def netem(self) -> str:
        """The ``tc qdisc ... netem`` arguments this stands in for, e.g. "loss 1% delay 5ms"."""
        parts = []
        if self.loss:
            parts.append(f"loss {_percent(self.loss)}")
        if self.delay:
            parts.append(f"delay {_millis(self.delay)}")
        return " ".join(parts) or "none"

    def argv(self, if_a: str, if_b: str) -> list[str]:
        argv = [sys.executable, "-m", "ipop_trio.lab.wire", "--a", if_a, "--b", if_b]
        argv += ["--loss", repr(self.loss), "--delay", repr(self.delay)]
        argv += ["--limit", str(self.limit)]
        return argv + ([] if self.seed is None else ["--seed", str(self.seed)])


class WireProcess:
    """A running labwire in `host`, relaying between `if_a` and `if_b`; ready when built.

    The lab tracks the process, so its teardown stops it even if `stop` is never called."""

    def __init__(
        self,
        host: Host,
        if_a: str,
        if_b: str,
        impairment: Impairment,
        timeout: float = WIRE_READY_TIMEOUT,
    ) -> None:
        self.host = host
        self.impairment = impairment
        self.log = host.lab.workdir / f"labwire-{host.name}.log"
        with open(self.log, "ab") as err:
            self.proc = host.popen(
                impairment.argv(if_a, if_b),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=err,
            )
        self._buf = b""
        self.ready = self._next("ready", timeout)
        self.final: dict[str, Any] | None = None

    def counters(self, timeout: float = 5.0) -> dict[str, Any]:
        """The wire's counters now (SIGUSR1; it answers with one JSON line)."""
        if self.final is not None:
            return self.final
        self.proc.send_signal(signal.SIGUSR1)
        return self._next("counters", timeout)

    def stop(self, timeout: float = 10.0) -> dict[str, Any]:
        """Stop the wire (SIGTERM); return its final counters."""
        if self.final is None:
            self.proc.send_signal(signal.SIGTERM)
            self.final = self._next("exit", timeout)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired as exc:
                raise LabError(f"labwire in {self.host.name} did not exit") from exc
        return self.final

    def _next(self, event: str, timeout: float) -> dict[str, Any]:
        """The next JSON line on the wire's stdout whose event is `event`, within `timeout`."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" in self._buf:
                line, self._buf = self._buf.split(b"\n", 1)
                try:
                    message = json.loads(line)
                except ValueError as exc:
                    raise LabError(f"labwire said something odd: {line[:200]!r}") from exc
                if isinstance(message, dict) and message.get("event") == event:
                    return message
            left = deadline - time.monotonic()
            ready, _, _ = select.select([fd], [], [], max(0.0, left))
            chunk = os.read(fd, 65536) if ready else b""
            if not chunk:
                why = "timed out" if left <= 0 or not ready else "exited"
                raise LabError(
                    f"labwire in {self.host.name} {why} before {event!r}: "
                    + self.log.read_text(errors="replace")[-2000:]
                )
            self._buf += chunk


class KernelWire:
    """w's two ends bridged (`br0`), nftables dropping `impairment.loss` of the frames the
    bridge forwards, at random, with counters per direction in labwire's schema. Built in
    the lab's namespace w, so the lab's teardown removes it all."""

    proc = None  # no process of its own: its CPU is the kernel's (softirq)

    def __init__(self, host: Host, if_a: str, if_b: str, impairment: Impairment) -> None:
        self.host = host
        self.impairment = impairment
        self._ways = {"a_to_b": if_a, "b_to_a": if_b}
        host.check(["ip", "link", "add", "br0", "type", "bridge"])
        for ifname in (if_a, if_b):
            host.check(["ip", "link", "set", ifname, "master", "br0"])
        host.check(["ip", "link", "set", "br0", "up"])
        keep = round(impairment.loss * KERNEL_LOSS_SCALE)
        rules = []
        for way, ifname in self._ways.items():
            rules.append(f'        iifname "{ifname}" counter comment "{way} received"')
            rules.append(
                f'        iifname "{ifname}" numgen random mod {KERNEL_LOSS_SCALE} < {keep} '
                f'counter drop comment "{way} lost"'
            )
        nft(
            host,
            "table bridge ipt_loss {\n    chain forward {\n"
            "        type filter hook forward priority 0; policy accept;\n"
            + "\n".join(rules)
            + "\n    }\n}\n",
            name="loss",
        )
        self.ready: dict[str, Any] = {"kernel": True, "loss": impairment.loss}

    def counters(self, timeout: float = 5.0) -> dict[str, Any]:
        """{"a_to_b": {"received", "lost", "waiting"}, "b_to_a": ...}, as labwire's."""
        done = self.host.run(
            ["nft", "-j", "list", "table", "bridge", "ipt_loss"],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if done.returncode != 0:
            raise LabError(f"nft list in {self.host.name}: {done.stderr.strip()}")
        out: dict[str, Any] = {way: {"received": 0, "lost": 0, "waiting": 0} for way in self._ways}
        for item in json.loads(done.stdout)["nftables"]:
            rule = item.get("rule")
            if not rule or " " not in rule.get("comment", ""):
                continue
            way, what = rule["comment"].split(" ", 1)
            for expr in rule["expr"]:
                if "counter" in expr:
                    out[way][what] = int(expr["counter"]["packets"])
        return out

    def stop(self, timeout: float = 10.0) -> dict[str, Any]:
        return self.counters(timeout)


@dataclass(frozen=True, slots=True)
class WiredPair:
    """Hosts a and b on one subnet, joined through the wire host w."""

    lab: Lab
    a: Host
    b: Host
    w: Host
    if_a: str  # a's interface towards the wire
    if_b: str  # b's interface towards the wire
    address_a: str
    address_b: str
    wire: WireProcess | KernelWire

    def address(self, host: Host) -> str:
        """`host`'s underlay address on the wired subnet."""
        if host is self.a:
            return self.address_a
        if host is self.b:
            return self.address_b
        raise LabError(f"host {host.name} is not an end of the wire")


def offloads_off(host: Host, ifname: str, *, endpoint: bool = False) -> None:
    """Turn off the offloads that would put super-frames on the wire. An endpoint (a or b)
    gets receive GRO with a flush timeout: it coalesces what *arrives* from the wire, as a
    host with a real NIC does, and never puts anything longer than the MTU on it. (A veth
    starts with GRO off, and without the timeout its GRO would see one frame per poll.)"""
    argv = ["ethtool", "-K", ifname]
    for feature in OFFLOADS_OFF:
        argv += [feature, "on" if endpoint and feature == "gro" else "off"]
    host.check(argv)
    if endpoint:
        # `ip netns exec` gives the command the namespace's own /sys.
        sysfs = f"/sys/class/net/{ifname}/gro_flush_timeout"
        host.check(["sh", "-c", f"echo {RX_COALESCE_NS} > {sysfs}"])


def build_wired_pair(
    lab: Lab,
    impairment: Impairment,
    *,
    names: tuple[str, str, str] = ("a", "b", "w"),
    network: ipaddress.IPv4Network = WIRE_NETWORK,
) -> WiredPair:
    """Hosts a and b, a wire host w between them running labwire with `impairment` (or,
    in-kernel, a bridge and nftables); returns once a reaches b across the wire (a ping
    answered)."""
    a, b, w = (lab.add_host(n) for n in names)
    w.check(["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"])
    w.check(["sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1"])
    link_a, link_b = lab.connect(a, w), lab.connect(w, b)
    ends = [
        (a, link_a.end(a).ifname),
        (w, link_a.end(w).ifname),
        (w, link_b.end(w).ifname),
        (b, link_b.end(b).ifname),
    ]
    for host, ifname in ends:
        offloads_off(host, ifname, endpoint=host is not w)
        host.check(["ip", "addr", "flush", "dev", ifname])
    hosts = network.hosts()
    address_a, address_b = str(next(hosts)), str(next(hosts))
    a.check(["ip", "addr", "add", f"{address_a}/{network.prefixlen}", "dev", ends[0][1]])
    b.check(["ip", "addr", "add", f"{address_b}/{network.prefixlen}", "dev", ends[3][1]])
    wire: WireProcess | KernelWire
    if impairment.kernel:
        wire = KernelWire(w, ends[1][1], ends[2][1], impairment)
    else:
        wire = WireProcess(w, ends[1][1], ends[2][1], impairment)
    pair = WiredPair(lab, a, b, w, ends[0][1], ends[3][1], address_a, address_b, wire)
    if impairment.loss < 1.0:
        wait_reachable(a, address_b)
    return pair


def wait_reachable(host: Host, address: str, timeout: float = REACHABLE_TIMEOUT) -> None:
    """Ping `address` from `host` until one reply comes back (a lossy wire may eat some)."""
    deadline = time.monotonic() + timeout
    while True:
        done = host.run(
            ["ping", "-n", "-c", "1", "-W", "1", address], capture_output=True, timeout=10
        )
        if done.returncode == 0:
            return
        if time.monotonic() >= deadline:
            raise LabError(f"{address} unreachable from {host.name} across the wire")


class WiredOverlay(Overlay):
    """An `Overlay` on a `WiredPair`: each node's peer endpoint is the peer host's address on
    the wired subnet (the lab's own link records know nothing of that subnet)."""

    def __init__(self, pair: WiredPair, **kw: Any) -> None:
        super().__init__(pair.lab, **kw)
        self.pair = pair

    def endpoint(self, src: OverlayNode, dst: OverlayNode) -> str:
        return f"{self.pair.address(dst.host)}:{dst.port}"


def wire_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, dict[str, int]]:
    """Per-direction counter differences between two wire snapshots (gauges as of `after`)."""
    out: dict[str, dict[str, int]] = {}
    for way in ("a_to_b", "b_to_a"):
        out[way] = {
            k: v if k == "waiting" else v - before[way].get(k, 0) for k, v in after[way].items()
        }
    return out


__all__ = [
    "OFFLOADS_OFF",
    "WIRE_NETWORK",
    "Impairment",
    "KernelWire",
    "WireProcess",
    "WiredOverlay",
    "WiredPair",
    "build_wired_pair",
    "offloads_off",
    "wait_reachable",
    "wire_delta",
]
