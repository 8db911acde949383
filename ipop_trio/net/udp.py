"""The node's one UDP socket: batch send with UDP GSO, batch receive with UDP GRO.

The only module that owns the underlay socket. Everything is non-blocking; callers make one
`await wait_readable()` per batch and then drain. GSO and GRO are
probed and switched off cleanly where the kernel or the egress device refuses them
(wireguard-go `errShouldDisableUDPGSO`).
"""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Iterator

import trio

from ..config import endpoint_text

SOL_UDP = 17
UDP_SEGMENT = 103
UDP_GRO = 104
SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33
SOCKET_BUFFER = 7 * 1024 * 1024  # wireguard-go f26efb6: 7 MiB raised throughput ~30%
UDP_MAX_SEGMENTS = 64  # kernels before 6.9 allow 64 segments per GSO send
GSO_MAX_BYTES = 65535 - 28 - 8
RECV_BUFFER = 65536
_GSO_CMSG = struct.Struct("=H")
_GRO_CMSG = struct.Struct("=i")
# Which local address a datagram came to, and which to send from (ICE host candidates on a
# socket bound to the wildcard address): struct in_pktinfo / in6_pktinfo.
SOL_IP, IP_PKTINFO = 0, 8
SOL_IPV6, IPV6_RECVPKTINFO, IPV6_PKTINFO = 41, 49, 50
_PKTINFO4 = struct.Struct("=i4s4s")  # ifindex, spec_dst, addr (the header's destination)
_PKTINFO6 = struct.Struct("=16si")  # addr, ifindex
_PKTINFO_CMSGS = frozenset({(SOL_IP, IP_PKTINFO), (SOL_IPV6, IPV6_PKTINFO)})

Address = tuple[str, int]


