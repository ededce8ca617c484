"""Pruning benchmarks (issue 13): structured channel pruning at 50% of the MACs against
Torch-Pruning (DepGraph) on the zoo's BN ResNets, and LEAP against magnitude pruning.

    pip install torch-pruning==1.6.1      # the peer (it pulls nothing else here; check with --dry-run)
    python benchmarks/pruning.py structured [--models digits_resnet_deep,mnist1d_resnet]
        [--dense-epochs 40] [--finetune 20] [--seed 0] [--threads 1] [--json FILE]
    python benchmarks/pruning.py leap [--ratios 0.5,0.7,0.9] [--finetune 10] [--json FILE]
    python benchmarks/pruning.py joint [--models digits_resnet_deep] [--budgets 0.3,0.4]
        [--latency-budgets 0.25,0.5] [--omega hessian|measured] [--finetune 20]
        [--recover float|qat|float,qat]
    python benchmarks/pruning.py joint-zeros [--budgets 0.3,0.4,0.5]   (magnitude zeros, no FT)
    python benchmarks/pruning.py large [--model mnist1d_resnet] [--widths 8,16,32]

Every variant is pruned from the same trained dense net to at most 50% of its MACs (squeezer's
own MAC count, :func:`squeezer.measure.profile_layers`, for both tools), then fine-tuned by the
one trainer, :func:`squeezer.train.finetune.finetune`, with knowledge distillation from the dense
net, for the same epochs, learning rate and seed. Channel widths are rounded to multiples of 8 in
both tools (``round_to=8``). Latency: ONNX Runtime (FP32 export of each model), batch 32, one
thread, median of the timed calls taken round-robin over the variants in one run.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

DATA_OF = {"digits_resnet_deep": "digits", "mnist1d_resnet": "mnist1d", "digits_resnet": "digits",
           "digits_cnn": "digits", "mnist1d_cnn": "mnist1d"}  # fmt: skip


def _macs(model: nn.Module, example: torch.Tensor) -> float:
    from squeezer.measure import profile_layers

    return float(sum(v.macs for v in profile_layers(model, example[:1]).values()))


def _accuracy(model: nn.Module, data) -> float:
    from squeezer.data import evaluate

    return evaluate(model.eval(), data.test_batches(), data.task)


def _dense(name: str, data, epochs: int, seed: int, cache: Path, width: int | None = None):
    """The dense net, trained once per (model, width, epochs, seed) and cached."""
    from squeezer.models import load_weights, save_weights
    from squeezer.train import fit
    from squeezer.zoo import create

    tag = "" if width is None else f"-w{width}"
    path = cache / f"{name}{tag}-e{epochs}-s{seed}.safetensors"
    model = create(name, **({} if width is None else {"width": width}))
    if path.is_file():
        load_weights(model, path)
        return model.eval()
    model, _ = fit(model, data, epochs=epochs, seed=seed)
    cache.mkdir(parents=True, exist_ok=True)
    save_weights(model, path)
    return model.eval()


def _data_and_dense(name: str, args: argparse.Namespace):
    """The data set of a zoo net and the net trained on it (cached)."""
    from squeezer.data import load_data

    data = load_data(DATA_OF[name], seed=args.seed)
    torch.manual_seed(args.seed)
    return data, _dense(name, data, args.dense_epochs, args.seed, Path(args.cache))


def _recover(model: nn.Module, teacher: nn.Module, data, args) -> tuple[nn.Module, float]:
    from squeezer.train.finetune import finetune

    if args.finetune == 0:
        return model, 0.0
    t = time.perf_counter()
    r = finetune(
        model, data, teacher=teacher, epochs=args.finetune, lr=args.lr, seed=args.seed,
        freeze_bn=False, progress=False,
    )  # fmt: skip
    return r.model, time.perf_counter() - t


def torch_pruning(dense: nn.Module, example: torch.Tensor, ratio: float, head: str) -> nn.Module:
    """Torch-Pruning's DepGraph with group L1 magnitude, global ranking and round_to=8, its
    pruning ratio bisected until the MACs are at most ``1 - ratio`` of the dense net's."""
    import torch_pruning as tp

    goal = (1 - ratio) * _macs(dense, example)

    def pruned(r: float) -> nn.Module:
        m = copy.deepcopy(dense).eval()
        pruner = tp.pruner.MetaPruner(
            m, example[:2], importance=tp.importance.GroupMagnitudeImportance(p=1),
            pruning_ratio=r, global_pruning=True, round_to=8,
            ignored_layers=[m.get_submodule(head)],
        )  # fmt: skip
        pruner.step()
        return m

    lo, hi = 0.0, 0.95
    best = pruned(hi)
    for _ in range(14):
        mid = (lo + hi) / 2
        m = pruned(mid)
        if _macs(m, example) <= goal:
            hi, best = mid, m
        else:
            lo = mid
    return best


