"""ipop-trio: IP over P2P on Trio.

Every node gets a TAP interface with an overlay address; nodes meet through a signalling
server, find a UDP path with ICE, authenticate each link with a Noise IK handshake and carry
Ethernet frames over it. The layers, bottom up (docs/architecture.md, "Layers"): proto/
(sans-IO cores), net/ (drivers), datapath/, control/ and signalling/, node.py (assembles one
node), cli.py (the only place errors become messages); lab/ on top, for the CLI only.
Nothing in this package imports `profiling` or reaches upward.
"""

__version__ = "0.1.0"
