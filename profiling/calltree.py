"""py-spy samples as a top-down call tree (Zoom's view), hot-function tables and speedscope.

Input is py-spy's ``--format raw`` output: one line per distinct stack, root first, frames
joined by ``;``, then a space and the number of samples::

    thread (18814): MainThread;<module> (ipop_trio/__main__.py:5);...;Outbound.send
    (ipop_trio/datapath/outbound.py:41) 12

(one line in the file)

With ``--threads`` the first frame names the thread (native id and Python name). Every
sample is one moment a thread was busy (idle frames are left out when recording), so a node's
*inclusive* share is the fraction of busy samples with it on the stack, and samples / rate
approximates busy seconds. Pure: text in, plain data out.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

Stack = tuple[str, ...]

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")
_THREAD = re.compile(r"^thread \((?P<tid>\w+)\)(?::\s*(?P<name>.*))?$")

# Frames of the data path, for "is the hot path in the profile?" checks and highlighting.
DATAPATH_FILES = (
    "ipop_trio/datapath/",
    "ipop_trio/net/",
    "ipop_trio/proto/session.py",
    "ipop_trio/proto/offload.py",
)


# Characters XML 1.0 forbids (C0 controls but tab/newline/CR, lone surrogates, U+FFFE/F).
# py-spy reads names out of a running process's memory, so a sample taken while a string
# was being written can carry any byte; such a character is replaced, never passed to SVG.
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def xml_safe(text: str) -> str:
    """`text` with every character XML cannot carry replaced by U+FFFD."""
    return _NOT_XML.sub("\ufffd", text)


class ParseError(ValueError):
    """A line of py-spy raw output is not ``stack count``."""


def parse_collapsed(text: str) -> list[tuple[Stack, int]]:
    """Parse collapsed stacks (``a;b;c N`` per line); blank lines are skipped. Lines end at
    newline only (not at the other separators `str.splitlines` knows), and characters that
    XML cannot carry become U+FFFD."""
    out: list[tuple[Stack, int]] = []
    for n, line in enumerate(xml_safe(text).split("\n"), 1):
        line = line.rstrip()
        if not line:
            continue
        stack, sep, count = line.rpartition(" ")
        if not sep or not count.isdigit() or not stack:
            raise ParseError(f"line {n}: expected 'frame;frame;... COUNT', got {line[:120]!r}")
        out.append((tuple(stack.split(";")), int(count)))
    return out


def write_collapsed(stacks: Iterable[tuple[Stack, int]]) -> str:
    return "".join(f"{';'.join(s)} {c}\n" for s, c in stacks)


@dataclass(frozen=True, slots=True)
class Frame:
    """A frame's parts: function, file (as py-spy shortens it), line (may be None)."""

    name: str
    file: str
    line: int | None
    thread: bool = False


def parse_frame(frame: str) -> Frame:
    """Split ``func (file:line)``; thread roots and unparsable frames keep the whole text."""
    if m := _THREAD.match(frame):
        return Frame(frame, "", None, thread=True)
    if m := _FRAME.match(frame):
        line = m.group("line")
        return Frame(m.group("func"), m.group("file"), int(line) if line else None)
    return Frame(frame, "", None)


def short_name(frame: str) -> str:
    """``func (file)`` without the line: what the tree and the tables show."""
    f = parse_frame(frame)
    if f.thread or not f.file:
        return f.name
    return f"{f.name} ({f.file})"


def thread_label(frame: str) -> str:
    """``MainThread (tid 18814)`` for a thread root frame; other text as it is."""
    m = _THREAD.match(frame)
    if not m:
        return frame
    return f"{m.group('name') or 'thread'} (tid {m.group('tid')})"


def is_datapath(frame: str) -> bool:
    f = parse_frame(frame)
    return any(part in f.file for part in DATAPATH_FILES)


@dataclass(slots=True)
class Node:
    """One node of the top-down tree: `total` samples with this path on the stack, `self`
    samples where it was the leaf."""

    name: str
    total: int = 0
    self: int = 0
    children: dict[str, Node] = field(default_factory=dict)

    def child(self, name: str) -> Node:
        node = self.children.get(name)
        if node is None:
            node = self.children[name] = Node(name)
        return node

    def sorted_children(self) -> list[Node]:
        return sorted(self.children.values(), key=lambda n: (-n.total, n.name))


