"""The efficient-architecture zoo (issue 16): reference checks, latency, compressed sizes, and
training on the real data available offline.

Three tables:

1. **Reference and latency**, per architecture at its reference shape (1000 classes at 224 x 224;
   10 classes at 32 x 32 for the CIFAR nets): parameters and MACs against the published figures
   (MACs in the source's own convention, and conv + linear MACs as squeezer counts them), FP32
   latency in PyTorch and in ONNX Runtime at batch 1 and 32 (median of ``--runs`` rounds, all
   variants of one model timed round-robin), and the sizes of W8A8 and of a 4-bit-average plan.
2. **Digits, equal compressed size**: scikit-learn's 8 x 8 digits upscaled (bilinear) to 32 x 32 and
   repeated to 3 channels, written as an .npz in a temporary folder and loaded with
   ``squeezer.load_data``; SqueezeNet 1.1, 1.0-SqNxt-23 and the CIFAR ResNet-20 trained the same way,
   then quantized W8A8, Hessian mixed precision at 4 average bits (HAWQ-V2 traces + the ILP
   planner, activations 8 bits) and Hessian plans under common size budgets.
3. **ShiftResNet-20 at expansion 1, 3, 6, 9** on the same data: accuracy against parameters.

Run:  python benchmarks/zoo.py                  (about 15-20 minutes on 2 busy cores)
      python benchmarks/zoo.py --quick          (a few minutes: fewer epochs, runs and models)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import squeezer as sq
from squeezer.data import Batches
from squeezer.export import export_float_onnx, ort_session
from squeezer.measure import param_count, time_calls
from squeezer.train import fit
from squeezer.zoo import MODELS, create
from squeezer.zoo.reference import count_macs

BITS = (2, 3, 4, 8)
W8A8 = sq.LayerQuant(bits=8, act_bits=8)
TABLE1 = ["squeezenet1_0", "squeezenet1_1", "sqnxt23", "sqnxt23v5", "diracdeltanet",
          "squeezedet", "resnet20_cifar", "shiftresnet20_e1", "shiftresnet20_e3",
          "shiftresnet20_e6", "shiftresnet20_e9", "shiftresnet56_e9"]  # fmt: skip
DIGITS_NETS = ["squeezenet1_1", "sqnxt23", "resnet20_cifar"]
SHIFT_NETS = [f"shiftresnet20_e{e}" for e in (1, 3, 6, 9)]
#: optimizer, learning rate and batch size per net, from short probes on this data (10 epochs):
#: SqueezeNet (no BatchNorm, a ReLU on its logits) died at AdamW 3e-3 and at SGD 0.02 (the loss
#: stuck at ln 10) and reached 38% at AdamW 1e-3; SqueezeNext reached 45% at AdamW 1e-3 and 79% at
#: SGD 0.05; the ResNets train at fit's defaults.
TRAIN = {"squeezenet1_1": ("adamw", 1e-3, 32), "sqnxt23": ("sgd", 0.05, 32)}
DEFAULT_TRAIN = ("adamw", None, 64)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def reference_kwargs(name: str) -> dict:
    ref = MODELS[name].reference
    return dict(ref.kwargs) if ref else ({} if name == "squeezedet" else {"classes": 1000})


def latency_row(net: torch.nn.Module, shape: tuple[int, ...], runs: int, threads: int) -> dict:
    """Median ms of PyTorch FP32 and ONNX Runtime FP32 at batch 1 and 32 (round-robin timing)."""
    net = net.eval()
    g = torch.Generator().manual_seed(0)
    sess = ort_session(export_float_onnx(net, torch.zeros(2, *shape)), threads=threads)
    out = {}
    for batch in (1, 32):
        x = torch.randn(batch, *shape, generator=g)
        feeds = {sess.get_inputs()[0].name: x.numpy()}

        def run_torch(x=x):
            with torch.no_grad():
                net(x)

        def run_ort(sess=sess, feeds=feeds):
            sess.run(None, feeds)

        n, warm = (runs, 3) if batch == 1 else (max(3, runs // 6), 1)
        t = time_calls({"torch": run_torch, "ort": run_ort}, warmup=warm, runs=n, batch=batch)
        out[f"torch_b{batch}_ms"] = t["torch"].median_ms
        out[f"ort_b{batch}_ms"] = t["ort"].median_ms
    return out


def table1(names: list[str], runs: int, threads: int) -> list[dict]:
    rows = []
    for name in names:
        entry = MODELS[name]
        ref = entry.reference
        net = create(name, **reference_kwargs(name)).eval()
        row = {"model": name, "params": param_count(net), "input": entry.input_shape}
        row["macs"] = count_macs(net, entry.input_shape)
        if ref is not None:
            row["ref_params"], row["ref_source"] = ref.params, ref.source
            row["params_tol"] = ref.params_tol
            if ref.macs:
                row["ref_macs"], row["counting"] = ref.macs, ref.counting
                row["macs_in_ref_counting"] = count_macs(net, entry.input_shape, ref.counting)
        w8 = sq.QuantConfig(W8A8).to_plan(net)
        w4 = sq.QuantConfig(sq.LayerQuant(bits=4, act_bits=8)).to_plan(net)
        row["fp32_bytes"] = sq.model_bytes(net)
        row["w8a8_bytes"] = sq.model_bytes(net, w8)
        row["w4_bytes"] = sq.model_bytes(net, w4)
        t0 = time.perf_counter()
        row.update(latency_row(net, entry.input_shape, runs, threads))
        log(f"{name}: {row['params']:,} params, {row['macs'] / 1e6:.1f}M MACs, "
            f"torch b1 {row['torch_b1_ms']:.1f} ms, ort b1 {row['ort_b1_ms']:.1f} ms "
            f"({time.perf_counter() - t0:.0f} s)")  # fmt: skip
        rows.append(row)
    return rows


def digits32(work: Path, seed: int) -> sq.Dataset:
    """Digits upscaled to 3 x 32 x 32 through an .npz, the way a user would bring their own data."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=32, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    path = work / "digits32.npz"
    np.savez(path, x=x.numpy(), y=d.target.astype(np.int64))
    return sq.load_data(str(path), seed=seed)


