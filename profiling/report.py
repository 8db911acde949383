"""The profile as one self-contained HTML page, and as a short terminal summary.

The page answers, in order: how fast and at what CPU cost (throughput, CPU per node), where
the time goes (the stage timers: a table and bars per node, batch sizes, drops, queue gauges),
which code (the hottest functions, and per thread a top-down call tree from the first data-path
frame down with inclusive percentages of that thread's samples, Zoom's view, the full tree
folded below it), and the flame graphs, inlined with their zoom-and-search script. No
external resource: it can be mailed or attached to an issue. Every table cell is a formatted
number with its unit or a name, never a Python repr, whatever shape a node's stats take
(`fmt_value`, `mapping_table`). Pure: the profile dict in, text out.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from html import escape as _html_escape
from pathlib import Path
from typing import Any

from . import calltree, stages

TREE_MIN_SHARE = 0.005  # call-tree nodes under 0.5% of samples are left out
TREE_OPEN_SHARE = 0.05  # nodes from 5% up start expanded

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;
max-width:1260px;color:#222;background:#fff;line-height:1.4}
h1{font-size:22px;margin-bottom:2px}h2{font-size:18px;margin-top:32px;border-bottom:1px solid
#ddd;padding-bottom:4px}h3{font-size:15px;margin:18px 0 6px}.sub{color:#666;font-size:13px}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin:16px 0}.card{border:1px solid #ddd;
border-radius:8px;padding:10px 14px;min-width:150px}.card b{display:block;font-size:22px}
.card span{color:#666;font-size:12px}table{border-collapse:collapse;font-size:13px;margin:6px 0}
th,td{padding:3px 8px;text-align:right;border-bottom:1px solid #eee}th{background:#f6f6f6}
td.l,th.l{text-align:left}.bar{display:inline-block;height:10px;background:#f08228;
vertical-align:middle}.bar.in{background:#3b82c4}.bar.rest{background:#bbb}
.note{color:#555;font-size:13px}.warn{color:#a33}.ok{color:#275}
details{margin-left:18px}details>summary{cursor:pointer;list-style:disclosure-closed}
details[open]>summary{list-style:disclosure-open}.leaf{margin-left:18px;padding-left:14px}
.tree{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px}
.tree .p{display:inline-block;width:58px;text-align:right;color:#000}
.tree .s{display:inline-block;width:78px;color:#888}.dp{color:#b4500a;font-weight:600}
.hist td{padding:2px 4px;font-size:11px}.svg{overflow-x:auto;border:1px solid #eee}
code{background:#f4f4f4;padding:1px 4px;border-radius:3px}.el{color:#999}
p.thread{font-size:13px;margin:14px 0 4px}details.full{margin:10px 0 0}
details.full>summary{color:#555;font-size:13px}
"""


def escape(text: Any) -> str:
    """Text for the page: markup escaped, characters XML (and HTML) cannot carry replaced."""
    return _html_escape(calltree.xml_safe(str(text)))


def _f(value: Any, fmt: str = "{:.2f}", dash: str = "–") -> str:
    return dash if value is None else fmt.format(value)


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{x * 100:.1f}%"


# ---------------------------------------------------------------------------------------------
# Values with units


def duration(seconds: float) -> str:
    """``1.23 s``, ``4.56 ms``, ``78.9 µs``, ``12 ns``."""
    a = abs(seconds)
    if a == 0:
        return "0 s"
    if a >= 1:
        return f"{seconds:.2f} s"
    if a >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    if a >= 1e-6:
        return f"{seconds * 1e6:.1f} µs"
    return f"{seconds * 1e9:.0f} ns"


def size(nbytes: float) -> str:
    """``512 B``, ``3.4 kB``, ``56.7 MB``, ``1.20 GB`` (powers of ten, like iperf3's MB)."""
    a = abs(nbytes)
    if a >= 1e9:
        return f"{nbytes / 1e9:.2f} GB"
    if a >= 1e6:
        return f"{nbytes / 1e6:.1f} MB"
    if a >= 1e3:
        return f"{nbytes / 1e3:.1f} kB"
    return f"{nbytes:.0f} B"


