"""Fine-tuning benchmark (issue 14): quantization-aware training with knowledge distillation,
squeezer's one trainer (``squeezer.train.finetune``), against post-training quantization and
against Brevitas' QAT on the same net, bits, epochs and seed.

Install step for the peer (only for ``peer``; never a squeezer dependency):
    pip install brevitas==0.13.4          # pulls dependencies, unfoldNd, setuptools; not torch

Parts:
- ``cnn``: the BatchNorm nets of the zoo, trained FP32 by squeezer's own trainer (``fit``), then
  W4A4 (uniform) and Hessian mixed <= 3 bits with 8-bit activations: PTQ, QAT on the labels and
  QAT + KD from the FP32 net, each seed re-running the whole chain (calibration subset, Hessian
  probes, fine-tuning order); the share of PTQ's gap to FP32 that fine-tuning recovers.
- ``minilm RUN...``: run folders of ``squeezer compress hf:minilm --data sentences ...`` (their
  PTQ model as the CLI made it): distillation on the FP32 embeddings, cosine after each epoch.
- ``peer``: Brevitas QAT (QuantConv2d / QuantLinear, 4-bit per-channel weights, 4-bit asymmetric
  per-tensor inputs, activation ranges calibrated on the same batches) trained by the same loop
  (``finetune``: same data order, loss, optimizer, schedule, seed) against squeezer's QAT.
- ``sweep``: QAT + KD variants of the trainer's defaults on one net and plan, every epoch's
  logits recorded; each epoch-selection rule and each variant judged on the held-out split only
  (epoch picked on one half of it, scored on the other), never on the test split.
- ``export RUN``: ``squeezer finetune`` on a copy of a CNN run folder, then ``squeezer export``
  and ``to_integer`` on the fine-tuned model, each compared with it.

Usage:
    python benchmarks/finetune.py cnn --seeds 0,1,2 --epochs 5 --json ft-cnn.json
    python benchmarks/finetune.py minilm RUN_UNIFORM RUN_MIXED --epochs 2 --json ft-minilm.json
    python benchmarks/finetune.py peer --net digits --epochs 5 --seeds 0,1,2 --json ft-peer.json
    python benchmarks/finetune.py export RUN
    python benchmarks/finetune.py sweep --net mnist1d --seeds 0,1,2 --variants qat,recipe --save r.pt
    python benchmarks/finetune.py sweep --load r.pt t.pt   # re-judge saved records
    python benchmarks/finetune.py cnn --nets digits --seeds 0 --epochs 1 --fp32-epochs 2  # quick
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from squeezer.data import evaluate, load_data
from squeezer.pipeline import compress, test_metrics
from squeezer.train import fit
from squeezer.train.finetune import BN_CLASSIFIER_RECIPE, finetune
from squeezer.train.select import SELECT, halves, per_sample, pick_on, split_half_scores
from squeezer.zoo import create

NETS = {"digits": ("digits_resnet_deep", "digits"), "mnist1d": ("mnist1d_resnet", "mnist1d")}
PLANS = {  # name: (budget, method, activation bits)
    "W4A4": ("bits=4", "uniform", 4),
    "mixed<=3 A8": ("bits=3", "hessian", 8),
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def mean_spread(xs: list[float]) -> str:
    """``mean ± half-range`` (the spread of three seeds)."""
    if len(xs) == 1:
        return f"{xs[0]:.2f}"
    return f"{statistics.mean(xs):.2f} ± {(max(xs) - min(xs)) / 2:.2f}"


def held_out(data: Any, fraction: float = 0.1, seed: int = 0) -> tuple[Any, Any]:
    """``(fit_data, val)``: the training split without a seeded ``fraction`` of it, and that part
    as batches. The FP32 net trains on ``fit_data`` only, so the fine-tuning runs validate (and
    pick their best epoch) on samples neither the teacher nor the student ever trained on."""
    from dataclasses import replace

    from squeezer.data import Batches

    n = data.n_train
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    va, tr = order[: round(n * fraction)].sort().values, order[round(n * fraction):].sort().values
    fit_data = replace(data, x_train=data.x_train[tr], y_train=data.y_train[tr])
    return fit_data, Batches(data.x_train[va], data.y_train[va], 256)


def trained(net_key: str, epochs: int, cache: Path | None) -> tuple[nn.Module, Any, Any]:
    """The FP32 net trained by squeezer's ``fit`` (seed 0) on the training split less the
    fine-tuning held-out part, cached by name and epochs; with the data (that training split)
    and the held-out batches."""
    name, data_name = NETS[net_key]
    data, val = held_out(load_data(data_name))
    net = create(name)
    f = cache / f"{name}-{epochs}ep-heldout.pt" if cache else None
    if f is not None and f.is_file():
        net.load_state_dict(torch.load(f, weights_only=True))
        return net.eval(), data, val
    t = time.perf_counter()
    net, info = fit(net, data, epochs=epochs, seed=0)
    log(f"trained {name} {epochs} epochs on {data.n_train} samples in "
        f"{time.perf_counter() - t:.0f} s: {info}")  # fmt: skip
    if f is not None:
        f.parent.mkdir(parents=True, exist_ok=True)
        torch.save(net.state_dict(), f)
    return net.eval(), data, val


def top1(model: nn.Module, data: Any) -> float:
    return float(evaluate(model, data.test_batches(), data.task))


def recovered(ptq: float, after: float, fp32: float) -> float:
    """Share of PTQ's gap to FP32 that fine-tuning closed (1: all of it)."""
    gap = fp32 - ptq
    return float("nan") if gap <= 0 else (after - ptq) / gap


