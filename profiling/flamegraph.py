"""A flame graph (SVG) of py-spy samples, rendered from the same samples as the call tree.

py-spy writes one output format per recording; recording three times (raw, speedscope, SVG)
would triple the sampling cost and give three different sample sets. So we record `raw` once
and draw the graph here: Brendan Gregg's layout (root at the bottom, width = samples, children
sorted by name so the same code lands in the same place run after run), a tooltip per frame,
and colours by where the code lives, so the data path stands out.

Interactive, and still self-contained: one small inline script (SCRIPT, in CDATA so the file
stays well-formed XML) zooms into a clicked frame (it fills the width, its ancestors stay
below it) and searches frame names (matches highlighted, their share of samples shown). It
works the same in the standalone NODE/flamegraph.svg and inlined in report.html, and loads
nothing. The script reads only what the markup carries: each frame's `<g class="f">` has
`data-s` (first sample), `data-n` (samples) and `data-d` (depth) in sample units, so a zoom is
exact integer arithmetic, and its name is its tooltip up to the last " — ". Pure: samples in,
SVG text out.
"""

from __future__ import annotations

import json
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
MATCH_COLOUR = "rgb(230,0,230)"  # search hits, a colour no origin family uses

LEGEND = (
    ("data path (ipop_trio datapath/net/session/offload)", "rgb(240,130,40)"),
    ("other ipop_trio", "rgb(226,196,70)"),
    ("trio", "rgb(130,190,120)"),
    ("native / C", "rgb(120,160,220)"),
    ("other Python", "rgb(226,96,76)"),
)