# The unit a value's key names (its last part that names one): the formatter for it.
_UNITS: tuple[tuple[tuple[str, ...], Any], ...] = (
    (("seconds", "_s"), duration),
    (("bytes",), size),
    (("share", "ratio", "utilisation"), _pct),
    (("_mb",), lambda v: f"{v:.1f} MB"),
    (("_ms",), lambda v: f"{v:.2f} ms"),
    (("_mbps",), lambda v: f"{v:.1f} Mbit/s"),
)


def fmt_value(key: str | Sequence[str], value: Any) -> str:
    """A value as the text of one cell: its unit from its key (``wait_seconds`` -> a duration,
    ``bytes`` -> MB, ``share`` -> %; for a nested key, the innermost part that names a unit),
    whole numbers without ``.0``, a mapping as ``name value, ...`` and a list comma-joined, so
    no Python repr reaches a reader whatever a node reports."""
    parts = [key] if isinstance(key, str) else list(key)
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int | float):
        if not math.isfinite(value):
            return "–"
        for part in reversed(parts):
            for suffixes, unit in _UNITS:
                if part == suffixes[0] or part.endswith(suffixes):
                    text: str = unit(value)
                    return text
        if float(value).is_integer():
            return str(int(value))
        return f"{value:.2f}"
    if isinstance(value, Mapping):
        return ", ".join(f"{k} {fmt_value([*parts, str(k)], v)}" for k, v in value.items())
    if isinstance(value, list | tuple):
        return ", ".join(fmt_value(parts, v) for v in value)
    return str(value)


