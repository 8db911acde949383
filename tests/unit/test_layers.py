"""The package's layers (docs/architecture.md, "Layers"), checked on every import statement.

    errors, stats  <-  proto  <-  config, pki  <-  net  <-  datapath  <-  control | signalling
                   <-  node, status  <-  cli          (lab: on top, imported only by the cli)

A module may import from its own folder and from any layer below its own, never above; the
two control-plane folders (control/, signalling/) do not import each other; `lab` is for the
CLI only; nothing in the package imports `profiling` (the CLI finds `profile` through an
entry point). Every import counts, also those inside functions or under TYPE_CHECKING: an
arrow drawn lazily is still an arrow. And no import circle, at module granularity.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "ipop_trio"

RANK = {
    "": 0,  # ipop_trio/__init__.py: the version
    "errors": 0,
    "stats": 0,
    "logs": 0,
    "_native": 1,  # the optional Rust extension: pure per-batch work
    "proto": 1,
    "config": 2,
    "pki": 2,
    "net": 3,
    "datapath": 4,
    "control": 5,
    "signalling": 5,
    "metrics": 5,  # status snapshots -> Prometheus families; imports none of ours
    "node": 6,
    "status": 6,
    "netcheck": 6,
    "cli": 7,
    "__main__": 8,
    "lab": 8,
}
APART = {frozenset({"control", "signalling"})}


def _module(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Modules (or packages) of the project that `path` imports, fully qualified."""
    me = _module(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            # `from . import pki` names a module; `from .x import name` names x.
            for alias in node.names:
                out.add(f"{target}.{alias.name}")
            out.add(target)
    return {m for m in out if m.split(".")[0] in ("ipop_trio", "profiling")}


MODULES = {_module(p): p for p in PKG.rglob("*.py")}


def _resolve(name: str) -> str | None:
    """The project module `name` refers to (a name imported from a module: that module)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for module, path in MODULES.items():
        targets = {_resolve(n) for n in _imports(path)}
        graph[module] = {t for t in targets if t is not None and t != module}
    return graph


def test_every_folder_and_module_has_a_layer() -> None:
    assert {_layer(m) for m in MODULES} <= set(RANK)


def test_no_arrow_runs_up() -> None:
    wrong = []
    for module, targets in _graph().items():
        src = _layer(module)
        for target in targets:
            dst = _layer(target)
            if dst == src:
                continue
            if frozenset({src, dst}) in APART:
                wrong.append(f"{module} -> {target} (control and signalling stay apart)")
            elif dst == "lab" and src != "cli":
                wrong.append(f"{module} -> {target} (only the CLI uses the lab)")
            elif RANK[dst] >= RANK[src] and not (src == "cli" and dst == "lab"):
                wrong.append(f"{module} -> {target} ({src} may not import {dst})")
    assert wrong == []


def test_nothing_imports_profiling() -> None:
    users = [m for m, p in MODULES.items() if any(n.startswith("profiling") for n in _imports(p))]
    assert users == []


def test_no_import_circle() -> None:
    graph = _graph()
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        stack.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                cycles.append([*stack[stack.index(target) :], target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)
    assert cycles == []
