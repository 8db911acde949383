"""The profile as one self-contained HTML page, and as a short terminal summary.

The page answers, in order: how fast and at what CPU cost (throughput, CPU per node), where
the time goes (the stage timers: a table and bars per node, batch sizes, drops, queue gauges),
which code (a top-down call tree with inclusive percentages from the py-spy samples, Zoom's
view, and the hottest functions), and the flame graphs, inlined with their zoom-and-search
script. No external resource: it can be mailed or attached to an issue. Pure: the profile
dict in, text out.
"""

from __future__ import annotations

from collections.abc import Mapping
from html import escape
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
code{background:#f4f4f4;padding:1px 4px;border-radius:3px}
"""


def _f(value: Any, fmt: str = "{:.2f}", dash: str = "–") -> str:
    return dash if value is None else fmt.format(value)


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{x * 100:.1f}%"


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
        if node.get("drops"):
            lines.append(
                "         drops: " + ", ".join(f"{k} {v}" for k, v in node["drops"].items())
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
        items = "".join(
            f"<tr><td class=l>{escape(k)}</td><td>{v}</td></tr>" for k, v in drops.items()
        )
        parts.append(
            f"<h3>Drops</h3><table><tr><th class=l>reason</th><th>count</th></tr>{items}</table>"
        )
    elif drops is not None:
        parts.append('<p class="note">No drops during the interval.</p>')
    gauges = (node.get("gauges") or {}).get("polled") or {}
    if gauges:
        items = "".join(
            f"<tr><td class=l>{escape(k)}</td><td>{g['samples']}</td><td>{g['min']:.0f}</td>"
            f"<td>{g['mean']:.2f}</td><td>{g['max']:.0f}</td></tr>"
            for k, g in gauges.items()
        )
        parts.append(
            "<h3>Channel depths (polled while recording)</h3><table><tr><th class=l>gauge</th>"
            f"<th>polls</th><th>min</th><th>mean</th><th>max</th></tr>{items}</table>"
        )
    if node.get("channels"):
        items = "".join(
            f"<tr><td class=l>{escape(k)}</td><td class=l><code>{escape(str(v))}</code></td></tr>"
            for k, v in node["channels"].items()
        )
        parts.append(f"<h3>Channels</h3><table>{items}</table>")
    threads = node["cpu"].get("threads") or []
    if threads:
        items = "".join(
            f"<tr><td>{t['tid']}</td><td class=l>{escape(t['name'] or '?')}</td>"
            f"<td>{t['seconds']:.2f}</td></tr>"
            for t in threads
        )
        parts.append(
            "<h3>CPU per thread</h3><table><tr><th>tid</th><th class=l>thread</th>"
            f"<th>CPU s</th></tr>{items}</table>"
        )
    if node.get("missing"):
        items = "".join(f"<li>{escape(m)}</li>" for m in node["missing"])
        parts.append(
            '<p class="note">Not reported by this node\'s stats yet:</p>'
            f'<ul class="note">{items}</ul>'
        )
    return "\n".join(parts)


def _tree_html(root: calltree.Node) -> str:
    total = root.total or 1

    def name_html(name: str) -> str:
        cls = ' class="dp"' if calltree.is_datapath(name) else ""
        return f"<span{cls}>{escape(name)}</span>"

    def visit(node: calltree.Node) -> list[str]:
        out: list[str] = []
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
        '<p class="note">Each line: share of the node\'s busy samples with this function on the '
        "stack (inclusive), the share where it was the innermost frame (self), and the function. "
        "Chains that pass every sample on are joined with →. Data-path code is "
        '<span class="dp">highlighted</span>. Idle threads are not sampled.</p>'
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
        body.append(_tree_html(calltree.build_tree(stacks)))
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
