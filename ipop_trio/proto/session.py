"""Transport sessions: AEAD seal/open of data datagrams, counters, replay window, limits.

A `Session` is what a finished link handshake leaves behind: one key per direction, the two
receiver indices, and the counters WireGuard's timers are expressed in (whitepaper §5.4.6,
§6). `seal*` turns an inner payload into a data datagram; `open*_untrusted` turns a datagram
from the network back into its payload or raises `BadPacket`.

This module must never:
  * read a clock, touch a socket, a file or an event loop (imports no os, time, socket,
    trio; `now` comes in as float seconds, a test scans the imports);
  * send two datagrams with the same counter under one key (the counter is the AEAD nonce);
  * move the replay window for a datagram whose tag has not verified;
  * raise anything but `BadPacket` from an `*_untrusted` function;
  * log, or allocate more than it must, on the per-packet path.

A Session has a single owner: it is not thread-safe.

Data datagram: type(1) pad(3) receiver_index(4) counter(8) | payload | tag(16, secure only),
drawn in wire.py, which owns the layout (secure links 0xA4, plain links 0xA5):

    secure: ciphertext||tag = AEAD(send_key, nonce, payload, aad = the 16 header bytes)
    nonce (12 bytes)        = 4 zero bytes || counter (u64, little endian)   (§5.4.6)

Plain links carry the same header and counters with the payload in clear: they dedupe and
order-check like secure links but, having no tag, anyone on the path can forge them.
"""

from __future__ import annotations

import enum
import hmac
import struct
from collections.abc import Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from ..errors import BadPacket, LocalProtocolError
from .wire import DATA_HEADER, DATA_HEADER_SIZE, TAG_SIZE, Kind


class Cipher(enum.Enum):
    AES_256_GCM = "aes-256-gcm"
    CHACHA20_POLY1305 = "chacha20-poly1305"


KEY_SIZE = 32

# WireGuard's timers (whitepaper §6.1), in seconds / messages.
REKEY_AFTER_MESSAGES = 2**60
REJECT_AFTER_MESSAGES = 2**64 - 2**13 - 1
REKEY_AFTER_TIME = 120.0
REJECT_AFTER_TIME = 180.0
REKEY_ATTEMPT_TIME = 90.0
REKEY_TIMEOUT = 5.0
KEEPALIVE_TIMEOUT = 10.0

# §5.4.6: the nonce is 32 zero bits followed by the 64-bit little-endian counter.
_NONCE = struct.Struct("<4xQ")
# The data header read as words: the first u32 is type | pad << 8, so comparing it to the
# type checks the three pad bytes are zero in the same operation (as wireguard-go does).
_HEADER_WORDS = struct.Struct("<IIQ")
assert _HEADER_WORDS.size == DATA_HEADER_SIZE == DATA_HEADER.size

# --- Replay window (RFC 6479, as in wireguard-go's replay/replay.go) ---------------------
#
# A ring of RING_BLOCKS 64-bit blocks; bit (c % 64) of block (c // 64) % RING_BLOCKS says
# whether counter c was seen. Moving the window forward only zeroes the blocks it enters,
# so an in-order packet costs one bit test and set (RFC 6479 §2). One block is kept spare
# so the block holding the highest counter never overlaps the oldest one still accepted:
# WINDOW_SIZE = (RING_BLOCKS - 1) * 64 = 8128 = 8192 - 64, wireguard-go's choice. That is
# ~8k datagrams of reordering, ~100 ms at 1 Gbit/s of 1400-byte datagrams: enough for the
# reordering of multi-path underlays and of batched sends, at 1 KiB per session.
# (Measured with timeit, 20k updates: this list of ints ~300 ns/update in order, ~320
# reordered; one 8128-bit int shifted per advance ~510 / ~330 ns; an absolute-position big
# int rebased now and then ~690 ns. Each big-int operation copies the whole bitmap.)
_BLOCK_BITS_LOG = 6
_BLOCK_BIT_MASK = (1 << _BLOCK_BITS_LOG) - 1
RING_BLOCKS = 128
_RING_MASK = RING_BLOCKS - 1
WINDOW_SIZE = (RING_BLOCKS - 1) << _BLOCK_BITS_LOG  # 8128

