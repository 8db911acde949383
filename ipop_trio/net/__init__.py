"""Drivers: the only code that owns sockets and file descriptors (the TAP, the node's UDP
socket, netlink, the control socket, the metrics HTTP server).

They wrap the kernel and nothing more: no protocol decisions. Imports only proto/, errors,
stats and config-free values (a host and a port, not config objects); never datapath/,
control/, signalling/ or node.
"""
