"""Latency budgets from the command line, predicted against measured (issue 18).

For a zoo CNN trained briefly on digits upscaled to 3x32x32: one ``squeezer compress`` (analysis
and the latency table, measured on the exported int8 model and its one-layer-in-float variants),
then for budgets spread between the all-int8 and the all-float prediction: ``squeezer plan DIR
--budget latency=X``, ``squeezer export DIR`` and ``squeezer bench DIR --batch 1``, all at one
ONNX Runtime thread. Each plan is checked by squeezer itself (exported and timed; the cap rescaled
while it misses), then measured again by `squeezer bench`. Prints a markdown table.

    python benchmarks/latency_budget.py [--model resnet_cifar] [--budgets 3] [--runs 50]

``--model minilm``: all-MiniLM-L6-v2 (``hf:minilm``) on ``--data sentences``, no training; the
analysis on ``--hessian-samples`` sentences (default 64) in batches of ``--hessian-batch-size``
(default 16; more runs out of memory here) with at most ``--hessian-probes`` probes per trace,
and the table by encoder layer (the ``auto`` unit: 12 exports of the 90 MB model instead of 72).

``--bits 7``: the planner's integer widths (``squeezer compress --bits 7``; default: the
template's), so the table's integer graph is at 7 bits; ``--per-channel``: MiniLM's Linears with
one weight range per output row instead of the Q-BERT template's groups of 128 (``squeezer
compress --template qbert-channel``; group-wise codes run as float ops in ONNX Runtime, so that
"int8" graph is not an integer one). Both are recorded in the run folder, so the re-plans use
them too. At ≤ 7 bits the export keeps int8 weight codes even on x86 without VNNI (they cannot
saturate ONNX Runtime's uint8 × int8 kernels there):

    python benchmarks/latency_budget.py --model minilm --bits 7 --per-channel --hessian-probes 16

The table is measured by ``compress --budget latency=1r`` (the all-float plan, relative, so not
checked by export); ``--out DIR`` keeps the run folder. Each budget's row is printed as it is done.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from zoo import digits32  # noqa: E402

from squeezer.cli import main as cli  # noqa: E402


def run(argv: list[str]) -> None:
    code = cli([*argv, "--threads", "1"])
    if code:
        raise SystemExit(f"squeezer {' '.join(argv)} exited {code}")


def template_flags(model: str, bits: str | None, per_channel: bool) -> list[str]:
    """``squeezer compress``'s ``--bits`` and ``--template`` for this benchmark's options."""
    flags = ["--bits", bits] if bits else []
    if per_channel:
        if model != "minilm":
            raise SystemExit("--per-channel is for --model minilm (zoo CNNs are per channel)")
        flags += ["--template", "qbert-channel"]
    return flags


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="resnet_cifar")
    ap.add_argument("--budgets", type=int, default=3)
    ap.add_argument("--runs", type=int, default=50, help="timed runs of squeezer bench")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--hessian-samples", type=int, default=None, help="default 64")
    ap.add_argument("--hessian-probes", type=int, default=None, help="per trace (default 100)")
    ap.add_argument("--hessian-batch-size", type=int, default=16,
                    help="MiniLM: sentences per Hessian-vector product (default 16)")  # fmt: skip
    ap.add_argument("--out", default=None, help="keep the run folder here (default: temporary)")
    ap.add_argument("--reuse", action="store_true",
                    help="--out already holds a compress run: re-plan it, do not re-measure")  # fmt: skip
    ap.add_argument("--bits", default=None,
                    help="integer widths to plan with, e.g. 7 or 4,7 (compress --bits)")  # fmt: skip
    ap.add_argument("--per-channel", action="store_true",
                    help="MiniLM: Linears per output row, not in groups of 128 "
                    "(compress --template qbert-channel)")  # fmt: skip
    args = ap.parse_args()
    flags = template_flags(args.model, args.bits, args.per_channel)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        r = Path(args.out) if args.out else work / "run"
        t0 = time.perf_counter()
        hessian = ["--hessian-samples", str(args.hessian_samples or 64)]
        if args.hessian_probes:
            hessian += ["--hessian-probes", str(args.hessian_probes)]
        if args.reuse and not (r / "costs.json").exists():
            raise SystemExit(f"--reuse needs a compress run in --out; {r} has no costs.json")
        if not args.reuse:
            if args.model == "minilm":
                model = ["hf:minilm", "--data", "sentences", *hessian, "--hessian-batch-size",
                         str(args.hessian_batch_size)]  # fmt: skip
            else:
                digits32(work, seed=0)
                data = str(work / "digits32.npz")
                run(["train", f"zoo:{args.model}", "--data", data, "--epochs", str(args.epochs),
                     "--out", str(work / "fp32"), "--quiet"])  # fmt: skip
                weights = str(work / "fp32" / "model.safetensors")
                model = [f"zoo:{args.model}", "--weights", weights, "--data", data, *hessian]
            # The analysis and the table, then re-plans (milliseconds). A relative budget is not
            # checked by export (a generous absolute one would export the all-float plan 3 times).
            run(["compress", *model, *flags, "--budget", "latency=1r", "--out", str(r), "--quiet"])
        t_table = time.perf_counter() - t0
        costs = json.loads((r / "costs.json").read_text())["costs"]
        rec = costs["meta"]["latency"]
        lo = costs["fixed_latency_ms"]
        hi = lo + sum(row[max(row, key=int)] for row in costs["latency_ms"].values())
        print(f"\n{args.model}: table measured in-context by {rec.get('unit', 'layer')} "
              f"({len(rec['variants_ms'])} variants); "
              f"int8 model {rec['int8_ms']:.3f} ms, float model {rec['whole_fp32_ms']:.3f} ms, "
              f"all-float predicted {hi:.3f} ms (sum of the table's units + int8 graph: "
              f"{hi / rec['whole_fp32_ms']:.2f} x the float model); "
              f"train + analysis + table {t_table:.0f} s\n", flush=True)  # fmt: skip
        if hi <= lo:
            print(
                f"(the all-float plan is predicted faster than the int8 one: budgets span "
                f"{hi:.3f}-{lo:.3f} ms, and a plan under the int8 time keeps layers in float)\n"
            )
        print(
            "| budget | table's prediction | plan's checks (ms) | measured by bench (batch 1) | "
            "bench / budget | ORT FP32 same run | layers in float | plan + export + bench |"
        )
        print("|---|---|---|---|---|---|---|---|", flush=True)
        fast, slow = min(lo, hi), max(lo, hi)
        for i in range(args.budgets):
            budget = fast + (slow - fast) * (i + 1) / (args.budgets + 1)
            if hi > lo:
                budget = max(budget, rec["int8_ms"] * 1.02)
            t1 = time.perf_counter()
            run(["plan", str(r), "--budget", f"latency={budget:.4f}ms"])
            plan = json.loads((r / "plan.json").read_text())
            floats = sum(1 for v in plan["layers"].values() if v["bits"] >= 16)
            checks = [round(c["measured_ms"], 3) for c in plan["meta"].get("latency_checks", [])]
            meas = f32 = None
            if floats < len(plan["layers"]):  # an all-float plan has no quantized model to export
                run(["export", str(r), "--samples", "16"])
                run(["bench", str(r), "--batch", "1", "--runs", str(args.runs)])
                b1 = json.loads((r / "metrics.json").read_text())["latency"]["batch_1"]
                meas = b1["ONNX (squeezer)"]["median_ms"]
                f32 = b1.get("ORT FP32", {}).get("median_ms")
            meas_s = (
                "– (all float: not exported) | –"
                if meas is None
                else f"{meas:.3f} ms | {meas / budget:.2f}"
            )
            f32s = "–" if f32 is None else f"{f32:.3f} ms"
            print(f"| {budget:.3f} ms | {plan['meta']['achieved']['latency_ms']:.3f} ms | "
                  f"{', '.join(map(str, checks))} | {meas_s} | {f32s} | "
                  f"{floats} of {len(plan['layers'])} | {time.perf_counter() - t1:.0f} s |",
                  flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
