"""The ``squeezer`` command line. It parses, calls the API, writes the run folder, and maps errors to
exit codes: 0 done, 2 bad input or infeasible request (one line on stderr), 1 internal failure."""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from . import __version__
from .errors import ConfigError, SqueezerError

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2 (argparse prints usage too)
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def command(name: str, help: str):
    """Register ``fn(args) -> exit code`` as a subcommand; ``fn.configure(parser)`` adds its flags."""

    def deco(fn):
        COMMANDS[name] = fn
        fn.help = help
        return fn

    return deco


# --------------------------------------------------------------------------------------------------
# shared pieces


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="zoo:NAME, pkg.module:factory, or hf:DIR")
    p.add_argument("--weights", metavar="FILE", help=".safetensors or torch state-dict file")
    p.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow a weights file that is a full pickle (it can run code)",
    )


def _manifest(args: argparse.Namespace, **extra: Any) -> dict[str, Any]:
    import torch

    return {
        "tool": "squeezer",
        "version": __version__,
        "command": args.command,
        "argv": sys.argv[1:],
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "seed": getattr(args, "seed", 0),
        **extra,
    }


def _load(args: argparse.Namespace):
    """The model and data an invocation names. Text data is tokenized with an hf: model's own
    tokenizer, and its targets are that FP32 model's embeddings."""
    from .data import load_data
    from .models import load_model, load_weights

    seed = getattr(args, "seed", 0)
    if args.model.startswith("hf:"):
        from .hf import load_hf

        model, tokenizer = load_hf(args.model)
        if args.weights:
            load_weights(model, args.weights, trust_pickle=args.trust_pickle)
        max_len = getattr(args, "max_len", None) or 128
        return model, load_data(
            args.data, seed=seed, model=model, tokenizer=tokenizer, max_len=max_len
        )
    model = load_model(args.model, weights=args.weights, trust_pickle=args.trust_pickle)
    return model, load_data(args.data, seed=seed)


def _check_fits(model, data) -> None:
    """A one-line DataError when the data's inputs do not fit the model."""
    import torch

    from .data import forward
    from .errors import DataError
    from .pipeline import example_input

    try:
        with torch.no_grad():
            forward(model.eval(), example_input(data, 2))
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise DataError(
            f"the data ({data.name}, inputs of shape {data.input_shape}) does not fit the model: "
            f"{first}"
        ) from None