def bench_structured(args: argparse.Namespace) -> dict:
    from squeezer.data import load_data
    from squeezer.export import export_float_onnx, latency_table, ort_session
    from squeezer.prune import PruneSpec, prune

    rows = []
    for name in args.models.split(","):
        data = load_data(DATA_OF[name], seed=args.seed)
        torch.manual_seed(args.seed)
        dense = _dense(name, data, args.dense_epochs, args.seed, Path(args.cache))
        example = data.example(32)
        head = [k for k, m in dense.named_modules() if isinstance(m, nn.Linear)][-1]
        variants: dict[str, nn.Module] = {"dense": dense}
        info: dict[str, dict] = {"dense": {"accuracy": _accuracy(dense, data)}}
        for importance in args.importance.split(","):
            t = time.perf_counter()
            spec = PruneSpec("structured", args.ratio, importance=importance, seed=args.seed)
            p = prune(dense, spec, data)
            key = f"squeezer ({importance})"
            info[key] = {"prune_s": time.perf_counter() - t, "acc_pruned": _accuracy(p.model, data)}
            variants[key] = p.model
        t = time.perf_counter()
        variants["Torch-Pruning"] = torch_pruning(dense, example, args.ratio, head)
        info["Torch-Pruning"] = {
            "prune_s": time.perf_counter() - t,
            "acc_pruned": _accuracy(variants["Torch-Pruning"], data),
        }
        for key in list(variants)[1:]:
            variants[key], secs = _recover(variants[key], dense, data, args)
            info[key].update(accuracy=_accuracy(variants[key], data), finetune_s=secs)
        sessions = {
            k: ort_session(export_float_onnx(m, example), threads=args.threads)
            for k, m in variants.items()
        }
        table = latency_table(sessions, {32: example}, threads=args.threads, runs=args.runs)
        base = table["batch_32"]["dense"]["median_ms"]
        dense_macs = _macs(dense, example)
        for key, m in variants.items():
            lat = table["batch_32"][key]["median_ms"]
            row = {
                "model": name, "data": data.name, "variant": key, **info[key],
                "macs_ratio": _macs(m, example) / dense_macs,
                "params": sum(p.numel() for p in m.parameters()),
                "ort_b32_ms": lat, "speedup": base / lat,
            }  # fmt: skip
            print(json.dumps(row), flush=True)
            rows.append(row)
    return {
        "ratio": args.ratio, "dense_epochs": args.dense_epochs, "finetune_epochs": args.finetune,
        "lr": args.lr, "seed": args.seed, "threads": args.threads, "rows": rows,
    }  # fmt: skip