def run_cnn(args: argparse.Namespace) -> dict:
    out: dict[str, Any] = {"epochs": args.epochs, "lr": args.lr, "lsq": args.lsq,
                           "batch_size": args.batch_size, "seeds": args.seeds, "nets": {}}  # fmt: skip
    for key in args.nets:
        net, data, val = trained(key, args.fp32_epochs, args.cache)
        fp32 = top1(net, data)
        log(f"{key}: FP32 top-1 {fp32:.2f}")
        rows: dict[str, Any] = {}
        for plan_name in args.plans:
            budget, method, act = PLANS[plan_name]
            cells: dict[str, list] = {"ptq": [], "qat": [], "kd": [], "bits": [],
                                      "qat_s": [], "kd_s": [], "kd_best": []}  # fmt: skip
            for seed in args.seeds:
                t = time.perf_counter()
                res = compress(net, data, budget, method=method, act_bits=act, seed=seed)
                t_ptq = time.perf_counter() - t
                q = res.qmodel
                ptq = top1(q, data)
                kw = dict(epochs=args.epochs, lr=args.lr, seed=seed, progress=False,
                          lsq=args.lsq, batch_size=args.batch_size, freeze_bn=args.freeze_bn,
                          val_data=val)  # fmt: skip
                qat = finetune(q, data, distill=False, **kw)
                kd = finetune(q, data, teacher=net, **kw)
                a_qat, a_kd = top1(qat.model, data), top1(kd.model, data)
                bits = float(res.after.to_dict().get("avg_bits", float("nan")))
                for k, v in (("ptq", ptq), ("qat", a_qat), ("kd", a_kd), ("bits", bits),
                             ("qat_s", qat.seconds), ("kd_s", kd.seconds),
                             ("kd_best", kd.best_epoch)):  # fmt: skip
                    cells[k].append(v)
                log(f"{key} {plan_name} seed {seed}: PTQ {ptq:.2f} ({t_ptq:.0f} s, {bits:.2f} "
                    f"bits) QAT {a_qat:.2f} ({qat.seconds:.0f} s, best ep {qat.best_epoch}) "
                    f"QAT+KD {a_kd:.2f} ({kd.seconds:.0f} s, best ep {kd.best_epoch}); "
                    f"recovered {recovered(ptq, a_kd, fp32):.0%}")  # fmt: skip
            gaps = [recovered(p, k, fp32) for p, k in zip(cells["ptq"], cells["kd"], strict=True)]
            cells["recovered_kd"] = gaps
            cells["recovered_kd_of_means"] = recovered(statistics.mean(cells["ptq"]),
                                                       statistics.mean(cells["kd"]), fp32)  # fmt: skip
            rows[plan_name] = cells
        out["nets"][key] = {"model": NETS[key][0], "fp32": fp32, "plans": rows}
    print_cnn(out)
    return out


