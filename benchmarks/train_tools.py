"""Benchmarks of squeezer's training tools (issue 17): large-batch LAMB/LARS, Hessian-driven
adaptive batch size (ABS), and Checkmate rematerialization against torch.utils.checkpoint and
torch.compile's min-cut partitioner.

    python benchmarks/train_tools.py optim   [--seeds 3] [--epochs 20]
    python benchmarks/train_tools.py abs     [--seeds 3] [--epochs 16] [--plot FILE.png]
    python benchmarks/train_tools.py remat   [--models resnet,encoder] [--fractions 0.5,0.3]
    python benchmarks/train_tools.py solve   [--segments 4,8,12,16,24]

Every run is seeded and sets ``torch.set_num_threads`` (``--threads``, default 1). Memory is the
peak of CPU allocations live at once during one training step above what was live before it (the
profiler's allocation events: every tensor, autograd buffer and compiled-kernel buffer counts),
measured after a warm-up step so parameter gradients already exist.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn


# --------------------------------------------------------------------------------------- optim
def bench_optim(args: argparse.Namespace) -> dict:
    from squeezer.data import load_data
    from squeezer.train import fit
    from squeezer.zoo import create

    data = load_data("mnist1d")
    if args.recipe == "paper":
        return _optim_paper(args, data)
    runs = [("adamw", args.small_batch, [3e-3])]
    runs += [("adamw", args.large_batch, [3e-3, 1e-2, 3e-2])]
    runs += [("lamb", args.large_batch, [1e-2, 3e-2, 1e-1])]
    runs += [("lars", args.large_batch, [1.0, 3.0, 10.0])]
    rows = []
    for name, batch, lrs in runs:
        for lr in lrs:
            accs = []
            for seed in range(args.seeds):
                _, info = fit(
                    create("mnist1d_cnn"), data, epochs=args.epochs, batch_size=batch, lr=lr,
                    optimizer=name, seed=seed,
                )  # fmt: skip
                accs.append(info[data.task.metric_name])
            row = dict(
                optimizer=name, batch=batch, lr=lr, accuracy=statistics.median(accs), runs=accs
            )
            print(json.dumps(row), flush=True)
            rows.append(row)
    return {"data": "mnist1d", "model": "mnist1d_cnn", "epochs": args.epochs, "rows": rows}


def _optim_paper(args: argparse.Namespace, data) -> dict:
    """LAMB's recipe (arXiv:1904.00962) at the large batch, AdamW under the same one: lr =
    base × √(large/small batch), linear warm-up over the first ``--warmup`` of the steps then
    cosine decay to 0, weight decay 0.01 excluded from biases and normalisation, ε 1e-6; the same
    number of epochs as the small-batch run (so far fewer steps)."""
    from squeezer.data import evaluate, forward
    from squeezer.train.optim import LAMB, param_groups
    from squeezer.zoo import create

    scale = math.sqrt(args.large_batch / args.small_batch)
    rows = []
    for name in ("adamw", "lamb"):
        for base in (float(b) for b in args.base_lrs.split(",")):
            accs = []
            for seed in range(args.seeds):
                torch.manual_seed(seed)
                net = create("mnist1d_cnn").train()
                groups = param_groups(net, weight_decay=0.01)
                if name == "lamb":
                    opt = LAMB(groups, lr=base * scale, eps=1e-6)
                else:
                    for g in groups:
                        g.pop("adapt", None)
                    opt = torch.optim.AdamW(groups, lr=base * scale, eps=1e-6)
                batches = data.train_batches(args.large_batch, shuffle=True, seed=seed)
                steps = args.epochs * len(batches)
                warm = max(1, round(args.warmup * steps))

                def factor(s: int, warm: int = warm, steps: int = steps) -> float:
                    if s < warm:
                        return (s + 1) / warm
                    return 0.5 * (1 + math.cos(math.pi * (s - warm) / max(steps - warm, 1)))

                sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
                for _ in range(args.epochs):
                    for x, y in batches:
                        opt.zero_grad(set_to_none=True)
                        data.task.loss(forward(net, x), y).backward()
                        opt.step()
                        sched.step()
                net.eval()
                accs.append(evaluate(net, data.test_batches(), data.task))
            row = dict(optimizer=name, batch=args.large_batch, base_lr=base, lr=base * scale,
                       steps=steps, accuracy=statistics.median(accs), runs=accs)  # fmt: skip
            print(json.dumps(row), flush=True)
            rows.append(row)
    return {"data": "mnist1d", "model": "mnist1d_cnn", "epochs": args.epochs, "recipe": "paper",
            "rows": rows}  # fmt: skip


# ----------------------------------------------------------------------------------------- abs
def bench_abs(args: argparse.Namespace) -> dict:
    from squeezer.data import load_data
    from squeezer.train import fit_abs
    from squeezer.zoo import create

    data = load_data("mnist1d")
    out = {"data": "mnist1d", "model": "mnist1d_cnn", "epochs": args.epochs, "runs": []}
    for label, maxb in (("fixed", args.batch), ("abs", args.max_batch)):
        for seed in range(args.seeds):
            t0 = time.perf_counter()
            _, run = fit_abs(
                create("mnist1d_cnn"), data, epochs=args.epochs, batch_size=args.batch,
                max_batch_size=maxb, lr=args.lr, lr_scaling=args.lr_scaling,
                decay_epochs=tuple(int(e) for e in args.decay_epochs.split(",") if e),
                optimizer="sgd", seed=seed,
            )  # fmt: skip
            rec = dict(label=label, seed=seed, seconds=time.perf_counter() - t0, **run.to_dict())
            print(json.dumps({k: rec[k] for k in ("label", "seed", "steps", "metric", "seconds")}))
            out["runs"].append(rec)
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
        for rec in out["runs"]:
            if rec["label"] != "abs":
                continue
            ep = [e["epoch"] for e in rec["epochs"]]
            ax[0].plot(
                ep,
                [e["eigenvalue"] for e in rec["epochs"]],
                marker="o",
                label=f"seed {rec['seed']}",
            )
            ax[1].step(ep, [e["batch_size"] for e in rec["epochs"]], where="post")
        ax[0].set(xlabel="epoch", ylabel="top Hessian eigenvalue", yscale="log")
        ax[1].set(xlabel="epoch", ylabel="effective batch", yscale="log")
        ax[0].legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)
    return out


# --------------------------------------------------------------------------------------- remat
class _Block(nn.Module):
    """A pre-LayerNorm transformer encoder block written out in traceable ops."""

    def __init__(self, d: int, heads: int, ff: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, ff), nn.Linear(ff, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).reshape(b, t, 3, self.heads, d // self.heads).unbind(2)
        a = nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        )
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(nn.functional.gelu(self.fc1(self.ln2(x))))


class Encoder(nn.Module):
    def __init__(self, d=256, heads=4, ff=1024, layers=6, vocab_in=64, classes=10) -> None:
        super().__init__()
        self.embed = nn.Linear(vocab_in, d)
        self.blocks = nn.Sequential(*[_Block(d, heads, ff) for _ in range(layers)])
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.embed(x)).mean(1))


def _workload(name: str, batch: int):
    torch.manual_seed(0)
    if name == "resnet":
        from squeezer.zoo import create

        model = create("resnet_cifar")
        x = torch.randn(batch, 3, 32, 32)
    elif name == "encoder":
        model = Encoder()
        x = torch.randn(batch, 128, 64)
    else:
        raise SystemExit(f"unknown model {name}; use resnet or encoder")
    y = torch.randint(0, 10, (batch,))
    return model.train(), x, y


def _peak(step, params) -> int:
    """The measured allocation peak of one step, after two warm-up steps (gradients allocated,
    kernels chosen / compiled)."""
    from squeezer.train.remat import allocation_peak

    for _ in range(2):
        step()
    _zero(params)
    peak, _, _ = allocation_peak(step)
    return peak


def _zero(params) -> None:
    for p in params:
        if p.grad is not None:
            p.grad.zero_()


def _round_robin(steps: dict, reps: int) -> dict:
    """Median step time of every method, timed interleaved: one step of each per round, so a
    change in the machine's load reaches them all alike."""
    times = {name: [] for name in steps}
    for _ in range(reps):
        for name, (step, params) in steps.items():
            _zero(params)
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in times.items()}


