"""The ``squeezer`` command line. It parses, calls the API, writes the run folder, and maps errors to
exit codes: 0 done, 2 bad input or infeasible request (one line on stderr), 1 internal failure."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from . import __version__
from .errors import ConfigError, SqueezerError
from .threads import configure_threads

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
    p.add_argument("model", metavar="MODEL", help="zoo:NAME, module:factory, hf:minilm or hf:DIR")
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
        "threads": torch.get_num_threads(),
        "seed": getattr(args, "seed", 0),
        **extra,
    }


def _weights_ref(args: argparse.Namespace) -> str | None:
    """The weights file as the manifest records it (absolute, so the run can be rebuilt)."""
    return str(Path(args.weights).resolve()) if args.weights else None


def _load(args: argparse.Namespace):
    """The model (its attention split, as :func:`squeezer.models.load_model` returns it) and data
    an invocation names. Text data is tokenized with an hf: model's own tokenizer, and its targets
    are that FP32 model's embeddings."""
    from .data import load_data
    from .graph import split_attention
    from .models import load_model, load_weights

    seed = getattr(args, "seed", 0)
    if args.model.startswith("hf:"):
        from .hf import load_hf

        model, tokenizer = load_hf(args.model)
        if args.weights:
            load_weights(model, args.weights, trust_pickle=args.trust_pickle)
        model = split_attention(model)
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
    """A plain-text table: numeric columns (numbers, sizes, ratios, "–") right-aligned, text left."""
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    numeric = [i > 0 and all(_looks_numeric(str(r[i])) for r in rows) for i in range(len(headers))]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip())
    print("  ".join("-" * w for w in widths))
    for r in rows:
        cells = zip(r, widths, numeric, strict=True)
        print("  ".join(str(c).rjust(w) if n else str(c).ljust(w) for c, w, n in cells).rstrip())


def _looks_numeric(text: str) -> bool:
    """ "99.55", "293 kB", "1.00x", "–": what a numeric column holds."""
    head = text.split(" ")[0].rstrip("x×%")
    if head in ("–", "-", ""):
        return True
    try:
        float(head.replace(",", ""))
    except ValueError:
        return False
    return True


def _summary(result, data) -> None:
    from .graph import QUANTIZABLE_TYPES, quantizable_layers
    from .report import fmt_bytes

    name = data.task.metric_name if data is not None else "metric"
    rows = [
        [
            v.name,
            "–" if v.metric is None else f"{v.metric:.2f}",
            fmt_bytes(v.size_bytes),
            f"{v.avg_bits:.2f}",
        ]
        for v in result.variants
    ]
    _print_table(rows, ["variant", name, "size", "avg bits"])
    floats = result.float_layers()
    if floats:
        n = sum(v["weights"] for v in floats.values())
        total = n + sum(m.weight.numel() for m in quantizable_layers(result.model).values())
        listed = ", ".join(
            f"{k} ({v['type']}, {v['weights']:,})" for k, v in list(floats.items())[:4]
        )
        more = f" and {len(floats) - 4} more" if len(floats) > 4 else ""
        kinds = ", ".join(t.__name__ for t in QUANTIZABLE_TYPES)
        print(
            f"note: {n / total:.0%} of the weights stay in float, in layers squeezer does not "
            f"quantize (it quantizes {kinds}): {listed}{more}"
        )


def _write_compress_run(
    stage, args, result, data, *, weights_rel: str | None = None, extra_manifest: dict | None = None
) -> None:
    from .models import save_weights
    from .quant.storage import packed_state_dict

    stage.write_json("plan.json", result.plan.to_dict())
    if result.analysis is not None:
        _write_analysis(stage.path, result.analysis)
    stage.write_json("metrics.json", result.metrics(data))  # data may be None (zero-shot)
    # A zero-shot run keeps its distilled inputs: re-planning calibrates on them again.
    if result.calib_inputs is not None:
        save_weights(
            {f"batch{i}": x.contiguous() for i, x in enumerate(result.calib_inputs)},
            stage.path(DISTILLED_FILE),
            metadata={"format": "squeezer-distilled-inputs"},
        )
    save_weights(
        packed_state_dict(result.qmodel),
        stage.path("model.safetensors"),
        metadata={"format": "squeezer-packed", "plan": "plan.json"},
    )
    _finish_run(
        stage,
        args,
        weights=weights_rel or _weights_ref(args),
        budget=str(args.budget),
        timings={**result.timings, "total": time.perf_counter() - stage.t0},
        **(extra_manifest or {}),
    )


