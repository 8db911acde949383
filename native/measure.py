"""Micro-measure of the native core against the pure-Python data path, per batch.

Not a test: it prints what the native core buys for 64 KiB TSO super-frames and for
1400-byte frames, outbound (encode + seal + GSO runs) and inbound (open + reassemble), as
`Outbound.send` and `Inbound.process` do them, minus sockets and the switch.

    .venv/bin/python native/measure.py [--seconds 1.0] [--cipher aes-256-gcm]
"""

from __future__ import annotations

import argparse
import time

from ipop_trio.datapath import native
from ipop_trio.net.udp import _runs
from ipop_trio.proto import offload
from ipop_trio.proto.session import Cipher, Session

K1, K2 = bytes(range(32)), bytes(range(1, 33))


def sessions(cls: type, cipher: Cipher) -> tuple:
    common = {"cipher": cipher, "secure": True, "created": 0.0}
    tx = cls(send_key=K1, recv_key=K2, local_index=2, remote_index=1, **common)
    rx = cls(send_key=K2, recv_key=K1, local_index=1, remote_index=2, **common)
    return tx, rx


def tso_read(data_len: int) -> bytes:
    # The shape of tests/unit/test_offload.py's build_read (IPv4, TCP timestamps, MSS 1348).
    import struct

    tcp = struct.pack("!HHIIBBHHH", 40000, 5201, 1, 1, 8 << 4, 0x18, 512, 0, 0) + bytes(12)
    ip = struct.pack("!BBHHHBBH", 0x45, 0, (20 + 32 + data_len) & 0xFFFF, 1, 0x4000, 64, 6, 0)
    ip += bytes((10, 77, 0, 2, 10, 77, 0, 3))
    frame = bytes.fromhex("02aabbccdd0202aabbccdd010800") + ip + tcp + bytes(data_len)
    return offload.VNET_HDR.pack(1, offload.GSO_TCPV4, 66, 1348, 34, 16) + frame


def small_read(size: int) -> bytes:
    return bytes(10) + bytes.fromhex("02aabbccdd0202aabbccdd010800") + bytes(size - 14)


def python_out(tx: Session, reads: list[bytes], fid: int) -> tuple[list[bytes], list]:
    payloads: list[bytes] = []
    for r in reads:
        payloads.extend(offload.encode_outbound(r, fid))
        fid += 1
    iov: list[bytes] = []
    sizes: list[int] = []
    tx.seal_iov(payloads, iov, sizes)
    return iov, list(_runs(sizes))


def calls_of(iov: list[bytes], runs: list) -> list[bytes]:
    """The receive calls GRO would make of these sends: one buffer per GSO run."""
    return [b"".join(iov[2 * s : 2 * (s + n)]) for s, n, _seg, _total in runs]


def python_in(rx: Session, r: offload.Reassembler, calls: list, segs: list) -> int:
    n = 0
    for buf, seg in zip(calls, segs, strict=True):
        view = memoryview(buf)
        datagrams = [view[i : i + seg] for i in range(0, len(buf), seg)]
        payloads: list[bytes] = []
        rx.open_batch(datagrams, 0, payloads)
        writes: list[bytes] = []
        for p in payloads:
            r.push_untrusted(p, writes)
        n += len(writes)
    return n


def rate(fn: object, seconds: float) -> float:
    """Calls per second of fn()."""
    count, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        fn()  # type: ignore[operator]
        count += 1
    return count / elapsed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=1.0)
    ap.add_argument("--cipher", default="aes-256-gcm")
    a = ap.parse_args()
    cipher = Cipher(a.cipher)
    assert native.AVAILABLE, native.WHY
    cases = {
        "64 KiB TSO super-frames (8 x 63000 B)": [tso_read(63_000)] * 8,
        "1400-byte frames (64 x 1400 B)": [small_read(1400)] * 64,
    }
    print(f"cipher {cipher.value}; Gbit/s of TAP frame bytes, single thread, per-batch calls")
    print(f"{'case':40} {'stage':9} {'python':>8} {'native':>8} {'speedup':>8}")
    for name, reads in cases.items():
        measure(name, reads, cipher, a.seconds)


def measure(name: str, reads: list[bytes], cipher: Cipher, seconds: float) -> None:
    frame_bits = 8 * (sum(map(len, reads)) - 10 * len(reads))
    py_tx, _ = sessions(Session, cipher)
    nt_tx, _ = sessions(native.Session, cipher)
    out = bytearray()
    py_rate = rate(lambda: python_out(py_tx, reads, 0), seconds)
    nt_rate = rate(lambda: nt_tx.seal_tap_batch(reads, 0, out), seconds)
    show(name, "outbound", py_rate * frame_bits, nt_rate * frame_bits)
    # Inbound: one batch's receive calls, replayed against fresh receivers each time.
    fresh_tx, _ = sessions(Session, cipher)
    iov, runs = python_out(fresh_tx, reads, 0)
    calls = calls_of(iov, runs)
    segs = [seg for _s, _n, seg, _t in runs]

    def py_in() -> None:
        _, rx = sessions(Session, cipher)
        python_in(rx, offload.Reassembler(), calls, segs)

    def nt_in() -> None:
        _, rx = sessions(native.Session, cipher)
        table = native.SessionTable()
        table.insert(rx, 0)
        for buf, seg in zip(calls, segs, strict=True):
            table.open_batch(buf, seg, 0)

    py_rate, nt_rate = rate(py_in, seconds), rate(nt_in, seconds)
    show(name, "inbound", py_rate * frame_bits, nt_rate * frame_bits)


def show(name: str, stage: str, py_bits: float, nt_bits: float) -> None:
    speedup = nt_bits / py_bits
    print(f"{name:40} {stage:9} {py_bits / 1e9:8.2f} {nt_bits / 1e9:8.2f} {speedup:7.1f}x")


if __name__ == "__main__":
    main()
