"""proto/probe.py and the prober: a ping is answered with a pong to the same port, and a pong
counts only for the port and id it answers."""

from __future__ import annotations

import pytest

from ipop_trio.errors import BadPacket
from ipop_trio.proto import probe

A, B = bytes.fromhex("020000000001"), bytes.fromhex("020000000002")


def test_build_and_parse() -> None:
    frame = probe.build(B, A, probe.ProbeKind.PING, 2**64 - 1)
    assert len(frame) == probe.SIZE and frame[:12] == B + A and frame[12:14] == probe.ETH_P_PROBE
    assert probe.parse_untrusted(frame[14:]) == (probe.ProbeKind.PING, 2**64 - 1)


@pytest.mark.parametrize(
    "body",
    [b"", b"IPOP", b"IPOQ\x01\x00\x00\x00" + bytes(8), b"IPOP\x03\x00\x00\x00" + bytes(8)],
)
def test_bad_probes_are_refused(body: bytes) -> None:
    with pytest.raises(BadPacket):
        probe.parse_untrusted(body)