def bench_leap(args: argparse.Namespace) -> dict:
    """LEAP (thresholds learned over ``--finetune`` epochs) against global magnitude pruning
    followed by the same number of fine-tuning epochs (zeros held), at each ratio; with
    ``--granularity channels``, structured LEAP (ratio of the MACs) against structured L1 pruning
    followed by the same fine-tuning."""
    target, baseline = (("weights", "unstructured") if args.granularity == "weights"
                        else ("macs", "structured"))  # fmt: skip
    from squeezer.data import load_data
    from squeezer.prune import PruneSpec, prune
    from squeezer.prune.stage import prune_stage

    rows = []
    for name in args.models.split(","):
        data = load_data(DATA_OF[name], seed=args.seed)
        torch.manual_seed(args.seed)
        dense = _dense(name, data, args.dense_epochs, args.seed, Path(args.cache))
        acc = _accuracy(dense, data)
        for ratio in (float(r) for r in args.ratios.split(",")):
            t = time.perf_counter()
            opts = {"epochs": args.finetune, "lr": args.lr}
            leap = prune(dense, PruneSpec("leap", ratio, target=target, seed=args.seed,
                                          options=opts), data)  # fmt: skip
            t_leap = time.perf_counter() - t
            t = time.perf_counter()
            mag = prune_stage(dense, data, PruneSpec(baseline, ratio, target=target),
                              finetune_epochs=args.finetune, lr=args.lr, seed=args.seed)  # fmt: skip
            row = {
                "model": name, "data": data.name, "ratio": ratio, "dense": acc,
                "granularity": args.granularity,
                "leap": _accuracy(leap.model, data), "leap_learned_ratio": leap.stats["learned_ratio"],
                **({"leap_ratio": leap.stats["sparsity"],
                    "leap_threshold_factor": leap.stats["threshold_factor"]}
                   if target == "weights" else
                   {"leap_ratio": 1 - leap.stats["macs_after"] / leap.stats["macs_before"],
                    "magnitude_ratio": 1 - mag.pruned.stats["macs_after"] / mag.pruned.stats["macs_before"],
                    "leap_architecture": leap.architecture}),
                "leap_s": t_leap,
                "magnitude": _accuracy(mag.model, data),
                "magnitude_no_ft": mag.record["pruned"]["metric"],
                "magnitude_s": time.perf_counter() - t,
            }  # fmt: skip
            print(json.dumps(row), flush=True)
            rows.append(row)
    return {"finetune_epochs": args.finetune, "lr": args.lr, "seed": args.seed, "rows": rows,
            "dense_epochs": args.dense_epochs}  # fmt: skip


def _int8_bytes(dense: nn.Module, bits, ratios) -> float:
    """Bytes of ``dense`` with every planned layer at 8 bits, unpruned (the budgets' unit)."""
    from squeezer.costs import joint_size_bytes, plan_costs
    from squeezer.graph import quantizable_layers

    layers = list(quantizable_layers(dense))
    size = joint_size_bytes(dense, layers, (8,), (0.0,))
    return plan_costs(dense, (8,), layers=layers).fixed_bytes + sum(
        size[k][8, 0.0] for k in layers
    )


def _joint_rows(name, dense, data, caps, bits, ratios, modes, seed, label) -> list[dict]:
    """Accuracy of the joint / restricted plans of ``dense`` at each size cap in bytes."""
    from squeezer.config import LayerQuant, Plan
    from squeezer.costs import joint_size_bytes, plan_costs
    from squeezer.errors import InfeasibleBudgetError
    from squeezer.plan import plan_joint
    from squeezer.prune.unstructured import apply_masks
    from squeezer.quant.apply import quantize
    from squeezer.sensitivity import joint_sensitivity, magnitude_mask
    from squeezer.spectrum import analyze_dataset

    rows = []
    spec = analyze_dataset(dense, data, samples=512, top_k=1, per_layer_eig=False,
                           max_probes=30, min_probes=10, seed=seed)  # fmt: skip
    omega = joint_sensitivity(dense, dict(spec.layer_trace), bits, ratios)
    size = joint_size_bytes(dense, list(omega), bits, ratios)
    fixed = plan_costs(dense, (8,), layers=list(omega)).fixed_bytes
    calib = data.calibration_batches(seed=seed)
    named = dict(dense.named_modules())
    n = {k: named[k].weight.numel() for k in omega}
    acc = _accuracy(dense, data)
    params = sum(p.numel() for p in dense.parameters())
    for i, cap in enumerate(caps):
        for mode, allowed in modes.items():
            row = {"model": name, "params": params, "cap_bytes": cap, "mode": mode, "dense": acc,
                   **{k: v[i] for k, v in label.items()}}  # fmt: skip
            try:
                jp = plan_joint(omega, size, cap, fixed_bytes=fixed, allowed=allowed)
            except InfeasibleBudgetError:
                row["accuracy"] = None
                print(json.dumps(row), flush=True)
                rows.append(row)
                continue
            masks = {k: magnitude_mask(named[k].weight, r) for k, (_, r) in jp.choices.items()}
            plan = Plan({k: LayerQuant(bits=b, act_bits=8 if b < 16 else None)
                         for k, b in jp.bits().items()})  # fmt: skip
            q = quantize(apply_masks(dense, masks), plan, calib=calib)
            row.update(
                accuracy=_accuracy(q, data), omega=jp.omega, size_bytes=jp.size_bytes,
                avg_bits=sum(n[k] * b for k, b in jp.bits().items()) / sum(n.values()),
                sparsity=sum(n[k] * r for k, r in jp.ratios().items()) / sum(n.values()),
            )  # fmt: skip
            print(json.dumps(row), flush=True)
            rows.append({**row, "choices": {k: list(c) for k, c in jp.choices.items()}})
    return rows