def _checkpoint_step(model, loss_fn, x, y, groups: int):
    """torch.utils.checkpoint over ``groups`` contiguous groups of the traced calls (uniform)."""
    from torch.utils.checkpoint import checkpoint

    from squeezer.train.remat.graph import run_nodes, segment, trace

    gm = trace(model, loss_fn)
    segs, env = segment(gm, (x, y), groups)
    env.clear()
    place = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    loss_name = next(n for n in gm.graph.nodes if n.op == "output").args[0].name

    def run_group(seg, names, *vals):
        local = dict(zip(names, vals, strict=True))
        run_nodes(gm, seg.nodes, local, keep=set(seg.outputs))
        return tuple(local[o] for o in seg.outputs)

    def step():
        env = dict(zip(place, (x, y), strict=True))
        for i, seg in enumerate(segs):
            names = list(seg.inputs)
            vals = [env[n] for n in names]
            if i < len(segs) - 1:
                outs = checkpoint(run_group, seg, names, *vals, use_reentrant=False)
            else:
                outs = run_group(seg, names, *vals)
            env.update(zip(seg.outputs, outs, strict=True))
        env[loss_name].backward()

    return step, len(segs)


def bench_remat(args: argparse.Namespace) -> dict:
    """Per model: the eager store-everything peak P; for each fraction f, squeezer's schedule
    under f·P, torch.utils.checkpoint with the uniform group count whose measured peak is the
    largest within f·P, and torch.compile's min-cut partitioner at activation_memory_budget f;
    every peak measured, step times round-robin."""
    import copy

    from squeezer.train.remat import remat, solve, store_all
    from squeezer.train.remat.solve import peak_floor

    loss_fn = nn.functional.cross_entropy
    fractions = [float(f) for f in args.fractions.split(",")]
    out = {"rows": []}
    for name in args.models.split(","):
        model, x, y = _workload(name, args.batch)
        params = list(model.parameters())

        def plain(model=model, x=x, y=y):
            loss_fn(model(x), y).backward()

        p_all = _peak(plain, params)
        steps = {"eager": (plain, params)}
        rows = {
            "eager": dict(model=name, method="eager, store everything", budget=None, peak=p_all)
        }
        rm = remat(model, loss_fn, (x, y), segments=args.segments, reps=3)
        graph = rm.graph
        full = store_all(graph)
        floor = peak_floor(graph)
        p = _peak(lambda rm=rm, x=x, y=y: rm.step(x, y), list(rm.model.parameters()))
        steps["squeezer store-all"] = (
            lambda rm=rm, x=x, y=y: rm.step(x, y),
            list(rm.model.parameters()),
        )
        rows["squeezer store-all"] = dict(
            model=name, method="squeezer store-all schedule", budget=None, peak=p,
            modelled=full.peak, nodes=graph.n, floor=floor,
        )  # fmt: skip
        print(json.dumps(rows["squeezer store-all"]), flush=True)
        for f in fractions:
            budget = int(f * p_all)
            key = f"squeezer {f}"
            target, tries = budget, []
            # Solved on the model, held in the measurement: while the measured peak exceeds the
            # budget, solve again with the target shrunk by the measured overshoot.
            for _ in range(args.attempts):
                s = solve(graph, target, time_limit=args.time_limit)
                if s is None:
                    tries.append(dict(target=target, error="no schedule"))
                    break
                r = copy.copy(rm)  # the same traced step and graph, its own schedule
                r.set_schedule(s)
                p = _peak(lambda r=r, x=x, y=y: r.step(x, y), list(r.model.parameters()))
                tries.append(dict(target=target, peak=p, modelled=s.peak, method=s.method))
                rows[key] = dict(
                    model=name, method=f"squeezer {s.method}", budget=f, peak=p, modelled=s.peak,
                    target=target, solve=s.solve_seconds, gap=s.gap, recomputed=s.recomputed,
                    cost=s.cost / full.cost,
                )  # fmt: skip
                steps[key] = (lambda r=r, x=x, y=y: r.step(x, y), list(r.model.parameters()))
                if p <= budget:
                    break
                target = int(target * budget / p)
            if key not in rows:
                rows[key] = dict(model=name, method="squeezer", budget=f, error="no schedule",
                                 floor=floor)  # fmt: skip
            rows[key]["tries"] = tries
            print(json.dumps(rows[key]), flush=True)
        # torch.utils.checkpoint: the measured peak of every uniform group count
        sweep = {}
        for groups in range(2, args.max_groups + 1):
            step, got = _checkpoint_step(model, loss_fn, x, y, groups)
            if got in sweep:
                continue
            sweep[got] = (_peak(step, params), step)
        print(json.dumps({"model": name, "checkpoint peaks": {g: v[0] for g, v in sweep.items()}}))
        for f in fractions:
            within = [(pk, g) for g, (pk, _) in sweep.items() if pk <= f * p_all]
            pk, g = max(within) if within else min((pk, g) for g, (pk, _) in sweep.items())
            key = f"checkpoint {f}"
            rows[key] = dict(model=name, method=f"torch.utils.checkpoint, {g} groups", budget=f,
                             peak=pk, groups=g)  # fmt: skip
            steps[key] = (sweep[g][1], params)
        if args.compile:
            import torch._functorch.config as fconfig

            for f in fractions:
                fconfig.activation_memory_budget = f
                twin = copy.deepcopy(model)  # its own module: compiled once, at this budget
                cm = torch.compile(twin)

                def cstep(cm=cm, x=x, y=y):
                    loss_fn(cm(x), y).backward()

                t0 = time.perf_counter()
                cstep()
                compile_s = time.perf_counter() - t0
                key = f"compile {f}"
                p = _peak(cstep, list(twin.parameters()))
                rows[key] = dict(model=name, method="torch.compile min-cut", budget=f, peak=p,
                                 compile=compile_s)  # fmt: skip
                steps[key] = (cstep, list(twin.parameters()))
            fconfig.activation_memory_budget = 1.0
        for step, ps in steps.values():  # warm: the first rounds are then not outliers
            step()
            _zero(ps)
        times = _round_robin(steps, args.reps)
        for key, row in rows.items():
            row["seconds"] = times.get(key)
            row["vs_eager"] = None if key not in times else times[key] / times["eager"]
            row["of_eager"] = row.get("peak", 0) / p_all
            row["holds"] = (
                row["budget"] is not None and "peak" in row and row["peak"] <= row["budget"] * p_all
            )
            print(json.dumps(row), flush=True)
        out["rows"] += list(rows.values())
        del steps
    return out