def build_tree(stacks: Iterable[tuple[Stack, int]], *, by_function: bool = True) -> Node:
    """Merge stacks into a top-down tree. With `by_function`, frames that differ only in
    their line number are one node (Zoom's and oprofile's per-function view)."""
    root = Node("all")
    for stack, count in stacks:
        root.total += count
        node = root
        for frame in stack:
            node = node.child(short_name(frame) if by_function else frame)
            node.total += count
        node.self += count
    return root


@dataclass(frozen=True, slots=True)
class TreeLine:
    """A flattened tree row for text and HTML views."""

    depth: int
    name: str
    total: int
    self: int
    inclusive: float  # share of all samples, 0..1
    has_children: bool


def flatten(
    root: Node, *, min_share: float = 0.005, max_depth: int = 60, collapse: bool = True
) -> list[TreeLine]:
    """Depth-first rows of the tree, children by descending samples, dropping nodes under
    `min_share` of all samples. With `collapse`, a chain of nodes that each pass all their
    samples to their one child (the runpy / cli / trio.run prefix) is one row, its names
    joined by " → " (as in report.html)."""
    total = root.total or 1
    lines: list[TreeLine] = []

    def visit(node: Node, depth: int) -> None:
        for child in node.sorted_children():
            if child.total / total < min_share or depth > max_depth:
                continue
            chain = [child]
            while collapse and len(chain[-1].children) == 1 and chain[-1].self == 0:
                chain.append(next(iter(chain[-1].children.values())))
            last = chain[-1]
            kids = [c for c in last.children.values() if c.total / total >= min_share]
            name = " → ".join(n.name for n in chain)
            lines.append(
                TreeLine(depth, name, child.total, last.self, child.total / total, bool(kids))
            )
            visit(last, depth + 1)

    visit(root, 0)
    return lines


@dataclass(slots=True)
class ThreadView:
    """One thread's samples from the data path down: `root.children` are the first data-path
    frame of each of its stacks (merged by function), `root.total` is all the thread's samples,
    so shares of `root.total` are shares of the thread. `above[name]` counts the chains of
    frames above that data-path frame (thread start, runpy, the CLI, Trio's run loop), which the
    view leaves out; `outside` is the samples with no data-path frame at all, and
    `outside_leaves` their innermost functions (Trio's epoll wait, the control socket...)."""

    thread: str
    root: Node
    above: dict[str, dict[Stack, int]] = field(default_factory=dict)
    outside: int = 0
    outside_leaves: dict[str, int] = field(default_factory=dict)

    @property
    def samples(self) -> int:
        return self.root.total


def datapath_view(stacks: Iterable[tuple[Stack, int]]) -> list[ThreadView]:
    """Per thread (by descending samples), the subtrees rooted at the first data-path frame
    of each stack, names as `short_name` gives them."""
    views: dict[str, ThreadView] = {}
    for stack, count in stacks:
        thread, body = "all", stack
        if stack and parse_frame(stack[0]).thread:
            thread, body = stack[0], stack[1:]
        view = views.get(thread)
        if view is None:
            view = views[thread] = ThreadView(thread, Node(thread))
        view.root.total += count
        first = next((i for i, f in enumerate(body) if is_datapath(f)), None)
        names = [short_name(f) for f in body]
        if first is None:
            view.outside += count
            leaf = names[-1] if names else thread
            view.outside_leaves[leaf] = view.outside_leaves.get(leaf, 0) + count
            continue
        above = view.above.setdefault(names[first], {})
        prefix = tuple(names[:first])
        above[prefix] = above.get(prefix, 0) + count
        node = view.root
        for name in names[first:]:
            node = node.child(name)
            node.total += count
        node.self += count
    return sorted(views.values(), key=lambda v: (-v.samples, v.thread))


# Where the frames above the data path come from, by file, for saying what a view left out.
BOILERPLATE = (
    ("<frozen runpy>", "runpy"),
    ("runpy.py", "runpy"),
    ("ipop_trio/__main__.py", "ipop-trio CLI"),
    ("ipop_trio/cli.py", "ipop-trio CLI"),
    ("trio/_core/_run.py", "trio run loop"),
    ("threading.py", "thread start"),
)


def frame_origin(frame: str) -> str:
    """What a frame is part of (`BOILERPLATE`: "trio run loop", ...), else its function."""
    f = parse_frame(frame)
    for file, label in BOILERPLATE:
        if f.file == file or f.file.endswith("/" + file):
            return label
    return f.name


def describe_chain(chain: Sequence[str]) -> str:
    """A chain of frames in a few words: consecutive frames of one origin are one step,
    ``runpy → ipop-trio CLI → trio run loop``."""
    steps: list[str] = []
    for frame in chain:
        origin = frame_origin(frame)
        if not steps or steps[-1] != origin:
            steps.append(origin)
    return " → ".join(steps)


