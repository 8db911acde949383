"""A node without [dns] or [metrics] does not carry their libraries: dnspython and
prometheus_client (together ~5 MB of a node's RSS, which the bench holds to 80 MB) are
imported only where those sections are used."""

from __future__ import annotations

import subprocess
import sys


def test_a_node_imports_neither_dns_nor_prometheus() -> None:
    probe = (
        "import sys, ipop_trio.cli, ipop_trio.config, ipop_trio.node, ipop_trio.status\n"
        "print(sorted(m for m in ('dns', 'prometheus_client') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout
