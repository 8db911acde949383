"""Overlay CAs, node certificates and `LocalIdentity`s for the handshake and link tests.

Module-level and cached (not fixtures) so hypothesis tests can use them too. Everything is
issued at `NOW`; tests pass `NOW + offset` as the wall clock.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from ipop_trio import pki
from ipop_trio.proto.handshake import LocalIdentity

NOW = 1_767_225_600.0  # 2026-01-01T00:00:00Z, as tests/unit/conftest.py


@functools.cache
def ca(name: str = "lab", network: str = "10.77.0.0/24", *, tag: str = "") -> pki.CaBundle:
    """An overlay CA; a different `tag` gives a different CA with the same name."""
    del tag  # only part of the cache key
    return pki.new_ca_bundle(name, network, now=NOW)


@dataclass(frozen=True, slots=True)
class Node:
    bundle: pki.NodeBundle
    local: LocalIdentity

    @property
    def public_key(self) -> bytes:
        return self.local.public_key


@functools.cache
def node(
    name: str,
    address: str,
    groups: Iterable[str] = (),
    *,
    authority: pki.CaBundle | None = None,
    days: int = pki.DEFAULT_NODE_DAYS,
    private_key: bytes | None = None,
    certify_key: bytes | None = None,
) -> Node:
    """A node of `authority` (default `ca()`). `private_key` (raw) reuses a key;
    `certify_key` issues the certificate for another public key than the node's own."""
    authority = authority or ca()
    if private_key is None:
        private_key = X25519PrivateKey.generate().private_bytes_raw()
    public = certify_key or pki.public_key_of(private_key)
    bundle = pki.issue_node_bundle(
        authority, name, address, tuple(groups), now=NOW, days=days, public_key=public
    )
    local = LocalIdentity(private_key, bundle.cert_der, authority.anchor)
    return Node(bundle, local)


def alice() -> Node:
    return node("alice", "10.77.0.2", ("eng",))


def bob() -> Node:
    return node("bob", "10.77.0.3", ("eng",))


def carol() -> Node:
    return node("carol", "10.77.0.4", ("ops",))