# The interaction. Plain ES5 so any browser runs it; `__CONFIG__` becomes a JSON object.
# Zoom to frame z: frames inside z's sample range at depth >= z's are stretched so z fills
# the width; z's ancestors (depth < z's, range covering z's) span the width, dimmed; the rest
# are hidden. Clicking the root or "Reset zoom" undoes it. Search: a case-insensitive regular
# expression (a literal if it does not compile) over frame names; the matched share is the
# union of the hits' sample ranges, so a match nested in another is counted once. While a
# search is shown, the "Search" control reads "Clear search".
SCRIPT = r"""
(function () {
  "use strict";
  var cfg = __CONFIG__;
  var svg = document.getElementById(cfg.id);
  if (!svg) { return; }
  var frames = [];
  var groups = svg.getElementsByTagName("g");
  for (var i = 0; i < groups.length; i++) {
    var g = groups[i];
    if (g.getAttribute("class") !== "f") { continue; }
    var tip = g.getElementsByTagName("title")[0].textContent;
    var rect = g.getElementsByTagName("rect")[0];
    frames.push({
      g: g, rect: rect, text: g.getElementsByTagName("text")[0],
      s: Number(g.getAttribute("data-s")), n: Number(g.getAttribute("data-n")),
      d: Number(g.getAttribute("data-d")),
      name: tip.slice(0, tip.lastIndexOf(" \u2014 ")), fill: rect.getAttribute("fill")
    });
  }
  var resetButton = document.getElementById(cfg.id + "-reset");
  var searchButton = document.getElementById(cfg.id + "-search");
  var matchedText = document.getElementById(cfg.id + "-matched");
  var zoomed = null;
  var pattern = null;
  var term = "";

  function label(f, w) {
    var chars = Math.floor((w - 6) / cfg.charPx);
    if (chars < 3) { return ""; }
    return f.name.length <= chars ? f.name : f.name.slice(0, chars - 2) + "..";
  }

  function place(f, x, w, dim) {
    f.g.removeAttribute("display");
    if (dim) { f.g.setAttribute("opacity", "0.6"); } else { f.g.removeAttribute("opacity"); }
    f.rect.setAttribute("x", x.toFixed(2));
    f.rect.setAttribute("width", w.toFixed(2));
    f.text.setAttribute("x", (x + 3).toFixed(2));
    f.text.textContent = label(f, w);
  }

  function zoom(z) {
    zoomed = z;
    for (var i = 0; i < frames.length; i++) {
      var f = frames[i];
      if (z === null) {
        place(f, cfg.pad + f.s / cfg.total * cfg.usable, f.n / cfg.total * cfg.usable, false);
      } else if (f.d < z.d && f.s <= z.s && f.s + f.n >= z.s + z.n) {
        place(f, cfg.pad, cfg.usable, true);
      } else if (f.d >= z.d && f.s >= z.s && f.s + f.n <= z.s + z.n) {
        place(f, cfg.pad + (f.s - z.s) / z.n * cfg.usable, f.n / z.n * cfg.usable, false);
      } else {
        f.g.setAttribute("display", "none");
      }
    }
    resetButton.setAttribute("visibility", z === null ? "hidden" : "visible");
    showMatches();
  }

  // Samples covered by the union of [start, end) ranges, clipped to [lo, hi).
  function covered(ranges, lo, hi) {
    ranges.sort(function (a, b) { return a[0] - b[0]; });
    var sum = 0;
    var end = lo;
    for (var i = 0; i < ranges.length; i++) {
      var a = Math.max(ranges[i][0], end);
      var b = Math.min(ranges[i][1], hi);
      if (b > a) { sum += b - a; end = b; }
    }
    return sum;
  }

  function pct(x) { return (x * 100).toFixed(1) + "%"; }

  function showMatches() {
    if (pattern === null) {
      matchedText.textContent = "";
      matchedText.setAttribute("visibility", "hidden");
      searchButton.textContent = "Search";
      return;
    }
    var ranges = [];
    for (var i = 0; i < frames.length; i++) {
      var f = frames[i];
      var hit = pattern.test(f.name);
      f.rect.setAttribute("fill", hit ? cfg.matchColour : f.fill);
      if (hit) { ranges.push([f.s, f.s + f.n]); }
    }
    var all = covered(ranges, 0, cfg.total);
    var text = "\u201c" + term + "\u201d: " + pct(all / cfg.total) + " of samples";
    if (zoomed !== null) {
      text += ", " + pct(covered(ranges, zoomed.s, zoomed.s + zoomed.n) / zoomed.n) +
        " of the zoomed frame";
    }
    matchedText.textContent = text;
    matchedText.setAttribute("visibility", "visible");
    searchButton.textContent = "Clear search";
  }

  function search(value) {
    term = value || "";
    if (term === "") {
      pattern = null;
      for (var i = 0; i < frames.length; i++) {
        frames[i].rect.setAttribute("fill", frames[i].fill);
      }
    } else {
      try {
        pattern = new RegExp(term, "i");
      } catch (e) {
        pattern = new RegExp(term.replace(/[.*+?^${}()|[\]\\]/g, "\\$&"), "i");
      }
    }
    showMatches();
  }

  function ask() {
    var value = window.prompt("Search frames (regular expression, any case):", term);
    if (value !== null) { search(value); }
  }

  function frameOf(node) {
    while (node && node !== svg) {
      for (var i = 0; i < frames.length; i++) {
        if (frames[i].g === node) { return frames[i]; }
      }
      node = node.parentNode;
    }
    return null;
  }

  svg.addEventListener("click", function (event) {
    var target = event.target;
    if (target === resetButton) { zoom(null); return; }
    if (target === searchButton) {
      if (pattern === null) { ask(); } else { search(""); }
      return;
    }
    var f = frameOf(target);
    if (f !== null) { zoom(f.d === 0 ? null : f); }
  });

  // Standalone (the SVG is the document), Ctrl-F or "/" searches and Escape undoes both;
  // inlined in a page, the page's own keys stay the page's.
  if (svg.ownerDocument.documentElement === svg) {
    window.addEventListener("keydown", function (event) {
      if ((event.key === "f" && (event.ctrlKey || event.metaKey)) || event.key === "/") {
        event.preventDefault();
        ask();
      } else if (event.key === "Escape") {
        search("");
        zoom(null);
      }
    });
  }

  svg.flamegraph = { zoom: zoom, search: search, frames: frames };  // for a console, a test
})();
"""
assert "]]>" not in SCRIPT  # it is inlined in a CDATA section


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


