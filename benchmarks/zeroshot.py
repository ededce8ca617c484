"""Data-free quantization benchmark (ZeroQ, arXiv:2001.00281): how well do distilled inputs stand in
for real data?

For BatchNorm nets trained on digits and on MNIST-1D (the zoo's 5-layer `digits_cnn` and
`mnist1d_cnn`, and the 22-layer residual `digits_resnet_deep` and `mnist1d_resnet`), the same
quantization is calibrated with four sources of 64 inputs each: real training inputs, distilled
inputs (ZeroQ's loss on batch statistics, squeezer's default), distilled inputs matching each
input's own per-channel statistics (``match="sample"``), and standard Gaussian noise.
Settings: W8A8, W6A6 and, as a stress test, W4A4 (uniform, per-channel weights, percentile-clipped
activations), and "mixed-4": at most 4 weight bits on average over {2, 3, 4, 8}, chosen by the ILP
planner from ZeroQ's KL sensitivity computed on the same source, with 8-bit activations. Each seed
draws a different real subset, distillation, or noise; the net is the same.

Reported per setting and source, mean ± std over seeds, on the whole test split: top-1; top-1
agreement with the FP32 net; and KL(FP32 || quantized) of the predicted class distributions, which
resolves differences that top-1 on a few hundred inputs (steps of one input) cannot. Also: the time
to distill 64 inputs, the BatchNorm-statistics loss of each source, how far each source's activation
ranges are from those real data gives, and how many layers get the same bits in the mixed plan as
with real data.

Run:  python benchmarks/zeroshot.py --seeds 5 --out zeroshot.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from squeezer.config import Budget, LayerQuant, QuantConfig
from squeezer.costs import Costs
from squeezer.data import evaluate, load_data
from squeezer.graph import quantizable_layers
from squeezer.plan import plan
from squeezer.quant.apply import quantize
from squeezer.sensitivity import sensitivity
from squeezer.train.fit import fit
from squeezer.zeroshot import bn_stat_loss, distill
from squeezer.zoo import MODELS as ZOO
from squeezer.zoo import create

MODELS = ("digits_cnn", "mnist1d_cnn", "digits_resnet_deep", "mnist1d_resnet")
SOURCES = ("real", "distilled", "distilled-sample", "noise")
SETTINGS = ("W8A8", "W6A6", "W4A4", "mixed-4")
N = 64


def sources(
    net, ds, seed: int, steps: int | None, prior: tuple[float, float] | None
) -> tuple[dict[str, torch.Tensor], float, float]:
    """64 inputs from each source, and the wall-clock and CPU seconds the default distillation
    took."""
    g = torch.Generator().manual_seed(1000 + seed)
    idx = torch.randperm(ds.x_train.shape[0], generator=g)[:N]
    noise = torch.randn((N, *ds.input_shape), generator=g)
    kw = {"prior": prior} if steps is None else {"steps": steps, "prior": prior}
    cpu = time.process_time()
    d = distill(net, N, seed=seed, **kw)
    cpu = time.process_time() - cpu
    ds_ = distill(net, N, seed=seed, match="sample", **kw)
    xs = {"real": ds.x_train[idx], "distilled": d.inputs, "distilled-sample": ds_.inputs}
    return {**xs, "noise": noise}, d.seconds, cpu


def quantized(net, setting: str, x: torch.Tensor) -> tuple[torch.nn.Module, dict[str, int]]:
    """The quantized model for ``setting`` calibrated (and, for mixed-4, planned) on ``x``, and its
    bits per layer."""
    if setting.startswith("W"):
        b = int(setting[1])
        cfg = QuantConfig(LayerQuant(bits=b, act_bits=b))
        return quantize(net, cfg, calib=[x]), cfg.to_plan(net).bits()
    sens = sensitivity(net, method="kl", data=[x], bits=(2, 3, 4, 8))
    p = plan(sens, Budget(bits=4.0), costs=Costs(params=sens.params, act_bits=8))
    return quantize(net, p, calib=[x]), p.bits()


@torch.no_grad()
def fidelity(net, qnet, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float, float]:
    """On the test inputs ``x``: top-1 (%), top-1 agreement with the FP32 net (%), and the mean KL
    divergence KL(FP32 || quantized) of the predicted class distributions (nats). Top-1 on a few
    hundred inputs moves in steps of one input; agreement and KL resolve smaller differences."""
    ref = torch.log_softmax(net(x), -1)
    out = torch.log_softmax(qnet(x), -1)
    acc = 100.0 * float((out.argmax(-1) == y).float().mean())
    agree = 100.0 * float((out.argmax(-1) == ref.argmax(-1)).float().mean())
    kl = float((ref.exp() * (ref - out)).sum(-1).mean())
    return acc, agree, kl


@torch.no_grad()
def act_ranges(net, x: torch.Tensor) -> dict[str, float]:
    """Per quantizable layer: the 0.01–99.99 percentile width of its input on ``x`` (the range the
    percentile observer would pick)."""
    out, handles = {}, []
    for name, m in quantizable_layers(net).items():

        def hook(_m, a, name=name):
            q = torch.quantile(a[0].flatten().float(), torch.tensor([1e-4, 1 - 1e-4]))
            out[name] = float(q[1] - q[0])

        handles.append(m.register_forward_pre_hook(hook))
    try:
        net(x)
    finally:
        for h in handles:
            h.remove()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--steps", type=int, default=None, help="distillation steps (default: 200)")
    ap.add_argument("--prior", default=None, help="input prior MEAN,STD for distillation")
    ap.add_argument(
        "--models", nargs="+", default=list(MODELS), choices=MODELS, help="zoo nets to run"
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="write the raw results as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    prior = tuple(float(v) for v in args.prior.split(",")) if args.prior else None

    results = {}
    for zoo in args.models:
        data_name = ZOO[zoo].data
        ds = load_data(data_name)
        torch.manual_seed(0)  # the zoo's initialisation draws from the global generator
        t0 = time.perf_counter()
        net, info = fit(create(zoo), ds, epochs=args.epochs, seed=0)
        train_s = time.perf_counter() - t0
        net.eval()
        test = ds.test_batches()
        fp32 = evaluate(net, test, ds.task)
        acc = {(s, src): [] for s in SETTINGS for src in SOURCES}
        agree = {(s, src): [] for s in SETTINGS for src in SOURCES}
        kl = {(s, src): [] for s in SETTINGS for src in SOURCES}
        avg_bits = {src: [] for src in SOURCES}
        same_bits = {src: [] for src in SOURCES}
        range_ratio = {src: [] for src in SOURCES}
        bn_loss = {src: [] for src in SOURCES}
        seconds, cpu_seconds = [], []
        params = {k: m.weight.numel() for k, m in quantizable_layers(net).items()}
        for seed in range(args.seeds):
            xs, sec, cpu = sources(net, ds, seed, args.steps, prior)
            seconds.append(sec)
            cpu_seconds.append(cpu)
            ref_ranges = act_ranges(net, xs["real"])
            ref_plan = None
            for src, x in xs.items():
                bn_loss[src].append(bn_stat_loss(net, x))
                rr = act_ranges(net, x)
                range_ratio[src].append(statistics.mean(rr[k] / ref_ranges[k] for k in rr))
                for setting in SETTINGS:
                    q, bits = quantized(net, setting, x)
                    a, g, k = fidelity(net, q, ds.x_test, ds.y_test)
                    acc[(setting, src)].append(a)
                    agree[(setting, src)].append(g)
                    kl[(setting, src)].append(k)
                    if setting == "mixed-4":
                        ref_plan = ref_plan or bits  # "real" comes first
                        avg_bits[src].append(
                            sum(params[k] * b for k, b in bits.items()) / sum(params.values())
                        )
                        same_bits[src].append(sum(bits[k] == ref_plan[k] for k in bits))
        results[zoo] = {
            "data": data_name,
            "model": zoo,
            "train_seconds": train_s,
            "fp32": fp32,
            "test_size": int(ds.x_test.shape[0]),
            "acc": {f"{s}/{src}": v for (s, src), v in acc.items()},
            "agree": {f"{s}/{src}": v for (s, src), v in agree.items()},
            "kl": {f"{s}/{src}": v for (s, src), v in kl.items()},
            "mixed_avg_bits": avg_bits,
            "mixed_layers_as_real": same_bits,
            "n_layers": len(params),
            "act_range_vs_real": range_ratio,
            "bn_loss": bn_loss,
            "distill_seconds": seconds,
            "distill_cpu_seconds": cpu_seconds,
        }
        print_table(zoo, results[zoo])
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)


def _ms(v: list[float], digits: int = 1) -> str:
    if len(v) == 1:
        return f"{v[0]:.{digits}f}"
    return f"{statistics.mean(v):.{digits}f} ± {statistics.stdev(v):.{digits}f}"


def print_table(name: str, r: dict) -> None:
    print(f"\n### {name} ({r['data']}, {r['test_size']} test inputs), FP32 top-1 {r['fp32']:.2f}")
    print("| setting | real data | distilled | distilled, per-sample statistics | Gaussian noise |")
    print("|---|---|---|---|---|")
    for s in SETTINGS:
        cells = [_ms(r["acc"][f"{s}/{src}"], 2) for src in SOURCES]
        print(f"| {s} | " + " | ".join(cells) + " |")
    print("\nKL(FP32 || quantized) on the test inputs, x 1e-3 (lower is closer to FP32):")
    print("| setting | real data | distilled | distilled, per-sample statistics | Gaussian noise |")
    print("|---|---|---|---|---|")
    for s in SETTINGS:
        cells = [_ms([1e3 * v for v in r["kl"][f"{s}/{src}"]], 2) for src in SOURCES]
        print(f"| {s} | " + " | ".join(cells) + " |")
    print("\ntop-1 agreement with FP32 (%):")
    print("| setting | real data | distilled | distilled, per-sample statistics | Gaussian noise |")
    print("|---|---|---|---|---|")
    for s in SETTINGS:
        cells = [_ms(r["agree"][f"{s}/{src}"], 2) for src in SOURCES]
        print(f"| {s} | " + " | ".join(cells) + " |")
    bits = " / ".join(_ms(r["mixed_avg_bits"][src], 2) for src in SOURCES)
    same = " / ".join(_ms(r["mixed_layers_as_real"][src], 1) for src in SOURCES)
    rng = " / ".join(_ms(r["act_range_vs_real"][src], 2) for src in SOURCES)
    loss = " / ".join(f"{statistics.mean(r['bn_loss'][src]):.2g}" for src in SOURCES)
    print(f"\nmixed-4 average weight bits (real / distilled / per-sample / noise): {bits}")
    print(f"mixed-4 layers (of {r['n_layers']}) with the bits real data picks: {same}")
    print(f"activation range / real data's, mean over layers (same order): {rng}")
    print(f"BatchNorm batch-statistics loss (same order): {loss}")
    print(
        f"time to distill {N} inputs: {_ms(r['distill_seconds'])} s wall-clock, "
        f"{_ms(r['distill_cpu_seconds'])} s CPU ({torch.get_num_threads()} thread)"
    )


if __name__ == "__main__":
    main()
