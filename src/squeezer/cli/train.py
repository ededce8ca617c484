"""``squeezer train``, ``analyze``, ``demo``, ``report`` and ``zoo``."""

from __future__ import annotations

import argparse
import sys
import time

from .args import command, model_args, print_summary, spec_of


def _configure_train(p: argparse.ArgumentParser) -> None:
    from ..train.optim import OPTIMIZERS

    model_args(p)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--optimizer", choices=tuple(OPTIMIZERS), default="adamw",
                   help="adamw (default), lamb or lars (layer-wise trust ratios), sgd")  # fmt: skip
    p.add_argument(
        "--lr", type=float, default=None, help="learning rate (default: the optimizer's)"
    )
    p.add_argument("--batch-size", type=int, default=64)


@command("train", "train a classifier (zoo:NAME or module:factory) on a data set, save its weights",
         _configure_train)  # fmt: skip
def cmd_train(args: argparse.Namespace) -> int:
    from ..runs import train_run

    spec = spec_of(args, "train", method=None)
    info, data = train_run(spec, args.out, epochs=args.epochs, progress=not args.quiet,
                           optimizer=args.optimizer, lr=args.lr, batch_size=args.batch_size)  # fmt: skip
    if not args.quiet:
        print(
            f"{args.model} on {data.name}: {data.task.metric_name} {info[data.task.metric_name]:.2f} "
            f"after {args.epochs} epochs; weights in {args.out}/model.safetensors"
        )
    return 0


def _configure_analyze(p: argparse.ArgumentParser) -> None:
    model_args(p)
    p.add_argument("--samples", type=int, default=2048, help="training samples (default 2048)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--top-k", type=int, default=3, help="top eigenvalues of the full Hessian")
    p.add_argument("--max-probes", type=int, default=200, help="most trace probes")
    p.add_argument("--rel-stderr", type=float, default=0.05, help="trace stopping target")
    p.add_argument("--trace", choices=["hutchinson", "hutch++"], default="hutchinson")
    p.add_argument("--density", action="store_true", help="also the SLQ spectral density")


@command("analyze", "Hessian spectrum: top eigenvalues, per-layer traces, spectral density",
         _configure_analyze)  # fmt: skip
def cmd_analyze(args: argparse.Namespace) -> int:
    from ..runs import analyze_run
    from ..spectrum import summary

    spectrum = analyze_run(
        spec_of(args, "analyze", method=None), args.out,
        progress=not args.quiet and sys.stderr.isatty(), samples=args.samples,
        batch_size=args.batch_size, top_k=args.top_k, max_probes=args.max_probes,
        rel_stderr=args.rel_stderr, trace_method=args.trace, density=args.density,
    )  # fmt: skip
    if spectrum is not None and not args.quiet:
        print(summary(spectrum))
        print(f"\nwrote {args.out}/spectrum.json")
    return 0


def _configure_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="squeezer-demo", metavar="DIR",
                   help="run folder (default: ./squeezer-demo)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)


@command("demo", "train the digits net (or reuse it) and compress it end to end, offline",
         _configure_demo)  # fmt: skip
def cmd_demo(args: argparse.Namespace) -> int:
    import torch

    from ..runs import run_demo

    # The digits net is tiny: one thread is as fast on an idle machine and many times faster on a
    # busy one (threads of an oversubscribed OpenMP pool stall each other).
    if args.threads_source != "flag":
        torch.set_num_threads(1)
    t0 = time.perf_counter()
    result, data = run_demo(args.out, seed=args.seed)
    print()
    print_summary(result, data, args.out)
    print(f"({time.perf_counter() - t0:.1f} s)")
    return 0


@command("report", "re-write DIR/report.html and report.md from the run folder's files",
         lambda p: p.add_argument("dir", metavar="DIR"))  # fmt: skip
def cmd_report(args: argparse.Namespace) -> int:
    from ..report import write_report
    from ..runfolder import require_run_folder

    html, _ = write_report(require_run_folder(args.dir))
    print(f"wrote {html}")
    return 0


@command("zoo", "list the built-in models", lambda p: None)
def cmd_zoo(args: argparse.Namespace) -> int:
    from ..report import text_table
    from ..zoo import MODELS
    from ..zoo.registry import model_options

    def options(e) -> str:
        return ",".join(f"{k}={v}" for k, v in model_options(e.factory).items() if k != "seed")

    print(text_table(
        [[f"zoo:{e.name}", e.data, "x".join(map(str, e.input_shape)), options(e), e.description]
         for e in MODELS.values()],
        ["model", "data", "input", "options", "description"],
    ))  # fmt: skip
    print("\noptions ride in the name: zoo:NAME,KEY=VALUE,... (e.g. zoo:sqnxt23,classes=10); "
          "pretrained weights: zoo:NAME:TAG")  # fmt: skip
    return 0


# --------------------------------------------------------------------------------------------------
# deployment