class UdpSocket:
    """One bound UDP socket with batch send/receive."""

    def __init__(self, host: str, port: int) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.family = family
        self.sock = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
        try:
            # No SO_REUSEADDR: for UDP it would let a second node bind the same port and
            # share its datagrams; a taken port must be an error.
            self.sock.bind((host, port))
        except OSError as exc:
            self.sock.close()
            where = endpoint_text(host, port)
            raise OSError(exc.errno, f"cannot bind UDP {where}: {exc.strerror}") from None
        for opt, force in ((socket.SO_SNDBUF, SO_SNDBUFFORCE), (socket.SO_RCVBUF, SO_RCVBUFFORCE)):
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, force, SOCKET_BUFFER)
            except OSError:
                self.sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
        self.gso = True
        # Datagrams the kernel refused as larger than the path takes (EMSGSIZE): the
        # outbound stage watches it to learn a narrower path (proto/pmtu.py).
        self.too_big = 0
        try:
            self.sock.setsockopt(SOL_UDP, UDP_GRO, 1)
            self.gro = True
        except OSError:
            self.gro = False
        if family == socket.AF_INET:
            self.sock.setsockopt(SOL_IP, IP_PKTINFO, 1)
            pktinfo_size = _PKTINFO4.size
        else:
            self.sock.setsockopt(SOL_IPV6, IPV6_RECVPKTINFO, 1)
            pktinfo_size = _PKTINFO6.size
        # The pktinfo of the last `recv_once` (raw: only STUN needs it decoded, `last_local`).
        self._pktinfo: tuple[int, bytes] | None = None
        self._rbuf = bytearray(RECV_BUFFER)
        self._rview = memoryview(self._rbuf)
        self._cmsg_space = socket.CMSG_SPACE(_GRO_CMSG.size) + socket.CMSG_SPACE(pktinfo_size)

    @property
    def last_local(self) -> str | None:
        """The local address the last `recv_once` datagrams were sent to (None: unknown),
        decoded on demand: the data path never asks, ICE asks per STUN datagram."""
        info = self._pktinfo
        if info is None:
            return None
        kind, data = info
        if kind == IP_PKTINFO and len(data) >= _PKTINFO4.size:
            return socket.inet_ntop(socket.AF_INET, _PKTINFO4.unpack_from(data)[2])
        if kind == IPV6_PKTINFO and len(data) >= _PKTINFO6.size:
            return socket.inet_ntop(socket.AF_INET6, _PKTINFO6.unpack_from(data)[0])
        return None

    @property
    def local(self) -> Address:
        host, port = self.sock.getsockname()[:2]
        return (host, port)

    def fileno(self) -> int:
        return self.sock.fileno()

    async def wait_readable(self) -> None:
        await trio.lowlevel.wait_readable(self.sock)

    async def wait_writable(self) -> None:
        await trio.lowlevel.wait_writable(self.sock)

    def close(self) -> None:
        trio.lowlevel.notify_closing(self.sock)
        self.sock.close()

    # --- receive -------------------------------------------------------------------------

    def recv_raw(self) -> tuple[memoryview, int, Address] | None:
        """One receive call, uncut: the filled part of the reused buffer (valid until the
        next call), the GRO segment size it is cut by (its length when it is one datagram)
        and the source; None when nothing is waiting."""
        while True:
            try:
                n, anc, _flags, addr = self.sock.recvmsg_into([self._rbuf], self._cmsg_space)
                break
            except BlockingIOError:
                return None
            except ConnectionRefusedError:
                # ICMP port unreachable from an earlier send: not this datagram's problem
                # (the error is reported once; the next call returns what is waiting).
                continue
        seg = 0
        info = None
        for level, kind, data in anc:
            if level == SOL_UDP and kind == UDP_GRO and len(data) >= _GRO_CMSG.size:
                seg = _GRO_CMSG.unpack_from(data)[0]
            elif (level, kind) in _PKTINFO_CMSGS:
                info = (kind, data)
        self._pktinfo = info
        if seg <= 0 or seg >= n:
            seg = n
        return self._rview[:n], seg, (addr[0], addr[1])

    def recv_once(self) -> tuple[list[memoryview], Address] | None:
        """One receive call: the datagrams it returned (views into a reused buffer, valid
        until the next call) and their source; None when nothing is waiting."""
        got = self.recv_raw()
        if got is None:
            return None
        data, seg, addr = got
        return cut(data, seg), addr

    # --- send ----------------------------------------------------------------------------

    def send_iov(self, iov: list[bytes], sizes: list[int], addr: Address) -> int:
        """Send datagrams given as a scatter-gather list, two parts each (`iov[2i]`,
        `iov[2i+1]`, together `sizes[i]` bytes), to `addr`.

        Equal-sized neighbours go out in one GSO `sendmsg` (a shorter one may close a run).
        Returns the number of datagrams the kernel refused for lack of buffer space or
        route (the caller counts them: UDP may lose, the inner TCP recovers)."""
        dropped = 0
        sock = self.sock
        for start, count, seg, _total in _runs(sizes):
            parts = iov[2 * start : 2 * (start + count)]
            try:
                if count == 1:
                    sock.sendmsg(parts, (), 0, addr)
                elif self.gso:
                    sock.sendmsg(parts, [(SOL_UDP, UDP_SEGMENT, _GSO_CMSG.pack(seg))], 0, addr)
                else:
                    dropped += self._send_each(parts, addr)
            except BlockingIOError:
                dropped += count
            except OSError as exc:
                if exc.errno in (errno.EIO, errno.EINVAL) and count > 1 and self.gso:
                    # The egress device cannot checksum-offload (EIO) or an old kernel
                    # refused the size (EINVAL): GSO off for good, resend this run plainly.
                    self.gso = False
                    dropped += self._send_each(parts, addr)
                else:
                    # No route, a full buffer, or an address the kernel refuses (wrong
                    # family, broadcast): the peer's endpoint came from the network, so this
                    # is a counted loss of the run, never the data path's death.
                    dropped += count
                    if exc.errno == errno.EMSGSIZE:
                        self.too_big += count
        return dropped

    def _send_each(self, parts: list[bytes], addr: Address) -> int:
        dropped = 0
        for i in range(0, len(parts), 2):
            try:
                self.sock.sendmsg(parts[i : i + 2], (), 0, addr)
            except OSError:
                dropped += 1
        return dropped

    def send_runs(
        self, buf: bytearray, runs: list[tuple[int, int, int, int]], addr: Address
    ) -> int:
        """Send datagrams laid out back to back in `buf` (the native core's seal): each run
        (offset, length, segment size, count) is one GSO `sendmsg`. Returns the datagrams
        the kernel refused, as `send_iov` does. No view of `buf` outlives the call."""
        dropped = 0
        sock = self.sock
        view = memoryview(buf)
        try:
            for off, length, seg, count in runs:
                part = view[off : off + length]
                try:
                    if count == 1:
                        sock.sendmsg([part], (), 0, addr)
                    elif self.gso:
                        sock.sendmsg([part], [(SOL_UDP, UDP_SEGMENT, _GSO_CMSG.pack(seg))], 0, addr)
                    else:
                        dropped += self._send_cut(part, seg, addr)
                except BlockingIOError:
                    dropped += count
                except OSError as exc:
                    if exc.errno in (errno.EIO, errno.EINVAL) and count > 1 and self.gso:
                        self.gso = False  # as in send_iov
                        dropped += self._send_cut(part, seg, addr)
                    else:
                        dropped += count
                        if exc.errno == errno.EMSGSIZE:
                            self.too_big += count
                finally:
                    part.release()
        finally:
            view.release()
        return dropped

    def _send_cut(self, data: memoryview, seg: int, addr: Address) -> int:
        dropped = 0
        for i in range(0, len(data), seg):
            try:
                self.sock.sendto(data[i : i + seg], addr)
            except OSError:
                dropped += 1
        return dropped

    def send_from(self, datagram: bytes, source: str, addr: Address) -> bool:
        """Send a control datagram from local address `source` (an ICE host candidate):
        with a wildcard-bound socket the kernel would otherwise pick the route's source."""
        try:
            if self.family == socket.AF_INET:
                info = _PKTINFO4.pack(0, socket.inet_pton(socket.AF_INET, source), bytes(4))
                cmsg = [(SOL_IP, IP_PKTINFO, info)]
            else:
                info = _PKTINFO6.pack(socket.inet_pton(socket.AF_INET6, source), 0)
                cmsg = [(SOL_IPV6, IPV6_PKTINFO, info)]
            self.sock.sendmsg([datagram], cmsg, 0, addr)
        except (OSError, ValueError):
            return False
        return True

    def send_one(self, datagram: bytes, addr: Address) -> bool:
        """Send a control datagram (handshake, keepalive); False if it could not go out."""
        try:
            self.sock.sendto(datagram, addr)
        except (OSError, ValueError):  # ValueError: an address the socket cannot even parse
            return False
        return True


def cut(data: memoryview, seg: int) -> list[memoryview]:
    """A receive call's datagrams: `data` cut every `seg` bytes (GRO's layout)."""
    n = len(data)
    if seg <= 0 or seg >= n:
        return [data] if n else []
    return [data[i : min(i + seg, n)] for i in range(0, n, seg)]


def _runs(sizes: list[int]) -> Iterator[tuple[int, int, int, int]]:
    """Group datagram sizes into GSO runs: (first index, count, segment size, total bytes).

    A run is a sequence of equal sizes, optionally closed by one shorter datagram, at most
    UDP_MAX_SEGMENTS long and GSO_MAX_BYTES in total (the kernel's limits for one
    UDP_SEGMENT send: udp_send_skb refuses more segments or a longer datagram)."""
    i, n = 0, len(sizes)
    while i < n:
        seg = sizes[i]
        j = i + 1
        total = seg
        limit = min(UDP_MAX_SEGMENTS, max(1, GSO_MAX_BYTES // seg))
        while j < n and j - i < limit and sizes[j] == seg:
            total += seg
            j += 1
        if j < n and j - i < limit and sizes[j] < seg:
            total += sizes[j]
            j += 1
        yield i, j - i, seg, total
        i = j