def bench_solve(args: argparse.Namespace) -> dict:
    from squeezer.train.remat import solve, store_all, trace_step

    model, x, y = _workload(args.model, args.batch)
    rows = []
    for k in (int(s) for s in args.segments.split(",")):
        graph, _, _ = trace_step(model, nn.functional.cross_entropy, (x, y), segments=k, reps=1)
        full = store_all(graph)
        for f in (0.7, 0.5):
            s = solve(graph, int(f * full.peak), time_limit=args.time_limit)
            r = solve(graph, int(f * full.peak), rounding=True)
            milp = None
            if s is not None:
                milp = dict(method=s.method, seconds=s.solve_seconds, cost=s.cost / full.cost)
            rounded = None
            if r is not None:
                rounded = dict(seconds=r.solve_seconds, cost=r.cost / full.cost)
            row = dict(segments=k, nodes=graph.n, budget=f, milp=milp, rounding=rounded)
            print(json.dumps(row), flush=True)
            rows.append(row)
    return {"model": args.model, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    sub = p.add_subparsers(dest="cmd", required=True)
    o = sub.add_parser("optim", help="large-batch LAMB/LARS/AdamW against small-batch AdamW")
    o.add_argument("--seeds", type=int, default=3)
    o.add_argument("--epochs", type=int, default=20)
    o.add_argument("--small-batch", type=int, default=32)
    o.add_argument("--large-batch", type=int, default=1024)
    o.add_argument("--recipe", choices=("fit", "paper"), default="fit")
    o.add_argument("--base-lrs", default="3e-3,6e-3,1.2e-2")
    o.add_argument("--warmup", type=float, default=0.1)
    a = sub.add_parser("abs", help="adaptive batch size against the fixed small batch")
    a.add_argument("--seeds", type=int, default=3)
    a.add_argument("--epochs", type=int, default=16)
    a.add_argument("--batch", type=int, default=32)
    a.add_argument("--max-batch", type=int, default=512)
    a.add_argument("--lr", type=float, default=0.02)
    a.add_argument("--lr-scaling", default="linear")
    a.add_argument("--decay-epochs", default="12")
    a.add_argument("--plot", type=Path)
    r = sub.add_parser("remat", help="peak memory and step time of rematerialization schedules")
    r.add_argument("--models", default="resnet,encoder")
    r.add_argument("--batch", type=int, default=32)
    r.add_argument("--fractions", default="0.5,0.3")
    r.add_argument("--segments", type=int, default=1000, help="at most one per traced call")
    r.add_argument("--attempts", type=int, default=3, help="solves per budget (see above)")
    r.add_argument("--max-groups", type=int, default=16, help="checkpoint group counts swept")
    r.add_argument("--time-limit", type=float, default=60.0)
    r.add_argument("--reps", type=int, default=5)
    r.add_argument("--no-compile", dest="compile", action="store_false")
    s = sub.add_parser("solve", help="MILP solve time against graph size")
    s.add_argument("--model", default="resnet")
    s.add_argument("--batch", type=int, default=32)
    s.add_argument("--segments", default="4,8,12,16,24")
    s.add_argument("--time-limit", type=float, default=120.0)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    result = {"optim": bench_optim, "abs": bench_abs, "remat": bench_remat, "solve": bench_solve}[
        args.cmd
    ](args)
    result["threads"] = args.threads
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
