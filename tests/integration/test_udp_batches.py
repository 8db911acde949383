"""The UDP driver over loopback: GSO sends of scatter-gather lists arrive intact via GRO."""

from __future__ import annotations

import os

import trio

from ipop_trio.net.udp import UdpSocket


async def test_gso_runs_arrive_as_the_same_datagrams() -> None:
    rx = UdpSocket("127.0.0.1", 0)
    tx = UdpSocket("127.0.0.1", 0)
    try:
        sizes = [1400] * 50 + [90] + [1400] * 3 + [700, 64]
        datagrams = [os.urandom(n) for n in sizes]
        iov: list[bytes] = []
        for d in datagrams:
            iov += [d[:16], d[16:]]
        assert tx.send_iov(iov, sizes, rx.local) == 0
        got: list[bytes] = []
        with trio.fail_after(5):
            while len(got) < len(datagrams):
                await rx.wait_readable()
                while (r := rx.recv_once()) is not None:
                    views, addr = r
                    assert addr == tx.local
                    got += [bytes(v) for v in views]
        assert got == datagrams
    finally:
        rx.close()
        tx.close()