def bench_large(args: argparse.Namespace) -> dict:
    """\"Train large, then compress" (Li et al., arXiv:2002.11794): nets of several widths trained
    for the same epochs on the same data, each compressed by the joint planner (and bits only) to
    the same sizes in bytes, given as fractions of the narrowest net's all-8-bit size."""
    from squeezer.data import load_data

    bits = tuple(int(b) for b in args.bits.split(","))
    ratios = tuple(float(r) for r in args.ratios.split(","))
    budgets = [float(f) for f in args.budgets.split(",")]
    modes = {"joint": None, "bits only": lambda c: c[1] == 0}
    data = load_data(DATA_OF[args.model], seed=args.seed)
    widths = [int(w) for w in args.widths.split(",")]
    rows, unit = [], None
    for w in widths:
        dense = _dense(args.model, data, args.dense_epochs, args.seed, Path(args.cache), width=w)
        unit = unit or _int8_bytes(dense, bits, ratios)
        rows += _joint_rows(f"{args.model} w{w}", dense, data, [f * unit for f in budgets], bits,
                            ratios, modes, args.seed, {"budget_frac": budgets})  # fmt: skip
    return {"widths": widths, "unit_bytes": unit, "dense_epochs": args.dense_epochs, "rows": rows}


def _joint_setup(name: str, dense: nn.Module, data, args) -> tuple:
    """The structured joint table of ``dense``: channel groups at ``--ratios``, bits ``--bits``,
    Ω (``--omega``), sizes, and the per-layer ONNX Runtime latency table at batch 32."""
    from squeezer.layer_timing import exported_latency
    from squeezer.prune import PruneSpec
    from squeezer.prune import joint as jp
    from squeezer.prune.structured import hessian_traces
    from squeezer.quant.apply import quantize
    from squeezer.templates import uniform_plan

    bits = tuple(int(b) for b in args.bits.split(","))
    ratios = tuple(float(r) for r in args.ratios.split(","))
    spec = PruneSpec("structured", 0.0, seed=args.seed)
    template = next(iter(uniform_plan(dense, max(bits), act_bits=8).layers.values()))
    t = time.perf_counter()
    traces = hessian_traces(dense, data, spec)
    space = jp.joint_space(dense, data.example(2), ratios=ratios, traces=traces)
    if args.omega == "hessian":
        omega = jp.omega_hessian(space, traces, bits, template)
    else:
        omega = jp.omega_measured(space, data, bits, template, seed=args.seed)
    t_omega = time.perf_counter() - t
    example = data.example(32)
    t = time.perf_counter()
    latency = jp.latency_rows(space, example, bits, threads=args.threads, runs=args.runs)
    int8 = quantize(dense, uniform_plan(dense, 8, act_bits=8),
                    calib=data.calibration_batches(seed=args.seed))  # fmt: skip
    whole = exported_latency(int8, example, threads=args.threads, runs=args.runs)
    table = jp.joint_table(space, omega, bits, template, latency=latency, whole_latency_ms=whole,
                           meta={"omega": args.omega})  # fmt: skip
    info = {"int8_model": int8, "omega_s": t_omega, "latency_table_s": time.perf_counter() - t,
            "int8_dense_ms": whole, "groups": {g: list(r) for g, r in table.groups.items()}}  # fmt: skip
    return space, table, template, info


def _extreme(table, key: str, top: bool) -> float:
    """The cost ``key`` with every group at its largest ratio (top) or none, at 8 bits."""
    groups = {g: (max(r) if top else 0.0) for g, r in table.groups.items()}
    layers = {}
    for k, (og, ig) in table.layers.items():
        layers[k] = (8, groups.get(og, 0.0) if og else 0.0, groups.get(ig, 0.0) if ig else 0.0)
    return table.total(key, groups, layers)