def function_table(stacks: Sequence[tuple[Stack, int]], *, limit: int = 25) -> list[dict[str, Any]]:
    """Hot functions: inclusive samples (a function counted once per stack, however deep its
    recursion) and self samples, by descending inclusive."""
    total = sum(c for _, c in stacks) or 1
    inclusive: dict[str, int] = {}
    self_: dict[str, int] = {}
    for stack, count in stacks:
        names = [short_name(f) for f in stack if not parse_frame(f).thread]
        for name in set(names):
            inclusive[name] = inclusive.get(name, 0) + count
        if names:
            self_[names[-1]] = self_.get(names[-1], 0) + count
    rows: list[dict[str, Any]] = [
        {
            "function": name,
            "inclusive": n,
            "inclusive_share": n / total,
            "self": self_.get(name, 0),
            "self_share": self_.get(name, 0) / total,
        }
        for name, n in inclusive.items()
    ]
    rows.sort(key=lambda r: (-r["inclusive"], -r["self"], r["function"]))
    return rows[:limit]


def thread_samples(stacks: Iterable[tuple[Stack, int]]) -> dict[str, int]:
    """Samples per thread root frame (``thread (tid): name``), or "all" without --threads."""
    out: dict[str, int] = {}
    for stack, count in stacks:
        key = stack[0] if stack and parse_frame(stack[0]).thread else "all"
        out[key] = out.get(key, 0) + count
    return out


def datapath_functions(stacks: Iterable[tuple[Stack, int]]) -> dict[str, int]:
    """Samples per data-path function (a function counted once per stack)."""
    out: dict[str, int] = {}
    for stack, count in stacks:
        for name in {short_name(f) for f in stack if is_datapath(f)}:
            out[name] = out.get(name, 0) + count
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def to_speedscope(stacks: Sequence[tuple[Stack, int]], *, name: str, rate: float) -> dict[str, Any]:
    """A speedscope file (https://www.speedscope.app/file-format-schema.json): one sampled
    profile per thread, each sample weighted 1/rate seconds."""
    frames: list[dict[str, Any]] = []
    index: dict[str, int] = {}
    per_thread: dict[str, tuple[list[list[int]], list[float]]] = {}
    weight = 1.0 / rate if rate > 0 else 1.0
    for stack, count in stacks:
        thread = "all"
        body = stack
        if stack and parse_frame(stack[0]).thread:
            thread, body = stack[0], stack[1:]
        ids = []
        for frame in body:
            i = index.get(frame)
            if i is None:
                f = parse_frame(frame)
                entry: dict[str, Any] = {"name": f.name}
                if f.file:
                    entry["file"] = f.file
                if f.line is not None:
                    entry["line"] = f.line
                i = index[frame] = len(frames)
                frames.append(entry)
            ids.append(i)
        samples, weights = per_thread.setdefault(thread, ([], []))
        samples.append(ids)
        weights.append(count * weight)
    profiles = []
    for thread, (samples, weights) in per_thread.items():
        profiles.append(
            {
                "type": "sampled",
                "name": f"{name} {thread}",
                "unit": "seconds",
                "startValue": 0,
                "endValue": sum(weights),
                "samples": samples,
                "weights": weights,
            }
        )
    return {
        "$schema": "https://www.speedscope.app/file-format-schema.json",
        "name": name,
        "exporter": "ipop-trio profile",
        "activeProfileIndex": 0,
        "shared": {"frames": frames},
        "profiles": profiles,
    }


def format_tree(lines: Sequence[TreeLine], *, width: int = 100) -> str:
    """The tree as indented text: inclusive %, name."""
    out = []
    for ln in lines:
        text = f"{ln.inclusive * 100:6.1f}%  " + "  " * ln.depth + ln.name
        out.append(text[:width])
    return "\n".join(out)


__all__ = [
    "DATAPATH_FILES",
    "Frame",
    "Node",
    "ParseError",
    "ThreadView",
    "TreeLine",
    "build_tree",
    "datapath_functions",
    "datapath_view",
    "describe_chain",
    "flatten",
    "format_tree",
    "frame_origin",
    "function_table",
    "is_datapath",
    "parse_collapsed",
    "parse_frame",
    "short_name",
    "thread_label",
    "thread_samples",
    "to_speedscope",
    "write_collapsed",
    "xml_safe",
]