def compress_rows(name: str, net, ds, sizes_kb: list[float], args) -> dict:
    """W8A8, Hessian mixed at 4 average bits, and Hessian plans under each size budget."""
    calib = ds.calibration_batches(256)
    test = ds.test_batches()
    train = Batches(ds.x_train, ds.y_train, 128, limit=args.hessian_samples)
    t0 = time.perf_counter()
    spec = sq.analyze(net, ds.task.loss, train, top_k=0, max_probes=args.probes, min_probes=8,
                      rel_stderr=0.1, per_layer_eig=False, seed=args.seed)  # fmt: skip
    t_an = time.perf_counter() - t0
    sens = sq.sensitivity(net, spec, bits=BITS)
    example = ds.example(1)
    costs = sq.plan_costs(net, BITS, example=example, template=W8A8)

    def score(plan) -> dict:
        q = sq.quantize(net, plan, calib=calib)
        return {
            "top1": sq.evaluate(q, test, ds.task),
            "bytes": sq.model_bytes(net, plan),
            "avg_bits": sq.average_bits(net, plan),
        }

    out = {"analyze_s": t_an, "probes": spec.probes}
    out["w8a8"] = score(sq.QuantConfig(W8A8).to_plan(net))
    out["mixed4"] = score(sq.plan(sens, sq.Budget(bits=4.0), costs=costs))
    for kb in sizes_kb:
        try:
            out[f"size{kb:g}kB"] = score(sq.plan(sens, sq.Budget(size_bytes=kb * 1e3), costs=costs))
        except sq.InfeasibleBudgetError:
            out[f"size{kb:g}kB"] = None
    log(f"  {name}: analyze {t_an:.0f} s ({spec.probes} probes); W8A8 {out['w8a8']['top1']:.1f}%, "
        f"mixed-4 {out['mixed4']['top1']:.1f}% at {out['mixed4']['bytes'] / 1e3:.0f} kB")  # fmt: skip
    return out


def train_rows(names, ds, epochs: int, args, compress: bool, sizes_kb) -> list[dict]:
    rows = []
    for name in names:
        t0 = time.perf_counter()
        opt, lr, bs = TRAIN.get(name, DEFAULT_TRAIN)
        net, info = fit(create(name, classes=10, seed=args.seed), ds, epochs=epochs, lr=lr,
                        batch_size=bs, optimizer=opt, seed=args.seed)  # fmt: skip
        row = {
            "model": name,
            "train": f"{opt} lr {lr or 'default'} batch {bs}",
            "params": param_count(net),
            "macs": count_macs(net, ds.input_shape),
            "epochs": epochs,
            "fp32_top1": info["top1"],
            "fp32_bytes": sq.model_bytes(net),
            "train_s": time.perf_counter() - t0,
        }
        log(f"{name}: {epochs} epochs in {row['train_s']:.0f} s, top1 {info['top1']:.2f}%")
        if compress:
            row.update(compress_rows(name, net, ds, sizes_kb, args))
        rows.append(row)
    return rows


def _m(v: float) -> str:
    return f"{v / 1e6:.2f}M" if v >= 1e5 else f"{v / 1e3:.1f}k"


