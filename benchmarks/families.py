"""Your model (issue 12): every encoder family and two vision transformers through the CLI.

Each model is built from a tiny ``transformers`` config with seeded random weights (hidden 32,
2 layers, 4 heads; ``tests/hf_families.py``) and saved with ``save_pretrained`` to a temporary
folder; then, each in its own process, as a new user would run them:

    squeezer compress MODEL --data DATA --budget bits=6 --out RUN   (Q-BERT mixed precision)
    squeezer plan RUN --budget bits=5                                (re-plan from the analysis)
    squeezer export RUN                                              (ONNX, checked in ORT)
    squeezer bench RUN --batch 1 8

Text families run on 240 short sentences at 16 tokens; ViT (``ViTForImageClassification``) and an
``nn.TransformerEncoder`` ViT with a class token (``tests/hf_families.py:tiny_vit``) on 160
16x16 images in an ``.npz``. The table gives each step's exit code and what it reported: the
metric after compression (cosine to FP32 for encoders, top-1 for images), the average weight bits
after re-planning, ONNX Runtime's max |Δ| from squeezer's simulation in output steps (one step =
the output range / 255) and the exported model's latency against PyTorch FP32 at batch 8.

Run:  python benchmarks/families.py                  (about 25 minutes on 2 cores shared with other jobs)
      python benchmarks/families.py --only bert vit  (a subset)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import hf_families as fam  # noqa: E402

MODELS = (*fam.TEXT_FAMILIES, "vit", "torch-vit")


def _cli(args: list[str], env: dict) -> tuple[int, str]:
    p = subprocess.run([sys.executable, "-m", "squeezer", *args], env=env, capture_output=True,
                       text=True)  # fmt: skip
    lines = [x for x in (p.stderr or p.stdout).splitlines() if x.startswith("squeezer:")]
    return p.returncode, (lines[-1] if lines else "")


def run_one(name: str, work: Path, env: dict) -> dict:
    """Build ``name``, run the four commands, return what each reported."""
    if name == "vit":
        model, data = f"hf:{fam.build_vit(work / name)}", str(fam.image_npz(work / "img.npz"))
    elif name == "torch-vit":
        model, data = "hf_families:tiny_vit", str(fam.image_npz(work / "img.npz"))
    else:
        model, data = f"hf:{fam.build_text(name, work / name)}", str(fam.corpus(work / "c.txt"))
    run = work / f"run-{name}"
    row: dict = {"model": name}
    t = time.perf_counter()
    rc, msg = _cli(["compress", model, "--data", data, "--budget", "bits=6", "--max-len", "16",
                    "--out", str(run), "--quiet"], env)  # fmt: skip
    row["compress"] = (rc, msg, time.perf_counter() - t)
    if rc != 0:
        return row
    m = json.loads((run / "metrics.json").read_text())
    row["metric"] = (m["metric_name"], m["after"]["metric"], m["before"]["metric"])
    row["template"] = json.loads((run / "plan.json").read_text())["meta"].get("template")
    rc, msg = _cli(["plan", str(run), "--budget", "bits=5"], env)
    row["plan"] = (rc, msg)
    if rc == 0:
        row["replanned_bits"] = json.loads((run / "metrics.json").read_text())["after"]["avg_bits"]
    rc, msg = _cli(["export", str(run)], env)
    row["export"] = (rc, msg)
    if rc == 0:
        e = json.loads((run / "metrics.json").read_text())["export"]
        row["steps"] = e["max_abs_error"] / e["output_step"]
        row["median_steps"] = e["median_sample_error"] / e["output_step"]
        rc, msg = _cli(["bench", str(run), "--batch", "1", "8", "--runs", "20"], env)
        row["bench"] = (rc, msg)
        if rc == 0:
            lat = json.loads((run / "metrics.json").read_text())["latency"]["batch_8"]
            row["ms_b8"] = (lat["PyTorch FP32"]["median_ms"], lat["ONNX (squeezer)"]["median_ms"])
    return row


def table(rows: list[dict]) -> str:
    out = [
        "| model | compress (metric after; FP32) | plan bits=5 (avg bits) | export max / median "
        "\\|Δ\\| (output steps) | bench b8 PyTorch FP32 → ONNX ms |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        rc, msg, _ = r["compress"]
        if rc:
            out.append(f"| {r['model']} | exit {rc}: {msg} | — | — | — |")
            continue
        name, after, before = r["metric"]
        comp = f"ok, {r['template']} ({name} {after:.4g}; {before:.4g})"
        plan = f"ok ({r['replanned_bits']:.2f})" if r["plan"][0] == 0 else f"exit {r['plan'][0]}"
        if r["export"][0]:
            exp = f"exit {r['export'][0]}: {r['export'][1]}"
        else:
            exp = f"ok, {r['steps']:.2g} / {r['median_steps']:.2g}"
        bench = (f"{r['ms_b8'][0]:.2f} → {r['ms_b8'][1]:.2f}" if "ms_b8" in r
                 else f"exit {r.get('bench', (None,))[0]}")  # fmt: skip
        out.append(f"| {r['model']} | {comp} | {plan} | {exp} | {bench} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="+", choices=MODELS, default=list(MODELS))
    args = ap.parse_args()
    path = os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, SQUEEZER_THREADS="1", SQUEEZER_NO_PROGRESS="1", PYTHONPATH=path)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only:
            rows.append(run_one(name, Path(tmp), env))
            print(f"{name}: {rows[-1]}", file=sys.stderr)
    print(table(rows))


if __name__ == "__main__":
    main()