def _leaves(value: Mapping[str, Any], path: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """A nested mapping's scalars by key path: {"a": {"b": 1}, "c": 2} -> {(a, b): 1, (c,): 2}."""
    out: dict[tuple[str, ...], Any] = {}
    for k, v in value.items():
        if isinstance(v, Mapping) and v:
            out.update(_leaves(v, (*path, str(k))))
        else:
            out[(*path, str(k))] = v
    return out


def mapping_table(
    rows: Mapping[str, Any],
    *,
    name: str,
    columns: Mapping[str, str] | None = None,
    value: str = "value",
) -> str:
    """`rows` (row name -> a mapping, or a scalar) as an HTML table. A mapping's keys become
    columns, a nested mapping's leaves columns headed ``outer · inner``; known keys come first,
    in the order and with the headers `columns` gives, then the rest as they first appear.
    Scalar rows fill one column headed `value`. Cells go through `fmt_value`."""
    columns = columns or {}
    flat: dict[str, dict[tuple[str, ...], Any]] = {
        str(r): _leaves(v) if isinstance(v, Mapping) else {(value,): v} for r, v in rows.items()
    }
    seen: list[tuple[str, ...]] = []
    for cells in flat.values():
        seen += [p for p in cells if p not in seen]
    order = {k: i for i, k in enumerate(columns)}
    first = {p: i for i, p in enumerate(seen)}
    seen.sort(key=lambda p: (order.get(p[0], len(order)), first[p]))

    def header(path: tuple[str, ...]) -> str:
        return " · ".join(columns.get(p, p.replace("_", " ")) for p in path)

    out = [f"<table><tr><th class=l>{escape(name)}</th>"]
    out += [f"<th>{escape(header(p))}</th>" for p in seen] + ["</tr>"]
    for r, cells in flat.items():
        out.append(f"<tr><td class=l>{escape(r)}</td>")
        out += [f"<td>{escape(fmt_value(p, cells.get(p)))}</td>" for p in seen]
        out.append("</tr>")
    out.append("</table>")
    return "".join(out)


CHANNEL_COLUMNS = {
    "batches": "batches taken",
    "depth": "depth at end",
    "max_depth": "max depth",
    "wait_seconds": "queue wait",
    "wait_per_batch_seconds": "mean wait / batch",
}


def channel_rows(channels: Mapping[str, Any]) -> dict[str, Any]:
    """The node's channels with the mean wait per batch taken added (when both are known)."""
    out: dict[str, Any] = {}
    for name, ch in channels.items():
        if isinstance(ch, Mapping):
            row = dict(ch)
            wait, batches = ch.get("wait_seconds"), ch.get("batches")
            if isinstance(wait, int | float) and isinstance(batches, int | float) and batches > 0:
                row["wait_per_batch_seconds"] = wait / batches
            out[str(name)] = row
        else:
            out[str(name)] = ch
    return out


def _channels_text(channels: Mapping[str, Any]) -> str:
    parts = []
    for name, ch in channel_rows(channels).items():
        if not isinstance(ch, Mapping):
            parts.append(f"{name} {fmt_value(name, ch)}")
            continue
        bits = [
            f"{label} {fmt_value(key, ch[key])}"
            for key, label in (
                ("max_depth", "max depth"),
                ("wait_per_batch_seconds", "wait/batch"),
            )
            if key in ch
        ]
        parts.append(f"{name} " + ", ".join(bits) if bits else name)
    return "; ".join(parts)


# ---------------------------------------------------------------------------------------------
# Terminal summary


def summary_text(profile: Mapping[str, Any], out: Path | None = None) -> str:
    """A dozen lines for the terminal: throughput, CPU, stage shares, hottest functions."""
    lines: list[str] = []
    tr = profile.get("traffic")
    head = f"ipop-trio profile ({profile['mode']}): {profile['interval_s']:.1f} s recorded"
    if tr:
        head += (
            f", iperf3 {tr['from']} -> {tr['to']} over a {tr.get('link_mode') or '?'} link"
            f" ({tr.get('cipher')})"
        )
    lines.append(head)
    if tr:
        lines.append(
            f"  throughput {tr['throughput_mbps']:.1f} Mbit/s, RTT p50 {_f(tr.get('rtt_p50_ms'))}"
            f" ms p99 {_f(tr.get('rtt_p99_ms'))} ms, retransmits {_f(tr.get('retransmits'), '{}')}"
        )
    for name, node in profile["nodes"].items():
        cpu = node["cpu"]
        util = cpu.get("utilisation")
        line = f"  {name:<6} {node['role']:<8} CPU {cpu['seconds']:.2f} s ({_pct(util)} of a core)"
        cons = node.get("consistency")
        lines.append(line)
        if cons:
            wait = cons.get("runqueue_wait_seconds")
            verdict = "consistent" if cons["consistent"] else "INCONSISTENT: a timer may be off"
            lines.append(
                f"         stage timers {cons['stage_seconds']:.2f} s = {_pct(cons['ratio'])} of"
                " CPU"
                + (
                    f", {_pct(cons['ratio_busy'])} of CPU + run-queue wait ({wait:.2f} s)"
                    if wait is not None
                    else ""
                )
                + f" ({verdict})"
            )
        rows = [r for r in node.get("stages") or [] if r["seconds"] > 0]
        rows.sort(key=lambda r: -r["seconds"])
        if rows:
            parts = [f"{r['stage']} {r['share'] * 100:.0f}%" for r in rows[:4]]
            lines.append("         where the time goes: " + ", ".join(parts))
        samples = node["pyspy"]["samples"] or 0
        hot = list((node.get("datapath_functions") or {}).items())[:4]
        if hot and samples:
            parts = [f"{name.split(' (')[0]} {n / samples * 100:.0f}%" for name, n in hot]
            lines.append("         hottest data-path code (py-spy, inclusive): " + ", ".join(parts))
        if node.get("channels"):
            lines.append("         channels: " + _channels_text(node["channels"]))
        if node.get("drops"):
            lines.append(
                "         drops: "
                + ", ".join(f"{k} {fmt_value(k, v)}" for k, v in node["drops"].items())
            )
    if out is not None:
        lines.append(f"  report: {out / 'report.html'}")
        files = ["stages.json"] + [f"{n}/flamegraph.svg" for n in profile["nodes"]]
        lines.append(f"  also:   {', '.join(files)}, */profile.speedscope.json")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# HTML


def _cards(profile: Mapping[str, Any]) -> str:
    cards = []
    tr = profile.get("traffic")
    if tr:
        cards.append(("throughput", f"{tr['throughput_mbps']:.0f} Mbit/s", "iperf3, received"))
        cards.append(
            (
                "RTT p50 / p99",
                f"{_f(tr.get('rtt_p50_ms'))} / {_f(tr.get('rtt_p99_ms'))}",
                "ms, ping through the overlay",
            )
        )
    for name, node in profile["nodes"].items():
        cpu = node["cpu"]
        sub = f"{cpu['seconds']:.2f} s CPU in {node['interval_s']:.1f} s"
        if cpu.get("rss_mb_max") is not None:
            sub += f", RSS {cpu['rss_mb_max']:.0f} MB"
        cards.append((f"{name} ({node['role']})", f"{_pct(cpu.get('utilisation'))} CPU", sub))
        if tr and tr.get("bytes"):
            per_gb = cpu["seconds"] / (tr["bytes"] / 1e9)
            cards.append((f"{name} CPU per GB", f"{per_gb:.2f} s", "of iperf3 data"))
    html = "".join(
        f'<div class="card"><span>{escape(t)}</span><b>{escape(v)}</b>'
        f"<span>{escape(s)}</span></div>"
        for t, v, s in cards
    )
    return f'<div class="cards">{html}</div>'


def _stage_table(node: Mapping[str, Any]) -> str:
    rows = node.get("stages")
    if not rows:
        return '<p class="note">No stage timers: the node\'s control socket was not found.</p>'
    cpu = node["cpu"]["seconds"]
    scale = max([r["seconds"] for r in rows] + [cpu, 1e-9])
    out = [
        "<table><tr><th class=l>stage</th><th>dir</th><th>batches</th><th>items</th>"
        "<th>items/batch</th><th>µs/batch</th><th>ns/item</th><th>MB</th><th>seconds</th>"
        "<th>share</th><th class=l></th></tr>"
    ]
    for r in rows:
        cls = "bar in" if r["direction"] == "inbound" else "bar"
        width = r["seconds"] / scale * 320
        out.append(
            f"<tr><td class=l>{escape(r['label'])}</td><td>{r['direction'][:3]}</td>"
            f"<td>{r['batches']}</td><td>{r['items']}</td><td>{_f(r['mean_batch'], '{:.1f}')}</td>"
            f"<td>{_f(r['us_per_batch'], '{:.1f}')}</td><td>{_f(r['ns_per_item'], '{:.0f}')}</td>"
            f"<td>{r['bytes'] / 1e6:.1f}</td><td>{r['seconds']:.3f}</td><td>{_pct(r['share'])}</td>"
            f'<td class=l><span class="{cls}" style="width:{width:.0f}px"></span></td></tr>'
        )
    total = node["stage_seconds"] or 0.0
    rest = cpu - total
    out.append(
        f"<tr><td class=l><b>all stages</b></td><td></td><td></td><td></td><td></td><td></td>"
        f"<td></td><td></td><td><b>{total:.3f}</b></td><td></td><td></td></tr>"
    )
    out.append(
        f"<tr><td class=l>process CPU (utime + stime)</td><td></td><td></td><td></td><td></td>"
        f"<td></td><td></td><td></td><td>{cpu:.3f}</td><td></td>"
        f'<td class=l><span class="bar rest" style="width:{cpu / scale * 320:.0f}px"></span>'
        f"</td></tr>"
    )
    out.append("</table>")
    cons = node.get("consistency") or {}
    if cons.get("ratio") is not None:
        low, high = cons["bounds_seconds"]
        verdict = (
            '<span class="ok">consistent</span>'
            if cons["consistent"]
            else '<span class="warn">outside the expected bounds — a timer may be off</span>'
        )
        wait = cons.get("runqueue_wait_seconds")
        wait_text = (
            f" The node's threads also waited {wait:.2f} s for a CPU (run queue, schedstat): "
            f"stages = {_pct(cons['ratio_busy'])} of CPU + wait."
            if wait is not None
            else ""
        )
        out.append(
            f'<p class="note">Stage timers add up to {_pct(cons["ratio"])} of the process\'s CPU '
            f"time ({verdict}: expected {low:.2f}–{high:.2f} s).{wait_text} The timers are "
            f"wall-clock spans around each stage: CPU spent outside them (Trio's scheduler, "
            f"epoll, keepalives: {max(rest, 0):.2f} s at most) lowers the ratio; time a stage "
            f"is runnable but not running (a busy machine), or sleeping (the TAP writer thread "
            f"waiting for the GIL), raises it.</p>"
        )
    return "\n".join(out)


def _hist_table(node: Mapping[str, Any]) -> str:
    rows = [r for r in node.get("stages") or [] if r["batches"]]
    if not rows:
        return ""
    width = max(len(r["batch_hist"]) for r in rows)
    labels = stages.bucket_labels(width)
    used = [
        i
        for i in range(width)
        if any(i < len(r["batch_hist"]) and r["batch_hist"][i] for r in rows)
    ]
    out = ['<table class="hist"><tr><th class=l>batch size →</th>']
    out += [f"<th>{escape(labels[i])}</th>" for i in used] + ["</tr>"]
    for r in rows:
        n = r["batches"] or 1
        out.append(f"<tr><td class=l>{escape(r['stage'])}</td>")
        for i in used:
            c = r["batch_hist"][i] if i < len(r["batch_hist"]) else 0
            alpha = c / n
            out.append(
                f'<td style="background:rgba(240,130,40,{alpha:.2f})" '
                f'title="{c} batches">{c / n * 100:.0f}%</td>'
            )
        out.append("</tr>")
    out.append("</table>")
    return "".join(out)


def _extras(node: Mapping[str, Any]) -> str:
    parts = []
    drops = node.get("drops")
    if drops:
        parts.append("<h3>Drops</h3>" + mapping_table(drops, name="reason", value="count"))
    elif drops is not None:
        parts.append('<p class="note">No drops during the interval.</p>')
    gauges = (node.get("gauges") or {}).get("polled") or {}
    if gauges:
        parts.append(
            "<h3>Gauges (polled while recording)</h3>"
            + mapping_table(gauges, name="gauge", columns={"samples": "polls"})
        )
    if node.get("channels"):
        parts.append(
            "<h3>Channels</h3>"
            + mapping_table(channel_rows(node["channels"]), name="channel", columns=CHANNEL_COLUMNS)
            + '<p class="note">Batches taken and queue wait (time from put to take, summed) '
            "over the interval; depths as the closing snapshot saw them.</p>"
        )
    threads = node["cpu"].get("threads") or []
    if threads:
        items = "".join(
            f"<tr><td>{escape(t['tid'])}</td><td class=l>{escape(t['name'] or '?')}</td>"
            f"<td>{escape(fmt_value('seconds', t['seconds']))}</td></tr>"
            for t in threads
        )
        parts.append(
            "<h3>CPU per thread</h3><table><tr><th>tid</th><th class=l>thread</th>"
            f"<th>CPU</th></tr>{items}</table>"
        )
    if node.get("missing"):
        items = "".join(f"<li>{escape(m)}</li>" for m in node["missing"])
        parts.append(
            '<p class="note">Not reported by this node\'s stats yet:</p>'
            f'<ul class="note">{items}</ul>'
        )
    return "\n".join(parts)


def _above_html(above: Mapping[calltree.Stack, int]) -> str:
    """The grey ``… unrolled_run →`` before a data-path root: the last function of the chain
    most of its samples came through, every chain and its samples in the tooltip."""
    chains = sorted(above.items(), key=lambda kv: (-kv[1], kv[0]))
    if not chains or (len(chains) == 1 and not chains[0][0]):
        return ""
    tip = "\n".join(
        f"{n} sample{'s' if n != 1 else ''}: "
        + (" → ".join(chain) if chain else "(the stack starts here)")
        for chain, n in chains
    )
    top = chains[0][0]
    text = f"… {calltree.frame_origin(top[-1])} →" if top else "…"
    if len(chains) > 1:
        text = f"{text} (+{len(chains) - 1} other path{'s' if len(chains) > 2 else ''})"
    return f'<span class="el" title="elided above: {escape(tip)}">{escape(text)}</span> '


def _tree_html(
    root: calltree.Node, above: Mapping[str, Mapping[calltree.Stack, int]] | None = None
) -> str:
    """`root`'s children as nested <details>, shares of `root.total`; with `above`, each
    top-level row starts with what was elided above it (`_above_html`)."""
    total = root.total or 1

    def name_html(name: str) -> str:
        cls = ' class="dp"' if calltree.is_datapath(name) else ""
        return f"<span{cls}>{escape(name)}</span>"

    def visit(node: calltree.Node) -> list[str]:
        out: list[str] = []
        top = node is root and above is not None
        for child in node.sorted_children():
            share = child.total / total
            if share < TREE_MIN_SHARE:
                continue
            # A chain that hands all its samples to one child is shown as one line.
            chain = [child]
            while len(chain[-1].children) == 1 and chain[-1].self == 0 and len(chain) < 12:
                chain.append(next(iter(chain[-1].children.values())))
            last = chain[-1]
            label = " → ".join(name_html(c.name) for c in chain)
            if top and above is not None:
                label = _above_html(above.get(child.name) or {}) + label
            head = (
                f'<span class="p">{share * 100:.1f}%</span>'
                f'<span class="s">self {last.self / total * 100:.1f}%</span> {label}'
            )
            kids = visit(last)
            if kids:
                opened = " open" if share >= TREE_OPEN_SHARE else ""
                out.append(f"<details{opened}><summary>{head}</summary>{''.join(kids)}</details>")
            else:
                out.append(f'<div class="leaf">{head}</div>')
        return out

    return '<div class="tree">' + "".join(visit(root)) + "</div>"


def _datapath_trees(stacks: Sequence[tuple[calltree.Stack, int]]) -> str:
    """Per thread: its share of the node's samples, what was elided above the data path,
    the tree from the first data-path frame down (shares of the thread's samples), and where
    the rest of its samples were."""
    views = calltree.datapath_view(stacks)
    everything = sum(v.samples for v in views) or 1
    out: list[str] = []
    for view in views:
        inside = view.samples - view.outside
        head = (
            f"<b>{escape(calltree.thread_label(view.thread))}</b>: {view.samples} samples "
            f"({_pct(view.samples / everything)} of the node's), {_pct(inside / view.samples)} "
            "of them in the data path"
        )
        chains: dict[calltree.Stack, int] = {}
        for above in view.above.values():
            for chain, n in above.items():
                chains[chain] = chains.get(chain, 0) + n
        common = max(chains.items(), key=lambda kv: (kv[1], kv[0]), default=((), 0))[0]
        if common:
            head += (
                f'; elided above it: <span class="el" title="{escape(" → ".join(common))}">'
                f"{escape(calltree.describe_chain(common))}</span> ({len(common)} frames)"
            )
        out.append(f'<p class="thread">{head}</p>')
        if inside:
            out.append(_tree_html(view.root, view.above))
        if view.outside:
            leaves = sorted(view.outside_leaves.items(), key=lambda kv: (-kv[1], kv[0]))[:4]
            where = ", ".join(
                f"{escape(calltree.parse_frame(name).name)} {_pct(n / view.samples)}"
                for name, n in leaves
            )
            out.append(
                f'<p class="note">Outside the data path: {_pct(view.outside / view.samples)} '
                f"of this thread's samples; innermost there: {where}.</p>"
            )
    return "".join(out)


def _hot_table(node: Mapping[str, Any]) -> str:
    rows = node.get("hot_functions") or []
    if not rows:
        return ""
    out = [
        "<table><tr><th class=l>function</th><th>inclusive</th><th>self</th><th>samples</th></tr>"
    ]
    for r in rows[:15]:
        dp = calltree.is_datapath(r["function"])
        name = f'<span class="dp">{escape(r["function"])}</span>' if dp else escape(r["function"])
        out.append(
            f"<tr><td class=l>{name}</td><td>{_pct(r['inclusive_share'])}</td>"
            f"<td>{_pct(r['self_share'])}</td><td>{r['inclusive']}</td></tr>"
        )
    out.append("</table>")
    return "".join(out)


def render_html(
    profile: Mapping[str, Any], out: Path, svgs: Mapping[str, str] | None = None
) -> str:
    """The report page. Reads each node's py-spy raw file under `out` for the call tree;
    `svgs` are the flame graphs (read from `out` when not given)."""
    tr = profile.get("traffic")
    title = "ipop-trio profile"
    if tr:
        desc = (
            f"lab: iperf3 {tr['from']} → {tr['to']}, {tr['seconds']:g} s, "
            f"{tr.get('streams', 1)} stream(s), {tr.get('link_mode') or '?'} link, "
            f"{tr.get('cipher')}"
        )
    else:
        desc = f"running node(s): {', '.join(profile['nodes'])}, {profile['interval_s']:.1f} s"
    m = profile.get("machine") or {}
    machine = (
        f"{m.get('cpu', '?')} ×{m.get('nproc', '?')}, Linux {m.get('kernel', '?')}, "
        f"Python {m.get('python', '?')}, cryptography {m.get('cryptography', '?')}"
    )
    body = [
        f"<h1>{escape(title)}</h1>",
        f'<div class="sub">{escape(desc)} · {escape(machine)} · {escape(profile["created"])}</div>',
        _cards(profile),
        "<h2>Where the time goes</h2>",
        '<p class="note">From the node\'s always-on stage timers (ipop_trio/stats.py): the '
        "difference of two snapshots taken at the start and the end of the recording. "
        "Orange bars: outbound (TAP → UDP); blue: inbound (UDP → TAP); grey: the process's "
        "CPU time over the same interval.</p>",
    ]
    for name, node in profile["nodes"].items():
        body.append(f"<h3>{escape(name)} ({escape(node['role'])}, pid {node['pid']})</h3>")
        body.append(_stage_table(node))
        hist = _hist_table(node)
        if hist:
            body.append("<h3>Batch sizes (share of each stage's batches)</h3>" + hist)
        body.append(_extras(node))
    body.append("<h2>Call tree (top-down, from py-spy samples)</h2>")
    body.append(
        '<p class="note">Per thread, from the data path down: each tree starts at the first '
        "data-path frame of its stacks; what ran above it (thread start, runpy, the CLI, Trio's "
        "run loop) is elided, shown grey (hover for every chain and its samples). Each line: "
        "share of the thread's busy samples with this function on the stack (inclusive), the "
        "share where it was the innermost frame (self), and the function. Chains that pass "
        "every sample on are joined with →. Data-path code is "
        '<span class="dp">highlighted</span>. Idle threads are not sampled. The full tree, '
        "from each thread's first frame and in shares of all the node's samples, is folded "
        "below.</p>"
    )
    for name, node in profile["nodes"].items():
        raw = out / node["pyspy"]["raw"]
        stacks = calltree.parse_collapsed(raw.read_text()) if raw.exists() else []
        spy = node["pyspy"]
        body.append(
            f"<h3>{escape(name)}: {spy['samples']} samples at {spy['rate']} Hz "
            f"(≈{spy['busy_seconds']:.2f} busy thread-seconds)</h3>"
        )
        body.append(_hot_table(node))
        body.append(_datapath_trees(stacks))
        body.append(
            f'<details class="full"><summary>Full call tree of {escape(name)}</summary>'
            f"{_tree_html(calltree.build_tree(stacks))}</details>"
        )
    body.append("<h2>Flame graphs</h2>")
    body.append(
        '<p class="note">Width is samples; the root is at the bottom. Hover a frame for its '
        "numbers; click it to zoom (it fills the width, its callers stay below it; “Reset "
        "zoom” or a click on the root undoes it); “Search” highlights the frames whose name "
        "matches a regular expression and says what share of the samples they cover. The "
        "same samples in another viewer: open <code>NODE/profile.speedscope.json</code> in "
        "speedscope.</p>"
    )
    for name, node in profile["nodes"].items():
        svg = (svgs or {}).get(name)
        if svg is None:
            path = out / node["pyspy"]["flamegraph"]
            svg = path.read_text() if path.exists() else ""
        body.append(f'<h3>{escape(name)}</h3><div class="svg">{svg}</div>')
        if node.get("scalene"):
            sc = node["scalene"]
            body.append(
                f'<p class="note">scalene line profile: <code>{escape(sc["html"])}</code>, '
                f"<code>{escape(sc['json'])}</code></p>"
            )
    files = ["stages.json"] + (["bench.json"] if tr else [])
    for node in profile["nodes"].values():
        files += [node["pyspy"]["flamegraph"], node["pyspy"]["speedscope"], node["pyspy"]["raw"]]
    body.append(
        '<p class="sub">Files: ' + ", ".join(f"<code>{escape(f)}</code>" for f in files) + "</p>"
    )
    return (
        "<!doctype html>\n<html lang=en><head><meta charset=utf-8>"
        f"<title>{escape(title)}</title><style>{CSS}</style></head><body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )


__all__ = ["render_html", "summary_text"]
