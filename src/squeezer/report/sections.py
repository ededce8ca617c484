"""The report's core sections: summary, variants, layers, mixed precision, and the run's manifest."""

from __future__ import annotations

import html
import json
from typing import Any

from ..graph import QUANTIZABLE_TYPES
from .render import Run, figure, fmt_bytes, fmt_num, section, table


@section("Summary", 10)
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


@section("Variants", 20)
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


@section("Layers", 30)
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


@section("Mixed precision", 60)
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


@section("Pruning", 25)
def _pruning(run: Run) -> tuple[str, str] | None:
    """What pruning removed (prune.json): totals, the metric along the way, per-layer ratios and
    the pruned architecture; measured latency of the dense and the deployed model if benched."""
    rec = run.get("prune")
    if not rec:
        return None
    spec, st = rec.get("spec", {}), rec.get("stats", {})
    joint = rec.get("joint") or {}
    asked = (f"joint plan: a ratio per channel group of {spec.get('options', {}).get('ratios')} "
             f"and bits per layer under {joint.get('limits')}" if joint
             else f"remove {spec.get('ratio')} of the {spec.get('target')}")  # fmt: skip
    rows = [["method", f"{spec.get('method')} ({spec.get('importance')}, {spec.get('scope')})"],
            ["asked", asked]]  # fmt: skip
    for key in ("macs", "params", "weights"):
        if st.get(f"{key}_before") is not None:
            rows.append([key, f"{fmt_num(st[f'{key}_before'])} → {fmt_num(st[f'{key}_after'])}"])
    if st.get("weight_bytes_stored") is not None:
        rows.append(["weight bytes (dense → stored, sparse only where smaller)",
                     f"{fmt_bytes(st['weight_bytes_dense'])} → "
                     f"{fmt_bytes(st['weight_bytes_stored'])}"])  # fmt: skip
    steps = [("dense", rec.get("dense")), ("pruned", rec.get("pruned")),
             ("fine-tuned", rec.get("finetune"))]  # fmt: skip
    metric = " → ".join(f"{fmt_num(v['metric'])} ({k})" for k, v in steps if v)
    if metric:
        rows.append(["metric", metric])
    lat = ((run.get("metrics") or {}).get("latency") or {}).get("batch_32") or {}
    if "ORT FP32" in lat and "ONNX (squeezer)" in lat:
        a, b = lat["ORT FP32"]["median_ms"], lat["ONNX (squeezer)"]["median_ms"]
        rows.append(["latency, batch 32 (ORT: dense FP32 → deployed)",
                     f"{a:.4g} ms → {b:.4g} ms ({a / b:.2f}×)"])  # fmt: skip
    md, body = table(["", ""], rows)
    arch = rec.get("architecture") or {}
    bits = {k: c["bits"] for k, c in (joint.get("layers") or {}).items()}
    layers = [[k, f"{100 * r:.1f}%", *([str(bits.get(k, ""))] if bits else []),
               json.dumps(arch.get(k, {}))]
              for k, r in (rec.get("ratios") or {}).items()]  # fmt: skip
    if layers:
        head = ["layer", "weights removed", *(["bits"] if bits else []), "new shape (changed arguments)"]
        m2, b2 = table(head, layers)
        md, body = md + "\n" + m2, body + b2
    return md, body


@section("Run", 90)
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