def print_cnn(out: dict) -> None:
    print("\n| net | setting | avg bits | FP32 | PTQ | QAT (labels) | QAT + KD | gap recovered (KD, "
          "of means; per seed) | kept epoch (KD) | s / run (QAT+KD) |\n" + "|---" * 10 + "|")
    for n in out["nets"].values():
        for plan_name, c in n["plans"].items():
            per_seed = ", ".join(f"{g:.0%}" for g in c["recovered_kd"])
            print(f"| {n['model']} | {plan_name} | {statistics.mean(c['bits']):.2f} | "
                  f"{n['fp32']:.2f} | {mean_spread(c['ptq'])} | {mean_spread(c['qat'])} | "
                  f"{mean_spread(c['kd'])} | {c['recovered_kd_of_means']:.0%} ({per_seed}) | "
                  f"{c['kd_best']} | {statistics.median(c['kd_s']):.0f} |")  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Recipe sweep: QAT + KD variants on one net and plan, scored on the held-out split


def mse_scales(q: nn.Module) -> nn.Module:
    """A copy of ``q`` whose weight quantizers start from the MSE observer's scales (the step
    sizes LSQ then learns from) instead of the min-max ones post-training quantization set."""
    from squeezer.graph import copy_model
    from squeezer.quant.modules import QuantMixin
    from squeezer.quant.primitives import observe

    q = copy_model(q)
    with torch.no_grad():
        for m in q.modules():
            if isinstance(m, QuantMixin):
                wq, spec = m.weight_quantizer, m.weight_quantizer.spec
                qp = observe(wq.grouped(m.weight), spec.bits, spec.symmetric, "mse")
                wq.scale = qp.scale.to(m.weight.dtype)
                wq.zero_point = qp.zero_point.to(m.weight.dtype)
    return q


VARIANTS: dict[str, tuple[dict[str, Any], Any]] = {  # name: (finetune options, model preparation)
    "recipe": ({}, None), "qat": ({"distill": False}, None),  # qat: on the labels alone
    "alpha1": ({"alpha": 1.0}, None), "mse": ({}, mse_scales), "slr3": ({"scale_lr": 3.0}, None),
    "mse_slr3": ({"scale_lr": 3.0}, mse_scales), "T1": ({"temperature": 1.0}, None),
    "T2": ({"temperature": 2.0}, None), "T4": ({"temperature": 4.0}, None),
}  # fmt: skip
RULES = tuple(SELECT)  # the trainer's selection rules, judged here


def recorded_run(q: nn.Module, data: Any, teacher: nn.Module, val: Any, kw: dict) -> dict:
    """``finetune(q, ...)`` with every epoch's logits on the held-out and the test samples kept:
    the trainer's held-out measurement (``squeezer.train.finetune.validate``) is wrapped for the
    length of the run, the training itself is untouched."""
    import importlib
    from unittest import mock

    ft = importlib.import_module("squeezer.train.finetune")  # the package exports the function
    xv = torch.cat([x for x, _ in val])
    seen, inner = [], ft.validate

    def recording(net, *a, **k):  # eval mode is what validation sets; each epoch resets modes
        with torch.no_grad():
            seen.append((net.eval()(xv), net(data.x_test)))
        return inner(net, *a, **k)

    with mock.patch.object(ft, "validate", recording):
        r = finetune(q, data, teacher=teacher, val_data=val, **kw)
    return {"val": torch.stack([v for v, _ in seen]), "test": torch.stack([t for _, t in seen]),
            "best_epoch": r.best_epoch, "seconds": r.seconds, "final_test": top1(r.model, data),
            "history": [dict(h) for h in r.history]}  # fmt: skip