def bench_joint(args: argparse.Namespace) -> dict:
    """Bits and structured sparsity under one budget (:func:`squeezer.plan_joint.plan_structured`):
    joint against bits only (no channel removed) and prune only (8 bits), each plan pruned for real
    and recovered as each ``--recover`` says (:data:`RECOVERIES`): ``float`` fine-tunes
    ``--finetune`` epochs with distillation from the dense net (as the structured rows; plans that
    remove nothing are not fine-tuned), then quantizes (8-bit activations, min-max per-channel
    weights, calibration on 512 training samples); ``qat`` quantizes first, then gives every plan
    the same ``--finetune`` epochs of QAT + KD. Each variant is evaluated and exported to ONNX
    Runtime, timed at batch 32. Size budgets are fractions of the all-8-bit size; latency budgets
    are points between the prune-only floor and the int8 dense model's measured latency."""
    from squeezer.errors import InfeasibleBudgetError
    from squeezer.plan_joint import plan_structured

    modes = {"joint": None, "bits only": lambda c: c[1] == 0 and c[2] == 0,
             "prune only (8 bit)": lambda c: c[0] == 8}  # fmt: skip
    recovers = [r for r in args.recover.split(",") if r]
    if not recovers or set(recovers) - set(RECOVERIES):
        raise SystemExit(f"--recover {args.recover!r}: give one or more of {', '.join(RECOVERIES)}")
    rows = []
    for name in args.models.split(","):
        data, dense = _data_and_dense(name, args)
        acc = _accuracy(dense, data)
        space, table, template, info = _joint_setup(name, dense, data, args)
        models: dict[str, nn.Module] = {"int8 dense": info.pop("int8_model")}
        int8_bytes = _extreme(table, "size_bytes", False)
        lo, hi = _extreme(table, "latency_ms", True), info["int8_dense_ms"]
        budgets = [("size", f, {"size_bytes": f * int8_bytes}) for f in _floats(args.budgets)]
        budgets += [("latency", f, {"latency_ms": lo + f * (hi - lo)})
                    for f in _floats(args.latency_budgets)]  # fmt: skip
        budgets += [("size+latency", f, {"size_bytes": args.combined_size * int8_bytes,
                                          "latency_ms": lo + f * (hi - lo)})
                    for f in _floats(args.combined_latency)]  # fmt: skip
        print(json.dumps({"model": name, "dense": acc, "int8_bytes": int8_bytes,
                          "latency_floor_ms": lo, **info}), flush=True)  # fmt: skip
        done: dict[str, dict] = {}
        example = data.example(32)
        for kind, frac, limits in budgets:
            for mode, allowed in modes.items():
                row = {"model": name, "dense": acc, "budget": kind, "frac": frac,
                       "limits": limits, "mode": mode}  # fmt: skip
                try:
                    ch = plan_structured(table, limits, allowed=allowed)
                except InfeasibleBudgetError as e:
                    row["infeasible"] = str(e)
                    print(json.dumps(row), flush=True)
                    rows.append(row)
                    continue
                n = {k: m.weight.numel() for k, m in quantizable(dense).items()}
                for recover in recovers:
                    key = json.dumps([ch.groups, ch.bits(), recover], sort_keys=True)
                    if key not in done:
                        done[key] = _joint_variant(dense, data, space, ch, template, args, example,
                                                   recover)  # fmt: skip
                        models[key] = done[key].pop("qmodel")
                    r = {**row, **done[key], "recover": recover, "omega": ch.omega,
                         "predicted": dict(ch.achieved), "groups": ch.groups,
                         "avg_bits": sum(n[k] * b for k, b in ch.bits().items()) / sum(n.values())}
                    quiet = ("groups", "qat_options")
                    print(json.dumps({k: v for k, v in r.items() if k not in quiet}), flush=True)
                    rows.append({**r, "variant": key})
        times = _round_robin(models, example, args)
        for row in rows:
            if row.get("model") == name and "variant" in row:
                row["ort_b32_ms"] = times[row["variant"]]
                row["int8_dense_b32_ms"] = times["int8 dense"]
                print(json.dumps({"mode": row["mode"], "budget": row["budget"], "frac": row["frac"],
                                  "recover": row["recover"], "ort_b32_ms": row["ort_b32_ms"],
                                  "int8_dense_b32_ms": times["int8 dense"]}), flush=True)  # fmt: skip
    return {"bits": args.bits, "ratios": args.ratios, "omega": args.omega, "seed": args.seed,
            "dense_epochs": args.dense_epochs, "finetune_epochs": args.finetune,
            "recover": recovers, "rows": rows}  # fmt: skip


