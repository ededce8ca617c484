"""The run report: a self-contained ``report.html`` (plots inlined as PNG data URIs) and ``report.md``,
rendered from the JSON files of a run folder, so ``squeezer report DIR`` can always re-write it.

Each section is a function of the loaded run that returns (markdown, html) or None when its inputs
are absent; later stages add sections by appending to :data:`SECTIONS`.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .config import write_text_atomic
from .graph import QUANTIZABLE_TYPES

Run = dict[str, Any]
Section = Callable[[Run], tuple[str, str] | None]
SECTIONS: list[tuple[str, Section]] = []


def section(title: str) -> Callable[[Section], Section]:
    """Register a report section renderer."""

    def deco(fn: Section) -> Section:
        SECTIONS.append((title, fn))
        return fn

    return deco


def load_run(run_dir: str | Path) -> Run:
    """Every JSON file of a run folder, keyed by file stem (``metrics``, ``plan``, ``spectrum``...)."""
    run: Run = {"dir": Path(run_dir)}
    for f in sorted(Path(run_dir).glob("*.json")):
        try:
            run[f.stem] = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError):
            continue
    return run


def write_report(run_dir: str | Path) -> tuple[Path, Path]:
    """Render ``report.md`` and ``report.html`` into ``run_dir`` from its JSON files."""
    run = load_run(run_dir)
    title = "squeezer report"
    man = run.get("manifest", {})
    subtitle = " · ".join(
        str(x) for x in (man.get("model"), man.get("data"), man.get("budget")) if x
    )
    md_parts = [f"# {title}\n", f"{subtitle}\n" if subtitle else ""]
    html_parts = []
    for name, fn in SECTIONS:
        out = fn(run)
        if out is None:
            continue
        md, body = out
        md_parts.append(f"\n## {name}\n\n{md}\n")
        html_parts.append(f"<section><h2>{html.escape(name)}</h2>\n{body}\n</section>")
    md_text = "".join(md_parts)
    page = _PAGE.format(
        title=html.escape(title),
        subtitle=html.escape(subtitle),
        body="\n".join(html_parts),
        version=html.escape(str(man.get("version", ""))),
    )
    d = Path(run_dir)
    write_text_atomic(d / "report.md", md_text)
    write_text_atomic(d / "report.html", page)
    return d / "report.html", d / "report.md"


# --------------------------------------------------------------------------------------------------
# helpers


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


# --------------------------------------------------------------------------------------------------
# sections


@section("Summary")
def _summary(run: Run) -> tuple[str, str] | None:
    m = run.get("metrics")
    if not m:
        return None
    name = m.get("metric_name") or "metric"
    b, a = m.get("before", {}), m.get("after", {})
    rows = [
        [name, b.get("metric"), a.get("metric"), _delta(a.get("metric"), b.get("metric"))],
        [
            "size",
            fmt_bytes(b.get("size_bytes")),
            fmt_bytes(a.get("size_bytes")),
            _ratio(b.get("size_bytes"), a.get("size_bytes")),
        ],
        ["average weight bits", b.get("avg_bits"), a.get("avg_bits"), ""],
        ["BOPs per sample", b.get("bops"), a.get("bops"), _ratio(b.get("bops"), a.get("bops"))],
    ]
    for key, label in (("latency_ms", "latency (ms, batch 1)"),):
        if b.get(key) is not None or a.get(key) is not None:
            rows.append([label, b.get(key), a.get(key), _ratio(b.get(key), a.get(key))])
    md, body = table(["", "before (FP32)", "after", "change"], rows)
    floats = m.get("float_layers") or {}
    if floats:
        listed = ", ".join(
            f"{k} ({v['type']}, {v['weights']:,} weights)" for k, v in floats.items()
        )
        *first, last = (t.__name__ for t in QUANTIZABLE_TYPES)
        note = (
            f"Kept in float (squeezer quantizes {', '.join(first)} and {last} weights): {listed}."
        )
        md += "\n" + note + "\n"
        body += f"<p class=note>{html.escape(note)}</p>"
    return md, body


def _delta(a: Any, b: Any) -> str:
    return f"{a - b:+.2f}" if isinstance(a, int | float) and isinstance(b, int | float) else ""


def _ratio(before: Any, after: Any) -> str:
    if isinstance(before, int | float) and isinstance(after, int | float) and after:
        return (
            f"{before / after:.2f}× smaller" if before >= after else f"{after / before:.2f}× larger"
        )
    return ""


@section("Variants")
def _variants(run: Run) -> tuple[str, str] | None:
    m = run.get("metrics") or {}
    vs = m.get("variants")
    if not vs:
        return None
    name = m.get("metric_name") or "metric"
    rows = [
        [v["name"], v.get("metric"), fmt_bytes(v.get("size_bytes")), v.get("avg_bits")] for v in vs
    ]
    md, body = table(["variant", name, "size", "avg weight bits"], rows)

    measured = [v for v in vs if v.get("metric") is not None]
    if not measured:
        return md, body

    def draw(ax):
        # Variants often share a metric at nearby sizes: stagger the labels over four heights,
        # each tied to its point by a thin line, so none covers another.
        offsets = ((8, 10), (8, -16), (8, 24), (8, -30))
        for k, v in enumerate(sorted(measured, key=lambda v: v["size_bytes"])):
            ax.scatter(v["size_bytes"] / 1e3, v["metric"], s=40, zorder=3)
            ax.annotate(
                v["name"],
                (v["size_bytes"] / 1e3, v["metric"]),
                fontsize=8,
                xytext=offsets[k % len(offsets)],
                textcoords="offset points",
                arrowprops={"arrowstyle": "-", "lw": 0.5, "color": "0.5"},
            )
        ax.margins(x=0.12, y=0.35)
        ax.set_xlabel("model size (kB)")
        ax.set_ylabel(name)
        ax.set_title(f"{name} vs size")

    return md, body + figure(draw)


@section("Layers")
def _layers(run: Run) -> tuple[str, str] | None:
    m = run.get("metrics") or {}
    layers = m.get("layers")
    if not layers:
        return None
    headers = ["layer", "type", "params", "MACs", "bits", "act bits", "rel. error"]
    rows = [
        [
            r["fqn"],
            r["type"],
            r["params"],
            r["macs"],
            r.get("bits"),
            r.get("act_bits") or "–",
            r.get("rel_error"),
        ]
        for r in layers
    ]
    md, body = table(headers, rows)

    def draw(ax):
        names = [r["fqn"] for r in layers]
        xs = range(len(names))
        ax.bar(xs, [r.get("bits") or 32 for r in layers], color="#4c72b0", label="weight bits")
        ax.set_ylabel("weight bits")
        ax.set_xticks(list(xs), names, rotation=60, ha="right", fontsize=7)
        ax2 = ax.twinx()
        ax2.plot(
            list(xs),
            [r.get("rel_error") or 0 for r in layers],
            "o-",
            color="#dd8452",
            label="relative error",
        )
        ax2.set_ylabel("‖Q(W) − W‖ / ‖W‖")
        ax.set_title("per-layer bits and quantization error")

    return md, body + figure(draw, height=3.6)


@section("Hessian spectrum")
def _spectrum(run: Run) -> tuple[str, str] | None:
    from .spectrum import report_section

    return report_section(run.get("spectrum"))


@section("Deployment")
def _deployment(run: Run) -> tuple[str, str] | None:
    from .export import report_section

    return report_section(run.get("metrics"))


@section("Mixed precision")
def _mixed(run: Run) -> tuple[str, str] | None:
    pareto, plan = run.get("pareto"), run.get("plan") or {}
    sens = run.get("sensitivity")
    if not pareto and not sens:
        return None
    meta = plan.get("meta", {})
    md, body = "", ""
    loss = (run.get("metrics") or {}).get("loss") or {}
    if loss:
        kl = (sens or {}).get("method") == "kl"
        seen = "training samples" if kl else "training samples the Hessian saw"
        rows = [
            ["loss, FP32", loss.get("fp32"), loss.get("train_fp32")],
            ["loss, compressed", loss.get("after"), loss.get("train_after")],
            ["measured increase", loss.get("increase"), loss.get("train_increase")],
        ]
        tm, th = table(["", "test split", seen], rows)
        predicted = loss.get("predicted_increase")
        if predicted is not None:
            what = (
                "Σ per-layer output KL on distilled data (a ranking, not a loss)"
                if kl
                else "ΣΩ, a second-order estimate of the weights' share of the increase on the "
                "Hessian's training samples"
            )
            note = f"Predicted: {fmt_num(predicted)} ({what})."
            tm, th = tm + "\n" + note + "\n", th + f"<p>{html.escape(note)}</p>"
        md += tm + "\n"
        body += th
    if pareto:
        chosen = meta.get("achieved", {}).get("size_bytes")
        chosen_omega = meta.get("predicted_omega")

        def draw(ax):
            xs = [p["cost"] / 1e3 for p in pareto]
            ys = [p["omega"] for p in pareto]
            ax.step(xs, ys, where="post", marker="o", ms=3, label="Pareto frontier (ILP optimum)")
            if chosen is not None and chosen_omega is not None:
                ax.scatter(
                    [chosen / 1e3],
                    [chosen_omega],
                    s=90,
                    color="#c44e52",
                    zorder=5,
                    label="chosen plan",
                )
            ax.set_xlabel("model size (kB)")
            ax.set_ylabel("predicted loss increase ΣΩ")
            ax.set_yscale("symlog", linthresh=max(min([y for y in ys if y > 0] or [1e-6]), 1e-9))
            ax.legend(fontsize=8)
            ax.set_title("size vs predicted sensitivity")

        body += figure(draw)
        md += "The Pareto frontier and the chosen point are plotted in report.html.\n\n"
    if sens:
        omega = sens.get("omega", {})
        chosen_bits = {k: v.get("bits") for k, v in plan.get("layers", {}).items()}
        bits = sorted({int(b) for per in omega.values() for b in per}, key=int)
        headers = ["layer", "params", *[f"Ω({b} bit)" for b in bits], "chosen bits"]
        rows = [
            [
                fqn,
                (sens.get("params") or {}).get(fqn),
                *[per.get(str(b), per.get(b)) for b in bits],
                chosen_bits.get(fqn, 32),
            ]
            for fqn, per in omega.items()
        ]
        tm, th = table(headers, rows)
        md += tm

        def draw2(ax):
            names = list(omega)
            for b in bits:
                ax.plot(
                    range(len(names)),
                    [max(omega[n].get(str(b), omega[n].get(b)) or 0, 1e-12) for n in names],
                    "o-",
                    label=f"{b} bit",
                    ms=3,
                )
            ax.set_yscale("log")
            ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
            ax.set_ylabel("Ω = ½·Tr(H)/n·‖Q(W) − W‖²")
            ax.legend(fontsize=8)
            ax.set_title("per-layer sensitivity (HAWQ-V2)")

        body += th + figure(draw2, height=3.6)
    return md, body


@section("Run")
def _manifest(run: Run) -> tuple[str, str] | None:
    man = run.get("manifest")
    if not man:
        return None
    rows = [
        [k, json.dumps(v) if isinstance(v, dict | list) else v]
        for k, v in man.items()
        if k not in ("timings",)
    ]
    rows += [[f"time: {k}", f"{v:.2f} s"] for k, v in (man.get("timings") or {}).items()]
    return table(["key", "value"], rows)


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
