"""The report's "Deployment" section, built from the ``export`` and ``latency`` entries of
``metrics.json`` (written by ``squeezer export`` and ``squeezer bench``).
"""

from __future__ import annotations

from typing import Any

from .render import Run, fmt_bytes, section, table


def _ms(x: Any) -> str:
    return f"{x:.4g} ms" if isinstance(x, int | float) else "–"


def _num(x: Any) -> str:
    return f"{x:.4g}" if isinstance(x, int | float) else "–"


#: {runtime: (metrics.json key of its export, its latency row)}
RUNTIMES = {"ONNX Runtime": ("export", "ONNX (squeezer)"),
            "ExecuTorch (XNNPACK)": ("executorch", "ExecuTorch (squeezer)")}  # fmt: skip


def _runtime_rows(m: dict) -> list[list[Any]]:
    """One row per runtime a model was exported to: file, size, latency at batch 1 and 32, and
    the export's agreement with the simulation."""
    rows = []
    for runtime, (key, row) in RUNTIMES.items():
        ex = m.get(key)
        if not ex:
            continue
        cells = []
        for b in (1, 32):
            t = ((m.get("latency") or {}).get(f"batch_{b}") or {}).get(row)
            t = t or ((ex.get("latency") or {}).get(f"batch_{b}") or {}).get(row)
            cells.append(_ms((t or {}).get("median_ms")))
        err = ex.get("max_abs_error")
        agree = "–" if err is None else f"{err:.3g} ({ex.get('median_sample_error', 0):.3g})"
        arg = ex.get("argmax_agreement")
        rows.append([runtime, ex.get("path"), fmt_bytes(ex.get("size_bytes")), *cells, agree,
                     "–" if arg is None else f"{arg:.1%}"])  # fmt: skip
    return rows


@section("Deployment", 50)
def _deployment(run: Run) -> tuple[str, str] | None:
    """The section from ``metrics.json``'s ``export`` and ``latency`` keys, as (markdown, html);
    None when neither was measured."""
    m = run.get("metrics") or {}
    ex, lat = m.get("export"), m.get("latency")
    predicted = (((run.get("plan") or {}).get("meta") or {}).get("achieved") or {}).get(
        "latency_ms"
    )
    if not ex and not lat and predicted is None and not m.get("executorch"):
        return None
    md, body = "", ""
    if predicted is not None:
        rec = (((run.get("costs") or {}).get("costs") or {}).get("meta") or {}).get("latency", {})
        measured = ((lat or {}).get("batch_1") or {}).get("ONNX (squeezer)", {}).get("median_ms")
        rows = [
            [f"predicted, per-layer table ({rec.get('backend', '?')}, "
             f"{rec.get('threads', '?')} threads, batch 1)", f"{predicted:.4g} ms"],
            ["measured, the exported model in ONNX Runtime (batch 1; squeezer bench)",
             "–" if measured is None else f"{measured:.4g} ms"],
            ["float model, whole (measured with the table)", _ms(rec.get("whole_fp32_ms"))],
        ]  # fmt: skip
        if rec.get("method") == "in-context":  # the int8 graph + each layer's cost in float
            table_ms = ((run.get("costs") or {}).get("costs") or {}).get("latency_ms") or {}
            all_float = rec["int8_ms"] + sum(r[max(r, key=int)] for r in table_ms.values())
            rows += [["int8 model, whole (measured with the table)", _ms(rec.get("int8_ms"))],
                     ["float model, predicted by the table (int8 + each layer's float cost)",
                      _ms(all_float)]]  # fmt: skip
        else:
            rows.append(["float model, sum of its layers' times", _ms(rec.get("layers_fp32_ms"))])
        md, body = table(["latency of the plan", ""], rows)
        md += "\n"
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
        emd, ebody = table(["ONNX export", ""], rows)
        md, body = md + emd, body + ebody
    if rows := _runtime_rows(m):
        tmd, tbody = table(["runtime", "file", "size", "batch 1", "batch 32",
                            "max abs. difference vs squeezer (median sample)",
                            "argmax agreement"], rows)  # fmt: skip
        note = (
            "Latency: `squeezer bench` where it timed the file, else the export's own "
            "timing; agreement: the export's check against squeezer's simulation."
        )
        md, body = md + "\n" + tmd + "\n" + note + "\n", body + tbody + f"<p>{note}</p>"
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
