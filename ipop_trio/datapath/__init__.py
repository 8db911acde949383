"""The data path: TAP frames to sealed UDP datagrams (outbound) and back (inbound), the
overlay switch, the session table, and the Trio tasks and channels between the stages.

Per batch, never per packet, with bounded channels that drop and count when full. Imports
proto/, net/ and stats; never control/, signalling/ or node: the control plane writes the
session table and the peers' ports, the data path hands it handshakes and STUN through the
callables it is built with.
"""