def markdown(res: dict) -> str:
    lines = ["### Reference figures, latency and sizes", ""]
    lines.append("| model | input | params (ours / ref) | MACs ours (conv+linear) | MACs in ref's "
                 "counting / ref | torch b1 / b32 ms | ORT b1 / b32 ms | FP32 / W8A8 / W4 kB |")  # fmt: skip
    lines.append("|---|---|---|---|---|---|---|---|")
    for r in res["table1"]:
        ref_p = (
            f"{r['params']:,} / {r['ref_params']:,}"
            if "ref_params" in r
            else f"{r['params']:,} / —"
        )
        if "ref_params" in r and r["params_tol"]:
            ref_p = f"{_m(r['params'])} / {r['ref_params'] / 1e6:.2f}M"
        ref_m = (f"{_m(r['macs_in_ref_counting'])} / {_m(r['ref_macs'])} "
                 f"({100 * (r['macs_in_ref_counting'] / r['ref_macs'] - 1):+.1f}%)"
                 if "ref_macs" in r else "—")  # fmt: skip
        lines.append(
            f"| {r['model']} | {'x'.join(map(str, r['input']))} | {ref_p} | {_m(r['macs'])} | "
            f"{ref_m} | {r['torch_b1_ms']:.1f} / {r['torch_b32_ms']:.0f} | "
            f"{r['ort_b1_ms']:.1f} / {r['ort_b32_ms']:.0f} | {r['fp32_bytes'] / 1e3:.0f} / "
            f"{r['w8a8_bytes'] / 1e3:.0f} / {r['w4_bytes'] / 1e3:.0f} |"
        )
    sizes = res["sizes_kb"]
    lines += ["", "### Digits (8x8 upscaled to 3x32x32): accuracy at compressed sizes", ""]
    head = "| model | params | MACs | training | FP32 top1 | W8A8 top1 (kB) | Hessian mixed 4-bit top1 (kB) |"
    head += "".join(f" Hessian plan ≤ {kb:g} kB: top1 (avg bits) |" for kb in sizes)
    lines += [head, "|---" * (7 + len(sizes)) + "|"]
    for r in res["digits"]:
        cells = [
            r["model"], _m(r["params"]), _m(r["macs"]), r["train"], f"{r['fp32_top1']:.2f}",
            f"{r['w8a8']['top1']:.2f} ({r['w8a8']['bytes'] / 1e3:.0f})",
            f"{r['mixed4']['top1']:.2f} ({r['mixed4']['bytes'] / 1e3:.0f})",
        ]  # fmt: skip
        for kb in sizes:
            c = r[f"size{kb:g}kB"]
            cells.append("infeasible" if c is None else f"{c['top1']:.2f} ({c['avg_bits']:.2f})")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "### ShiftResNet-20 on digits (3x32x32): accuracy against parameters", ""]
    lines += [
        "| model | params | MACs | epochs | train s | FP32 top1 |",
        "|---|---|---|---|---|---|",
    ]
    for r in res["shift"]:
        lines.append(f"| {r['model']} | {r['params']:,} | {_m(r['macs'])} | {r['epochs']} | "
                     f"{r['train_s']:.0f} | {r['fp32_top1']:.2f} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch and ONNX Runtime threads (1: on a busy 2-core machine a second thread is often slower)",
    )
    ap.add_argument(
        "--runs", type=int, default=20, help="timed rounds at batch 1 (a sixth, at least 3, at 32)"
    )
    ap.add_argument("--epochs", type=int, default=10, help="training epochs, digits comparison")
    ap.add_argument("--shift-epochs", type=int, default=4, help="training epochs, ShiftResNet-20")
    ap.add_argument("--probes", type=int, default=16, help="most Hutchinson probes per model")
    ap.add_argument("--hessian-samples", type=int, default=256, help="samples the Hessian averages")
    ap.add_argument("--sizes-kb", type=float, nargs="+", default=[120.0, 250.0],
                    help="common size budgets (kB) for the Hessian plans")  # fmt: skip
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="fewer epochs, runs and models")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args()
    if args.quick:
        args.runs, args.epochs, args.shift_epochs, args.probes = 5, 2, 1, 8
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t_all = time.perf_counter()
    names = TABLE1 if not args.quick else ["squeezenet1_1", "sqnxt23", "shiftresnet20_e1"]
    res = {"threads": args.threads, "runs": args.runs, "sizes_kb": args.sizes_kb}
    res["table1"] = table1(names, args.runs, args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        ds = digits32(Path(tmp), args.seed)
    log(f"digits32: {ds.n_train} train / {len(ds.y_test)} test samples")
    res["digits"] = train_rows(DIGITS_NETS, ds, args.epochs, args, True, args.sizes_kb)
    res["shift"] = train_rows(SHIFT_NETS, ds, args.shift_epochs, args, False, [])
    res["total_s"] = time.perf_counter() - t_all
    res["torch"] = torch.__version__
    md = markdown(res)
    print(md)
    print(f"\ntotal {res['total_s'] / 60:.1f} min on {args.threads} threads")
    if args.out:
        args.out.write_text(json.dumps(res, indent=1, default=str))


if __name__ == "__main__":
    main()
