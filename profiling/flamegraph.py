"""A flame graph (SVG) of py-spy samples, rendered from the same samples as the call tree.

py-spy writes one output format per recording; recording three times (raw, speedscope, SVG)
would triple the sampling cost and give three different sample sets. So we record `raw` once
and draw the graph here: Brendan Gregg's layout (root at the bottom, width = samples, children
sorted by name so the same code lands in the same place run after run), a tooltip per frame,
and colours by where the code lives, so the data path stands out. Self-contained: no script,
no external font, safe to inline in report.html. Pure: samples in, SVG text out.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from html import escape as _html_escape

from .calltree import Node, Stack, build_tree, is_datapath, parse_frame, xml_safe

WIDTH = 1200
FRAME_HEIGHT = 17
PAD_TOP = 46
PAD_BOTTOM = 8
PAD_X = 10
MIN_WIDTH_PX = 0.25  # narrower frames are not drawn (they cannot be seen or hovered)
CHAR_PX = 6.6  # average glyph width at 11px

LEGEND = (
    ("data path (ipop_trio datapath/net/session/offload)", "rgb(240,130,40)"),
    ("other ipop_trio", "rgb(226,196,70)"),
    ("trio", "rgb(130,190,120)"),
    ("native / C", "rgb(120,160,220)"),
    ("other Python", "rgb(226,96,76)"),
)


def escape(text: str) -> str:
    """Text for an SVG element: markup escaped, characters XML forbids replaced."""
    return _html_escape(xml_safe(text))


def _hash(name: str) -> int:
    return zlib.crc32(name.encode())


def frame_colour(name: str) -> str:
    """Colour family by origin, shade by name (stable across runs)."""
    f = parse_frame(name)
    h = _hash(f.name)
    if f.thread or name == "all":
        return "rgb(190,190,190)"
    if is_datapath(name):
        return f"rgb(240,{110 + h % 50},{30 + h % 30})"
    if "ipop_trio/" in f.file:
        return f"rgb(226,{185 + h % 30},{60 + h % 30})"
    if f.file.startswith("trio/") or "/trio/" in f.file:
        return f"rgb({115 + h % 35},{185 + h % 20},{110 + h % 30})"
    if not f.file or f.file.endswith((".c", ".so", ".h", ".rs")) or "/lib" in f.file[:5]:
        return f"rgb({110 + h % 30},{150 + h % 30},{215 + h % 30})"
    return f"rgb(226,{80 + h % 60},{60 + h % 40})"


def _depth(node: Node) -> int:
    return 1 + max((_depth(c) for c in node.children.values()), default=0)


def render_svg(stacks: Sequence[tuple[Stack, int]], *, title: str, subtitle: str = "") -> str:
    """The flame graph of `stacks` as an SVG document."""
    root = build_tree(stacks)
    depth = _depth(root)
    height = PAD_TOP + depth * FRAME_HEIGHT + PAD_BOTTOM
    usable = WIDTH - 2 * PAD_X
    total = root.total or 1
    out: list[str] = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
        f'viewBox="0 0 {WIDTH} {height}" font-family="Verdana, sans-serif" font-size="11">',
        '<rect width="100%" height="100%" fill="#fdfdf8"/>',
        f'<text x="{WIDTH / 2}" y="16" text-anchor="middle" font-size="15">{escape(title)}</text>',
    ]
    if subtitle:
        out.append(
            f'<text x="{WIDTH / 2}" y="32" text-anchor="middle" fill="#555">'
            f"{escape(subtitle)}</text>"
        )
    x: float = PAD_X
    for label, colour in LEGEND:
        out.append(f'<rect x="{x}" y="36" width="10" height="8" fill="{colour}"/>')
        out.append(f'<text x="{x + 13}" y="44" font-size="9" fill="#444">{escape(label)}</text>')
        x += 18 + len(label) * 5.0

    def draw(node: Node, level: int, x0: float) -> None:
        w = node.total / total * usable
        if w < MIN_WIDTH_PX:
            return
        y = height - PAD_BOTTOM - (level + 1) * FRAME_HEIGHT
        pct = node.total / total * 100
        tip = f"{node.name} — {node.total} samples ({pct:.2f}%), self {node.self}"
        out.append(
            f'<g><title>{escape(tip)}</title><rect x="{x0:.2f}" y="{y}" width="{w:.2f}" '
            f'height="{FRAME_HEIGHT - 1}" rx="2" fill="{frame_colour(node.name)}"/>'
        )
        chars = int((w - 6) / CHAR_PX)
        if chars >= 3:
            text = node.name if len(node.name) <= chars else node.name[: chars - 2] + ".."
            out.append(f'<text x="{x0 + 3:.2f}" y="{y + FRAME_HEIGHT - 5}">{escape(text)}</text>')
        out.append("</g>")
        cx = x0
        for child in sorted(node.children.values(), key=lambda n: n.name):
            draw(child, level + 1, cx)
            cx += child.total / total * usable

    draw(root, 0, PAD_X)
    out.append("</svg>")
    return "\n".join(out) + "\n"


__all__ = ["frame_colour", "render_svg"]
