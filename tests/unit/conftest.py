"""Shared unit-test fixtures: overlay CAs and node certificates built in memory.

    def test_x(make_ca, make_node, pki_now):
        ca = make_ca()                                   # "lab", 10.77.0.0/24
        alice = make_node(ca, "alice", "10.77.0.2", groups=("eng",))
        identity = ca.anchor.verify_untrusted(alice.cert_der, pki_now)

`make_ca` returns a `pki.CaBundle` (key_pem, cert_pem, cert_der, anchor, ...), `make_node` a
`pki.NodeBundle` (private_key raw 32 bytes, public_key, cert_der, identity, mac, ...). Both
issue at `PKI_NOW` unless given `now=`; certificates start `pki.CLOCK_SKEW` seconds earlier.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import pytest

from ipop_trio import pki

PKI_NOW = 1_767_225_600.0  # 2026-01-01T00:00:00Z: fixed, so tests never depend on the clock

MakeCa = Callable[..., pki.CaBundle]
MakeNode = Callable[..., pki.NodeBundle]


@pytest.fixture
def pki_now() -> float:
    """The moment `make_ca` / `make_node` issue at by default (Unix seconds)."""
    return PKI_NOW


@pytest.fixture
def make_ca() -> MakeCa:
    """Factory: `make_ca(name="lab", network="10.77.0.0/24", *, now=PKI_NOW, days=3650)`."""

    def _make_ca(
        name: str = "lab",
        network: str = "10.77.0.0/24",
        *,
        now: float = PKI_NOW,
        days: int = pki.DEFAULT_CA_DAYS,
    ) -> pki.CaBundle:
        return pki.new_ca_bundle(name, network, now=now, days=days)

    return _make_ca


@pytest.fixture
def make_node() -> MakeNode:
    """Factory: `make_node(ca, name, address, groups=(), *, now=PKI_NOW, days=365,
    public_key=None)`."""

    def _make_node(
        ca: pki.CaBundle,
        name: str,
        address: str,
        groups: Iterable[str] = (),
        *,
        now: float = PKI_NOW,
        days: int = pki.DEFAULT_NODE_DAYS,
        public_key: bytes | None = None,
    ) -> pki.NodeBundle:
        return pki.issue_node_bundle(
            ca, name, address, groups, now=now, days=days, public_key=public_key
        )

    return _make_node


@pytest.fixture
def lab_ca(make_ca: MakeCa) -> pki.CaBundle:
    """The default overlay CA: "lab", 10.77.0.0/24."""
    return make_ca()