def _finish_run(stage, args: argparse.Namespace, *, weights: str | None, **fields: Any) -> None:
    """Write a run's manifest.json (the model, ``weights`` and data it was made from, then
    ``fields``) and its report.html."""
    from .report import write_report

    stage.write_json(
        "manifest.json",
        _manifest(args, model=args.model, weights=weights, data=args.data, **fields),
    )
    write_report(stage.dir)


DISTILLED_FILE = "distilled.safetensors"


def _distilled_inputs(run_dir: Path) -> list:
    """The distilled calibration batches a zero-shot run saved, in order."""
    from .models import read_state_dict

    path = run_dir / DISTILLED_FILE
    if not path.is_file():
        raise ConfigError(
            f"{run_dir} is a zero-shot run without {DISTILLED_FILE} (made by an older squeezer); "
            "run 'squeezer compress ... --calib zeroshot' again with the new budget"
        )
    sd = read_state_dict(path)
    return [sd[f"batch{i}"] for i in range(len(sd))]


def _write_analysis(path, analysis) -> None:
    """spectrum.json, sensitivity.json, costs.json and pareto.json: what re-planning needs."""
    from .runfolder import write_json

    if analysis.spectrum is not None:
        write_json(path("spectrum.json"), analysis.spectrum.to_dict())
    write_json(path("sensitivity.json"), analysis.sensitivity.to_dict())
    if analysis.costs is None:
        return
    write_json(
        path("costs.json"),
        {"costs": analysis.costs.to_dict(), "ties": [list(t) for t in analysis.ties]},
    )
    write_json(path("pareto.json"), [p.to_dict() for p in analysis.frontier])


# --------------------------------------------------------------------------------------------------
# commands


@command("compress", "quantize a model to meet a budget, evaluate it, and write a run folder")
def cmd_compress(args: argparse.Namespace) -> int:
    from .config import Budget
    from .pipeline import compress, compress_zeroshot
    from .runfolder import Stage, check_output_dir

    budget = Budget.parse(args.budget)
    check_output_dir(args.out)
    if args.calib == "real" and not args.data:
        raise ConfigError(
            "--data is required to calibrate on real data; give --data DATA, or use "
            "--calib zeroshot to quantize without any data"
        )
    if args.calib == "zeroshot":
        args.data = args.eval_data or args.data
        if args.data:
            model, data = _load(args)
            _check_fits(model, data)
        else:
            model, data = _load_model_only(args), None
    else:
        model, data = _load(args)
        _check_fits(model, data)
    manifest = {
        "act_bits": args.act_bits or None,
        "max_len": args.max_len,
        "method": args.method,
        "calib": args.calib,
        "trust_pickle": bool(args.trust_pickle),
    }
    with Stage(args.out) as stage:
        if args.calib == "zeroshot":
            result = compress_zeroshot(
                model,
                budget,
                eval_data=data,
                act_bits=args.act_bits or None,
                method="uniform" if args.method == "uniform" else "kl",
                input_shape=_shape(args.input_shape),
                seed=args.seed,
                progress=not args.quiet,
            )
        else:
            result = compress(
                model,
                data,
                budget,
                act_bits=args.act_bits or None,
                method=args.method,
                hessian_samples=args.hessian_samples,
                seed=args.seed,
                progress=not args.quiet,
            )
        _write_compress_run(stage, args, result, data, extra_manifest=manifest)
    if not args.quiet:
        _summary(result, data)
        print(f"\nwrote {args.out}/report.html")
    return 0


def _shape(text: str | None) -> tuple[int, ...] | None:
    if not text:
        return None
    try:
        return tuple(int(v) for v in text.replace("x", ",").split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"--input-shape {text!r} is not a shape like 1,8,8") from None


