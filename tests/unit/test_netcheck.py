"""netcheck.Report.nat: what the STUN answers say about the NAT."""

from __future__ import annotations

from ipop_trio.netcheck import Check, Report

LOCAL = ("192.168.1.2", 5000)


def report(*mapped: tuple[str, int] | None) -> Report:
    return Report(
        LOCAL,
        [Check("stun", f"s{i}", m is not None, mapped=m) for i, m in enumerate(mapped)],
    )


def test_nat_behaviours() -> None:
    assert report().nat.startswith("unknown")
    assert report(None, None).nat.startswith("unknown")
    assert report(LOCAL, LOCAL).nat.startswith("no NAT")
    eim = report(("198.51.100.7", 5000), ("198.51.100.7", 5000)).nat
    assert eim.startswith("endpoint-independent") and "port preserved" in eim
    assert "port preserved" not in report(("198.51.100.7", 6000), ("198.51.100.7", 6000)).nat
    assert report(("198.51.100.7", 6000), ("198.51.100.7", 6001)).nat.startswith("symmetric")
    assert "cannot tell" in report(("198.51.100.7", 6000), None).nat


def test_ok_only_when_every_server_answered() -> None:
    assert report(("198.51.100.7", 5000)).ok
    assert not report(("198.51.100.7", 5000), None).ok