def _label(name: str, width: float) -> str:
    """The frame's name cut to fit `width` px (the script's `label` does the same)."""
    chars = int((width - 6) / CHAR_PX)
    if chars < 3:
        return ""
    return name if len(name) <= chars else name[: chars - 2] + ".."


def svg_id(key: str) -> str:
    """The document id of the graph of `key` (a node's name): unique per key within
    report.html, and safe in XML and in the script's JSON."""
    return f"fg-{_hash(key):08x}"


def render_svg(
    stacks: Sequence[tuple[Stack, int]], *, title: str, subtitle: str = "", key: str | None = None
) -> str:
    """The flame graph of `stacks` as an SVG document; `key` (default: the title) names it
    apart from other graphs inlined in the same page."""
    root = build_tree(stacks)
    depth = _depth(root)
    height = PAD_TOP + depth * FRAME_HEIGHT + PAD_BOTTOM
    usable = WIDTH - 2 * PAD_X
    total = root.total or 1
    ident = svg_id(key if key is not None else title)
    out: list[str] = [
        f'<svg xmlns="http://www.w3.org/2000/svg" id="{ident}" width="{WIDTH}" height="{height}" '
        f'viewBox="0 0 {WIDTH} {height}" font-family="Verdana, sans-serif" font-size="11">',
        '<rect width="100%" height="100%" fill="#fdfdf8"/>',
        f'<text x="{WIDTH / 2}" y="16" text-anchor="middle" font-size="15">{escape(title)}</text>',
        f'<text id="{ident}-reset" x="{PAD_X}" y="16" cursor="pointer" fill="#06c" '
        'visibility="hidden">Reset zoom</text>',
        f'<text id="{ident}-search" x="{WIDTH - PAD_X}" y="16" text-anchor="end" '
        'cursor="pointer" fill="#06c">Search</text>',
        f'<text id="{ident}-matched" x="{WIDTH - PAD_X}" y="32" text-anchor="end" '
        'fill="#a0a" visibility="hidden"></text>',
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
    out.append('<g class="frames" cursor="pointer">')

    def draw(node: Node, level: int, start: int) -> None:
        w = node.total / total * usable
        if w < MIN_WIDTH_PX:
            return
        x0 = PAD_X + start / total * usable
        y = height - PAD_BOTTOM - (level + 1) * FRAME_HEIGHT
        pct = node.total / total * 100
        tip = f"{node.name} — {node.total} samples ({pct:.2f}%), self {node.self}"
        out.append(
            f'<g class="f" data-s="{start}" data-n="{node.total}" data-d="{level}">'
            f'<title>{escape(tip)}</title><rect x="{x0:.2f}" y="{y}" width="{w:.2f}" '
            f'height="{FRAME_HEIGHT - 1}" rx="2" fill="{frame_colour(node.name)}"/>'
            f'<text x="{x0 + 3:.2f}" y="{y + FRAME_HEIGHT - 5}">'
            f"{escape(_label(node.name, w))}</text></g>"
        )
        at = start
        for child in sorted(node.children.values(), key=lambda n: n.name):
            draw(child, level + 1, at)
            at += child.total

    draw(root, 0, 0)
    out.append("</g>")
    config = {
        "id": ident,
        "total": total,
        "pad": PAD_X,
        "usable": usable,
        "charPx": CHAR_PX,
        "matchColour": MATCH_COLOUR,
    }
    script = SCRIPT.replace("__CONFIG__", json.dumps(config))
    out.append(f'<script type="text/javascript"><![CDATA[{script}]]></script>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


__all__ = ["MATCH_COLOUR", "SCRIPT", "frame_colour", "render_svg", "svg_id"]
