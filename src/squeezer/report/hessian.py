"""The report's "Hessian spectrum" section: top eigenvalues, per-layer traces and their plot, and
the eigenvalue density when it was computed."""

from __future__ import annotations

import math
from typing import Any

from ..spectrum import Spectrum
from .render import Run, figure, section, table


@section("Hessian spectrum", 40)
def _spectrum(run: Run) -> tuple[str, str] | None:
    """The "Hessian spectrum" section from the run's ``spectrum.json``, or None.

    Returns ``(markdown, html)``: the summary, the per-layer table, a per-layer plot (trace per
    parameter and top eigenvalue) and, when present, the smoothed eigenvalue density.
    """
    spectrum = run.get("spectrum")
    if not spectrum:
        return None
    spec = Spectrum.from_dict(spectrum)
    eig = ", ".join(f"{v:.4g}" for v in spec.top_eigenvalues) or "–"
    head = [
        ["top eigenvalues", eig],
        ["trace", f"{spec.trace:.4g} ± {spec.trace_stderr:.2g} ({spec.probes} probes)"],
        ["Hessian-vector products", spec.hvp_count],
        ["seconds", spec.seconds],
        ["parameters / samples", f"{spec.params:,} / {spec.samples:,}"],
    ]
    md1, html1 = table(["", ""], head)
    mean = spec.layer_mean_trace
    names = list(spec.layer_trace)
    rows = [
        [
            n,
            spec.layer_params[n],
            f"{spec.layer_trace[n]:.4g} ± {spec.layer_trace_stderr[n]:.2g}",
            mean[n],
            spec.layer_top_eigenvalue.get(n),
        ]
        for n in names
    ]
    md2, html2 = table(["layer", "params", "trace ± stderr", "trace / param", "top eig"], rows)

    def draw_layers(ax: Any) -> None:
        xs = list(range(len(names)))
        ax.bar(xs, [mean[n] for n in names], color="#4c72b0")
        ax.set_yscale("symlog", linthresh=1e-6)
        ax.set_ylabel("Tr(H_ll) / n_l")
        ax.set_xticks(xs, names, rotation=60, ha="right", fontsize=7)
        if spec.layer_top_eigenvalue:
            ax2 = ax.twinx()
            top = [spec.layer_top_eigenvalue.get(n, math.nan) for n in names]
            ax2.plot(xs, top, "o-", color="#dd8452")
            ax2.set_ylabel("top eigenvalue of H_ll")
            ax.set_title("per-layer Hessian: average trace (bars), top eigenvalue (line)")
        else:  # no per-layer eigenvalues were computed: promise no line
            ax.set_title("per-layer Hessian: average trace per parameter")

    html = html1 + html2 + figure(draw_layers, height=3.6)
    d = spec.density
    if d is not None and d.grid:

        def draw_density(ax: Any) -> None:
            floor = max(d.values) * 1e-7  # the Gaussian tails fall to 0; show 7 decades
            ax.semilogy(d.grid, [max(v, floor) for v in d.values])
            ax.set_ylim(bottom=floor)
            ax.set_xlabel("eigenvalue")
            ax.set_ylabel("density")
            ax.set_title(f"eigenvalue density (SLQ, Gaussian σ = {d.sigma:.2g})")

        html += figure(draw_density)
    return md1 + "\n" + md2, html
