"""Sans-IO protocol cores: wire formats, handshake, sessions, ICE/STUN/TURN, signalling
messages, certificates, selective-security policy, rate limiting, offload and reassembly.

Each core is fed bytes and `now` and returns events and bytes to send. This folder imports
nothing of the package but `errors` and itself: never trio, socket, os, time, select,
threading or asyncio, and never net/, datapath/, control/, signalling/ (tests/unit/
test_sans_io.py and test_layers.py keep it so).
"""
