"""Signalling over WebSocket: the node's client (stays connected, turns messages into events
for the controller) and the server (`ipop-trio signal`: admission, membership, relay of
con_req/con_resp), a sans-IO core behind a thin trio-websocket driver.

The only folder that imports trio-websocket. Imports proto/ and errors; never control/,
datapath/, net/ or node.
"""