def quantizable(model: nn.Module) -> dict[str, nn.Module]:
    from squeezer.graph import quantizable_layers

    return quantizable_layers(model)


#: How a joint-benchmark plan recovers: ``float``: fine-tune the pruned float net (plans that
#: remove nothing are not fine-tuned), then quantize post-training; ``qat``: prune, quantize with
#: the plan's bits, then quantization-aware fine-tuning with distillation from the dense net, for
#: every plan alike (the trainer's defaults for a quantized BN classifier).
RECOVERIES = ("float", "qat")


def _joint_variant(dense, data, space, ch, template, args, example, recover="float") -> dict:
    """Prune by the choice, recover as ``recover`` says (:data:`RECOVERIES`), evaluate."""
    from squeezer.measure import model_bytes
    from squeezer.prune import PruneSpec
    from squeezer.prune import joint as jp
    from squeezer.quant.apply import quantize
    from squeezer.train.finetune import finetune

    t = time.perf_counter()
    p = jp.apply_choice(dense, space, ch, PruneSpec("structured", 0.0, seed=args.seed))
    model, secs, out = p.model, 0.0, {}
    pruned_acc = _accuracy(model, data)
    if recover == "float" and any(ch.groups.values()):
        model, secs = _recover(model, dense, data, args)
    plan = jp.bits_plan(model, ch, template)
    q = quantize(model, plan, calib=data.calibration_batches(seed=args.seed))
    if recover == "qat" and args.finetune:
        out["ptq"] = _accuracy(q, data)
        r = finetune(q, data, teacher=dense, epochs=args.finetune, seed=args.seed,
                     progress=False)  # fmt: skip
        q, secs = r.model, r.seconds
        out.update(best_epoch=r.best_epoch, qat_options=r.options)
    out.update(accuracy=_accuracy(q, data), float_pruned=pruned_acc,
               float_finetuned=_accuracy(model, data) if recover == "float" else None,
               size_bytes=model_bytes(model, plan),
               macs_ratio=_macs(model, example) / _macs(dense, example),
               finetune_s=secs, variant_s=time.perf_counter() - t, qmodel=q)  # fmt: skip
    return out


def _round_robin(models: dict[str, nn.Module], example, args) -> dict[str, float]:
    """Median ms at batch 32 of every quantized variant exported as ``squeezer export`` does,
    timed round-robin in one run (ONNX Runtime, ``--threads``)."""
    import tempfile
    import warnings

    from squeezer.export import export_onnx, latency_table, ort_session

    with tempfile.TemporaryDirectory() as tmp:
        sessions = {}
        for i, (key, q) in enumerate(models.items()):
            path = Path(tmp) / f"v{i}.onnx"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                export_onnx(copy.deepcopy(q).eval(), path, example, verify=False,
                            threads=args.threads)  # fmt: skip
            sessions[key] = ort_session(path, threads=args.threads)
        table = latency_table(sessions, {32: example}, threads=args.threads, runs=args.runs)
    return {k: v["median_ms"] for k, v in table["batch_32"].items()}


def _floats(text: str) -> list[float]:
    return [float(f) for f in text.split(",") if f]


