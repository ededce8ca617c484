"""Packed sub-8-bit weights in ONNX (issue 18): does a mixed-precision plan's file reach its
theoretical size, and does ONNX Runtime still run it as fast as the int8 file?

For each run folder (a compressed model), squeezer's ONNX export is written twice from the same
model and the same check inputs (the first 64 test inputs, ``requantize=True`` as the CLI does):
``pack=False`` (a byte a code) and ``pack=True`` (sub-8-bit codes as bit planes, unpacked by ONNX
Runtime at load). Reported per file: its size against the plan's theoretical size (Σ params × bits
/ 8 plus scales, zero points and float parts: ``squeezer.measure.model_bytes``), whether ONNX
Runtime's optimized graphs of the two files are identical (op types and every initializer's bytes:
``squeezer.export.packing.unfolded``), whether their outputs on the whole test split are
bit-identical, the session load time, and the latency at batch 1 and 32 (medians; the two
sessions timed round-robin in one run, so load changes hit both alike).

Run folders, made by the CLI if not given:

- the demo's Hessian mixed plan: ``squeezer demo --out DIR`` (digits_cnn, budget bits=3);
- a deeper residual net's Hessian mixed plan: ``squeezer train zoo:digits_resnet_deep --data
  digits --epochs 20 --out T`` then ``squeezer compress zoo:digits_resnet_deep --weights
  T/model.safetensors --data digits --budget bits=3 --out DIR`` (8-bit activations), and the same
  with ``--act-bits 4`` (issue 18's failing case).

Run:  python benchmarks/packed_weights.py --work /tmp/packed --json packed.json   (~6 min, 1 thread)
      python benchmarks/packed_weights.py --demo runs/demo --runs 5                (smoke test)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import torch

from squeezer.export import export_onnx, latency_table, ort_feeds, ort_session
from squeezer.export.packing import unfolded
from squeezer.runfolder import load_compressed


def squeezer(*argv: str) -> None:
    subprocess.run(["squeezer", *argv], check=True, stdout=subprocess.DEVNULL)


def make_runs(work: Path, threads: int) -> dict[str, Path]:
    """The run folders of the module docstring, made with the CLI (kept if already there)."""
    t = ["--threads", str(threads)]
    runs = {"demo (digits_cnn, bits=3)": work / "demo"}
    if not (work / "demo" / "plan.json").is_file():
        squeezer("demo", "--out", str(work / "demo"), *t)
    weights = work / "resnet_deep_fp32" / "model.safetensors"
    if not weights.is_file():
        squeezer("train", "zoo:digits_resnet_deep", "--data", "digits", "--epochs", "20",
                 "--out", str(weights.parent), *t)  # fmt: skip
    for act in (8, 4):
        out = work / f"resnet_deep_a{act}"
        runs[f"digits_resnet_deep, bits=3, act {act}"] = out
        if not (out / "plan.json").is_file():
            squeezer("compress", "zoo:digits_resnet_deep", "--weights", str(weights), "--data",
                     "digits", "--budget", "bits=3", "--act-bits", str(act), "--out", str(out),
                     "--quiet", *t)  # fmt: skip
    return runs


def measure(run: Path, tmp: Path, threads: int, runs: int) -> dict:
    _, qmodel, inputs, _ = load_compressed(run)
    example = inputs[:64]
    reports, sessions, load_ms = {}, {}, {}
    for name, pack in (("int8", False), ("packed", True)):
        path = tmp / f"{run.name}_{name}.onnx"
        reports[name] = export_onnx(qmodel, path, example, requantize=True, threads=threads,
                                    pack=pack)  # fmt: skip
        t0 = time.perf_counter()
        sessions[name] = ort_session(path, threads=threads)
        load_ms[name] = (time.perf_counter() - t0) * 1e3
    data = {k: (tmp / f"{run.name}_{k}.onnx").read_bytes() for k in reports}
    same_graph = unfolded(data["packed"], data["int8"], threads)
    with tempfile.TemporaryDirectory() as opt:
        path = os.path.join(opt, "o.onnx")
        ort_session(data["packed"], threads=threads, optimized_path=path)
        ops = Counter(n.op_type for n in onnx.load(path).graph.node)
    outs = [sessions[k].run(None, ort_feeds(inputs, sessions[k]))[0] for k in ("int8", "packed")]
    lat = latency_table(sessions, {1: inputs[:1], 32: inputs[:32]}, threads=threads, runs=runs)
    rows = {}
    for k, r in reports.items():
        rows[k] = {
            "size_bytes": r.size_bytes,
            "theoretical_bytes": r.theoretical_bytes,
            "size_over_theoretical": r.size_bytes / r.theoretical_bytes,
            "packed_bits": r.packed_bits,
            "storage_note": r.storage_note,
            "max_abs_error_vs_squeezer": r.max_abs_error,
            "load_ms": load_ms[k],
            **{f"{b}_median_ms": lat[b][k]["median_ms"] for b in ("batch_1", "batch_32")},
        }
    return {
        "files": rows,
        "optimized_graphs_identical": same_graph is None,
        "difference": same_graph,
        "outputs_identical": bool(np.array_equal(outs[0], outs[1])),
        "runtime_ops": dict(ops),
        "latency_ratio_packed_over_int8": {
            b: lat[b]["packed"]["median_ms"] / lat[b]["int8"]["median_ms"]
            for b in ("batch_1", "batch_32")
        },
        "runs": runs,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("runs/packed"), help="run folders go here")
    ap.add_argument("--demo", type=Path, default=None, help="only this run folder (smoke test)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=200, help="timed runs per batch size and file")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    runs = {"given run": args.demo} if args.demo else make_runs(args.work, args.threads)
    results = {"threads": args.threads, "loadavg": os.getloadavg(), "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, run in runs.items():
            r = measure(run, Path(tmp), args.threads, args.runs)
            results["models"][name] = r
            print(f"\n{name}: optimized graphs identical {r['optimized_graphs_identical']}, "
                  f"outputs identical {r['outputs_identical']}")  # fmt: skip
            for k, f in r["files"].items():
                print(f"  {k:6s} {f['size_bytes'] / 1e3:7.1f} kB  {f['size_over_theoretical']:.3f}x "
                      f"theoretical {f['theoretical_bytes'] / 1e3:.1f} kB   b1 "
                      f"{f['batch_1_median_ms']:.3f} ms  b32 {f['batch_32_median_ms']:.3f} ms  "
                      f"load {f['load_ms']:.0f} ms")  # fmt: skip
            ratio = r["latency_ratio_packed_over_int8"]
            print(f"  packed/int8 latency: b1 {ratio['batch_1']:.3f}, b32 {ratio['batch_32']:.3f}")
    results["loadavg_end"] = os.getloadavg()
    print(
        f"\nthreads {args.threads}; load average {results['loadavg']} -> {results['loadavg_end']}"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
