"""A lab impairment element: an Ethernet "wire" that loses and delays frames, for a kernel
without netem.

The lab's kernel has no ``sch_netem``, so the bench's and the lab tests' lossy, delayed
underlay is this process instead. It runs in a wire namespace between two interfaces (the
far ends of veths from host a and host b) and relays every Ethernet frame that arrives on one
out of the other, through a `Direction` per way:

    host a --veth-- [IF_A  wire: loss p, delay d  IF_B] --veth-- host b

* each frame is lost independently with probability ``loss`` (a seeded PRNG per direction);
* each frame that survives leaves exactly ``delay`` seconds after it arrived; the delay is
  constant, so a FIFO deque per direction is the whole scheduler and frames never reorder;
* at most ``limit`` frames wait per direction (netem's default limit, 1000); one more is
  dropped and counted as ``overflow``.

Sockets: one ``AF_PACKET``/``SOCK_RAW``/``ETH_P_ALL`` socket bound to each interface, with
``PACKET_IGNORE_OUTGOING`` so a frame we send is not read back (echo loops), promiscuous
membership, and ``PACKET_VNET_HDR``: every frame carries its ``virtio_net_hdr``, so a frame whose
checksum the sending kernel left to "hardware" (CHECKSUM_PARTIAL on veth) keeps that state
through the wire and the receiving kernel does not drop it as corrupt. Frames must be real
Ethernet frames (<= 1514 bytes): turn TSO, GSO, UDP segmentation and GRO off on the wire's two
interfaces and on the two endpoints' veths (``ethtool -K IF tso off gso off gro off
tx-udp-segmentation off tx-gso-list off``; `ipop_trio.lab.impair` does). A super-frame
that slips through anyway is relayed and counted as ``oversize``, because losing it would
lose many segments at once, which is not what a wire does.

Run: ``python -m ipop_trio.lab.wire --a IF1 --b IF2 --loss 0.01 --delay 0.005 [--seed N]
[--limit 1000]``. Stdout carries JSON lines: ``{"event": "ready", ...}`` once both sockets
are bound, ``{"event": "counters", ...}`` on SIGUSR1, and ``{"event": "exit", ...}`` on
SIGTERM/SIGINT (then exit 0). Counters are per direction (``a_to_b``, ``b_to_a``):
received, relayed, lost, overflow, dropped (= lost + overflow), dropped_udp (of those, IPv4
UDP frames, e.g. overlay datagrams), kernel_drops (the packet socket's receive queue was full:
frames the wire never saw), send_errors, oversize.

The wire must never touch any interface but the two it is given, never reorder frames, never
block on one direction while the other has frames due, and never log per frame. It is a lab
tool: it trusts the frames it relays no further than counting their type on the drop path.
"""

from __future__ import annotations

import argparse
import enum
import errno
import json
import os
import random
import select
import signal
import socket
import struct
import sys
import time
from collections import deque
from collections.abc import Iterator
from types import FrameType
from typing import Any, TextIO

# <linux/if_packet.h>, <linux/if_ether.h>
ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_ADD_MEMBERSHIP = 1
PACKET_MR_PROMISC = 1
PACKET_STATISTICS = 6
PACKET_VNET_HDR = 15
PACKET_IGNORE_OUTGOING = 23
SO_RCVBUFFORCE = 33
_MREQ = struct.Struct("iHH8s")  # struct packet_mreq
_TPACKET_STATS = struct.Struct("II")  # struct tpacket_stats: tp_packets, tp_drops

VNET_HDR = 10  # struct virtio_net_hdr in front of each frame (PACKET_VNET_HDR)
MAX_FRAME = 1518  # Ethernet header + 1500 + one VLAN tag; anything longer is a super-frame
ETH_TYPE_OFF = VNET_HDR + 12  # EtherType, within a frame as read (virtio_net_hdr first)
IP_PROTO_OFF = VNET_HDR + 14 + 9  # IPv4 protocol byte
ETH_TYPE_IPV4 = b"\x08\x00"
IPPROTO_UDP = 17

# Tuning knobs.
DEFAULT_LIMIT = 1000  # frames waiting per direction (netem's default limit)
RECV_BUFFER = 65536 + VNET_HDR  # room for a super-frame that slipped through (counted)
SOCKET_BUFFER = 8 * 1024 * 1024  # per packet socket: bursts from TSO-less senders
DRAIN = 128  # frames read from one socket per wakeup before the other side gets a turn


class Verdict(enum.Enum):
    """What `Direction.offer` did with a frame."""

    QUEUED = "queued"
    LOST = "lost"  # the random loss
    OVERFLOW = "overflow"  # more than `limit` frames waiting