def bench_joint_zeros(args: argparse.Namespace) -> dict:
    """Bits and sparsity under one size budget: the joint (bits, prune ratio) ILP against the
    same ILP restricted to ratio 0 (bits only) and to 8 bits (prune only), at budgets given as
    fractions of the all-8-bit size; no fine-tuning in any row (post-training, same calibration)."""

    bits = tuple(int(b) for b in args.bits.split(","))
    ratios = tuple(float(r) for r in args.ratios.split(","))
    budgets = [float(f) for f in args.budgets.split(",")]
    modes = {"joint": None, "bits only": lambda c: c[1] == 0,
             "prune only (8 bit)": lambda c: c[0] == 8}  # fmt: skip
    rows = []
    for name in args.models.split(","):
        data, dense = _data_and_dense(name, args)
        caps = _int8_bytes(dense, bits, ratios)
        rows += _joint_rows(name, dense, data, [f * caps for f in budgets], bits, ratios, modes,
                            args.seed, {"budget_frac_of_int8": budgets})  # fmt: skip
    return {"bits": bits, "ratios": ratios, "seed": args.seed, "dense_epochs": args.dense_epochs,
            "rows": rows}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    s = sub.add_parser("structured")
    s.add_argument("--models", default="digits_resnet_deep,mnist1d_resnet")
    s.add_argument("--importance", default="l1,hessian")
    s.add_argument("--ratio", type=float, default=0.5, help="fraction of the MACs removed")
    s.add_argument("--dense-epochs", type=int, default=40)
    le = sub.add_parser("leap")
    le.add_argument("--models", default="digits_cnn,mnist1d_cnn")
    le.add_argument("--ratios", default="0.5,0.7,0.9")
    le.add_argument("--dense-epochs", type=int, default=30)
    le.add_argument("--granularity", choices=("weights", "channels"), default="weights",
                    help="unstructured LEAP vs magnitude, or structured LEAP vs L1 channels")
    jo = sub.add_parser("joint")
    jo.add_argument("--models", default="digits_resnet_deep,mnist1d_resnet")
    jo.add_argument("--bits", default="2,3,4,8")
    jo.add_argument("--ratios", default="0,0.25,0.5", help="candidate ratios per channel group")
    jo.add_argument("--omega", choices=("hessian", "measured"), default="hessian")
    jo.add_argument("--budgets", default="0.3,0.4", help="size limits, x all-8-bit size")
    jo.add_argument("--latency-budgets", default="0.25,0.5",
                    help="latency limits: floor + f x (int8 dense - floor)")  # fmt: skip
    jo.add_argument("--combined-size", type=float, default=0.4)
    jo.add_argument("--combined-latency", default="0.5", help="with --combined-size")
    jo.add_argument("--dense-epochs", type=int, default=40)
    jo.add_argument("--recover", default="float",
                    help="float (FT in float, then PTQ) and/or qat (PTQ, then QAT + KD for every "
                         "plan), comma-separated: each plan is recovered each way")  # fmt: skip
    jz = sub.add_parser("joint-zeros", help="the unstructured (magnitude zeros) joint ILP")
    jz.add_argument("--models", default="digits_resnet_deep,mnist1d_resnet")
    jz.add_argument("--bits", default="2,3,4,8")
    jz.add_argument("--ratios", default="0,0.25,0.5,0.75")
    jz.add_argument("--budgets", default="0.3,0.4,0.5", help="size limits, x all-8-bit size")
    jz.add_argument("--dense-epochs", type=int, default=40)
    la = sub.add_parser("large")
    la.add_argument("--model", default="mnist1d_resnet")
    la.add_argument("--widths", default="8,16,32")
    la.add_argument("--bits", default="2,3,4,8")
    la.add_argument("--ratios", default="0,0.25,0.5,0.75,0.9")
    la.add_argument("--budgets", default="0.25,0.5,1", help="x the narrowest net's 8-bit size")
    la.add_argument("--dense-epochs", type=int, default=15)
    for p in (s, le, jo, jz, la):
        p.add_argument("--finetune", type=int, default=20, help="fine-tuning epochs (KD)")
        p.add_argument("--lr", type=float, default=1e-3)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--threads", type=int, default=1)
        p.add_argument("--runs", type=int, default=50)
        p.add_argument(
            "--cache", default="runs/bench-pruning", help="where the trained dense nets are kept"
        )
        p.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    benches = {"structured": bench_structured, "leap": bench_leap, "joint": bench_joint,
               "joint-zeros": bench_joint_zeros, "large": bench_large}  # fmt: skip
    out = benches[args.what](args)
    if args.json:
        from squeezer.atomic import write_json

        write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
