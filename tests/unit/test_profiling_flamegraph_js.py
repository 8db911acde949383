"""The flame graph's script (profiling/flamegraph.py SCRIPT) run under node.js against a small
DOM (flamegraph_dom.js) built from the very SVG render_svg wrote: zoom, reset, search and the
keys do what the page promises. No browser here; node is in .ci/system-deps."""

from __future__ import annotations

import json
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from profiling import calltree
from profiling.flamegraph import MATCH_COLOUR, PAD_X, WIDTH, render_svg

NODE = shutil.which("node")
pytestmark = pytest.mark.skipif(NODE is None, reason="node.js not installed (.ci/system-deps)")

HARNESS = Path(__file__).with_name("flamegraph_dom.js")
USABLE = WIDTH - 2 * PAD_X
MAIN = "thread (100): MainThread"
_RUN = f"{MAIN};run (trio/_core/_run.py:1)"
_SEND = "Outbound.send (ipop_trio/datapath/outbound.py:41)"
RAW = f"""\
{_RUN};{_SEND};Session.seal_iov (ipop_trio/proto/session.py:200) 7
{_RUN};{_SEND} 2
{_RUN};get_events (trio/_core/_io_epoll.py:243) 3
thread (101): tap-writer;TapWriter._write (ipop_trio/net/tap.py:149) 4
"""
SEND = "Outbound.send (ipop_trio/datapath/outbound.py)"
SEAL = "Session.seal_iov (ipop_trio/proto/session.py)"


def _element(e: ET.Element) -> dict[str, Any]:
    return {
        "tag": e.tag.rpartition("}")[2],
        "attrs": dict(e.attrib),
        "text": e.text or "",
        "children": [_element(c) for c in e],
    }


def run(actions: list[dict[str, Any]], *, standalone: bool = True) -> tuple[Any, list[Any]]:
    """The initial snapshot and one per action (flamegraph_dom.js says what they hold)."""
    svg = ET.fromstring(render_svg(calltree.parse_collapsed(RAW), title="t", key="alpha"))
    script = svg.find("{http://www.w3.org/2000/svg}script")
    assert script is not None and script.text
    payload = {
        "tree": _element(svg),
        "script": script.text,
        "standalone": standalone,
        "actions": actions,
    }
    assert NODE is not None
    done = subprocess.run(
        [NODE, str(HARNESS)], input=json.dumps(payload), capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    return out["initial"], out["steps"]


def names() -> list[str]:
    svg = ET.fromstring(render_svg(calltree.parse_collapsed(RAW), title="t", key="alpha"))
    ns = "{http://www.w3.org/2000/svg}"
    return [
        (g.findtext(f"{ns}title") or "").rpartition(" — ")[0]
        for g in svg.iter(f"{ns}g")
        if g.get("class") == "f"
    ]


def test_click_zooms_the_frame_to_the_full_width_and_keeps_its_ancestors() -> None:
    order = names()
    send = order.index(SEND)
    initial, (zoomed, reset) = run([{"click_frame": send}, {"click": f"{_id()}-reset"}])
    by = {name: f for name, f in zip(order, zoomed["frames"], strict=True)}
    assert by[SEND]["x"] == pytest.approx(PAD_X) and by[SEND]["width"] == pytest.approx(USABLE)
    assert by[SEND]["label"] == SEND and by[SEND]["opacity"] is None
    assert by[SEAL]["width"] == pytest.approx(7 / 9 * USABLE, abs=0.01)
    for ancestor in ("all", MAIN, "run (trio/_core/_run.py)"):
        assert by[ancestor]["width"] == pytest.approx(USABLE), ancestor
        assert by[ancestor]["opacity"] == "0.6" and by[ancestor]["display"] is None
    for other in (
        "get_events (trio/_core/_io_epoll.py)",
        "TapWriter._write (ipop_trio/net/tap.py)",
    ):
        assert by[other]["display"] == "none", other
    assert zoomed["reset"]["visibility"] == "visible"
    # Reset: every frame back where render_svg drew it, with the label it drew.
    assert initial["reset"]["visibility"] == "hidden" == reset["reset"]["visibility"]
    for before, after in zip(initial["frames"], reset["frames"], strict=True):
        assert after["x"] == pytest.approx(before["x"], abs=0.01)
        assert after["width"] == pytest.approx(before["width"], abs=0.01)
        assert after["text_x"] == pytest.approx(before["text_x"], abs=0.01)
        assert (after["label"], after["display"], after["opacity"]) == (before["label"], None, None)


def _id() -> str:
    svg = ET.fromstring(render_svg(calltree.parse_collapsed(RAW), title="t", key="alpha"))
    return svg.get("id") or ""


def test_clicking_the_root_resets_the_zoom() -> None:
    order = names()
    _, (_, back) = run([{"click_frame": order.index(SEAL)}, {"click_frame": order.index("all")}])
    assert all(f["display"] is None and f["opacity"] is None for f in back["frames"])
    assert back["reset"]["visibility"] == "hidden"


def test_search_highlights_and_counts_nested_matches_once() -> None:
    order = names()
    ident = _id()
    _, steps = run(
        [
            {"prompt": "SEAL_iov"},
            {"click": f"{ident}-search"},
            {"prompt": "send|seal"},
            {"key": "f", "ctrl": True},  # a new search; the control would clear this one
            {"click_frame": order.index(SEND)},
            {"click": f"{ident}-search"},  # now "Clear search"
            {"prompt": "seal_iov ("},  # not a regular expression: searched as text
            {"click": f"{ident}-search"},
        ]
    )
    seal, both, zoomed, cleared, literal = steps[1], steps[3], steps[4], steps[5], steps[7]
    fills = {name: f["fill"] for name, f in zip(order, seal["frames"], strict=True)}
    assert fills[SEAL] == MATCH_COLOUR and fills[SEND] != MATCH_COLOUR
    assert seal["matched"]["text"] == "\u201cSEAL_iov\u201d: 43.8% of samples"  # 7 of 16
    assert seal["matched"]["visibility"] == "visible"
    assert seal["search"]["text"] == "Clear search"
    assert "56.3% of samples" in both["matched"]["text"]  # 9 of 16, not 7 + 9 (JS rounds up)
    assert "56.3% of samples, 100.0% of the zoomed frame" in zoomed["matched"]["text"]
    assert cleared["matched"]["visibility"] == "hidden" and cleared["search"]["text"] == "Search"
    assert MATCH_COLOUR not in {f["fill"] for f in cleared["frames"]}
    assert "43.8% of samples" in literal["matched"]["text"]  # the text "seal_iov ("


def test_keys_only_when_the_svg_is_the_document() -> None:
    order = names()
    _, steps = run(
        [
            {"prompt": "writer"},
            {"key": "f", "ctrl": True},
            {"click_frame": order.index(SEND)},
            {"key": "Escape"},
        ]
    )
    assert steps[0]["keys"] and "25.0% of samples" in steps[1]["matched"]["text"]
    assert steps[3]["matched"]["visibility"] == "hidden"
    assert steps[3]["reset"]["visibility"] == "hidden"
    _, inline = run([{"prompt": "writer"}, {"key": "f", "ctrl": True}], standalone=False)
    assert not inline[1]["keys"] and inline[1]["matched"]["visibility"] == "hidden"