def judge(rec: dict, splits: int) -> dict:
    """Each rule on each run, fairly (``split_half_scores``): ``half`` on each seed's own halving
    of the held-out samples, ``many`` on ``splits`` more; ``oracle``: the best epoch on the
    scoring half itself. The test top-1 of the epoch each rule keeps on the whole held-out split
    (and of every epoch) is for the record only."""
    y, tv, yt = rec["y_val"], rec["teacher_val"], rec["y_test"]
    out: dict[str, Any] = {}
    for name, runs in rec["runs"].items():
        t = float(VARIANTS[name][0].get("temperature", 6.0))
        cell: dict[str, Any] = {r: {"half": [], "many": [], "test": [], "epoch": []} for r in RULES}
        cell["oracle"], cell["epoch_test"], cell["ptq"] = [], [], [run["ptq"] for run in runs.values()]
        for seed, run in runs.items():
            ps = per_sample(run["val"], y, tv, t)
            test_acc = ((run["test"].argmax(-1) == yt).double().mean(-1) * 100).tolist()
            cell["epoch_test"].append(test_acc)
            for r in RULES:
                cell[r]["half"] += split_half_scores(ps, r, seed=int(seed))
                cell[r]["many"] += split_half_scores(ps, r, seed=int(seed) + 100, splits=splits)
                cell[r]["epoch"].append(pick_on(ps, torch.arange(len(y)), r))
                cell[r]["test"].append(test_acc[cell[r]["epoch"][-1]])
            # the best any rule could do: the scoring half's own best epoch
            cell["oracle"] += [float(ps["right"][:, b].mean(1).max()) for b in halves(len(y), int(seed))]
        out[name] = cell
    return out


def print_judged(rec: dict, judged: dict) -> None:
    fp32 = rec["fp32"]
    print(f"\nFP32 test {fp32:.2f}; PTQ test by seed {[round(p, 2) for p in rec['ptq']]}")
    print("| run | rule | held-out half B top-1, picked on half A (seed's split; mean of seeds x 2) "
          "| same, more random splits | kept epoch by seed | test top-1 of the kept epoch (record "
          "only) | gap recovered by seed |\n|---|---|---|---|---|---|---|")  # fmt: skip
    for name, cell in judged.items():
        for r in RULES:
            c = cell[r]
            many = f"{statistics.mean(c['many']):.2f}" if c["many"] else "—"
            gaps = ", ".join(f"{recovered(p, a, fp32):.0%}" for p, a in zip(cell["ptq"], c["test"],
                                                                           strict=True))  # fmt: skip
            print(f"| {name} | {r} | {statistics.mean(c['half']):.2f} | {many} | {c['epoch']} | "
                  f"{mean_spread(c['test'])} | {gaps} |")  # fmt: skip
    for name, cell in judged.items():
        print(f"{name}: the scoring half's own best epoch {statistics.mean(cell['oracle']):.2f}; "
              f"test top-1 by epoch, per seed: {[[round(a, 1) for a in s] for s in cell['epoch_test']]}")


def run_sweep(args: argparse.Namespace) -> dict:
    """QAT + KD from the FP32 net with the trainer's defaults and each variant of them (and QAT
    on the labels, variant ``qat``), every epoch's held-out and test logits recorded; then each
    selection rule and each variant judged on the held-out split only (``judge``), the test top-1
    printed beside it for the record. ``--load`` re-judges saved records instead of training."""
    if args.load:
        rec = None
        for f in args.load:  # each file's runs merged seed by seed, each run with its seed's PTQ
            r = torch.load(f, weights_only=True)
            for name, runs in r["runs"].items():
                for i, run in enumerate(runs.values()):
                    run.setdefault("ptq", r["ptq"][i])
                if rec is not None:
                    rec["runs"].setdefault(name, {}).update(runs)
            rec = rec or r
    else:
        rec = record_sweep(args)
        if args.save:
            torch.save(rec, args.save)
    judged = judge(rec, args.splits)
    print_judged(rec, judged)
    keep = ("best_epoch", "seconds", "final_test", "history", "ptq")
    return {"judged": judged, "fp32": rec["fp32"], "runs": {n: {s: {k: r[k] for k in keep}
            for s, r in runs.items()} for n, runs in rec["runs"].items()}}  # fmt: skip


