"""The selective-security decision table (policies × intersect / disjoint / missing ×
disagreement), and claims the certificate does not back."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ipop_trio.proto.policy import (
    SecurityPolicy,
    advertise,
    decide,
    effective_groups,
    peer_claims,
)

ALWAYS, GROUPS = SecurityPolicy.ALWAYS, SecurityPolicy.GROUPS
WEB, DB, BATCH = "web", "db", "batch"


def mode(local_policy, local_groups, peer_policy, peer_groups, peer_cert=None):
    ext = advertise(peer_policy, frozenset(peer_groups))
    cert = frozenset(peer_groups if peer_cert is None else peer_cert)
    return decide(local_policy, frozenset(local_groups), ext, cert)


@pytest.mark.parametrize(
    ("local_policy", "peer_policy", "local", "peer", "secure"),
    [
        (ALWAYS, ALWAYS, {WEB}, {WEB}, True),
        (ALWAYS, ALWAYS, {WEB}, {BATCH}, True),
        (ALWAYS, GROUPS, {WEB}, {BATCH}, True),  # disagreement: fail closed
        (GROUPS, ALWAYS, {WEB}, {BATCH}, True),  # disagreement: fail closed
        (GROUPS, GROUPS, {WEB}, {WEB, DB}, True),  # intersect
        (GROUPS, GROUPS, {WEB}, {BATCH}, False),  # disjoint
        (GROUPS, GROUPS, set(), {BATCH}, False),  # missing groups on one side
        (GROUPS, GROUPS, set(), set(), False),  # missing on both
        (ALWAYS, GROUPS, set(), set(), True),
    ],
)
def test_decision_table(local_policy, peer_policy, local, peer, secure) -> None:
    ours = mode(local_policy, local, peer_policy, peer)
    theirs = mode(peer_policy, peer, local_policy, local)
    assert ours.secure is secure and theirs.secure is secure  # both ends agree
    assert ours.reason and (ours.matched == frozenset(local) & frozenset(peer))


def test_claimed_groups_the_certificate_does_not_hold_change_nothing() -> None:
    # The peer is certified {batch} but claims {web}: still no common group with {web}.
    assert not mode(GROUPS, {WEB}, GROUPS, {WEB}, peer_cert={BATCH}).secure
    # A claim can only narrow: certified {web, db}, claims {db}: no match with {web}.
    assert not mode(GROUPS, {WEB}, GROUPS, {DB}, peer_cert={WEB, DB}).secure


def test_missing_or_malformed_claims_read_as_always() -> None:
    for ext in ({}, {"policy": "sometimes"}, {"policy": 3}, {"policy": None}):
        assert decide(GROUPS, frozenset({WEB}), ext, frozenset({BATCH})).secure
    # malformed groups claim: no narrowing, certified groups count
    d = decide(GROUPS, frozenset({WEB}), {"policy": "groups", "groups": "web"}, frozenset({WEB}))
    assert d.secure and d.matched == {WEB}


def test_configuration_narrows_never_widens() -> None:
    assert effective_groups({WEB, DB}, None) == {WEB, DB}
    assert effective_groups({WEB, DB}, [DB]) == {DB}
    assert effective_groups({WEB}, [WEB, "admin"]) == {WEB}


@given(
    st.dictionaries(
        st.text(max_size=8),
        st.none()
        | st.integers()
        | st.text()
        | st.lists(st.text(max_size=5) | st.integers(), max_size=70),
    )
)
def test_peer_claims_never_raise_and_fail_closed(ext) -> None:
    policy, _groups = peer_claims(ext)
    assert policy in (ALWAYS, GROUPS)
    d = decide(GROUPS, frozenset({WEB}), ext, frozenset({BATCH}))
    assert d.secure == (policy is ALWAYS)


def test_every_combination_is_symmetric() -> None:
    sets = [set(), {WEB}, {DB}, {WEB, DB}]
    for lp, pp, lg, pg in itertools.product((ALWAYS, GROUPS), (ALWAYS, GROUPS), sets, sets):
        assert mode(lp, lg, pp, pg).secure == mode(pp, pg, lp, lg).secure