def _load_model_only(args: argparse.Namespace):
    from .models import load_model

    return load_model(args.model, weights=args.weights, trust_pickle=args.trust_pickle)


def _configure_compress(p: argparse.ArgumentParser) -> None:
    _model_args(p)
    p.add_argument(
        "--data",
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
        default=512,
        metavar="N",
        help="training samples the Hessian traces average over (default 512)",
    )
    p.add_argument(
        "--method",
        choices=("hessian", "uniform"),
        default="hessian",
        help="hessian: per-layer bits from Hessian traces and an exact integer program (default); "
        "uniform: every layer at a whole --budget bits=N",
    )
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


def _run_args(run_dir: Path, man: dict[str, Any]) -> argparse.Namespace:
    """The loading arguments a run folder's manifest records (weights made absolute)."""
    weights = man.get("weights")
    if weights and not Path(weights).is_absolute():
        weights = str(run_dir / weights)
    return argparse.Namespace(
        model=man["model"],
        weights=weights,
        trust_pickle=man.get("trust_pickle", False),
        data=man.get("data"),
        seed=man.get("seed", 0),
        max_len=man.get("max_len", 128),
    )


def _load_run(run_dir: Path, man: dict[str, Any] | None = None):
    """The model, data and manifest a run folder was made from (``man``: the manifest, if the
    caller read it already). A zero-shot run made without any data gives ``None`` for the data."""
    if man is None:
        man = json.loads((run_dir / "manifest.json").read_text())
    ns = _run_args(run_dir, man)
    if not man.get("data"):
        return _load_model_only(ns), None, man
    model, data = _load(ns)
    return model, data, man


def _apply_and_write(
    run_dir: Path, args: argparse.Namespace, plan, *, replanned: bool, loaded=None
) -> int:
    """Apply ``plan`` to the run's model and rewrite the run folder. ``loaded``: the run's
    ``(model, data, manifest)`` if the caller has them already."""
    from .pipeline import apply_plan, apply_plan_zeroshot
    from .runfolder import Stage

    man = json.loads((run_dir / "manifest.json").read_text())
    zeroshot = man.get("calib") == "zeroshot"
    distilled = _distilled_inputs(run_dir) if zeroshot else None  # before loading the model
    model, data, man = loaded if loaded is not None else _load_run(run_dir, man)
    with Stage(run_dir, update=True) as stage:
        if zeroshot:
            result = apply_plan_zeroshot(model, plan, distilled, data)
            result.calib_inputs = distilled
        else:
            result = apply_plan(model, data, plan)
        args.model, args.data, args.weights = man["model"], man.get("data"), man.get("weights")
        args.budget = plan.meta.get("budget", man.get("budget"))
        keep = ("act_bits", "max_len", "method", "calib", "trust_pickle")
        _write_compress_run(
            stage,
            args,
            result,
            data,
            weights_rel=man.get("weights"),
            extra_manifest={**{k: man[k] for k in keep if k in man}, "replanned": replanned},
        )
    _summary(result, data)
    print(f"\nwrote {run_dir}/report.html")
    return 0


