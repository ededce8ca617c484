"""The ``squeezer`` command line. It parses arguments into a :class:`~squeezer.runfolder.RunSpec`,
calls the API (:mod:`squeezer.pipeline`, :mod:`squeezer.runfolder`, ...), prints, and maps errors
to exit codes: 0 done, 2 bad input or infeasible request (one line on stderr), 1 internal failure.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from typing import NoReturn

from ._version import __version__
from .errors import ConfigError, SqueezerError, first_line
from .threads import configure_threads

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2 (argparse prints usage too)
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def command(name: str, help: str, configure: Callable[[argparse.ArgumentParser], None]):
    """Register ``fn(args) -> exit code`` as a subcommand whose flags ``configure`` adds."""

    def deco(fn):
        COMMANDS[name] = fn
        fn.help, fn.configure = help, configure
        return fn

    return deco


# --------------------------------------------------------------------------------------------------
# arguments


def _model_args(p: argparse.ArgumentParser, *, data: bool = True, out: bool = True) -> None:
    p.add_argument("model", metavar="MODEL", help="zoo:NAME, module:factory, hf:minilm or hf:DIR")
    p.add_argument("--weights", metavar="FILE", help=".safetensors or torch state-dict file")
    p.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow a weights file that is a full pickle (it can run code)",
    )
    if data:
        p.add_argument(
            "--data",
            metavar="DATA",
            help="digits, mnist1d, sentences, a .npz (x, y[, x_test, y_test]), an image folder, a "
            ".txt file, or pkg.module:factory (a Dataset, DataLoader or iterable of batches)",
        )
    if out:
        p.add_argument("--out", required=True, metavar="DIR", help="run folder to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="print nothing on success")


def _configure_compress(p: argparse.ArgumentParser) -> None:
    _model_args(p)
    p.add_argument(
        "--budget",
        required=True,
        metavar="B",
        help="e.g. bits=8, bits=4.5, size=1.2MB, bops=2e9, latency=3ms, size=0.5r",
    )
    p.add_argument(
        "--calib",
        choices=("real", "zeroshot"),
        default="real",
        help="real: calibrate and plan on --data (default); zeroshot: no data at all "
        "(ZeroQ distilled inputs, KL sensitivity)",
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
    p.add_argument(
        "--method",
        choices=("hessian", "uniform"),
        default="hessian",
        help="hessian: per-layer bits from Hessian traces and an exact integer program (default); "
        "uniform: every layer at a whole --budget bits=N",
    )
    p.add_argument("--max-len", type=int, default=128, help="token length of text inputs (128)")
    p.add_argument("--act-bits", type=int, default=8,
                   help="activation bits (0 keeps activations in float; default 8)")  # fmt: skip
    _latency_arg(p)


def _latency_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--latency-backend", choices=("onnxruntime", "proxy"), default="onnxruntime",
                   help="where a latency budget's per-layer table is measured (default: ONNX "
                   "Runtime at --threads; proxy: PyTorch float time x bits/32)")  # fmt: skip


def _spec(args: argparse.Namespace, command: str, **fields):
    """The run spec an invocation describes (the weights path made absolute)."""
    from pathlib import Path

    from .runfolder import RunSpec

    weights = str(Path(args.weights).resolve()) if getattr(args, "weights", None) else None
    fields.setdefault("weights", weights)
    return RunSpec(
        command=command,
        model=args.model,
        trust_pickle=bool(getattr(args, "trust_pickle", False)),
        data=getattr(args, "data", None),
        max_len=getattr(args, "max_len", 128),
        seed=getattr(args, "seed", 0),
        **fields,
    )


def _shape(text: str | None) -> tuple[int, ...] | None:
    if not text:
        return None
    try:
        return tuple(int(v) for v in text.replace("x", ",").split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"--input-shape {text!r} is not a shape like 1,8,8") from None


def _summary(result, data, out) -> None:
    from .report import text_summary

    print(text_summary(result.metrics(data)))
    print(f"\nwrote {out}/report.html")


# --------------------------------------------------------------------------------------------------
# compression commands


@command("compress", "quantize a model to meet a budget, evaluate it, write a run folder",
         _configure_compress)  # fmt: skip
def cmd_compress(args: argparse.Namespace) -> int:
    from .budget import Budget
    from .runs import compress_run

    spec = _spec(
        args, "compress", budget=Budget.parse(args.budget), method=args.method, calib=args.calib,
        act_bits=args.act_bits or None, hessian_samples=args.hessian_samples,
        input_shape=_shape(args.input_shape), latency_backend=args.latency_backend,
    )  # fmt: skip
    if args.calib == "zeroshot":  # the data is for evaluation only
        spec = replace(spec, data=args.eval_data or args.data)
    result, data = compress_run(spec, args.out, progress=not args.quiet)
    if not args.quiet:
        _summary(result, data, args.out)
    return 0


def _configure_plan(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", metavar="DIR", help="a run folder written by 'squeezer compress'")
    p.add_argument("--budget", required=True, metavar="B", help="e.g. bits=3, size=40kB, size=0.5r")
    _latency_arg(p)


@command("plan", "re-plan bits from DIR's saved analysis for a new budget, apply and evaluate",
         _configure_plan)  # fmt: skip
def cmd_plan(args: argparse.Namespace) -> int:
    from .budget import Budget
    from .runs import replan_run

    result, data = replan_run(args.dir, Budget.parse(args.budget), args.latency_backend)
    ach = result.plan.meta.get("achieved", {})
    print(
        f"planned in {result.timings['plan']:.3f} s: predicted loss increase "
        f"{result.plan.meta.get('predicted_omega', 0):.4g}, size "
        f"{ach.get('size_bytes', 0):,.0f} B, average bits {ach.get('bits', float('nan')):.2f}"
    )
    _summary(result, data, args.dir)
    return 0


@command("quantize", "apply DIR's plan.json (e.g. after editing it) and evaluate the result",
         lambda p: p.add_argument("dir", metavar="DIR", help="a run folder with a plan.json"))  # fmt: skip
def cmd_quantize(args: argparse.Namespace) -> int:
    from .runs import replan_run

    _summary(*replan_run(args.dir), args.dir)
    return 0


# --------------------------------------------------------------------------------------------------
# training, analysis, demo


def _configure_train(p: argparse.ArgumentParser) -> None:
    from .train.optim import OPTIMIZERS

    _model_args(p)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--optimizer", choices=tuple(OPTIMIZERS), default="adamw",
                   help="adamw (default), lamb or lars (layer-wise trust ratios), sgd")  # fmt: skip
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: the optimizer's)")
    p.add_argument("--batch-size", type=int, default=64)


@command("train", "train a classifier (zoo:NAME or module:factory) on a data set, save its weights",
         _configure_train)  # fmt: skip
def cmd_train(args: argparse.Namespace) -> int:
    from .runs import train_run

    spec = _spec(args, "train", method=None)
    info, data = train_run(spec, args.out, epochs=args.epochs, progress=not args.quiet,
                           optimizer=args.optimizer, lr=args.lr, batch_size=args.batch_size)  # fmt: skip
    if not args.quiet:
        print(
            f"{args.model} on {data.name}: {data.task.metric_name} {info[data.task.metric_name]:.2f} "
            f"after {args.epochs} epochs; weights in {args.out}/model.safetensors"
        )
    return 0


def _configure_analyze(p: argparse.ArgumentParser) -> None:
    _model_args(p)
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
    from .runs import analyze_run
    from .spectrum import summary

    spectrum = analyze_run(
        _spec(args, "analyze", method=None), args.out,
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

    from .runs import run_demo

    # The digits net is tiny: one thread is as fast on an idle machine and many times faster on a
    # busy one (threads of an oversubscribed OpenMP pool stall each other).
    if args.threads_source != "flag":
        torch.set_num_threads(1)
    t0 = time.perf_counter()
    result, data = run_demo(args.out, seed=args.seed)
    print()
    _summary(result, data, args.out)
    print(f"({time.perf_counter() - t0:.1f} s)")
    return 0


@command("report", "re-write DIR/report.html and report.md from the run folder's files",
         lambda p: p.add_argument("dir", metavar="DIR"))  # fmt: skip
def cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report
    from .runfolder import require_run_folder

    html, _ = write_report(require_run_folder(args.dir))
    print(f"wrote {html}")
    return 0


@command("zoo", "list the built-in models", lambda p: None)
def cmd_zoo(args: argparse.Namespace) -> int:
    from .report import text_table
    from .zoo import MODELS

    print(text_table(
        [[f"zoo:{e.name}", e.data, "x".join(map(str, e.input_shape)), e.description]
         for e in MODELS.values()],
        ["model", "data", "input", "description"],
    ))  # fmt: skip
    return 0


# --------------------------------------------------------------------------------------------------
# deployment


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
    p.add_argument("--samples", type=int, default=64, help="test inputs used for the check")
    p.add_argument("--atol", type=float, default=None, help="tolerance of the check")


@command("export", "export DIR's compressed model to ONNX (QDQ int8), checked in ONNX Runtime",
         _configure_export)  # fmt: skip
def cmd_export(args: argparse.Namespace) -> int:
    from .deploy import FORMATS, export_run
    from .report import fmt_bytes

    rep, m = export_run(args.dir, format=args.format, samples=args.samples,
                        requantize=not args.exact, atol=args.atol, threads=args.threads)  # fmt: skip
    agree = "" if rep.argmax_agreement is None else f", argmax agrees {rep.argmax_agreement:.1%}"
    (file, key), runtime = FORMATS[args.format], {"onnx": "ONNX Runtime"}.get(args.format, "ExecuTorch")
    print(f"wrote {args.dir}/{file} ({fmt_bytes(rep.size_bytes)}; theoretical "
          f"{fmt_bytes(rep.theoretical_bytes)}); {runtime} vs squeezer: max |Δ| "
          f"{rep.max_abs_error:.3g}, median sample {rep.median_sample_error:.3g} (tolerance "
          f"{rep.atol:.3g}{agree})")  # fmt: skip
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
    from .deploy import bench_run
    from .report import text_table

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


EPILOG = """examples:
  squeezer demo                                     # train, compress and report a digits CNN
  squeezer compress zoo:digits_cnn --weights W.safetensors --data digits --budget bits=3 --out R
  squeezer plan R --budget size=40kB                # re-plan from R's analysis in milliseconds
  squeezer export R && squeezer bench R             # ONNX, checked and timed in ONNX Runtime

exit codes: 0 done, 2 bad input or infeasible request (one line on stderr), 1 internal failure.
"squeezer COMMAND --help" describes each command."""


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="squeezer",
        description="Make trained PyTorch models small and fast: Hessian-aware mixed-precision\n"
        "quantization, with or without data, and ONNX deployment.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"squeezer {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, fn in COMMANDS.items():
        p = sub.add_parser(name, help=fn.help, description=fn.help)
        fn.configure(p)
        p.add_argument(
            "--threads",
            default=None,
            metavar="N|auto",
            help="CPU threads for PyTorch and ONNX Runtime (default: the cores idle now; "
            "SQUEEZER_THREADS or OMP_NUM_THREADS also set it)",
        )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    try:
        args.threads, args.threads_source = configure_threads(args.threads)
        return COMMANDS[args.command](args)
    except SqueezerError as exc:
        print(f"squeezer: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("squeezer: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # an internal failure: say so, keep the traceback for --debug users
        if os.environ.get("SQUEEZER_DEBUG"):
            raise
        msg = first_line(exc) if str(exc).strip() else ""
        print(
            f"squeezer: internal error: {type(exc).__name__}: {msg} "
            "(set SQUEEZER_DEBUG=1 for the traceback and please report it)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
