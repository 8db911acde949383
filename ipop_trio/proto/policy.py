"""Selective security: is a link to this peer encrypted (secure) or plain?

From the study behind the project (IPOP's 550 vs 260 Mbit/s): encryption is needed only
between some peers. Each node has a policy:

    always   every link is secure (the default)
    groups   a link is secure when the two nodes' group sets intersect, plain otherwise

Group sets are the *certified* ones (OU attributes of the node certificates, signed by the
overlay CA). A node may narrow its own set in its configuration, never widen it: what a peer
claims (in signalling or in the handshake) counts only where its certificate agrees.
Both ends decide independently from data neither can forge, and a link is plain only if
*both* decisions say plain; any disagreement, missing or malformed field makes it secure
(fail closed). The decision is symmetric, so both ends reach the same mode.

A plain link still has an authenticated handshake (the peer is who its certificate says)
but no per-packet protection: it is for networks the operator trusts.

Pure: no I/O, no clock. The handshake carries {"policy": ..., "groups": [...]} in its
authenticated extension fields; `decide` turns both sides' facts into a `Decision`.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any


class SecurityPolicy(enum.Enum):
    ALWAYS = "always"
    GROUPS = "groups"


POLICY_KEY = "policy"
GROUPS_KEY = "groups"
MAX_CLAIMED_GROUPS = 64


@dataclass(frozen=True, slots=True)
class Decision:
    secure: bool
    reason: str  # for `ipop-trio status`: why this mode
    matched: frozenset[str]  # the groups both ends share (empty when none)


def effective_groups(certified: Iterable[str], narrowed: Iterable[str] | None) -> frozenset[str]:
    """Our own group set: the certified one, narrowed by configuration (never widened)."""
    cert = frozenset(certified)
    return cert if narrowed is None else cert & frozenset(narrowed)


def advertise(policy: SecurityPolicy, groups: frozenset[str]) -> dict[str, Any]:
    """The extension fields a node puts in its handshake messages (and signalling)."""
    return {POLICY_KEY: policy.value, GROUPS_KEY: sorted(groups)}


def peer_claims(ext: Mapping[str, Any]) -> tuple[SecurityPolicy, frozenset[str] | None]:
    """The peer's stated policy and (narrowed) groups. Anything missing or malformed reads as
    policy `always` / no narrowing: the safe side. Never raises."""
    raw_policy = ext.get(POLICY_KEY)
    try:
        policy = SecurityPolicy(raw_policy)
    except ValueError:
        policy = SecurityPolicy.ALWAYS
    raw_groups = ext.get(GROUPS_KEY)
    if (
        isinstance(raw_groups, list)
        and len(raw_groups) <= MAX_CLAIMED_GROUPS
        and all(isinstance(g, str) for g in raw_groups)
    ):
        return policy, frozenset(raw_groups)
    return policy, None


def decide(
    local_policy: SecurityPolicy,
    local_groups: frozenset[str],
    peer_ext: Mapping[str, Any],
    peer_certified: frozenset[str],
) -> Decision:
    """The link's mode, from our policy and groups, the peer's authenticated claims, and the
    peer's certified groups. Symmetric: the peer, deciding with the roles swapped, gets the
    same answer (the intersection is symmetric and a link is plain only if both say so)."""
    peer_policy, claimed = peer_claims(peer_ext)
    peer_groups = peer_certified if claimed is None else peer_certified & claimed
    matched = local_groups & peer_groups
    if local_policy is SecurityPolicy.ALWAYS:
        return Decision(True, "policy always (this node)", matched)
    if peer_policy is SecurityPolicy.ALWAYS:
        return Decision(True, "policy always (peer)", matched)
    if matched:
        return Decision(True, "groups match: " + ", ".join(sorted(matched)), matched)
    return Decision(False, "no common group", matched)
