"""Rendering pieces of the report: the section registry, numbers and sizes as text, tables as
(markdown, html), plots as inlined PNG images (matplotlib, the ``report`` extra)."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Callable
from typing import Any

Run = dict[str, Any]
Section = Callable[[Run], tuple[str, str] | None]
#: (order, title, renderer), rendered by ascending order.
SECTIONS: list[tuple[int, str, Section]] = []



def section(title: str, order: int) -> Callable[[Section], Section]:
    """Register a report section renderer at position ``order`` (ascending)."""

    def deco(fn: Section) -> Section:
        SECTIONS.append((order, title, fn))
        SECTIONS.sort(key=lambda s: s[0])
        return fn

    return deco


def fmt_bytes(n: float | None) -> str:
    """Human-readable bytes: ``fmt_bytes(1536)`` → ``'1.5 kB'`` (powers of 1000)."""
    if n is None:
        return "–"
    for unit, k in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= k:
            return f"{n / k:.3g} {unit}"
    return f"{n:.0f} B"


def fmt_num(x: Any, digits: int = 4) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        if x != 0 and (abs(x) >= 1e6 or abs(x) < 1e-3):
            return f"{x:.{digits - 1}e}"
        return f"{x:.{digits}g}"
    if isinstance(x, int) and not isinstance(x, bool):
        return f"{x:,}"
    return str(x)


def table(headers: list[str], rows: list[list[Any]]) -> tuple[str, str]:
    """A table as (markdown, html)."""
    md = "| " + " | ".join(headers) + " |\n|" + "---|" * len(headers) + "\n"
    md += "".join("| " + " | ".join(fmt_num(c) for c in r) + " |\n" for r in rows)
    th = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    trs = "".join(
        "<tr>" + "".join(f"<td>{html.escape(fmt_num(c))}</td>" for c in r) + "</tr>" for r in rows
    )
    return md, f"<table><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>"


def figure(draw: Callable[[Any], None], *, width: float = 7.0, height: float = 3.2) -> str:
    """Render ``draw(ax)`` with matplotlib into an inlined PNG ``<img>``; a note if matplotlib is
    missing (the ``report`` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        return "<p class=note>Plots need matplotlib: pip install 'squeezer[report]'.</p>"
    fig, ax = plt.subplots(figsize=(width, height), dpi=110)
    try:
        draw(ax)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
    finally:
        plt.close(fig)
    data = base64.b64encode(buf.getvalue()).decode()
    return f'<img alt="plot" src="data:image/png;base64,{data}">'



def text_table(rows: list[list[Any]], headers: list[str]) -> str:
    """A plain-text table for the terminal: numeric columns (numbers, sizes, ratios, "–")
    right-aligned, text left.

    Example:
        >>> print(text_table([["a", "1.5"]], ["name", "x"]))
        name    x
        ----  ---
        a     1.5
    """
    rows = [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
    numeric = [i > 0 and all(_looks_numeric(r[i]) for r in rows) for i in range(len(headers))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip(),
             "  ".join("-" * w for w in widths)]  # fmt: skip
    for r in rows:
        cells = zip(r, widths, numeric, strict=True)
        lines.append("  ".join(c.rjust(w) if n else c.ljust(w) for c, w, n in cells).rstrip())
    return "\n".join(lines)


def _looks_numeric(text: str) -> bool:
    """ "99.55", "293 kB", "1.00x", "–": what a numeric column holds."""
    head = text.split(" ")[0].rstrip("x×%")
    if head in ("–", "-", ""):
        return True
    try:
        float(head.replace(",", ""))
    except ValueError:
        return False
    return True


def text_summary(metrics: dict[str, Any]) -> str:
    """The terminal summary of a compression run's ``metrics.json``: each variant's metric, size
    and average bits, and a note naming the weights that stay in float."""
    from ..graph import QUANTIZABLE_TYPES

    rows = [
        [v["name"], "–" if v.get("metric") is None else f"{v['metric']:.2f}",
         fmt_bytes(v["size_bytes"]), f"{v['avg_bits']:.2f}"]
        for v in metrics.get("variants", [])
    ]  # fmt: skip
    out = text_table(rows, ["variant", metrics.get("metric_name") or "metric", "size", "avg bits"])
    floats = metrics.get("float_layers") or {}
    if floats:
        n = sum(v["weights"] for v in floats.values())
        total = n + sum(r["params"] for r in metrics.get("layers", []))
        listed = ", ".join(
            f"{k} ({v['type']}, {v['weights']:,})" for k, v in list(floats.items())[:4]
        )
        more = f" and {len(floats) - 4} more" if len(floats) > 4 else ""
        kinds = ", ".join(t.__name__ for t in QUANTIZABLE_TYPES)
        out += (
            f"\nnote: {n / total:.0%} of the weights stay in float, in layers squeezer does not "
            f"quantize (it quantizes {kinds}): {listed}{more}"
        )
    return out


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body {{ font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto;
       max-width: 70rem; padding: 0 1rem; color: #222; }}
h1 {{ margin-bottom: 0.2rem; }} .sub {{ color: #666; margin-top: 0; }}
section {{ margin: 2rem 0; }}
table {{ border-collapse: collapse; font-size: 0.9rem; }}
th, td {{ border-bottom: 1px solid #ddd; padding: 0.3rem 0.7rem; text-align: right; }}
th:first-child, td:first-child {{ text-align: left; }}
thead th {{ background: #f4f4f4; }}
img {{ max-width: 100%; }} .note {{ color: #a60; }}
footer {{ color: #888; font-size: 0.8rem; margin-top: 3rem; }}
</style></head>
<body><h1>{title}</h1><p class="sub">{subtitle}</p>
{body}
<footer>written by squeezer {version}</footer>
</body></html>
"""
