"""``squeezer export`` and ``bench``."""

from __future__ import annotations

import argparse

from .args import command


def _configure_export(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--format", choices=["onnx", "executorch"], default="onnx",
                   help="onnx (default) or executorch (.pte, XNNPACK; squeezer[executorch])")  # fmt: skip
    p.add_argument(
        "--exact",
        action="store_true",
        help="keep residual sums and pooled maps in float, exactly as squeezer's simulation "
        "does; by default they are quantized to 8 bits too, so that ONNX Runtime runs every conv "
        "in int8 (one more rounding per such tensor, several times faster on residual nets)",
    )
    p.add_argument(
        "--no-pack",
        action="store_true",
        help="store sub-8-bit weight codes a byte each; by default they are packed at their width "
        "(ONNX Runtime unpacks them at load into the same int8 graph, checked on every export)",
    )
    p.add_argument(
        "--weight-codes",
        choices=["auto", "int8", "uint8"],
        default="auto",
        help="form of 8-bit weight codes (ONNX): int8 (zero point 0) or uint8 (codes + 128, "
        "zero point 128, the same values); auto (default): int8, rebuilt as uint8 when it fails "
        "the check on an x86 CPU without VNNI, where ONNX Runtime's uint8 x int8 kernels "
        "saturate; int8 directly where every layer with quantized inputs has <= 7-bit weights "
        "(codes within +-64 cannot saturate)",
    )
    p.add_argument("--samples", type=int, default=64, help="test inputs used for the check")
    p.add_argument("--atol", type=float, default=None, help="tolerance of the check")


@command("export", "export DIR's compressed model to ONNX (QDQ int8), checked in ONNX Runtime",
         _configure_export)  # fmt: skip
def cmd_export(args: argparse.Namespace) -> int:
    from ..deploy import FORMATS, export_run
    from ..report import fmt_bytes

    rep, m = export_run(args.dir, format=args.format, samples=args.samples,
                        requantize=not args.exact, atol=args.atol, threads=args.threads,
                        pack=not args.no_pack, weight_codes=args.weight_codes)  # fmt: skip
    agree = "" if rep.argmax_agreement is None else f", argmax agrees {rep.argmax_agreement:.1%}"
    (file, key), runtime = (
        FORMATS[args.format],
        {"onnx": "ONNX Runtime"}.get(args.format, "ExecuTorch"),
    )
    packed = getattr(rep, "weights_storage", None) == "packed"  # ONNX only
    storage = ", sub-8-bit weight codes packed" if packed else ""
    if getattr(rep, "weight_codes", "int8") == "uint8":  # ONNX only
        storage += ", 8-bit weight codes stored as uint8"
    print(f"wrote {args.dir}/{file} (file {fmt_bytes(rep.size_bytes)} = "
          f"{rep.size_bytes / rep.theoretical_bytes:.2f}x theoretical "
          f"{fmt_bytes(rep.theoretical_bytes)}{storage}); {runtime} vs squeezer: max |Δ| "
          f"{rep.max_abs_error:.3g}, median sample {rep.median_sample_error:.3g} (tolerance "
          f"{rep.atol:.3g}{agree})")  # fmt: skip
    if note := getattr(rep, "storage_note", None):
        print(f"weights not packed: {note}")
    if (deployed := m[key].get("test_metric")) is not None:
        simulated, fp32 = m["after"].get("metric"), m["before"].get("metric")
        print(f"{m['metric_name']} of the {runtime.split()[0]} model on the test split: {deployed:.4g} "
              f"(squeezer's simulation: {simulated:.4g}; FP32: {fp32:.4g})")  # fmt: skip
    return 0


def _configure_bench(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 32], help="batch sizes")
    p.add_argument("--runs", type=int, default=30, help="timed runs per measurement")
    p.add_argument("--warmup", type=int, default=5, help="untimed runs first")


@command("bench", "measure latency of PyTorch FP32, ONNX Runtime FP32 and DIR's exported ONNX",
         _configure_bench)  # fmt: skip
def cmd_bench(args: argparse.Namespace) -> int:
    from ..deploy import bench_run
    from ..report import text_table

    table = bench_run(args.dir, batches=args.batch, runs=args.runs, warmup=args.warmup,
                      threads=args.threads)  # fmt: skip
    names = list(table[f"batch_{args.batch[0]}"])
    last = table[f"batch_{args.batch[-1]}"]
    rows = [
        [name]
        + [f"{table[f'batch_{b}'][name]['median_ms']:.2f}" for b in args.batch]
        + [f"{last[names[0]]['median_ms'] / last[name]['median_ms']:.2f}x"]
        for name in names
    ]
    speed = f"× {names[0]} speed (batch {args.batch[-1]})"
    print(text_table(rows, ["variant", *(f"batch {b} (ms)" for b in args.batch), speed]))
    print(f"\nmedians of {args.runs} runs, {args.threads} threads; written to "
          f"{args.dir}/metrics.json")  # fmt: skip
    return 0


# --------------------------------------------------------------------------------------------------
