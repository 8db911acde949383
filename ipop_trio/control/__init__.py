"""The control plane of one node: the controller (membership to desired links), the link
manager (one task per peer: handshakes, sessions, ICE paths) and the ICE service
(candidates, STUN and TURN servers, routing of STUN datagrams).

Decisions are synchronous methods fed `now`, driven by small Trio tasks. Imports proto/,
net/, datapath/, config and stats; never signalling/ (the signalling client's events are
defined in proto/signalling.py), node or cli.
"""
