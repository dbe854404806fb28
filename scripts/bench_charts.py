"""The SVG charts of docs/BENCHMARKS.md's e2e section, and the names they share with the tables.

Used by scripts/bench_report.py; standard library only, the SVG is written by hand.
"""

from __future__ import annotations

import html
from typing import Any

PLACEMENT_TEXT = {
    "split": "split (server CPU 0, client CPU 1)",
    "same": "same CPU (both on CPU 1)",
}
COLORS = {"split": "#3b6ea8", "same": "#d08a2c"}
SYSTEM_TEXT = {
    "floor": "floor (std UnixStream echo, buffered)",
    "floor+epoll": "epoll floor (the same echo, waiting in epoll_wait)",
    "blocking": "blocking ↔ blocking",
    "tokio": "tokio ↔ tokio",
    "blocking-tokio": "blocking client ↔ tokio server",
    "tokio-blocking": "tokio client ↔ blocking server",
    "blocking+kbuf": "blocking ↔ blocking, system's default send buffers (`send_buffer(0)`)",
    "tokio+kbuf": "tokio ↔ tokio, system's default send buffers (`send_buffer(0)`)",
    "blocking+shm": "blocking ↔ blocking over shared memory",
    "tokio+shm": "tokio ↔ tokio over shared memory",
    "blocking-tokio+shm": "blocking client ↔ tokio server over shared memory",
    "tokio-blocking+shm": "tokio client ↔ blocking server over shared memory",
}


def find(results: list[dict[str, Any]], scenario: str, system: str) -> dict[str, Any] | None:
    for r in results:
        if r["scenario"] == scenario and r["system"] == system:
            return r
    return None


def svg_text(x: float, y: float, s: str, size: int = 12, anchor: str = "start", weight: str = "normal",
             fill: str = "#222") -> str:
    return (f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" '
            f'font-weight="{weight}" fill="{fill}">{html.escape(s)}</text>')


def svg_head(width: int, height: int, left: int, placements: list[dict[str, Any]], title: str,
             subtitle: str) -> list[str]:
    """A chart's opening: the SVG element, white background, title, subtitle, placement legend."""
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="Helvetica, Arial, sans-serif">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           svg_text(width / 2, 22, title, 15, "middle", "bold"),
           svg_text(width / 2, 40, subtitle, 11, "middle", fill="#555")]
    for i, pl in enumerate(placements):
        x = left + i * 200
        out.append(f'<rect x="{x}" y="50" width="12" height="10" fill="{COLORS[pl["placement"]]}"/>')
        out.append(svg_text(x + 16, 59, PLACEMENT_TEXT[pl["placement"]], 11))
    return out


