"""Outbound: TAP frames -> route -> seal -> UDP (GSO).

Per batch (never per packet: no await, no logging, no allocation beyond the frame bytes):
  1. switch: split the TAP batch by destination peer; ARP for known peers answered locally;
     with a firewall, each peer's frames are checked against its compiled rules (one check
     per TAP read: a TSO super-frame is one flow's, checked once), refused ones counted;
  2. encode + seal: each TAP read becomes inner payloads (proto/offload.py: a frame, a frame
     whose checksum the peer's kernel finishes, or the segment-sized pieces of a TSO
     super-frame), each sealed into its own datagram: header + ciphertext, kept as a
     scatter-gather list (no copy into a send buffer);
  3. udp_send: equal-sized neighbours leave in one UDP GSO sendmsg per peer.
A peer without a usable session keeps up to 128 frames staged and wakes its link task.
A peer reached through a TURN relay (ICE chose a relayed pair) gets the same datagrams
framed for the relay (`send_relayed`, control/ice.py).

`Outbound` is the reference implementation, in Python; `NativeOutbound` does steps 2 and 3's
layout in one native call per peer batch (`seal_tap_batch`, datapath/native.py): encoded,
sealed and laid out back to back in one reused buffer, one GSO sendmsg per run.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable
from typing import Any

from ..config import DEFAULT_MTU, tap_mtu_for
from ..net import netlink
from ..net.udp import UdpSocket
from ..proto.offload import OffloadError, encode_outbound
from ..proto.pmtu import MIN_PATH_MTU, split_too_big
from ..stats import Stats, now_ns
from .switch import VNET, PeerPort, Switch

# (relay, peer, iov, sizes) -> datagrams dropped: the ICE service's send through a relay.
SendRelayed = Callable[[Any, tuple[str, int], list[bytes], list[int]], int]
log = logging.getLogger("ipop_trio.datapath")
# How far a path's MTU steps down when a send was refused as too big and the route tells
# nothing narrower (a PMTU the kernel has not cached, a tunnel further on).
PATH_MTU_STEP = 64


class Outbound:
    def __init__(
        self,
        switch: Switch,
        udp: UdpSocket,
        stats: Stats,
        *,
        send_relayed: SendRelayed,
        tap_mtu: int = DEFAULT_MTU,
    ) -> None:
        self.switch = switch
        self.udp = udp
        self.stats = stats
        self.send_relayed = send_relayed
        self.tap_mtu = tap_mtu  # the TAP's, as the node chose it
        # ICMP "fragmentation needed" for frames too big for their peer's path: they go
        # back into our TAP with the batch's local writes (proto/pmtu.py).
        self.replies: list[bytes] = []
        # NativeOutbound's: the native seal's output, reused batch after batch.
        self._buf = bytearray()

    def process(self, frames: list[bytes], now: float) -> list[bytes]:
        """Route and send one TAP batch; return frames to write back to our own TAP (ARP
        answers, and ICMP for frames too big for their peer's path)."""
        t0 = now_ns()
        switch = self.switch
        per_peer, local = switch.route_outbound(frames)
        if switch.firewall is not None:  # once per batch; None: no rules, no per-frame call
            per_peer = self._filter(per_peer, now)
        self.stats["switch"].record(len(frames), 0, t0)
        for port, batch in per_peer.items():
            self.send(port, batch, now)
        if self.replies:
            local += self.replies
            self.replies = []
        return local

    def _filter(
        self, per_peer: dict[PeerPort, list[bytes]], now: float
    ) -> dict[PeerPort, list[bytes]]:
        """Each peer's frames its firewall rules let out (proto/firewall.py)."""
        out: dict[PeerPort, list[bytes]] = {}
        refused = 0
        for port, batch in per_peer.items():
            flt = port.filter
            kept = batch if flt is None else flt.outbound_batch(batch, now)
            refused += len(batch) - len(kept)
            if kept:
                out[port] = kept
        if refused:
            self.stats.drop("firewall_outbound", refused)
        return out

    def send(self, port: PeerPort, frames: list[bytes], now: float) -> None:
        session = port.session
        endpoint = port.endpoint
        if session is None or endpoint is None:
            port.staged.extend(frames)
            port.wake()
            return
        if port.path_mtu is not None:
            frames, refused = split_too_big(frames, port.path_mtu, self.replies)
            if refused:
                self.stats.drop("too_big_for_path", refused)
            if not frames:
                return
        too_big = self.udp.too_big
        frame_bytes = self._seal_and_send(port, session, endpoint, frames)
        if self.udp.too_big != too_big and port.relay is None:
            self._narrower_path(port, endpoint)
        port.tx_packets += len(frames)
        port.tx_bytes += frame_bytes
        port.last_sent = now

    def _narrower_path(self, port: PeerPort, endpoint: tuple[str, int]) -> None:
        """A datagram to `port` was refused as too big (EMSGSIZE): from now on its frames
        must fit what the route towards it takes (or a step less than before, when the
        route says nothing narrower); said once in the log and in status."""
        current = port.path_mtu or self.tap_mtu
        found = netlink.path_mtu(endpoint[0])
        ipv6 = ipaddress.ip_address(endpoint[0]).version == 6
        fits = None if found is None else tap_mtu_for(found[0], ipv6=ipv6)
        if found is not None and fits is not None and fits < current:
            mtu = fits
            why = f"{found[1]} mtu {found[0]} towards {endpoint[0]}"
        else:
            mtu = max(MIN_PATH_MTU, current - PATH_MTU_STEP)
            why = f"sends to {endpoint[0]} too big, the route says nothing narrower"
        if mtu >= current:
            return
        port.path_mtu, port.path_mtu_why = mtu, why
        log.warning(
            "%s: the path takes at most %d-byte packets (%s, a send failed: message too "
            "long); larger ones are answered with ICMP 'fragmentation needed'",
            port.name,
            mtu,
            why,
        )

    def _seal_and_send(
        self, port: PeerPort, session: Any, endpoint: tuple[str, int], frames: list[bytes]
    ) -> int:
        """Encode, seal and send one peer's frames; return their bytes less virtio headers."""
        t0 = now_ns()
        payloads: list[bytes] = []
        frame_id = port.frame_id
        for frame in frames:
            try:
                payloads.extend(encode_outbound(frame, frame_id))
            except OffloadError:
                self.stats.drop("bad_tap_frame")
            frame_id = (frame_id + 1) & 0xFFFFFFFF
        port.frame_id = frame_id
        stats = self.stats
        t1 = now_ns()
        stats["encode"].record(len(frames), 0, t0)
        iov: list[bytes] = []
        sizes: list[int] = []
        session.seal_iov(payloads, iov, sizes)
        t2 = now_ns()
        nbytes = sum(sizes)
        stats["seal"].record(len(sizes), nbytes, t1)
        relay = port.relay
        if relay is None:
            dropped = self.udp.send_iov(iov, sizes, endpoint)
        else:
            dropped = self.send_relayed(relay, endpoint, iov, sizes)
        if dropped:
            stats.drop("udp_send_failed", dropped)
        stats["udp_send"].record(len(sizes), nbytes, t2)
        return sum(map(len, frames)) - VNET * len(frames)


class NativeOutbound(Outbound):
    """Outbound with encode + seal in the native core (the peer's session must be a native
    `Session`: the node makes every session with the native factory when this runs)."""

    def _seal_and_send(
        self, port: PeerPort, session: Any, endpoint: tuple[str, int], frames: list[bytes]
    ) -> int:
        stats = self.stats
        t0 = now_ns()
        buf = self._buf
        batch = session.seal_tap_batch(frames, port.frame_id, buf)
        port.frame_id = batch.frame_id
        if batch.bad_tap_frame:
            stats.drop("bad_tap_frame", batch.bad_tap_frame)
        t1 = now_ns()
        stats["seal"].record(batch.datagrams, batch.nbytes, t0)
        relay = port.relay
        if relay is None:
            dropped = self.udp.send_runs(buf, batch.runs, endpoint)
        else:
            iov: list[bytes] = []
            sizes: list[int] = []
            for off, length, seg, _count in batch.runs:
                for at in range(off, off + length, seg):
                    d = bytes(buf[at : min(at + seg, off + length)])
                    iov += (d, b"")
                    sizes.append(len(d))
            dropped = self.send_relayed(relay, endpoint, iov, sizes)
        if dropped:
            stats.drop("udp_send_failed", dropped)
        stats["udp_send"].record(batch.datagrams, batch.nbytes, t1)
        return int(batch.frame_bytes)
