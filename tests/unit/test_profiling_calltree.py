"""profiling.calltree and profiling.flamegraph on py-spy raw samples."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pytest

from profiling import calltree
from profiling.flamegraph import PAD_X, WIDTH, frame_colour, render_svg, svg_id

MAIN = "thread (100): MainThread"
WRITER = "thread (101): tap-writer-ipop0"
RUN = "run (trio/_core/_run.py:2400)"
SEND = "Outbound.send (ipop_trio/datapath/outbound.py:41)"
SEAL = "Session.seal_iov (ipop_trio/proto/session.py:200)"
AEAD = "AESGCM.encrypt_into (cryptography/aead.py:10)"
RAW = f"""\
{MAIN};{RUN};{SEND};{SEAL};{AEAD} 6
{MAIN};{RUN};{SEND} 2
{MAIN};{RUN};Outbound.send (ipop_trio/datapath/outbound.py:41);{SEAL} 1
{MAIN};{RUN};get_events (trio/_core/_io_epoll.py:243) 3
{WRITER};TapWriter._write (ipop_trio/net/tap.py:149) 4

"""


@pytest.fixture
def stacks() -> list[tuple[calltree.Stack, int]]:
    return calltree.parse_collapsed(RAW)


def test_parse_and_roundtrip(stacks: list[tuple[calltree.Stack, int]]) -> None:
    assert len(stacks) == 5 and sum(c for _, c in stacks) == 16
    assert calltree.parse_collapsed(calltree.write_collapsed(stacks)) == stacks
    with pytest.raises(calltree.ParseError):
        calltree.parse_collapsed("no count here\n")


def test_parse_frame() -> None:
    f = calltree.parse_frame(SEAL)
    assert (f.name, f.file, f.line, f.thread) == (
        "Session.seal_iov",
        "ipop_trio/proto/session.py",
        200,
        False,
    )
    assert calltree.parse_frame(MAIN).thread
    assert calltree.parse_frame("<lambda> (x.py)").line is None
    assert calltree.short_name(SEAL) == "Session.seal_iov (ipop_trio/proto/session.py)"
    assert calltree.is_datapath(SEND) and calltree.is_datapath(SEAL)
    assert not calltree.is_datapath(RUN) and not calltree.is_datapath(MAIN)


def test_tree_inclusive_and_self(stacks: list[tuple[calltree.Stack, int]]) -> None:
    root = calltree.build_tree(stacks)
    assert root.total == 16
    main = root.children[MAIN]
    run = main.children["run (trio/_core/_run.py)"]
    send = run.children["Outbound.send (ipop_trio/datapath/outbound.py)"]
    assert (main.total, run.total, send.total, send.self) == (12, 12, 9, 2)
    lines = calltree.flatten(root, min_share=0.0)
    by_name = {ln.name: ln for ln in lines}
    assert by_name["Outbound.send (ipop_trio/datapath/outbound.py)"].inclusive == pytest.approx(
        9 / 16
    )
    # run is the only child of MainThread, which has no samples of its own: one row
    assert f"{MAIN} → run (trio/_core/_run.py)" in by_name
    assert by_name["Outbound.send (ipop_trio/datapath/outbound.py)"].depth == 1
    assert "56.2%" in calltree.format_tree(lines)
    uncollapsed = {ln.name for ln in calltree.flatten(root, min_share=0.0, collapse=False)}
    assert MAIN in uncollapsed and "run (trio/_core/_run.py)" in uncollapsed


def test_datapath_view_starts_at_the_first_datapath_frame(
    stacks: list[tuple[calltree.Stack, int]],
) -> None:
    main, writer = calltree.datapath_view(stacks)
    assert (main.thread, main.samples, main.outside) == (MAIN, 12, 3)
    send = "Outbound.send (ipop_trio/datapath/outbound.py)"
    seal = "Session.seal_iov (ipop_trio/proto/session.py)"
    assert list(main.root.children) == [send]  # not the thread, not trio's run
    assert main.above == {send: {("run (trio/_core/_run.py)",): 9}}
    assert main.outside_leaves == {"get_events (trio/_core/_io_epoll.py)": 3}
    lines = {ln.name: ln for ln in calltree.flatten(main.root, min_share=0.0)}
    assert lines[send].depth == 0 and lines[send].inclusive == pytest.approx(9 / 12)
    assert lines[seal].inclusive == pytest.approx(7 / 12)
    assert (writer.thread, writer.samples, writer.outside) == (WRITER, 4, 0)
    assert writer.above == {"TapWriter._write (ipop_trio/net/tap.py)": {(): 4}}


def test_datapath_view_takes_only_the_first_datapath_frame() -> None:
    # The data path calls out (cryptography) and back in: one tree, rooted at the first frame.
    stack = f"{MAIN};{RUN};{SEND};{AEAD};{SEAL} 5\nlone (x.py:1) 1\n"
    main, everything = calltree.datapath_view(calltree.parse_collapsed(stack))
    send = main.root.children["Outbound.send (ipop_trio/datapath/outbound.py)"]
    assert list(main.root.children) == ["Outbound.send (ipop_trio/datapath/outbound.py)"]
    aead = send.children["AESGCM.encrypt_into (cryptography/aead.py)"]
    assert aead.children["Session.seal_iov (ipop_trio/proto/session.py)"].self == 5
    # without --threads, stacks belong to "all"
    assert (everything.thread, everything.samples, everything.outside) == ("all", 1, 1)


def test_describe_chain() -> None:
    chain = (
        "_run_module_as_main (<frozen runpy>)",
        "_run_code (<frozen runpy>)",
        "<module> (ipop_trio/__main__.py)",
        "main (ipop_trio/cli.py)",
        "run (trio/_core/_run.py)",
        "unrolled_run (trio/_core/_run.py)",
        "helper (somewhere.py)",
    )
    assert calltree.describe_chain(chain) == "runpy → ipop-trio CLI → trio run loop → helper"
    assert calltree.describe_chain(["Thread.run (threading.py)"]) == "thread start"
    assert calltree.thread_label(MAIN) == "MainThread (tid 100)"


def test_function_table_counts_each_function_once_per_stack() -> None:
    rec = "f (a.py:1)"
    stacks = calltree.parse_collapsed(f"{MAIN};{rec};{rec};{rec} 5\n{MAIN};g (a.py:9) 5\n")
    rows = {r["function"]: r for r in calltree.function_table(stacks)}
    assert rows["f (a.py)"]["inclusive"] == 5 and rows["f (a.py)"]["inclusive_share"] == 0.5
    assert rows["f (a.py)"]["self"] == 5 and rows["g (a.py)"]["self_share"] == 0.5
    assert MAIN not in rows


def test_threads_and_datapath(stacks: list[tuple[calltree.Stack, int]]) -> None:
    assert calltree.thread_samples(stacks) == {MAIN: 12, WRITER: 4}
    dp = calltree.datapath_functions(stacks)
    assert dp["Outbound.send (ipop_trio/datapath/outbound.py)"] == 9
    assert dp["Session.seal_iov (ipop_trio/proto/session.py)"] == 7
    assert dp["TapWriter._write (ipop_trio/net/tap.py)"] == 4


def test_speedscope(stacks: list[tuple[calltree.Stack, int]]) -> None:
    doc = calltree.to_speedscope(stacks, name="alpha", rate=200)
    json.dumps(doc)
    frames = doc["shared"]["frames"]
    assert {p["name"] for p in doc["profiles"]} == {f"alpha {MAIN}", f"alpha {WRITER}"}
    main = next(p for p in doc["profiles"] if MAIN in p["name"])
    assert sum(main["weights"]) == pytest.approx(12 / 200)
    assert main["endValue"] == pytest.approx(12 / 200)
    first = [frames[i]["name"] for i in main["samples"][0]]
    assert first == ["run", "Outbound.send", "Session.seal_iov", "AESGCM.encrypt_into"]
    assert frames[main["samples"][0][2]]["line"] == 200


def test_flamegraph_svg(stacks: list[tuple[calltree.Stack, int]]) -> None:
    svg = render_svg(stacks, title="alpha <sender> & co", subtitle="16 samples")
    root = ET.fromstring(svg)
    ns = "{http://www.w3.org/2000/svg}"
    titles = [t.text or "" for t in root.iter(f"{ns}title")]
    assert any(t.startswith("all — 16 samples (100.00%)") for t in titles)
    assert any(
        t.startswith("Outbound.send (ipop_trio/datapath/outbound.py) — 9 samples") for t in titles
    )
    frames = [g for g in root.iter(f"{ns}g") if g.get("class") == "f"]
    rects = {
        g.find(f"{ns}title").text.split(" — ")[0]: float(g.find(f"{ns}rect").get("width"))  # type: ignore[union-attr,arg-type]
        for g in frames
    }
    assert rects["Outbound.send (ipop_trio/datapath/outbound.py)"] / rects["all"] == pytest.approx(
        9 / 16
    )
    assert "alpha &lt;sender&gt; &amp; co" in svg


def test_flamegraph_carries_what_its_script_needs(
    stacks: list[tuple[calltree.Stack, int]],
) -> None:
    svg = render_svg(stacks, title="alpha", key="alpha")
    root = ET.fromstring(svg)
    ns = "{http://www.w3.org/2000/svg}"
    ident = root.get("id")
    assert ident == svg_id("alpha") != svg_id("beta")
    # Each frame: first sample, samples, depth; the drawn rect agrees with them.
    usable = WIDTH - 2 * PAD_X
    frames = {}
    for g in root.iter(f"{ns}g"):
        if g.get("class") != "f":
            continue
        s, n, d = (int(g.get(a) or "-1") for a in ("data-s", "data-n", "data-d"))
        rect = g.find(f"{ns}rect")
        assert rect is not None and g.find(f"{ns}text") is not None
        assert float(rect.get("x") or 0) == pytest.approx(PAD_X + s / 16 * usable, abs=0.01)
        assert float(rect.get("width") or 0) == pytest.approx(n / 16 * usable, abs=0.01)
        name = (g.findtext(f"{ns}title") or "").rpartition(" — ")[0]
        frames[name] = (s, n, d)
    assert frames["all"] == (0, 16, 0)
    send = frames["Outbound.send (ipop_trio/datapath/outbound.py)"]
    seal = frames["Session.seal_iov (ipop_trio/proto/session.py)"]
    assert send[1:] == (9, 3) and seal[1:] == (7, 4)
    assert send[0] <= seal[0] and seal[0] + seal[1] <= send[0] + send[1]  # nested
    # Children tile their parent, by name: run = Outbound.send (9) then get_events (3).
    run = frames["run (trio/_core/_run.py)"]
    events = frames["get_events (trio/_core/_io_epoll.py)"]
    assert (send[0], events[0], events[0] + events[1]) == (run[0], run[0] + 9, run[0] + run[1])
    # The controls and the script, which names this graph and loads nothing.
    for control in ("reset", "search", "matched"):
        assert root.find(f".//*[@id='{ident}-{control}']") is not None, control
    script = root.find(f"{ns}script")
    assert script is not None and script.text and f'"id": "{ident}"' in script.text
    assert "<![CDATA[" in svg and "]]>" not in script.text
    assert "http" not in script.text and "src" not in script.text


def test_colours_by_origin() -> None:
    assert frame_colour(SEND).startswith("rgb(240,")
    assert frame_colour(MAIN) == "rgb(190,190,190)"
    assert frame_colour(RUN) != frame_colour(SEND)
    assert frame_colour(AEAD) == frame_colour(AEAD)  # stable


def test_names_xml_cannot_carry_are_replaced() -> None:
    # py-spy reads names from a running process: a torn read gives control characters (one
    # broke the lab profile's flamegraph.svg in CI) and line separators other than "\n".
    text = "thread (1): Main;bad\x01name (x.py:1);also\x1cbad (x.py:2) 3\nthread (1): Main 1\n"
    stacks = calltree.parse_collapsed(text)
    assert stacks == [
        (("thread (1): Main", "bad\ufffdname (x.py:1)", "also\ufffdbad (x.py:2)"), 3),
        (("thread (1): Main",), 1),
    ]
    ET.fromstring(render_svg(stacks, title="t\x02"))