def record_sweep(args: argparse.Namespace) -> dict:
    net, data, val = trained(args.net, args.fp32_epochs, args.cache)
    budget, method, act = PLANS[args.plan]
    rec: dict[str, Any] = {"net": NETS[args.net][0], "plan": args.plan, "fp32": top1(net, data),
                           "y_val": torch.cat([y for _, y in val]), "y_test": data.y_test,
                           "teacher_val": net(torch.cat([x for x, _ in val])).detach(), "ptq": [],
                           "runs": {v: {} for v in args.variants}}  # fmt: skip
    log(f"FP32 test {rec['fp32']:.2f} held-out {float(evaluate(net, val, data.task)):.2f}")
    for seed in args.seeds:
        q = compress(net, data, budget, method=method, act_bits=act, seed=seed).qmodel
        rec["ptq"].append(top1(q, data))
        log(f"seed {seed} PTQ test {rec['ptq'][-1]:.2f} held-out {evaluate(q, val, data.task):.2f}")
        for name in args.variants:
            kw, prep = VARIANTS[name]
            run = recorded_run(prep(q) if prep else q, data, net, val,
                               dict(epochs=args.epochs, seed=seed, progress=False, **kw))  # fmt: skip
            rec["runs"][name][str(seed)] = {**run, "ptq": rec["ptq"][-1]}
            log(f"seed {seed} {name}: best epoch {run['best_epoch']}, test {run['final_test']:.2f}"
                f" ({run['seconds']:.0f} s); held-out top-1 by epoch "
                f"{[round(h['val_metric'], 2) for h in run['history']]}")  # fmt: skip
    return rec


# --------------------------------------------------------------------------------------------------
# MiniLM run folders


def sentences_data(fp32: nn.Module, n_train: int | None, n_test: int, max_len: int,
                   cache: Path | None) -> Any:  # fmt: skip
    """The ``sentences`` data set with ``fp32``'s embeddings as targets, cached on disk by the
    model's weights, the sentences and ``max_len``: embedding the whole corpus with the FP32 model
    is the slow step, and every plan of a model (and every re-run) needs the same targets."""
    import hashlib

    from squeezer.hf import load_hf
    from squeezer.text import EmbeddingTask, TokenDataset, split_sentences, stdlib_sentences

    train, test = split_sentences(stdlib_sentences(), seed=0)
    h = hashlib.sha256(json.dumps([max_len, train[:n_train], test[:n_test]]).encode())
    for k, v in sorted(fp32.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().float().contiguous().numpy().tobytes())
    f = cache / f"sentences-{h.hexdigest()[:20]}.pt" if cache else None
    if f is not None and f.is_file():
        b = torch.load(f, weights_only=True)
        log(f"FP32 embeddings of {len(b['y_train'])} + {len(b['y_test'])} sentences from {f.name}")
        return TokenDataset("sentences", b["x_train"], b["y_train"], b["x_test"], b["y_test"],
                            EmbeddingTask(), b["meta"])  # fmt: skip
    t = time.perf_counter()
    _, tok = load_hf("hf:minilm")
    data = load_data("sentences", model=fp32, tokenizer=tok, n_train=n_train, n_test=n_test,
                     max_len=max_len)  # fmt: skip
    log(f"tokenized and embedded {data.n_train} + {n_test} sentences with FP32 in "
        f"{time.perf_counter() - t:.0f} s")  # fmt: skip
    if f is not None:
        f.parent.mkdir(parents=True, exist_ok=True)
        blob = {k: getattr(data, k) for k in ("x_train", "y_train", "x_test", "y_test")}
        tmp = f.with_suffix(".part")
        torch.save({**blob, "meta": data.meta}, tmp)
        tmp.replace(f)
    return data


