"""The lab: everything that builds and drives network namespaces on this machine.

Throwaway topologies with the real kernel (`netns`), ipop-trio nodes and the signalling server
run on them (`overlay`), NAT routers and coturn (`nat`), a lossy, delayed underlay (`impair`,
around the user-space wire process `wire`), iperf3, ping and /proc accounting (`measure`), and
the programs built from them: `ipop-trio demo` (`demo`), `ipop-trio bench` (`bench`,
`natbench`) and the signalling load test (`loadtest`, ``python -m ipop_trio.lab.loadtest``).
The lab tests (tests/lab) and `profiling/` use it too. Callers import the module they need;
this file re-exports nothing.

Nothing in `ipop_trio` imports this package except `cli.py` (inside the command that needs
it): a node, the signalling server and the libraries under them must never depend on the lab,
which needs root and namespaces. The lab may import anything in `ipop_trio` below it, never
`cli.py` and never `profiling/`; its own modules import each other without a cycle.
"""
