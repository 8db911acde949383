"""Fixtures for the lab tier: real namespaces, veths, TAP devices and node processes.

Every test here is marked `lab` and skipped (with the reason) only when not run as root.
Fixtures tear down in `finally`, so a failing test leaves no namespace, veth or process.
"""

from __future__ import annotations

import os
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ipop_trio.lab.netns import Host, Lab, Link, cleanup_stale
from ipop_trio.lab.overlay import Overlay, OverlayNode

LAB_DIR = Path(__file__).parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    root = os.geteuid() == 0
    skip = pytest.mark.skip(reason="lab tests need root (network namespaces, veth, TAP)")
    for item in items:
        if LAB_DIR in item.path.parents:
            item.add_marker(pytest.mark.lab)
            if not root:
                item.add_marker(skip)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    # Lets fixtures see whether the test failed (to print node logs on failure).
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


@pytest.fixture(scope="session", autouse=True)
def _no_stale_labs() -> None:
    """Remove what earlier, killed runs left (labs whose owner process is dead)."""
    if os.geteuid() == 0:
        cleanup_stale()


def failed(request: pytest.FixtureRequest) -> bool:
    report = getattr(request.node, "rep_call", None)
    return report is None or report.failed


@dataclass(frozen=True)
class TwoHosts:
    lab: Lab
    a: Host
    b: Host
    link: Link


@dataclass(frozen=True)
class Pair:
    """Two started nodes, alpha on host a and beta on host b, with their link established."""

    hosts: TwoHosts
    overlay: Overlay
    alpha: OverlayNode
    beta: OverlayNode


@pytest.fixture
def lab() -> Iterator[Lab]:
    with Lab() as built:
        yield built


@pytest.fixture
def two_hosts(lab: Lab) -> TwoHosts:
    a, b = lab.add_host("a"), lab.add_host("b")
    return TwoHosts(lab, a, b, lab.connect(a, b))


def print_logs(overlay: Overlay) -> None:
    for node in overlay.nodes.values():
        print(f"--- {node.name} ({node.host.ns}) log ---\n{overlay.log_tail(node, 200)}")


@pytest.fixture
def overlay(request: pytest.FixtureRequest, two_hosts: TwoHosts) -> Iterator[Overlay]:
    """An overlay on the two hosts, no nodes yet; node logs are printed when the test fails."""
    built = Overlay(two_hosts.lab)
    try:
        yield built
    finally:
        if failed(request):
            print_logs(built)


@pytest.fixture
def pair(two_hosts: TwoHosts, overlay: Overlay) -> Pair:
    alpha = overlay.add_node("alpha", two_hosts.a)
    beta = overlay.add_node("beta", two_hosts.b)
    overlay.start()
    overlay.wait_established(alpha, beta)
    return Pair(two_hosts, overlay, alpha, beta)


def processes_mentioning(needle: str) -> list[tuple[int, str]]:
    """(pid, command line) of live processes whose command line contains `needle` (a lab's
    workdir holds every node's and coturn's config, so their command lines carry it)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if needle.encode() in cmdline:
                found.append((int(entry), cmdline.replace(b"\0", b" ").decode(errors="replace")))
    return found