class Direction:
    """One way of the wire, sans-IO: frames in with the time they arrived, frames out when
    due. Constant delay, so the queue is FIFO and `next_deadline` is its head's due time."""

    __slots__ = ("delay", "limit", "loss", "lost", "overflow", "queue", "received", "rng")

    def __init__(self, loss: float, delay: float, limit: int, rng: random.Random) -> None:
        if not 0.0 <= loss <= 1.0:
            raise ValueError(f"loss must be within [0, 1], not {loss}")
        if delay < 0.0:
            raise ValueError(f"delay must not be negative, not {delay}")
        if limit < 1:
            raise ValueError(f"limit must be at least 1, not {limit}")
        self.loss = loss
        self.delay = delay
        self.limit = limit
        self.rng = rng
        self.queue: deque[tuple[float, bytes]] = deque()
        self.received = self.lost = self.overflow = 0

    def offer(self, frame: bytes, now: float) -> Verdict:
        """A frame arrived at `now`: lose it, refuse it (queue full) or queue it."""
        self.received += 1
        if self.loss and self.rng.random() < self.loss:
            self.lost += 1
            return Verdict.LOST
        if len(self.queue) >= self.limit:
            self.overflow += 1
            return Verdict.OVERFLOW
        self.queue.append((now + self.delay, frame))
        return Verdict.QUEUED

    def next_deadline(self) -> float | None:
        """When the oldest waiting frame is due; None when nothing waits."""
        return self.queue[0][0] if self.queue else None

    def pop_due(self, now: float) -> Iterator[bytes]:
        """The frames due by `now`, oldest first (removed as they are yielded)."""
        queue = self.queue
        while queue and queue[0][0] <= now:
            yield queue.popleft()[1]

    @property
    def waiting(self) -> int:
        return len(self.queue)


class Wire:
    """Both directions, with independent PRNGs derived from one seed (None: random)."""

    def __init__(
        self, loss: float, delay: float, *, limit: int = DEFAULT_LIMIT, seed: int | None = None
    ) -> None:
        root = random.Random(seed)
        self.a_to_b = Direction(loss, delay, limit, random.Random(root.getrandbits(64)))
        self.b_to_a = Direction(loss, delay, limit, random.Random(root.getrandbits(64)))

    def next_deadline(self) -> float | None:
        due = [
            d for d in (self.a_to_b.next_deadline(), self.b_to_a.next_deadline()) if d is not None
        ]
        return min(due) if due else None

    def timeout(self, now: float) -> float | None:
        """How long the driver may wait for input before a frame is due (None: forever)."""
        due = self.next_deadline()
        return None if due is None else max(0.0, due - now)


def is_ipv4_udp(frame: bytes) -> bool:
    """Whether a frame as read (virtio_net_hdr first) is IPv4/UDP; for drop accounting."""
    return (
        len(frame) > IP_PROTO_OFF
        and frame[ETH_TYPE_OFF : ETH_TYPE_OFF + 2] == ETH_TYPE_IPV4
        and frame[IP_PROTO_OFF] == IPPROTO_UDP
    )


# ---------------------------------------------------------------------------------------------
# The driver: two packet sockets and a select loop


class Side:
    """One packet socket and the counters the driver keeps for the direction it feeds."""

    __slots__ = (
        "dropped_udp",
        "ifname",
        "kernel_drops",
        "oversize",
        "relayed",
        "send_errors",
        "sock",
    )

    def __init__(self, ifname: str) -> None:
        self.ifname = ifname
        self.sock = open_packet_socket(ifname)
        self.dropped_udp = 0  # of frames read here and dropped by the wire
        self.kernel_drops = 0  # frames the kernel dropped before we could read them here
        self.oversize = 0  # super-frames read here (offloads left on)
        self.relayed = 0  # frames sent out of this side
        self.send_errors = 0  # frames the kernel refused to send out of this side

    def poll_kernel_drops(self) -> None:
        """Add the socket's drop count since the last call (reading resets it)."""
        raw = self.sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, _TPACKET_STATS.size)
        self.kernel_drops += _TPACKET_STATS.unpack(raw)[1]


def open_packet_socket(ifname: str) -> socket.socket:
    """A non-blocking raw packet socket on `ifname` seeing every incoming frame, never our own
    outgoing ones, with its virtio_net_hdr."""
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    try:
        sock.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
        sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, SOCKET_BUFFER)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
        sock.bind((ifname, ETH_P_ALL))
        index = socket.if_nametoindex(ifname)
        mreq = _MREQ.pack(index, PACKET_MR_PROMISC, 0, bytes(8))
        sock.setsockopt(SOL_PACKET, PACKET_ADD_MEMBERSHIP, mreq)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def counters(wire: Wire, a: Side, b: Side) -> dict[str, Any]:
    """Per-direction counters, JSON-able."""
    out: dict[str, Any] = {"a": a.ifname, "b": b.ifname}
    for key, d, src, dst in (("a_to_b", wire.a_to_b, a, b), ("b_to_a", wire.b_to_a, b, a)):
        src.poll_kernel_drops()
        out[key] = {
            "received": d.received,
            "relayed": dst.relayed,
            "lost": d.lost,
            "overflow": d.overflow,
            "dropped": d.lost + d.overflow,
            "dropped_udp": src.dropped_udp,
            "kernel_drops": src.kernel_drops,
            "send_errors": dst.send_errors,
            "oversize": src.oversize,
            "waiting": d.waiting,
        }
    return out


def _read(side: Side, direction: Direction, now: float) -> None:
    """Drain up to DRAIN frames from `side` into `direction`."""
    recv = side.sock.recv
    offer = direction.offer
    queued = Verdict.QUEUED
    for _ in range(DRAIN):
        try:
            frame = recv(RECV_BUFFER)
        except BlockingIOError:
            return
        if len(frame) > VNET_HDR + MAX_FRAME:
            side.oversize += 1
        if offer(frame, now) is not queued and is_ipv4_udp(frame):
            side.dropped_udp += 1


def _send_due(direction: Direction, out: Side, now: float) -> None:
    send = out.sock.send
    for frame in direction.pop_due(now):
        try:
            send(frame)
            out.relayed += 1
        except OSError as exc:  # ENOBUFS (peer backlog full), ENETDOWN: the frame is gone
            if exc.errno not in (errno.ENOBUFS, errno.EAGAIN, errno.ENETDOWN, errno.ENXIO):
                raise
            out.send_errors += 1


def relay(wire: Wire, a: Side, b: Side, out: TextIO, hello: dict[str, Any]) -> None:
    """Relay between `a` and `b` until SIGTERM/SIGINT; SIGUSR1 prints the counters. The
    "ready" line (`hello`) goes out once the signal handlers are in place: a SIGUSR1 before
    that would kill the process."""
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    pending: list[int] = []

    def note(signum: int, _frame: FrameType | None) -> None:
        pending.append(signum)

    old = {s: signal.signal(s, note) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    old_wakeup = signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    fa, fb = a.sock.fileno(), b.sock.fileno()
    readers = [fa, fb, wake_r]
    clock = time.monotonic
    try:
        _emit(out, "ready", hello)
        while True:
            ready, _, _ = select.select(readers, [], [], wire.timeout(clock()))
            now = clock()
            if fa in ready:
                _read(a, wire.a_to_b, now)
            if fb in ready:
                _read(b, wire.b_to_a, now)
            _send_due(wire.a_to_b, b, now)
            _send_due(wire.b_to_a, a, now)
            if wake_r in ready:
                while True:
                    try:
                        if not os.read(wake_r, 64):
                            break
                    except BlockingIOError:
                        break
            while pending:
                signum = pending.pop(0)
                if signum == signal.SIGUSR1:
                    _emit(out, "counters", counters(wire, a, b))
                else:
                    return
    finally:
        signal.set_wakeup_fd(old_wakeup)
        for s, handler in old.items():
            signal.signal(s, handler)
        os.close(wake_r)
        os.close(wake_w)


def _emit(out: TextIO, event: str, body: dict[str, Any]) -> None:
    out.write(json.dumps({"event": event, **body}) + "\n")
    out.flush()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m ipop_trio.lab.wire",
        description="Relay Ethernet frames between two interfaces with random loss and a "
        "fixed one-way delay (a netem stand-in for the namespace lab). Needs root.",
    )
    p.add_argument("--a", required=True, metavar="IF", help="first interface")
    p.add_argument("--b", required=True, metavar="IF", help="second interface")
    p.add_argument("--loss", type=float, default=0.0, help="loss probability per frame, 0..1")
    p.add_argument("--delay", type=float, default=0.0, help="one-way delay, seconds")
    p.add_argument("--limit", type=int, default=DEFAULT_LIMIT, help="frames queued per way")
    p.add_argument("--seed", type=int, default=None, help="PRNG seed (default: random)")
    args = p.parse_args(argv)
    try:
        wire = Wire(args.loss, args.delay, limit=args.limit, seed=args.seed)
    except ValueError as exc:
        p.error(str(exc))
    try:
        a, b = Side(args.a), Side(args.b)
    except OSError as exc:
        print(f"labwire: cannot open {args.a}/{args.b}: {exc}", file=sys.stderr)
        return 1
    try:
        params = {"loss": args.loss, "delay": args.delay, "limit": args.limit, "seed": args.seed}
        relay(wire, a, b, sys.stdout, {"a": args.a, "b": args.b, **params})
        _emit(sys.stdout, "exit", {**params, **counters(wire, a, b)})
    finally:
        a.sock.close()
        b.sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