@command(
    "plan", "re-plan bits from DIR's Hessian analysis for a new budget, then apply and evaluate"
)
def cmd_plan(args: argparse.Namespace) -> int:
    from .config import Budget, Plan
    from .pipeline import ZEROSHOT_NAME, Analysis, hessian_plan
    from .plan import Costs
    from .runfolder import require_run_folder
    from .sensitivity import Sensitivity

    d = require_run_folder(args.dir)
    budget = Budget.parse(args.budget)
    man = json.loads((d / "manifest.json").read_text())
    old = Plan.load(d / "plan.json") if (d / "plan.json").is_file() else None
    encoder = old is not None and old.meta.get("method") == "qbert-hessian"
    if not (d / "sensitivity.json").is_file() or not (encoder or (d / "costs.json").is_file()):
        raise ConfigError(
            f"{d} has no Hessian analysis (sensitivity.json, costs.json); make it with "
            "'squeezer compress MODEL --data DATA --budget B --out DIR' (--method hessian)"
        )
    sens = Sensitivity.load(d / "sensitivity.json")
    loaded = None
    t0 = time.perf_counter()
    if encoder:
        # A Q-BERT run: the previous plan is the template (each layer keeps its quantizer and only
        # its width changes); sizes come from the model itself.
        from .qbert import mixed_precision_plan

        loaded = _load_run(d, man)
        t0 = time.perf_counter()
        per_block = bool(old.meta.get("per_block", False))
        p = mixed_precision_plan(loaded[0], sens, budget, old, per_block=per_block)
        plan = Plan(p.layers, meta={**p.meta, "name": f"Q-BERT mixed ({budget})"})
    else:
        c = json.loads((d / "costs.json").read_text())
        ties = tuple(tuple(t) for t in c.get("ties", []))
        analysis = Analysis(None, sens, Costs.from_dict(c["costs"]), [], ties)
        name = ZEROSHOT_NAME if man.get("calib") == "zeroshot" else "Hessian mixed"
        plan = hessian_plan(analysis, budget, man.get("act_bits", 8), name=name)
    ach = plan.meta.get("achieved", {})
    print(
        f"planned in {time.perf_counter() - t0:.3f} s: predicted loss increase "
        f"{plan.meta.get('predicted_omega', 0):.4g}, size {ach.get('size_bytes', 0):,.0f} B, "
        f"average bits {ach.get('bits', float('nan')):.2f}"
    )
    return _apply_and_write(d, args, plan, replanned=True, loaded=loaded)


