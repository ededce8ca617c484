"""``squeezer compress``, ``plan`` and ``quantize``."""

from __future__ import annotations

import argparse
from dataclasses import replace

from .args import (
    command,
    latency_arg,
    model_args,
    parse_bits,
    parse_shape,
    print_summary,
    spec_of,
)
from .prune import prune_args, prune_of


def _configure_compress(p: argparse.ArgumentParser) -> None:
    model_args(p)
    p.add_argument(
        "--budget",
        required=True,
        metavar="B",
        help="e.g. bits=8, bits=4.5, size=1.2MB, bops=2e9, latency=3ms, size=0.5r",
    )
    p.add_argument(
        "--calib",
        choices=("real", "zeroshot", "noise"),
        default="real",
        help="real: calibrate and plan on --data (default); zeroshot: no data at all "
        "(ZeroQ distilled inputs, KL sensitivity); noise: standard-normal inputs (a baseline)",
    )
    p.add_argument(
        "--eval-data", metavar="DATA", help="with --calib zeroshot: data to report the metric on"
    )
    p.add_argument(
        "--input-shape",
        metavar="SHAPE",
        help="one input's shape (e.g. 1,8,8) for --calib zeroshot on non-zoo models",
    )
    p.add_argument(
        "--hessian-samples",
        type=int,
        default=None,
        metavar="N",
        help="training samples the Hessian traces average over (default: 512; 64 sentences for "
        "BERT-family encoders)",
    )
    p.add_argument("--hessian-batch-size", type=int, default=None, metavar="N",
                   help="samples per Hessian-vector product (default 128; lower it if a large "
                   "model's analysis runs out of memory: EfficientNet-Lite0 at 224x224 holds "
                   "~1.7 GB per 8 images)")  # fmt: skip
    p.add_argument("--hessian-probes", type=int, default=None, metavar="N",
                   help="most Hutchinson probes per trace (default 100; each costs one "
                   "Hessian-vector product over the samples)")  # fmt: skip
    p.add_argument(
        "--method",
        choices=("hessian", "uniform"),
        default="hessian",
        help="hessian: per-layer bits from Hessian traces and an exact integer program (default); "
        "uniform: every layer at a whole --budget bits=N",
    )
    p.add_argument("--template", metavar="NAME", default=None,
                   help="layer template: default (per channel), qbert (BERT-family encoders, "
                   "Linears in groups of 128), qbert-channel (the same per output row: integer "
                   "kernels in ONNX Runtime, what a latency budget there needs); default: the "
                   "one that matches the model")  # fmt: skip
    p.add_argument("--bits", metavar="B,B,...", default=None,
                   help="the planner's candidate integer weight widths, each 2..8 (e.g. 2,3,4,7; "
                   "default: the template's: 2,3,4,8, or 2,3,4,5,6,8 for qbert)")  # fmt: skip
    p.add_argument("--max-len", type=int, default=128, help="token length of text inputs (128)")
    p.add_argument("--act-bits", type=int, default=8,
                   help="activation bits (0 keeps activations in float; default 8)")  # fmt: skip
    p.add_argument("--bias-correction", action=argparse.BooleanOptionalAction, default=None,
                   help="subtract each layer's mean output error on the calibration data from "
                   "its bias (Nagel et al. 2019); default: on for conv nets")  # fmt: skip
    latency_arg(p)
    prune_args(p)
    from .finetune import finetune_args

    p.add_argument("--finetune", type=int, default=0, metavar="N",
                   help="then fine-tune N epochs (as 'squeezer finetune OUT --epochs N')")  # fmt: skip
    finetune_args(p, epochs=None)


@command("compress", "quantize a model to meet a budget, evaluate it, write a run folder",
         _configure_compress)  # fmt: skip
def cmd_compress(args: argparse.Namespace) -> int:
    from ..budget import Budget
    from ..runs import compress_run

    spec = spec_of(
        args, "compress", budget=Budget.parse(args.budget), method=args.method, calib=args.calib,
        act_bits=args.act_bits or None, hessian_samples=args.hessian_samples,
        hessian_batch_size=args.hessian_batch_size, hessian_probes=args.hessian_probes,
        bias_correction=args.bias_correction, template=args.template, bits=parse_bits(args.bits),
        input_shape=parse_shape(args.input_shape), latency_backend=args.latency_backend,
        **prune_of(args),
    )  # fmt: skip
    if args.calib != "real":  # the data is for evaluation only
        spec = replace(spec, data=args.eval_data or args.data)
    result, data = compress_run(spec, args.out, progress=not args.quiet)
    if not args.quiet:
        print_summary(result, data, args.out)
    if args.finetune:
        from ..runfolder import read_metrics
        from ..runs import finetune_run
        from .finetune import finetune_options, print_finetune

        finetune_run(args.out, epochs=args.finetune, seed=args.seed, progress=not args.quiet,
                     **finetune_options(args))  # fmt: skip
        if not args.quiet:
            print_finetune(args.out, read_metrics(args.out)["finetune"])
    return 0


def _configure_plan(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", metavar="DIR", help="a run folder written by 'squeezer compress'")
    p.add_argument("--budget", required=True, metavar="B", help="e.g. bits=3, size=40kB, size=0.5r")
    latency_arg(p)


@command("plan", "re-plan bits from DIR's saved analysis for a new budget, apply and evaluate",
         _configure_plan)  # fmt: skip
def cmd_plan(args: argparse.Namespace) -> int:
    from ..budget import Budget
    from ..runs import replan_run

    result, data = replan_run(args.dir, Budget.parse(args.budget), args.latency_backend)
    ach = result.plan.meta.get("achieved", {})
    print(
        f"planned in {result.timings['plan']:.3f} s: predicted loss increase "
        f"{result.plan.meta.get('predicted_omega', 0):.4g}, size "
        f"{ach.get('size_bytes', 0):,.0f} B, average bits {ach.get('bits', float('nan')):.2f}"
    )
    print_summary(result, data, args.dir)
    return 0


@command("quantize", "apply DIR's plan.json (e.g. after editing it) and evaluate the result",
         lambda p: p.add_argument("dir", metavar="DIR", help="a run folder with a plan.json"))  # fmt: skip
def cmd_quantize(args: argparse.Namespace) -> int:
    from ..runs import replan_run

    print_summary(*replan_run(args.dir), args.dir)
    return 0