# Plain sessions carry no tag, so a counter proves nothing: one datagram with a counter near
# 2**64 would move the window past every counter the sender will use. There a counter more
# than PLAIN_MAX_JUMP above the highest (refused as `Refusal.JUMP`), or older than the window
# (`REPLAYED`), is refused and remembered; a second that continues it (above it by at most
# PLAIN_MAX_JUMP) restarts the window on that line. One forged counter moves nothing; a
# sender back from a longer outage loses one datagram; a window forged datagrams did move is
# won back by the sender's next two. (An on-path party can inject into a plain link anyway:
# this bounds what one datagram does, it authenticates nothing.) 2**16 datagrams is ~90 MB,
# far beyond a loss burst TCP can have in flight.
PLAIN_MAX_JUMP = 1 << 16


class ReplayWindow:
    """RFC 6479 sliding window over 64-bit counters.

    A counter is accepted once if it is below REJECT_AFTER_MESSAGES and
    ``counter > highest - WINDOW_SIZE`` (highest: the largest counter accepted so far).
    Counter 0 is a valid first counter.
    """

    __slots__ = ("_last", "_ring")

    def __init__(self) -> None:
        self._last = -1  # nothing seen; -1 >> 6 == -1, so the first advance clears block 0
        self._ring = [0] * RING_BLOCKS

    @property
    def highest(self) -> int:
        """Largest counter accepted so far, -1 before the first."""
        return self._last

    def check(self, counter: int) -> bool:
        """Would `counter` be accepted? (Does not change the window.)"""
        if not 0 <= counter < REJECT_AFTER_MESSAGES:
            return False
        last = self._last
        if counter > last:
            return True
        if last - counter >= WINDOW_SIZE:
            return False
        block = self._ring[(counter >> _BLOCK_BITS_LOG) & _RING_MASK]
        return not (block >> (counter & _BLOCK_BIT_MASK)) & 1

    def update(self, counter: int) -> bool:
        """Accept `counter` (True) or refuse it as a replay / too old (False)."""
        if not 0 <= counter < REJECT_AFTER_MESSAGES:
            return False
        last = self._last
        ring = self._ring
        block = counter >> _BLOCK_BITS_LOG
        if counter > last:
            self._advance(counter)
        elif last - counter >= WINDOW_SIZE:
            return False
        i = block & _RING_MASK
        bit = 1 << (counter & _BLOCK_BIT_MASK)
        old = ring[i]
        if old & bit:
            return False
        ring[i] = old | bit
        return True

    def _advance(self, counter: int) -> None:
        """Make `counter` (above `highest`) the highest, zeroing the blocks the window enters
        (all of them on a far jump)."""
        current = self._last >> _BLOCK_BITS_LOG
        block = counter >> _BLOCK_BITS_LOG
        if block - current >= RING_BLOCKS:
            self._ring[:] = _ZERO_RING
        else:
            ring = self._ring
            for i in range(current + 1, block + 1):
                ring[i & _RING_MASK] = 0
        self._last = counter

    def restart(self) -> None:
        """Forget every counter: the next `update` starts a new line (plain sessions)."""
        self._last = -1
        self._ring[:] = _ZERO_RING

    def accept_run(self, first: int, last: int) -> None:
        """Accept the counters first..last (inclusive), all above `highest` and below
        REJECT_AFTER_MESSAGES: the same window as `update` on each in turn, with one bit mask
        per 64-counter block instead of one call per counter (the in-order run a GRO batch
        carries). The caller guarantees the preconditions (`Session.open_batch`)."""
        self._advance(last)
        ring = self._ring
        top = last >> _BLOCK_BITS_LOG
        # Only the newest RING_BLOCKS blocks are still in the ring (a longer run wraps).
        start = max(first, (top - RING_BLOCKS + 1) << _BLOCK_BITS_LOG)
        for block in range(start >> _BLOCK_BITS_LOG, top + 1):
            lo = start & _BLOCK_BIT_MASK if block == start >> _BLOCK_BITS_LOG else 0
            hi = last & _BLOCK_BIT_MASK if block == top else _BLOCK_BIT_MASK
            ring[block & _RING_MASK] |= ((2 << (hi - lo)) - 1) << lo