def _print_table(rows: list[list[str]], headers: list[str]) -> None:
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    print(line)
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print(
            "  ".join(
                str(c).rjust(w) if i else str(c).ljust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )


def _summary(result, data) -> None:
    from .report import fmt_bytes

    name = data.task.metric_name
    rows = [
        [v.name, f"{v.metric:.2f}", fmt_bytes(v.size_bytes), f"{v.avg_bits:.2f}"]
        for v in result.variants
    ]
    _print_table(rows, ["variant", name, "size", "avg bits"])


def _write_compress_run(
    stage, args, result, data, *, weights_rel: str | None = None, extra_manifest: dict | None = None
) -> None:
    from .models import save_weights
    from .quant.storage import packed_state_dict

    stage.write_json("plan.json", result.plan.to_dict())
    stage.write_json("metrics.json", result.metrics(data))
    save_weights(
        packed_state_dict(result.qmodel),
        stage.path("model.safetensors"),
        metadata={"format": "squeezer-packed", "plan": "plan.json"},
    )
    weights = weights_rel or (str(Path(args.weights).resolve()) if args.weights else None)
    stage.write_json(
        "manifest.json",
        _manifest(
            args,
            model=args.model,
            weights=weights,
            data=args.data,
            budget=str(args.budget),
            timings={**result.timings, "total": time.perf_counter() - stage.t0},
            **(extra_manifest or {}),
        ),
    )
    from .report import write_report

    write_report(stage.dir)


# --------------------------------------------------------------------------------------------------
# commands


@command("compress", "quantize a model to meet a budget, evaluate it, and write a run folder")
def cmd_compress(args: argparse.Namespace) -> int:
    from .config import Budget
    from .pipeline import compress
    from .runfolder import Stage, check_output_dir

    budget = Budget.parse(args.budget)
    check_output_dir(args.out)
    model, data = _load(args)
    _check_fits(model, data)
    with Stage(args.out) as stage:
        result = compress(
            model, data, budget, act_bits=args.act_bits or None, progress=not args.quiet
        )
        _write_compress_run(stage, args, result, data)
    if not args.quiet:
        _summary(result, data)
        print(f"\nwrote {args.out}/report.html")
    return 0


def _configure_compress(p: argparse.ArgumentParser) -> None:
    _model_args(p)
    p.add_argument(
        "--data",
        required=True,
        metavar="DATA",
        help="digits, mnist1d, a .npz with x and y, an image folder, or a .txt file",
    )
    p.add_argument(
        "--budget",
        required=True,
        metavar="B",
        help="e.g. bits=8, bits=4.5, size=1.2MB, bops=2e9, latency=3ms, size=0.5r",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="run folder to write")
    p.add_argument(
        "--max-len",
        type=int,
        default=128,
        help="token length of text inputs for hf: models (default 128)",
    )
    p.add_argument(
        "--act-bits",
        type=int,
        default=8,
        help="activation bits (0 keeps activations in float; default 8)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="print nothing on success")


cmd_compress.configure = _configure_compress


@command("train", "train a built-in net on a data set and save its weights (for demos and tests)")
def cmd_train(args: argparse.Namespace) -> int:
    from .data import load_data
    from .models import load_model, save_weights
    from .runfolder import Stage, check_output_dir
    from .train import fit

    if not args.model.startswith("zoo:"):
        raise ConfigError(f"squeezer train takes a built-in net (zoo:NAME), got {args.model!r}")
    check_output_dir(args.out)
    model = load_model(args.model)
    data = load_data(args.data, seed=args.seed)
    _check_fits(model, data)
    with Stage(args.out) as stage:
        net, info = fit(
            model, data, epochs=args.epochs, seed=args.seed, show_progress=not args.quiet
        )
        save_weights(net, stage.path("model.safetensors"))
        stage.write_json(
            "metrics.json", {"metric_name": data.task.metric_name, **info, "data": data.name}
        )
        stage.write_json(
            "manifest.json",
            _manifest(
                args,
                model=args.model,
                data=args.data,
                weights="model.safetensors",
                timings={"train": time.perf_counter() - stage.t0},
            ),
        )
    if not args.quiet:
        print(
            f"{args.model} on {data.name}: {data.task.metric_name} {info[data.task.metric_name]:.2f} "
            f"after {args.epochs} epochs; weights in {args.out}/model.safetensors"
        )
    return 0


def _configure_train(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="zoo:NAME")
    p.add_argument("--data", required=True, metavar="DATA")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")


cmd_train.configure = _configure_train


@command("analyze", "Hessian spectrum: top eigenvalues, per-layer traces and top eigenvalues")
def cmd_analyze(args: argparse.Namespace) -> int:
    from .report import write_report
    from .runfolder import Stage, check_output_dir
    from .spectrum import analyze_dataset, summary

    check_output_dir(args.out)
    model, data = _load(args)
    _check_fits(model, data)
    with Stage(args.out) as stage:
        spec = analyze_dataset(
            model,
            data,
            samples=args.samples,
            batch_size=args.batch_size,
            top_k=args.top_k,
            max_probes=args.max_probes,
            rel_stderr=args.rel_stderr,
            trace_method=args.trace,
            density=args.density,
            seed=args.seed,
            progress=not args.quiet and sys.stderr.isatty(),
        )
        stage.write_json("spectrum.json", spec.to_dict())
        weights = str(Path(args.weights).resolve()) if args.weights else None
        stage.write_json(
            "manifest.json",
            _manifest(
                args,
                model=args.model,
                weights=weights,
                data=args.data,
                timings={"analyze": spec.seconds},
            ),
        )
        write_report(stage.dir)
    if not args.quiet:
        print(summary(spec))
        print(f"\nwrote {args.out}/spectrum.json")
    return 0


def _configure_analyze(p: argparse.ArgumentParser) -> None:
    _model_args(p)
    p.add_argument("--data", required=True, metavar="DATA")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--samples", type=int, default=2048, help="training samples (default 2048)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--top-k", type=int, default=3, help="top eigenvalues of the full Hessian")
    p.add_argument("--max-probes", type=int, default=200, help="most trace probes")
    p.add_argument("--rel-stderr", type=float, default=0.05, help="trace stopping target")
    p.add_argument("--trace", choices=["hutchinson", "hutch++"], default="hutchinson")
    p.add_argument("--density", action="store_true", help="also the SLQ spectral density")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")


cmd_analyze.configure = _configure_analyze


@command("demo", "train the digits net (or reuse it) and compress it end to end, offline")
def cmd_demo(args: argparse.Namespace) -> int:
    import torch

    from .config import Budget
    from .data import load_data
    from .models import load_model, load_weights, save_weights
    from .pipeline import compress, uniform_plan
    from .runfolder import Stage, check_output_dir, is_run_folder
    from .train import fit

    out = check_output_dir(args.out)
    spec, data_name = "zoo:digits_cnn", "digits"
    args.model, args.data, args.weights, args.budget = spec, data_name, None, "bits=4"
    torch.manual_seed(args.seed)
    data = load_data(data_name, seed=args.seed)
    model = load_model(spec)
    cached = out / "fp32.safetensors"
    t0 = time.perf_counter()
    with Stage(out) as stage:
        if is_run_folder(out) and cached.is_file():
            load_weights(model, cached)
            print(f"reusing the trained {spec} from {cached}")
        else:
            print(f"training {spec} on {data_name} (15 epochs, CPU) ...")
            model, _ = fit(model, data, epochs=15, seed=args.seed, show_progress=True)
        t_train = time.perf_counter() - t0
        save_weights(model, stage.path("fp32.safetensors"))
        result = compress(
            model,
            data,
            Budget.parse(args.budget),
            act_bits=8,
            extra_variants=(uniform_plan(model, 8, act_bits=8),),
            progress=True,
        )
        result.timings["train"] = t_train
        _write_compress_run(stage, args, result, data, weights_rel="fp32.safetensors")
    print()
    _summary(result, data)
    print(f"\nwrote {out}/report.html ({time.perf_counter() - t0:.1f} s)")
    return 0


def _configure_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--out",
        default="squeezer-demo",
        metavar="DIR",
        help="run folder (default: ./squeezer-demo)",
    )
    p.add_argument("--seed", type=int, default=0)


cmd_demo.configure = _configure_demo


@command("report", "re-write DIR/report.html and report.md from the run folder's files")
def cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report
    from .runfolder import require_run_folder

    html, _ = write_report(require_run_folder(args.dir))
    print(f"wrote {html}")
    return 0


cmd_report.configure = lambda p: p.add_argument("dir", metavar="DIR")


@command("zoo", "list the built-in models")
def cmd_zoo(args: argparse.Namespace) -> int:
    from .zoo import MODELS

    _print_table(
        [
            [f"zoo:{e.name}", e.data, "x".join(map(str, e.input_shape)), e.description]
            for e in MODELS.values()
        ],
        ["model", "data", "input", "description"],
    )
    return 0


cmd_zoo.configure = lambda p: None


# --------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="squeezer", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"squeezer {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, fn in COMMANDS.items():
        p = sub.add_parser(name, help=fn.help, description=fn.help)
        fn.configure(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    try:
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
        msg = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        print(
            f"squeezer: internal error: {type(exc).__name__}: {msg} "
            "(set SQUEEZER_DEBUG=1 for the traceback and please report it)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
