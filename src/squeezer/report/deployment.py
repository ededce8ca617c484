"""The report's "Deployment" section, built from the ``export`` and ``latency`` entries of
``metrics.json`` (written by ``squeezer export`` and ``squeezer bench``).
"""

from __future__ import annotations

from typing import Any

from .render import Run, fmt_bytes, section, table


def _num(x: Any) -> str:
    return f"{x:.4g}" if isinstance(x, int | float) else "–"


@section("Deployment", 50)
def _deployment(run: Run) -> tuple[str, str] | None:
    """The section from ``metrics.json``'s ``export`` and ``latency`` keys, as (markdown, html);
    None when neither was measured."""
    m = run.get("metrics") or {}
    ex, lat = m.get("export"), m.get("latency")
    if not ex and not lat:
        return None
    md, body = "", ""
    if ex:
        kinds: dict[str, int] = {}
        for how in (ex.get("layers") or {}).values():
            kinds[how] = kinds.get(how, 0) + 1
        theo = ex.get("theoretical_bytes")
        rows = [
            ["file", ex.get("path")],
            ["size", fmt_bytes(ex.get("size_bytes"))],
            ["theoretical (Σ params × bits / 8 + float parts)", fmt_bytes(theo)],
            ["size / theoretical", f"{ex['size_bytes'] / theo:.3f}" if theo else "–"],
            ["max abs. difference, ONNX Runtime vs squeezer", ex.get("max_abs_error")],
            ["the same, median over samples", ex.get("median_sample_error")],
            ["tolerance", ex.get("atol")],
            ["one 8-bit output step", ex.get("output_step")],
            [
                "max abs. difference, squeezer vs FP32 (the quantization itself)",
                ex.get("quant_error"),
            ],
            ["argmax agreement", ex.get("argmax_agreement")],
            [
                f"{m.get('metric_name') or 'metric'} of the ONNX model, whole test split "
                f"(simulation: {_num((m.get('after') or {}).get('metric'))})",
                ex.get("test_metric"),
            ],
            ["layers", ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))],
        ]
        md, body = table(["ONNX export", ""], rows)
    if lat:
        batches = sorted(int(k.split("_")[1]) for k in lat if k.startswith("batch_"))
        names = list(lat[f"batch_{batches[0]}"]) if batches else []
        rows = []
        for name in names:
            row: list[Any] = [name]
            for b in batches:
                t = lat[f"batch_{b}"][name]
                base = lat[f"batch_{b}"][names[0]]["median_ms"]
                row += [
                    f"{t['median_ms']:.2f} ({t['p10_ms']:.2f}–{t['p90_ms']:.2f})",
                    f"{base / t['median_ms']:.2f}×",
                ]
            rows.append(row)
        headers = ["variant"]
        for b in batches:
            headers += [f"batch {b}: median ms (p10–p90)", f"speed-up vs {names[0]}"]
        tmd, tbody = table(headers, rows)
        note = (
            f"{lat.get('runs')} timed runs after {lat.get('warmup')} warm-up runs; PyTorch and "
            f"ONNX Runtime (intra_op_num_threads) both on {lat.get('threads')} threads."
        )
        md += f"\n{tmd}\n{note}\n"
        body += f"{tbody}<p>{note}</p>"
    return md, body