_ZERO_RING = (0,) * RING_BLOCKS


# --- Sessions ------------------------------------------------------------------------------


class Refusal(enum.StrEnum):
    """Why `open*_untrusted` refused a datagram (keys of `Session.refused`)."""

    SHORT = "short"  # shorter than header (+ tag)
    TYPE = "type"  # other mode's type (plain vs secure), or non-zero pad
    INDEX = "index"  # receiver_index is not ours
    LIMIT = "limit"  # counter >= REJECT_AFTER_MESSAGES
    REPLAYED = "replayed"  # seen already, or older than the window
    TOO_LONG = "too_long"  # payload larger than the caller's buffer
    BAD_TAG = "bad_tag"  # authentication failed
    JUMP = "jump"  # plain session: a counter far ahead of the window, not (yet) continued


_REFUSAL_TEXT = {
    Refusal.SHORT: "data datagram too short",
    Refusal.TYPE: "data datagram of the wrong type for this session",
    Refusal.INDEX: "data datagram for another receiver index",
    Refusal.LIMIT: "data counter past the reject limit",
    Refusal.REPLAYED: "data counter replayed or too old",
    Refusal.TOO_LONG: "data payload larger than the receive buffer",
    Refusal.BAD_TAG: "data datagram failed authentication",
    Refusal.JUMP: "plain data counter too far ahead of the window",
}


class SessionRefused(BadPacket):
    """`BadPacket` raised by a session; `reason` says which check refused the datagram."""

    def __init__(self, reason: Refusal) -> None:
        super().__init__(_REFUSAL_TEXT[reason])
        self.reason = reason


_HEADER_SIZE = DATA_HEADER_SIZE
_EXHAUSTED = "session send counter exhausted (REJECT_AFTER_MESSAGES): rekey"


def hkdf2(chaining_key: bytes, ikm: bytes) -> tuple[bytes, bytes]:
    """Noise §4.3 HKDF with two outputs (HMAC-SHA256). `hkdf2(ck, b"")` is Split() (§5.2):
    (initiator → responder key, responder → initiator key)."""
    temp = hmac.digest(chaining_key, ikm, "sha256")
    out1 = hmac.digest(temp, b"\x01", "sha256")
    return out1, hmac.digest(temp, out1 + b"\x02", "sha256")


