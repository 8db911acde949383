"""The protocol cores stay sans-IO, and dependencies stay behind their one module."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "ipop_trio"
FORBIDDEN_IN_PROTO = {"os", "time", "socket", "trio", "select", "asyncio", "threading"}


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("path", sorted((PKG / "proto").glob("*.py")), ids=lambda p: p.name)
def test_proto_is_sans_io(path: Path) -> None:
    assert not (_imports(path) & FORBIDDEN_IN_PROTO)


def test_pyroute2_only_in_netlink_and_lab() -> None:
    users = {p.relative_to(PKG).as_posix() for p in PKG.rglob("*.py") if "pyroute2" in _imports(p)}
    assert users <= {"net/netlink.py", "lab/netns.py"}


def test_dev_net_tun_only_in_tap() -> None:
    users = {
        p.relative_to(PKG).as_posix() for p in PKG.rglob("*.py") if "/dev/net/tun" in p.read_text()
    }
    assert users == {"net/tap.py"}


def test_profiling_is_not_imported_by_the_package() -> None:
    assert not any("profiling" in _imports(p) for p in PKG.rglob("*.py"))
