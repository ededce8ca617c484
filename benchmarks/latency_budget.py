"""Latency budgets from the command line, predicted against measured (issue 18).

For a zoo CNN trained briefly on digits upscaled to 3x32x32: one ``squeezer compress`` (analysis
and the latency table, measured on the exported int8 model and its one-layer-in-float variants),
then for budgets spread between the all-int8 and the all-float prediction: ``squeezer plan DIR
--budget latency=X``, ``squeezer export DIR`` and ``squeezer bench DIR --batch 1``, all at one
ONNX Runtime thread. Each plan is checked by squeezer itself (exported and timed; the cap rescaled
while it misses), then measured again by `squeezer bench`. Prints a markdown table.

    python benchmarks/latency_budget.py [--model resnet_cifar] [--budgets 3] [--runs 50]

``--model minilm``: all-MiniLM-L6-v2 (``hf:minilm``) on ``--data sentences``, no training; the
analysis on 128 sentences in batches of 16 (more runs out of memory here), and the table by
encoder layer (the ``auto`` unit: 12 exports of the 90 MB model instead of 72).
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="resnet_cifar")
    ap.add_argument("--budgets", type=int, default=3)
    ap.add_argument("--runs", type=int, default=50, help="timed runs of squeezer bench")
    ap.add_argument("--epochs", type=int, default=1)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        r = work / "run"
        t0 = time.perf_counter()
        if args.model == "minilm":
            model = ["hf:minilm", "--data", "sentences", "--hessian-samples", "128",
                     "--batch-size", "16"]  # fmt: skip
        else:
            digits32(work, seed=0)
            data = str(work / "digits32.npz")
            run(["train", f"zoo:{args.model}", "--data", data, "--epochs", str(args.epochs),
                 "--out", str(work / "fp32"), "--quiet"])  # fmt: skip
            weights = str(work / "fp32" / "model.safetensors")
            model = [f"zoo:{args.model}", "--weights", weights, "--data", data,
                     "--hessian-samples", "64"]  # fmt: skip
        # A generous latency budget: the analysis and the table, then re-plans (milliseconds).
        run(["compress", *model, "--budget", "latency=100000ms", "--out", str(r), "--quiet"])
        t_table = time.perf_counter() - t0
        costs = json.loads((r / "costs.json").read_text())["costs"]
        rec = costs["meta"]["latency"]
        lo = costs["fixed_latency_ms"]
        hi = lo + sum(row[max(row, key=int)] for row in costs["latency_ms"].values())
        rows = []
        for i in range(args.budgets):
            budget = lo + (hi - lo) * (i + 1) / (args.budgets + 1)
            budget = max(budget, rec["int8_ms"] * 1.02)
            run(["plan", str(r), "--budget", f"latency={budget:.4f}ms"])
            run(["export", str(r), "--samples", "16"])
            run(["bench", str(r), "--batch", "1", "--runs", str(args.runs)])
            plan = json.loads((r / "plan.json").read_text())
            m = json.loads((r / "metrics.json").read_text())
            b1 = m["latency"]["batch_1"]
            measured = b1["ONNX (squeezer)"]["median_ms"]
            floats = sum(1 for v in plan["layers"].values() if v["bits"] >= 16)
            checks = [round(c["measured_ms"], 3) for c in plan["meta"].get("latency_checks", [])]
            rows.append((budget, plan["meta"]["achieved"]["latency_ms"], checks, measured,
                         b1.get("ORT FP32", {}).get("median_ms"), floats,
                         len(plan["layers"])))  # fmt: skip
    print(f"\n{args.model}: table measured in-context by {rec.get('unit', 'layer')} "
          f"({len(rec['variants_ms'])} variants); "
          f"int8 model {rec['int8_ms']:.3f} ms, float model {rec['whole_fp32_ms']:.3f} ms, "
          f"all-float predicted {hi:.3f} ms; train + analysis + table {t_table:.0f} s\n")  # fmt: skip
    print(
        "| budget | table's prediction | plan's checks (ms) | measured by bench (batch 1) | "
        "bench / budget | ORT FP32 same run | layers in float |"
    )
    print("|---|---|---|---|---|---|---|")
    for budget, pred, checks, meas, f32, floats, n in rows:
        f32s = "–" if f32 is None else f"{f32:.3f} ms"
        print(
            f"| {budget:.3f} ms | {pred:.3f} ms | {', '.join(map(str, checks))} | {meas:.3f} ms | "
            f"{meas / budget:.2f} | {f32s} | {floats} of {n} |"
        )


if __name__ == "__main__":
    main()