def _configure_plan(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", metavar="DIR", help="a run folder written by 'squeezer compress'")
    p.add_argument("--budget", required=True, metavar="B", help="e.g. bits=3, size=40kB, size=0.5r")


cmd_plan.configure = _configure_plan


@command("quantize", "apply DIR's plan.json (e.g. after editing it) and evaluate the result")
def cmd_quantize(args: argparse.Namespace) -> int:
    from .config import Plan
    from .runfolder import require_run_folder

    d = require_run_folder(args.dir)
    if not (d / "plan.json").is_file():
        raise ConfigError(f"{d} has no plan.json; run 'squeezer compress' or 'squeezer plan' first")
    return _apply_and_write(d, args, Plan.load(d / "plan.json"), replanned=False)


def _configure_quantize(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", metavar="DIR", help="a run folder with a plan.json")


cmd_quantize.configure = _configure_quantize


@command(
    "train", "train a classifier (zoo:NAME or module:factory) on a data set and save its weights"
)
def cmd_train(args: argparse.Namespace) -> int:
    from .data import load_data
    from .models import load_model, save_weights
    from .runfolder import Stage, check_output_dir
    from .train import fit

    if args.model.startswith("hf:"):
        raise ConfigError(
            f"squeezer train trains classifiers (zoo:NAME or module:factory); {args.model} comes "
            "pre-trained: compress it directly"
        )
    check_output_dir(args.out)
    # Trained as built (attention not split), so the weights fit the user's own model class.
    model = load_model(args.model, split=False)
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
    p.add_argument(
        "model", metavar="MODEL", help="zoo:NAME or module:factory (a new, untrained net)"
    )
    p.add_argument("--data", required=True, metavar="DATA")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")


cmd_train.configure = _configure_train


@command("analyze", "Hessian spectrum: top eigenvalues, per-layer traces, spectral density")
def cmd_analyze(args: argparse.Namespace) -> int:
    from .distributed import broadcast_flag, process_group_from_env
    from .runfolder import Stage, check_output_dir
    from .spectrum import analyze_dataset, summary

    with process_group_from_env() as (rank, world_size):
        # Under torchrun every rank computes its shard; rank 0 alone checks and writes the run, and
        # tells the others whether to go on (so a refused output folder cannot leave them waiting).
        refused = None
        if rank == 0:
            try:
                check_output_dir(args.out)
            except SqueezerError as exc:
                refused = exc
        if not broadcast_flag(refused is None):
            raise refused or SqueezerError(f"rank 0 refused the output folder {args.out}")
        model, data = _load(args)
        _check_fits(model, data)

        def run():
            return analyze_dataset(
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
                progress=rank == 0 and not args.quiet and sys.stderr.isatty(),
            )

        if rank != 0:
            run()
            return 0
        with Stage(args.out) as stage:
            spec = run()
            stage.write_json("spectrum.json", spec.to_dict())
            _finish_run(
                stage,
                args,
                weights=_weights_ref(args),
                world_size=world_size,
                timings={"analyze": spec.seconds},
            )
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
    # The digits net is tiny: one thread is as fast on an idle machine and many times faster on a
    # busy one (threads of an oversubscribed OpenMP pool stall each other).
    if args.threads_source != "flag":
        torch.set_num_threads(1)
    args.model, args.data, args.weights, args.budget = spec, data_name, None, "bits=3"
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
            extra_variants=tuple(uniform_plan(model, b, act_bits=8) for b in (8, 4, 3)),
            seed=args.seed,
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


def _load_compressed(run: Path):
    """(float model, quantized model, test inputs, data set or None) of a compress run folder.
    The test inputs are the data set's test split, or for a zero-shot run without data its
    distilled inputs."""
    import torch

    from .config import Plan
    from .models import read_state_dict
    from .quant.apply import load_quantized

    if not (run / "plan.json").is_file() or not (run / "model.safetensors").is_file():
        raise ConfigError(
            f"{run} holds no compressed model (plan.json and model.safetensors); make one with "
            f"'squeezer compress MODEL --data DATA --budget B --out {run}'"
        )
    model, data, _ = _load_run(run)
    inputs = torch.cat(_distilled_inputs(run)) if data is None else data.x_test
    sd = read_state_dict(run / "model.safetensors")
    qmodel = load_quantized(model, Plan.load(run / "plan.json"), sd)
    return model.eval(), qmodel.eval(), inputs, data


def _examples(inputs, n: int):
    """The first ``n`` of ``inputs`` (a tensor or a dict of tensors), repeated if there are
    fewer."""
    import torch

    from .data import batch_size

    if isinstance(inputs, dict):
        reps = -(-n // batch_size(inputs))
        return {k: torch.cat([v] * reps)[:n] for k, v in inputs.items()}
    reps = -(-n // inputs.shape[0])
    return torch.cat([inputs] * reps)[:n]


def _update_metrics(run: Path, **entries: Any) -> None:
    from .runfolder import write_json

    path = run / "metrics.json"
    metrics = json.loads(path.read_text()) if path.is_file() else {}
    metrics.update(entries)
    write_json(path, metrics)


def _export_run(run: Path, qmodel, inputs, data, *, samples: int, requantize: bool, atol, threads):
    """Write ``run``/model.onnx (checked in ONNX Runtime against ``qmodel``) and, with ``data``,
    run it on the whole test split; both go into metrics.json under ``export``. Returns the
    :class:`~squeezer.export.ExportReport` and the ONNX model's metric (None without data)."""
    from .data import evaluate
    from .export import OrtModule, export_onnx, ort_session

    report = export_onnx(
        qmodel,
        run / "model.onnx",
        _examples(inputs, samples),
        requantize=requantize,
        atol=atol,
        threads=threads,
    )
    entry = {**report.to_dict(), "path": "model.onnx"}
    if data is not None:
        deployed = OrtModule(ort_session(run / "model.onnx", threads=threads))
        entry["test_metric"] = evaluate(deployed, data.test_batches(), data.task)
    _update_metrics(run, export=entry)
    return report, entry.get("test_metric")


@command("export", "export DIR's compressed model to ONNX (QDQ int8), checked in ONNX Runtime")
def cmd_export(args: argparse.Namespace) -> int:
    from .report import fmt_bytes, write_report
    from .runfolder import require_run_folder

    run = require_run_folder(args.dir)
    _, qmodel, inputs, data = _load_compressed(run)
    rep, deployed = _export_run(
        run,
        qmodel,
        inputs,
        data,
        samples=args.samples,
        requantize=not args.exact,
        atol=args.atol,
        threads=args.threads,
    )
    write_report(run)
    agree = "" if rep.argmax_agreement is None else f", argmax agrees {rep.argmax_agreement:.1%}"
    print(
        f"wrote {run}/model.onnx ({fmt_bytes(rep.size_bytes)}; theoretical "
        f"{fmt_bytes(rep.theoretical_bytes)}); ONNX Runtime vs squeezer: max |Δ| "
        f"{rep.max_abs_error:.3g}, median sample {rep.median_sample_error:.3g} (tolerance "
        f"{rep.atol:.3g}{agree})"
    )
    if deployed is not None:
        m = json.loads((run / "metrics.json").read_text())
        simulated, fp32 = m["after"].get("metric"), m["before"].get("metric")
        print(
            f"{data.task.metric_name} of the ONNX model on the test split: {deployed:.4g} "
            f"(squeezer's simulation: {simulated:.4g}; FP32: {fp32:.4g})"
        )
    return 0


def _configure_export(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--format", choices=["onnx"], default="onnx")
    p.add_argument(
        "--exact",
        action="store_true",
        help="keep residual sums and pooled maps in float, exactly as squeezer's simulation "
        "does; by default they are quantized to 8 bits too, so that ONNX Runtime runs every conv "
        "in int8 (one more rounding per such tensor, several times faster on residual nets)",
    )
    p.add_argument("--samples", type=int, default=64, help="test inputs used for the check")
    p.add_argument("--atol", type=float, default=None, help="tolerance of the check")


cmd_export.configure = _configure_export


@command("bench", "measure latency of PyTorch FP32, ONNX Runtime FP32 and DIR's exported ONNX")
def cmd_bench(args: argparse.Namespace) -> int:
    import json

    from .export import export_float_onnx, latency_table, ort_session
    from .report import write_report
    from .runfolder import require_run_folder

    run = require_run_folder(args.dir)
    model, qmodel, inputs, data = _load_compressed(run)
    threads = args.threads
    if not (run / "model.onnx").is_file():
        print(f"no {run}/model.onnx yet: exporting it first", file=sys.stderr)
        _export_run(
            run, qmodel, inputs, data, samples=64, requantize=True, atol=None, threads=threads
        )
    examples = {b: _examples(inputs, b) for b in args.batch}
    variants = {
        "PyTorch FP32": model,
        "ORT FP32": ort_session(export_float_onnx(model, examples[args.batch[0]]), threads=threads),
        "ONNX (squeezer)": ort_session(run / "model.onnx", threads=threads),
    }
    table = latency_table(variants, examples, threads=threads, warmup=args.warmup, runs=args.runs)
    metrics = json.loads((run / "metrics.json").read_text())
    first = table[f"batch_{args.batch[0]}"]
    before = {**metrics.get("before", {}), "latency_ms": first["PyTorch FP32"]["median_ms"]}
    after = {**metrics.get("after", {}), "latency_ms": first["ONNX (squeezer)"]["median_ms"]}
    _update_metrics(run, latency=table, before=before, after=after)
    write_report(run)
    last = table[f"batch_{args.batch[-1]}"]
    rows = [
        [name]
        + [f"{table[f'batch_{b}'][name]['median_ms']:.2f}" for b in args.batch]
        + [f"{last['PyTorch FP32']['median_ms'] / last[name]['median_ms']:.2f}x"]
        for name in variants
    ]
    speed = f"× PyTorch FP32 speed (batch {args.batch[-1]})"
    _print_table(rows, ["variant", *(f"batch {b} (ms)" for b in args.batch), speed])
    print(f"\nmedians of {args.runs} runs, {threads} threads; written to {run}/metrics.json")
    return 0


def _configure_bench(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 32], help="batch sizes")
    p.add_argument("--runs", type=int, default=30, help="timed runs per measurement")
    p.add_argument("--warmup", type=int, default=5, help="untimed runs first")


cmd_bench.configure = _configure_bench


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
        msg = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        print(
            f"squeezer: internal error: {type(exc).__name__}: {msg} "
            "(set SQUEEZER_DEBUG=1 for the traceback and please report it)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