class Session:
    """One direction pair of keys after a handshake.

    `secure=False` makes a plain link session (type 0xA5): same header and counters,
    payload in clear, no tag; its keys are not used.

    Counters: `send_counter` is the next counter to send (= datagrams sealed);
    `recv_highest` the highest counter accepted (-1 before the first). `tx_bytes` /
    `rx_bytes` count payload bytes, `rx_packets` datagrams opened, and `refused` the
    datagrams refused, by `Refusal`.
    """

    local_index: int
    remote_index: int
    secure: bool
    created: float

    __slots__ = (
        "_aead",
        "_held",
        "_jump",
        "_kind",
        "_min_len",
        "_open_aead",
        "_send",
        "_tag_size",
        "_window",
        "created",
        "local_index",
        "refused",
        "remote_index",
        "rx_bytes",
        "rx_packets",
        "secure",
        "tx_bytes",
    )

    def __init__(
        self,
        *,
        local_index: int,
        remote_index: int,
        cipher: Cipher,
        secure: bool,
        created: float,
        chaining_key: bytes | None = None,
        initiator: bool | None = None,
        send_key: bytes | None = None,
        recv_key: bytes | None = None,
    ) -> None:
        """Either form, as the native Session: `chaining_key` and `initiator` (a completed
        handshake: Noise's Split() derives the transport keys here), or `send_key` and
        `recv_key` (tests and tools with fixed keys)."""
        for index in (local_index, remote_index):
            if not 0 <= index < 2**32:
                raise LocalProtocolError(f"session index {index} does not fit in a u32")
        from_handshake = (chaining_key, initiator, send_key, recv_key)
        if None not in from_handshake[:2] and from_handshake[2:] == (None, None):
            assert chaining_key is not None  # (for mypy: checked just above)
            if len(chaining_key) != KEY_SIZE:
                raise LocalProtocolError(f"a chaining key must be {KEY_SIZE} bytes")
            to_responder, to_initiator = hkdf2(chaining_key, b"")
            send_key, recv_key = (
                (to_responder, to_initiator) if initiator else (to_initiator, to_responder)
            )
        elif from_handshake[:2] != (None, None) or send_key is None or recv_key is None:
            raise TypeError("Session takes chaining_key and initiator, or send_key and recv_key")
        aead_class = AESGCM if cipher is Cipher.AES_256_GCM else ChaCha20Poly1305
        if secure:
            if len(send_key) != KEY_SIZE or len(recv_key) != KEY_SIZE:
                raise LocalProtocolError(f"session keys must be {KEY_SIZE} bytes")
            self._aead: AESGCM | ChaCha20Poly1305 | None = aead_class(send_key)
            self._open_aead: AESGCM | ChaCha20Poly1305 | None = aead_class(recv_key)
        else:
            self._aead = self._open_aead = None
        self.local_index = local_index
        self.remote_index = remote_index
        self.secure = secure
        self.created = created
        self._kind = int(Kind.DATA_SECURE if secure else Kind.DATA_PLAIN)
        self._tag_size = TAG_SIZE if secure else 0
        self._min_len = _HEADER_SIZE + self._tag_size
        self._send = 0
        self._window = ReplayWindow()
        # Plain sessions: the refused far counter a second may continue (-1: none), and how
        # far the fast path may jump (unbounded on secure sessions, whose tag proves it).
        self._held = -1
        self._jump = REJECT_AFTER_MESSAGES if secure else PLAIN_MAX_JUMP
        self.tx_bytes = 0
        self.rx_bytes = 0
        self.rx_packets = 0
        self.refused: dict[Refusal, int] = dict.fromkeys(Refusal, 0)

    # --- counters and limits (WireGuard whitepaper §6.2) ---

    @property
    def send_counter(self) -> int:
        """The counter the next sealed datagram will carry (= datagrams sealed so far)."""
        return self._send

    @property
    def recv_highest(self) -> int:
        """Highest counter accepted from the peer, -1 before the first."""
        return self._window.highest

    def overhead(self) -> int:
        """Bytes a datagram adds to its payload (header, plus tag on secure links)."""
        return self._min_len

    def should_rekey(self, now: float, initiator: bool) -> bool:
        """Sender side: start a new handshake before sending? After REKEY_AFTER_MESSAGES
        datagrams, or REKEY_AFTER_TIME after the session began if we initiated it."""
        if self._send >= REKEY_AFTER_MESSAGES:
            return True
        return initiator and now - self.created >= REKEY_AFTER_TIME

    def expired(self, now: float) -> bool:
        """Neither send nor accept on this session any more: REJECT_AFTER_TIME old, or
        its send counter is exhausted."""
        return now - self.created >= REJECT_AFTER_TIME or self._send >= REJECT_AFTER_MESSAGES

    # --- send ---

    def seal(self, payload: bytes | memoryview) -> bytes:
        """One data datagram carrying `payload`, with the next counter."""
        counter = self._send
        if counter >= REJECT_AFTER_MESSAGES:
            raise LocalProtocolError(_EXHAUSTED)
        self._send = counter + 1
        header = DATA_HEADER.pack(self._kind, self.remote_index, counter)
        self.tx_bytes += len(payload)
        aead = self._aead
        if aead is None:
            return header + payload
        return header + aead.encrypt(_NONCE.pack(counter), payload, header)

    def seal_into(
        self, out: bytearray | memoryview, offset: int, payload: bytes | memoryview
    ) -> int:
        """Write the datagram `seal(payload)` would return into `out` at `offset`; return its
        length (len(payload) + overhead()). `out` must not overlap `payload`. Raises
        LocalProtocolError, before using a counter, when `out` has no room for it."""
        counter = self._send
        if counter >= REJECT_AFTER_MESSAGES:
            raise LocalProtocolError(_EXHAUSTED)
        n = len(payload)
        start = offset + _HEADER_SIZE
        end = start + n + self._tag_size
        if end > len(out):
            raise LocalProtocolError("seal_into: buffer too small for the datagram")
        self._send = counter + 1
        view = memoryview(out)
        DATA_HEADER.pack_into(view, offset, self._kind, self.remote_index, counter)
        aead = self._aead
        if aead is None:
            view[start:end] = payload
        else:
            aead.encrypt_into(_NONCE.pack(counter), payload, view[offset:start], view[start:end])
        self.tx_bytes += n
        return end - offset

    def seal_iov(self, payloads: Sequence[bytes], iov: list[bytes], sizes: list[int]) -> None:
        """Seal each payload into its own datagram, appending its two parts (header, then
        ciphertext and tag) to `iov` and its length to `sizes`: the scatter-gather list a
        UDP GSO `sendmsg` takes as is. Same datagrams as `seal`; cheaper than a `seal_into`
        loop into one buffer here (1.72 vs 1.95 µs per 1.4 KB, measured), because `encrypt`
        returning new bytes costs less than the three buffer acquisitions of `encrypt_into`,
        and nothing is copied after.
        All or nothing on counter exhaustion (LocalProtocolError, no counter used)."""
        count = len(payloads)
        first = self._send
        if first + count > REJECT_AFTER_MESSAGES:
            raise LocalProtocolError(_EXHAUSTED)
        self._send = first + count
        pack = DATA_HEADER.pack
        nonce = _NONCE.pack
        kind, remote = self._kind, self.remote_index
        aead = self._aead
        add_iov, add_size = iov.append, sizes.append
        counter = first
        nbytes = 0
        if aead is None:
            for payload in payloads:
                add_iov(pack(kind, remote, counter))
                add_iov(payload)
                add_size(_HEADER_SIZE + len(payload))
                nbytes += len(payload)
                counter += 1
        else:
            encrypt = aead.encrypt
            for payload in payloads:
                header = pack(kind, remote, counter)
                add_iov(header)
                add_iov(encrypt(nonce(counter), payload, header))
                add_size(_HEADER_SIZE + TAG_SIZE + len(payload))
                nbytes += len(payload)
                counter += 1
        self.tx_bytes += nbytes

    # --- receive ---

    def _refuse(self, reason: Refusal) -> SessionRefused:
        self.refused[reason] += 1
        return SessionRefused(reason)

    def _plain_refusal(self, counter: int) -> Refusal | None:
        """Plain sessions, before the window check: may `counter` be looked at (None)? Near
        the window, yes; far from it, only when it continues the far counter refused last
        (then the window restarts for it); otherwise it is remembered and refused: JUMP when
        ahead, REPLAYED when older than the window (counted). See PLAIN_MAX_JUMP."""
        highest = self._window.highest
        if counter >= REJECT_AFTER_MESSAGES or (
            highest - WINDOW_SIZE < counter and counter - highest <= PLAIN_MAX_JUMP
        ):
            return None
        held = self._held
        if 0 <= held < counter and counter - held <= PLAIN_MAX_JUMP:
            self._held = -1
            self._window.restart()
            return None
        self._held = counter
        reason = Refusal.JUMP if counter > highest else Refusal.REPLAYED
        self.refused[reason] += 1
        return reason

    def open_untrusted(self, datagram: bytes | memoryview) -> bytes:
        """The payload of a data datagram for this session, or raise BadPacket."""
        n = len(datagram) - self._min_len
        out = bytearray(n if n > 0 else 0)
        self.open_into_untrusted(datagram, out)
        return bytes(out)

    def open_batch(
        self, datagrams: Sequence[bytes | memoryview], start: int, payloads: list[bytes]
    ) -> int:
        """Open `datagrams[start:]` in order, appending each payload to `payloads`, until one
        is not a data datagram of this session (another index or type): return its
        position (len(datagrams) when all were ours). Ours but refused (replay, bad tag,
        limit) are counted in `refused` and skipped. The data path's receive loop: the
        same checks, in the same order, as `open_into_untrusted`, with lookups hoisted."""
        kind, local = self._kind, self.local_index
        min_len = self._min_len
        window = self._window
        unpack = _HEADER_WORDS.unpack_from
        nonce = _NONCE.pack
        aead = self._open_aead
        decrypt = None if aead is None else aead.decrypt
        refused = self.refused
        append = payloads.append
        opened = nbytes = 0
        # Fast path: a counter above every counter accepted so far (`top`, this batch's
        # included) needs no window lookup; such counters, authenticated, are collected as
        # consecutive runs and entered into the window with one `accept_run` each. Before any
        # other counter the pending run is entered, then that counter takes the full check.
        top = window.highest
        jump = self._jump
        secure = self.secure
        run_first = run_last = -1
        i, n = start, len(datagrams)
        while i < n:
            d = datagrams[i]
            if len(d) < min_len:
                break
            word, index, counter = unpack(d)
            if word != kind or index != local:
                break
            i += 1
            fast = top < counter < REJECT_AFTER_MESSAGES and counter - top <= jump
            if not fast:
                if run_first >= 0:
                    window.accept_run(run_first, run_last)
                    run_first = -1
                if not secure and self._plain_refusal(counter) is not None:
                    continue
                if not window.check(counter):
                    refused[
                        Refusal.LIMIT if counter >= REJECT_AFTER_MESSAGES else Refusal.REPLAYED
                    ] += 1
                    continue
            view = d if type(d) is memoryview else memoryview(d)
            if decrypt is None:
                payload = bytes(view[_HEADER_SIZE:])
            else:
                try:
                    payload = decrypt(nonce(counter), view[_HEADER_SIZE:], view[:_HEADER_SIZE])
                except InvalidTag:
                    refused[Refusal.BAD_TAG] += 1
                    continue
            # Authenticated (or a plain link): now, and only now, the window moves.
            if not fast:
                window.update(counter)
                top = window.highest  # a far counter accepted here is the new top too
            elif counter == run_last + 1 and run_first >= 0:
                run_last = top = counter
            else:
                if run_first >= 0:
                    window.accept_run(run_first, run_last)
                run_first = run_last = top = counter
            append(payload)
            opened += 1
            nbytes += len(payload)
        if run_first >= 0:
            window.accept_run(run_first, run_last)
        self.rx_packets += opened
        self.rx_bytes += nbytes
        return i

    def open_into_untrusted(self, datagram: bytes | memoryview, out: bytearray | memoryview) -> int:
        """Write the payload of a data datagram into the start of `out` and return its
        length, or raise BadPacket. `out` must not overlap `datagram`; after a refusal its
        first bytes are undefined (a failed tag check may leave plaintext there).

        Order matters (whitepaper §5.4.6): everything that costs no cryptography is checked
        first, the replay window is only *checked* before the tag is verified and only
        *updated* after, so a forged counter can never slide the window."""
        n = len(datagram) - self._min_len
        if n < 0:
            raise self._refuse(Refusal.SHORT)
        word, index, counter = _HEADER_WORDS.unpack_from(datagram)
        if word != self._kind:
            raise self._refuse(Refusal.TYPE)
        if index != self.local_index:
            raise self._refuse(Refusal.INDEX)
        window = self._window
        if self._open_aead is None:
            reason = self._plain_refusal(counter)
            if reason is not None:
                raise SessionRefused(reason)
        if not window.check(counter):
            if counter >= REJECT_AFTER_MESSAGES:
                raise self._refuse(Refusal.LIMIT)
            raise self._refuse(Refusal.REPLAYED)
        if n > len(out):
            raise self._refuse(Refusal.TOO_LONG)
        view = memoryview(datagram)
        aead = self._open_aead
        if aead is None:
            memoryview(out)[:n] = view[_HEADER_SIZE:]
        else:
            try:
                aead.decrypt_into(
                    _NONCE.pack(counter),
                    view[_HEADER_SIZE:],
                    view[:_HEADER_SIZE],
                    memoryview(out)[:n],
                )
            except InvalidTag:
                raise self._refuse(Refusal.BAD_TAG) from None
        # Authenticated (or a plain link): now, and only now, move the window.
        window.update(counter)
        self.rx_packets += 1
        self.rx_bytes += n
        return n