def latency_svg(placements: list[dict[str, Any]]) -> str:
    """32 B round trip: p50 bars with p99 and p99.9 marks, per system, both placements."""
    systems = [r["system"] for r in placements[0]["results"] if r["scenario"] == "latency_32"]
    width, row_h, left, right = 960, 22, 250, 250
    top = 70
    height = top + len(systems) * (row_h * len(placements) + 14) + 60
    # The scale follows the p99s, but not past 4× the slowest p50: one stray p99 of a noisy run
    # must not squash every bar (longer whiskers end in an arrow at the edge).
    p99_max = p50_max = 0.0
    for p in placements:
        for s in systems:
            r = find(p["results"], "latency_32", s)
            if r:
                p99_max = max(p99_max, r["p99_us"])
                p50_max = max(p50_max, r["p50_us"])
    vmax = nice_ceiling(min(p99_max, 4 * p50_max) * 1.05)
    plot_w = width - left - right
    scale = plot_w / vmax
    out = svg_head(width, height, left, placements, "32 B echo round trip, client and server in separate pinned "
                   "processes", "bar: p50 · thin line: p50 to p99 · tick: p99.9 (when in range) · "
                   "label: p50 as a ratio to the floor of the same run")
    # Grid.
    bottom = height - 40
    for t in ticks(vmax):
        gx = left + t * scale
        out.append(f'<line x1="{gx:.1f}" y1="{top - 4}" x2="{gx:.1f}" y2="{bottom}" stroke="#e4e4e4"/>')
        out.append(svg_text(gx, bottom + 14, f"{t:g}", 10, "middle", fill="#555"))
    out.append(svg_text(left + plot_w / 2, bottom + 30, "microseconds", 11, "middle", fill="#555"))
    y = top
    for s in systems:
        out.append(svg_text(left - 8, y + row_h * len(placements) / 2 + 4, SYSTEM_TEXT.get(s, s), 12, "end"))
        for pl in placements:
            r = find(pl["results"], "latency_32", s)
            if r is None:
                y += row_h
                continue
            color = COLORS[pl["placement"]]
            bw = r["p50_us"] * scale
            out.append(f'<rect x="{left}" y="{y + 3}" width="{bw:.1f}" height="{row_h - 6}" fill="{color}"/>')
            p99x = left + min(r["p99_us"], vmax) * scale
            cy = y + row_h / 2
            out.append(f'<line x1="{left + bw:.1f}" y1="{cy:.1f}" x2="{p99x:.1f}" y2="{cy:.1f}" '
                       f'stroke="{color}" stroke-width="1.5"/>')
            if r["p99_us"] <= vmax:
                out.append(f'<line x1="{p99x:.1f}" y1="{cy - 5:.1f}" x2="{p99x:.1f}" y2="{cy + 5:.1f}" '
                           f'stroke="{color}" stroke-width="1.5"/>')
            else:
                out.append(f'<path d="M{p99x - 6:.1f},{cy - 4:.1f} L{p99x:.1f},{cy:.1f} L{p99x - 6:.1f},{cy + 4:.1f}" '
                           f'fill="none" stroke="{color}" stroke-width="1.5"/>')
            if r["p999_us"] <= vmax:
                tx = left + r["p999_us"] * scale
                out.append(f'<line x1="{tx:.1f}" y1="{cy - 7:.1f}" x2="{tx:.1f}" y2="{cy + 7:.1f}" '
                           f'stroke="{color}" stroke-width="1" stroke-dasharray="2,2"/>')
            label = f'p50 {r["p50_us"]:.1f} µs ({r["ratio"]:.2f}×) · p99 {r["p99_us"]:.0f} µs'
            # In a column of their own, right of the plot.
            out.append(svg_text(width - right + 12, cy + 4, label, 11, fill="#222"))
            y += row_h
        y += 14
    out.append("</svg>")
    return "\n".join(out) + "\n"


def targets_svg(placements: list[dict[str, Any]], rows: list[list[Any]], title: str) -> str:
    """Each target as measured ÷ target (oriented so that left of the line meets it)."""
    names = [t.figure for t in rows[0]]
    width, row_h, left, right = 900, 18, 330, 150
    top = 70
    height = top + len(names) * (row_h * len(placements) + 10) + 50
    smax = 2.0
    plot_w = width - left - right
    scale = plot_w / smax
    out = svg_head(width, height, left, placements, title, "ratios to the socket floor of the same run; "
                   "\"at least\" targets inverted (target ÷ measured); bars past 2 are cut")
    bottom = height - 30
    for t in (0, 0.5, 1.0, 1.5, 2.0):
        gx = left + t * scale
        stroke = 'stroke="#c0392b" stroke-width="1.5"' if t == 1.0 else 'stroke="#e4e4e4"'
        out.append(f'<line x1="{gx:.1f}" y1="{top - 4}" x2="{gx:.1f}" y2="{bottom}" {stroke}/>')
        out.append(svg_text(gx, bottom + 14, f"{t:g}", 10, "middle", fill="#555"))
    y = top
    for k, name in enumerate(names):
        out.append(svg_text(left - 8, y + row_h * len(placements) / 2 + 4, name, 11, "end"))
        for pl, trow in zip(placements, rows):
            t = trow[k]
            sc = t.score()
            cy = y + row_h / 2
            if sc is None:
                out.append(svg_text(left + 4, cy + 4, "not measured", 10, fill="#888"))
            else:
                bw = min(sc, smax) * scale
                color = COLORS[pl["placement"]]
                faded = "" if t.met() else ' fill-opacity="0.55"'
                out.append(f'<rect x="{left}" y="{y + 2}" width="{bw:.1f}" height="{row_h - 4}" fill="{color}"{faded}/>')
                mark = "✓" if t.met() else "✗"
                out.append(svg_text(left + plot_w + 8, cy + 4, f"{mark} {t.shown}", 10,
                                    fill="#1e7b34" if t.met() else "#b03a2e"))
            y += row_h
        y += 10
    out.append("</svg>")
    return "\n".join(out) + "\n"


def nice_ceiling(v: float) -> float:
    candidates = sorted(s * 10 ** e for s in (1, 2, 2.5, 5) for e in range(-1, 7))
    return next(c for c in candidates if c >= v)


def ticks(vmax: float) -> list[float]:
    step = vmax / 5
    return [round(i * step, 6) for i in range(6)]