def run_minilm(args: argparse.Namespace) -> dict:
    from squeezer.runfolder import load_compressed, read_metrics

    out: dict[str, Any] = {"epochs": args.epochs, "lr": args.lr, "n_train": args.n_train,
                           "hidden": args.hidden, "hidden_loss": args.hidden_loss,
                           "hidden_attention": args.hidden_attention, "lsq": args.lsq,
                           "runs": {}}  # fmt: skip
    for run in args.runs:
        fp32, q, _, data = load_compressed(run)
        n_test = args.n_test or len(data.meta["test_text"])
        if args.n_train != data.n_train or n_test != len(data.meta["test_text"]):
            # more sentences than the run's: the same seeded split, its test part never trained on
            data = sentences_data(fp32, args.n_train or None, n_test, data.meta["max_len"],
                                  args.cache)  # fmt: skip
        m = read_metrics(run)
        name = m.get("after", {}).get("name", Path(run).name)
        t = time.perf_counter()
        ptq, _ = test_metrics(q, data)
        log(f"{name}: PTQ test cosine {ptq:.4f} ({time.perf_counter() - t:.0f} s to measure); "
            f"{data.n_train} training sentences")  # fmt: skip
        r = finetune(q, data, teacher=fp32, epochs=args.epochs, lr=args.lr,
                     batch_size=args.batch_size, seed=0, progress=False, steps_per_epoch=args.steps,
                     hidden_weight=args.hidden, hidden_loss=args.hidden_loss,
                     hidden_attention=args.hidden_attention, lsq=args.lsq)  # fmt: skip
        after, extra = test_metrics(r.model, data)
        curve = [(h["epoch"], h["val_metric"], h["seconds"]) for h in r.history]
        log(f"{name}: held-out cosine per epoch {[(e, round(c, 4)) for e, c, _ in curve]}; "
            f"s per epoch {[round(s) for _, _, s in curve[1:]]}; test cosine {ptq:.4f} -> "
            f"{after:.4f} on {n_test} sentences in {r.seconds:.0f} s (best epoch "
            f"{r.best_epoch}, {data.n_train} training sentences)")  # fmt: skip
        out["runs"][str(run)] = {"name": name, "avg_bits": m.get("after", {}).get("avg_bits"),
                                 "ptq": ptq, "after": after, "extra": extra,
                                 "history": list(r.history), "seconds": r.seconds,
                                 "best_epoch": r.best_epoch}  # fmt: skip
    print("\n| plan | avg bits | PTQ cosine | held-out cosine by epoch | test cosine after | "
          "fine-tune s |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for r in out["runs"].values():
        curve = " → ".join(f"{h['val_metric']:.4f}" for h in r["history"])
        print(f"| {r['name']} | {r['avg_bits']} | {r['ptq']:.4f} | {curve} | {r['after']:.4f} | "
              f"{r['seconds']:.0f} |")  # fmt: skip
    return out


# --------------------------------------------------------------------------------------------------
# Brevitas, trained by the same loop


def brevitas_model(net: nn.Module, bits: int) -> nn.Module:
    """A copy of ``net`` with every Conv2d / Linear a Brevitas layer: ``bits``-bit per-channel
    symmetric weights, ``bits``-bit asymmetric per-tensor inputs (squeezer's W4A4 settings)."""
    import brevitas.nn as qnn
    from brevitas.quant import Int8WeightPerChannelFloat, ShiftedUint8ActPerTensorFloat

    from squeezer.graph import copy_model

    model = copy_model(net)
    kw = dict(weight_quant=Int8WeightPerChannelFloat, weight_bit_width=bits,
              input_quant=ShiftedUint8ActPerTensorFloat, input_bit_width=bits)  # fmt: skip

    def swap(parent: nn.Module) -> None:
        for name, child in parent.named_children():
            if type(child) is nn.Conv2d or type(child) is nn.Conv1d:
                cls = qnn.QuantConv2d if type(child) is nn.Conv2d else qnn.QuantConv1d
                new = cls(child.in_channels, child.out_channels, child.kernel_size,
                          stride=child.stride, padding=child.padding, dilation=child.dilation,
                          groups=child.groups, bias=child.bias is not None, **kw)  # fmt: skip
            elif type(child) is nn.Linear:
                new = qnn.QuantLinear(child.in_features, child.out_features,
                                      bias=child.bias is not None, **kw)  # fmt: skip
            else:
                swap(child)
                continue
            new.load_state_dict(child.state_dict(), strict=False)
            setattr(parent, name, new)

    swap(model)
    return model


def calibrate_brevitas(model: nn.Module, batches: Any) -> nn.Module:
    from brevitas.graph.calibrate import calibration_mode

    model.eval()
    with torch.no_grad(), calibration_mode(model):
        for x, _ in batches:
            model(x)
    return model.eval()


def run_peer(args: argparse.Namespace) -> dict:
    import brevitas

    net, data, val = trained(args.net, args.fp32_epochs, args.cache)
    fp32 = top1(net, data)
    bits = 4
    out: dict[str, Any] = {"net": NETS[args.net][0], "fp32": fp32, "epochs": args.epochs,
                           "lr": args.lr, "brevitas": brevitas.__version__, "rows": []}  # fmt: skip
    for seed in args.seeds:
        res = compress(net, data, "bits=4", method="uniform", act_bits=bits, seed=seed)
        calib = data.calibration_batches(seed=1234 + seed)
        bq = calibrate_brevitas(brevitas_model(net, bits), calib)
        # the same recipe for both, written out (a Brevitas net is not a squeezer-quantized one,
        # so the trainer would give it the plain defaults): squeezer's BN-classifier recipe
        rec = {k: v for k, v in BN_CLASSIFIER_RECIPE.items() if k != "lsq"}
        rec.update({k: getattr(args, k) for k in ("lr", "batch_size", "freeze_bn")
                    if getattr(args, k) is not None})  # fmt: skip
        out["recipe"] = rec
        kw = dict(teacher=net, epochs=args.epochs, seed=seed, progress=False, val_data=val, **rec)
        for tool, q in (("squeezer", res.qmodel), ("brevitas", bq)):
            ptq = top1(q, data)
            # Brevitas' scales are parameters already (learned by the same optimizer)
            lsq = tool == "squeezer" and args.lsq is not False
            r = finetune(q, data, lsq=lsq, **kw)
            after = top1(r.model, data)
            per_epoch = statistics.median(h["seconds"] for h in r.history[1:])
            out["rows"].append({"tool": tool, "seed": seed, "ptq": ptq, "after": after,
                                "s_per_epoch": per_epoch, "best_epoch": r.best_epoch})  # fmt: skip
            log(f"{tool} seed {seed}: PTQ {ptq:.2f} -> QAT+KD {after:.2f}, "
                f"{per_epoch:.2f} s/epoch (median), best epoch {r.best_epoch}")  # fmt: skip
    print(f"\n{out['net']} W4A4, QAT + KD {args.epochs} epochs, {out['recipe']}, FP32 {fp32:.2f}")
    print("| tool | seed | PTQ | QAT + KD | s / epoch (median) |")
    print("|---|---|---|---|---|")
    for r in out["rows"]:
        print(f"| {r['tool']} | {r['seed']} | {r['ptq']:.2f} | {r['after']:.2f} | "
              f"{r['s_per_epoch']:.2f} |")  # fmt: skip
    print("| tool | PTQ | QAT + KD | s / epoch (median of seeds' medians) |")
    print("|---|---|---|---|")
    for tool in ("squeezer", "brevitas"):
        rows = [r for r in out["rows"] if r["tool"] == tool]
        print(f"| {tool} | {mean_spread([r['ptq'] for r in rows])} | "
              f"{mean_spread([r['after'] for r in rows])} | "
              f"{statistics.median(r['s_per_epoch'] for r in rows):.2f} |")  # fmt: skip
    return out


# --------------------------------------------------------------------------------------------------
# Export and the integer-only path of a fine-tuned run


def run_export(args: argparse.Namespace) -> dict:
    from squeezer.integer import to_integer
    from squeezer.runfolder import load_compressed, read_metrics

    tmp = Path(tempfile.mkdtemp(prefix="ft-export-"))
    d = tmp / "run"
    shutil.copytree(args.run, d)
    cli = [sys.executable, "-m", "squeezer"]
    out: dict[str, Any] = {}
    cmd = [*cli, "finetune", str(d), "--epochs", str(args.epochs), "--quiet", "--threads", "1"]
    out["finetune_rc"] = subprocess.run(cmd).returncode
    m = read_metrics(d)
    out["finetune"] = {k: m.get("finetune", {}).get(k) for k in ("ptq", "after", "fp32")}
    log(f"finetune: rc {out['finetune_rc']}, {out['finetune']}")
    p = subprocess.run([*cli, "export", str(d), "--threads", "1"], capture_output=True, text=True)
    out["export_rc"], out["export_out"] = p.returncode, (p.stdout + p.stderr).strip()[-600:]
    log(f"export: rc {p.returncode}: {out['export_out']}")
    _, q, x, data = load_compressed(d)
    imodel = to_integer(q, x[:1])
    with torch.no_grad():
        a, b = q(x), imodel(x)
    out["integer_agreement"] = float((a.argmax(1) == b.argmax(1)).float().mean() * 100)
    out["integer_max_abs_logit_diff"] = float((a - b).abs().max())
    out["integer_top1"] = float((b.argmax(1) == data.y_test).float().mean() * 100)
    out["finetuned_top1"] = float((a.argmax(1) == data.y_test).float().mean() * 100)
    log(f"to_integer: top-1 {out['integer_top1']:.2f} vs fine-tuned {out['finetuned_top1']:.2f}, "
        f"argmax agreement {out['integer_agreement']:.2f}%, max |logit diff| "
        f"{out['integer_max_abs_logit_diff']:.4g}")  # fmt: skip
    shutil.rmtree(tmp)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="part", required=True)
    seeds = dict(type=lambda s: [int(v) for v in s.split(",")], default=[0, 1, 2])
    for name in ("cnn", "peer", "sweep", "minilm", "export"):
        s = sub.add_parser(name)
        s.add_argument("--epochs", type=int, default=5 if name in ("cnn", "peer", "sweep") else 2)
        s.add_argument("--lr", type=float, default=None, help="default: the trainer's")
        s.add_argument("--json", type=Path, default=None)
        if name in ("cnn", "peer", "sweep"):
            s.add_argument("--seeds", **seeds)
            s.add_argument("--fp32-epochs", type=int, default=30)
            s.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "ft-bench")
            s.add_argument("--lsq", action=argparse.BooleanOptionalAction, default=None,
                           help="squeezer learns its step sizes (default: the trainer's)")
            s.add_argument("--batch-size", type=int, default=None, help="default: the trainer's")
            s.add_argument("--freeze-bn", action=argparse.BooleanOptionalAction, default=None,
                           help="BatchNorm statistics frozen (default: the trainer's)")
        if name == "cnn":
            s.add_argument("--nets", type=lambda s: s.split(","), default=list(NETS))
            s.add_argument("--plans", type=lambda s: s.split(","), default=list(PLANS),
                           help=f"of {', '.join(PLANS)}")  # fmt: skip
        if name in ("peer", "sweep"):
            s.add_argument("--net", choices=tuple(NETS), default="digits" if name == "peer" else "mnist1d")
        if name == "sweep":
            s.add_argument("--plan", choices=tuple(PLANS), default="W4A4")
            s.add_argument("--variants", type=lambda s: s.split(","), default=["qat", "recipe"],
                           help=f"of {', '.join(VARIANTS)}")  # fmt: skip
            s.add_argument("--splits", type=int, default=50, help="random halvings of held-out")
            s.add_argument("--save", type=Path, default=None, help="keep the recorded logits")
            s.add_argument("--load", type=Path, nargs="+", default=None,
                           help="re-judge saved records (their runs merged) instead of training")  # fmt: skip
        if name == "minilm":
            s.add_argument("runs", nargs="+", type=Path)
            s.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "ft-bench",
                           help="where the FP32 embeddings of the corpus are kept")  # fmt: skip
            s.add_argument("--threads", type=int, default=1)
            s.add_argument("--batch-size", type=int, default=32)
            s.add_argument("--steps", type=int, default=None, help="at most N steps an epoch")
            s.add_argument("--n-train", type=int, default=0,
                           help="training sentences (0: all; the run's own split has 1024)")  # fmt: skip
            s.add_argument("--n-test", type=int, default=0,
                           help="test sentences (0: the run's; the test split has 1817)")  # fmt: skip
            s.add_argument("--hidden", type=float, default=0.0,
                           help="hidden-state distillation weight (0: embeddings only)")  # fmt: skip
            s.add_argument("--hidden-loss", choices=("mse", "cosine"), default="mse")
            s.add_argument("--hidden-attention", action="store_true")
            s.add_argument("--lsq", action="store_true", help="learn the step sizes (LSQ)")
        if name == "export":
            s.add_argument("run", type=Path)
    args = p.parse_args()
    torch.set_num_threads(getattr(args, "threads", 1))
    t = time.perf_counter()
    parts = {"cnn": run_cnn, "peer": run_peer, "sweep": run_sweep, "minilm": run_minilm,
             "export": run_export}  # fmt: skip
    out = parts[args.part](args)
    out["wall_s"] = time.perf_counter() - t
    out["torch"] = torch.__version__
    log(f"done in {out['wall_s']:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
