"""The run report: a self-contained ``report.html`` (plots inlined as PNG data URIs) and ``report.md``,
rendered from the JSON files of a run folder, so ``squeezer report DIR`` can always re-write it.

Each section is a function of the loaded run that returns (markdown, html) or None when its inputs
are absent, registered with :func:`section` at a position (``order``); the Hessian spectrum and the
deployment sections live in their own modules of this package.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from ..atomic import write_text_atomic
from . import deployment, finetune, hessian, sections  # noqa: F401  (each registers its sections)
from .render import (
    _PAGE,
    SECTIONS,
    Run,
    figure,
    fmt_bytes,
    fmt_num,
    section,
    table,
    text_summary,
    text_table,
)  # fmt: skip

__all__ = ["SECTIONS", "figure", "fmt_bytes", "fmt_num", "load_run", "section", "table",
           "text_summary", "text_table", "write_report"]  # fmt: skip


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
    for _, name, fn in SECTIONS:
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
# sections
