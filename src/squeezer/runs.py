"""Run-folder operations: each command of the CLI as one function that takes a
:class:`~squeezer.runfolder.RunSpec` (or a run folder), computes through the pipeline, and writes
the run folder through :mod:`squeezer.runfolder`. The CLI parses and prints; these do the work, and
scripts can call them the same way.

Example:
    >>> spec = RunSpec("compress", "zoo:digits_cnn", weights="w.safetensors", data="digits",
    ...                budget=Budget(bits=3))
    >>> result, data = compress_run(spec, "runs/digits-mp")  # doctest: +SKIP
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import replace
from typing import Any

import torch

from .budget import Budget
from .calibration import NEEDS_DATA
from .config import Plan
from .errors import ConfigError, SqueezerError
from .pipeline import LatencyOptions, Result, apply_plan, compress, replan
from .runfolder import (
    RunSpec,
    Stage,
    check_output_dir,
    is_run_folder,
    load_inputs,
    read_run,
    write_compress_run,
)


def compress_run(spec: RunSpec, out: str | os.PathLike, *, progress: bool = False):
    """``squeezer compress``: compress the model ``spec`` names to its budget into ``out``.
    Returns the :class:`~squeezer.pipeline.Result` and the data set (None for zero-shot runs
    without evaluation data)."""
    if spec.budget is None:
        raise ConfigError("a compression run needs a budget, e.g. --budget bits=4")
    if spec.calib == "real" and not spec.data:  # before any loading
        raise ConfigError(NEEDS_DATA)
    check_output_dir(out)
    model, data = load_inputs(spec)
    if spec.method != "uniform" and "latency_ms" in spec.budget.limits():
        from .graph import split_attention
        from .templates import template_for

        split = split_attention(model)
        warn_grouped_linears(split, template_for(split, spec.template).mixed(split, spec.act_bits),
                             spec.budget, spec.latency_backend)  # fmt: skip
    with Stage(out) as stage:
        pruned = _prune(model, data, spec, progress)
        if pruned is not None and pruned.plan is not None:  # the joint plan chose the bits too
            result = apply_plan(pruned.model, data, pruned.plan, calib=spec.calib,
                                act_bits=spec.act_bits, seed=spec.seed,
                                bias_correction=spec.bias_correction)  # fmt: skip
        else:
            result = compress(
                model if pruned is None else pruned.model, data, spec.budget,
                method=spec.method or "hessian", calib=spec.calib,
                act_bits=spec.act_bits, hessian_samples=spec.hessian_samples, seed=spec.seed,
                hessian_batch_size=spec.hessian_batch_size, hessian_probes=spec.hessian_probes,
                progress=progress, samples=spec.calib_samples, input_shape=spec.input_shape,
                latency=_latency(spec), bias_correction=spec.bias_correction,
                template=spec.template, bits=spec.bits,
            )  # fmt: skip
        spec = replace(spec, bias_correction=result.extras["bias_correction"]["enabled"])
        if pruned:
            from .prune.stage import write_stage

            write_stage(stage, pruned)
            result = replace(result, extras={**result.extras, "prune": pruned.summary()})
        write_compress_run(stage, spec, result, data)
    return result, data


def _prune(model, data, spec: RunSpec, progress: bool):
    """The pruning stage before quantization (None when the run prunes nothing)."""
    if not spec.prune:
        return None
    from .prune import PruneSpec
    from .prune.stage import prune_stage

    return prune_stage(model, data, PruneSpec.from_dict(spec.prune), seed=spec.seed,
                       finetune_epochs=spec.prune_finetune, progress=progress,
                       budget=spec.budget, act_bits=spec.act_bits,
                       threads=torch.get_num_threads())  # fmt: skip


def replan_run(
    run_dir: str | os.PathLike, budget: Budget | None = None, latency_backend: str | None = None
):
    """``squeezer plan DIR --budget B`` (re-plan from the saved analysis, no Hessian work), or
    with ``budget=None`` ``squeezer quantize DIR`` (apply the folder's plan.json as it is); the
    run folder is rewritten. ``latency_backend`` overrides the run's for a latency budget.
    Returns the result and the data set."""
    run = read_run(run_dir)
    if budget is not None and run.analysis is None:
        raise ConfigError(
            f"{run.dir} has no saved analysis (sensitivity.json, costs.json); make it with "
            "'squeezer compress MODEL --data DATA --budget B --out DIR' (--method hessian)"
        )
    if budget is None and run.plan is None:
        raise ConfigError(f"{run.dir} has no plan.json; run 'squeezer compress' or 'squeezer plan'")
    model, data = run.load()
    if run.spec.prune:  # re-planned on the pruned float model the run saved
        from .prune.stage import load_pruned

        model = load_pruned(model, run.dir)
    s = replace(run.spec, latency_backend=latency_backend or run.spec.latency_backend)
    common = {"calib": s.calib, "calib_inputs": run.calib_inputs, "act_bits": s.act_bits,
              "seed": s.seed, "bias_correction": s.bias_correction}  # fmt: skip
    if budget is not None and run.analysis.template is not None:
        warn_grouped_linears(model, run.analysis.template, budget, s.latency_backend)
    with Stage(run.dir, update=True) as stage:
        if budget is not None:  # the saved analysis holds the run's template and widths
            result = replan(model, data, run.analysis, budget, latency=_latency(s), **common)
        else:
            template = run.analysis.template_name if run.analysis else run.spec.template
            result = apply_plan(model, data, run.plan, template=template, **common)
        if run.spec.prune:
            from .prune.stage import read_record

            result = replace(result, extras={**result.extras, "prune": read_record(run.dir)})
        redo = replace(run.redo(budget), latency_backend=s.latency_backend,
                       bias_correction=result.extras["bias_correction"]["enabled"])  # fmt: skip
        write_compress_run(stage, redo, result, data)
    return result, data


def warn_grouped_linears(model, template: Plan, budget: Budget, backend: str) -> bool:
    """One line on stderr when a latency budget on ONNX Runtime meets Linears quantized in
    groups: ONNX Runtime runs those as DequantizeLinear + float MatMul, so their "int8" form is
    not faster and the budget has little to trade. Returns whether it warned.

    Example:
        >>> warn_grouped_linears(encoder, qbert_plan(encoder), Budget.parse("latency=40ms"),
        ...                      "onnxruntime")  # doctest: +SKIP
        True
    """
    from torch import nn

    from .graph import quantizable_layers

    if "latency_ms" not in budget.limits() or backend != "onnxruntime":
        return False
    linears = {k for k, m in quantizable_layers(model).items() if isinstance(m, nn.Linear)}
    grouped = [k for k, q in template.layers.items() if k in linears and q.granularity == "group"]
    if grouped:
        print(f"squeezer: warning: {len(grouped)} Linear layers are quantized in groups, which "
              "ONNX Runtime runs as float MatMuls, so a latency budget has little to trade; "
              "quantize them per output row (for BERT-family encoders: --template qbert-channel)",
              file=sys.stderr)  # fmt: skip
    return bool(grouped)


def _latency(spec: RunSpec) -> LatencyOptions:
    """Latency tables are measured on the spec's runtime with the threads this process runs."""
    return LatencyOptions(backend=spec.latency_backend, threads=torch.get_num_threads())


def train_run(
    spec: RunSpec, out: str | os.PathLike, *, epochs: int, progress: bool = False, **fit_options
):
    """``squeezer train``: train a fresh classifier on ``spec.data`` and save its weights as
    ``out``/model.safetensors. ``fit_options`` go to :func:`squeezer.train.fit` (``optimizer``,
    ``lr``, ``batch_size``) and into metrics.json. Returns the training record and the data set."""
    from .data import check_fits, load_data
    from .models import load_model, save_weights
    from .train import fit

    if spec.model.startswith("hf:"):
        raise ConfigError(
            f"squeezer train trains classifiers (zoo:NAME or module:factory); {spec.model} comes "
            "pre-trained: compress it directly"
        )
    if not spec.data:
        raise ConfigError("squeezer train needs --data DATA (e.g. --data digits)")
    check_output_dir(out)
    # Trained as built (attention not split), so the weights fit the user's own model class.
    model = load_model(spec.model, split=False)
    data = load_data(spec.data, seed=spec.seed)
    check_fits(model, data)
    with Stage(out) as stage:
        net, info = fit(model, data, epochs=epochs, seed=spec.seed, show_progress=progress,
                        **fit_options)  # fmt: skip
        save_weights(net, stage.path("model.safetensors"))
        stage.write_json("metrics.json", {"metric_name": data.task.metric_name, **info,
                                          "data": data.name, "fit": fit_options})  # fmt: skip
        stage.finish(replace(spec, weights="model.safetensors"))
    return info, data


def analyze_run(spec: RunSpec, out: str | os.PathLike, *, progress: bool = False, **options: Any):
    """``squeezer analyze``: the Hessian spectrum of the model on its data, written to
    ``out``/spectrum.json. Under ``torchrun`` every rank computes its shard and rank 0 alone
    checks and writes the folder; other ranks return None. ``options`` go to
    :func:`squeezer.spectrum.analyze_dataset` (``samples``, ``top_k``, ``density`` ...)."""
    from .distributed import broadcast_flag, process_group_from_env
    from .spectrum import analyze_dataset

    if not spec.data:
        raise ConfigError("squeezer analyze needs --data DATA (e.g. --data digits)")
    with process_group_from_env() as (rank, world_size):
        # Rank 0 tells the others whether to go on, so a refused folder cannot leave them waiting.
        refused = None
        if rank == 0:
            try:
                check_output_dir(out)
            except SqueezerError as exc:
                refused = exc
        if not broadcast_flag(refused is None):
            raise refused or SqueezerError(f"rank 0 refused the output folder {out}")
        model, data = load_inputs(spec)

        def run():
            return analyze_dataset(model, data, seed=spec.seed, progress=progress and rank == 0,
                                   **options)  # fmt: skip

        if rank != 0:
            run()
            return None
        with Stage(out) as stage:
            spectrum = run()
            stage.write_json("spectrum.json", spectrum.to_dict())
            stage.finish(spec, world_size=world_size, timings={"analyze": spectrum.seconds})
    return spectrum


def run_demo(out: str | os.PathLike, *, seed: int = 0, log=print) -> tuple[Result, Any]:
    """``squeezer demo``: train the digits CNN (or reuse the one an earlier demo run saved),
    compress it to 3 average weight bits with Hessian mixed precision, evaluate uniform W8A8,
    W4A8 and W3A8 beside it, and write the run folder. ``log`` receives progress lines."""
    from .data import load_data
    from .models import load_model, load_weights, save_weights
    from .templates import uniform_plan
    from .train import fit

    out = check_output_dir(out)
    spec = RunSpec("demo", "zoo:digits_cnn", weights="fp32.safetensors", data="digits",
                   seed=seed, budget=Budget(bits=3))  # fmt: skip
    torch.manual_seed(seed)
    data = load_data(spec.data, seed=seed)
    model = load_model(spec.model)
    cached = out / spec.weights
    t0 = time.perf_counter()
    with Stage(out) as stage:
        if is_run_folder(out) and cached.is_file():
            load_weights(model, cached)
            log(f"reusing the trained {spec.model} from {cached}")
        else:
            log(f"training {spec.model} on {spec.data} (15 epochs, CPU) ...")
            model, _ = fit(model, data, epochs=15, seed=seed, show_progress=True)
        t_train = time.perf_counter() - t0
        save_weights(model, stage.path(spec.weights))
        result = compress(
            model, data, spec.budget, act_bits=8, seed=seed, progress=True,
            extra_variants=tuple(uniform_plan(model, b, act_bits=8) for b in (8, 4, 3)),
        )  # fmt: skip
        result = replace(result, timings={**result.timings, "train": t_train})
        write_compress_run(stage, spec, result, data)
    return result, data


#: The checkpoint ``squeezer finetune DIR`` keeps in the run folder while it trains (``--resume``).
FINETUNE_CHECKPOINT = "finetune.ckpt"


def finetune_run(run_dir: str | os.PathLike, *, progress: bool = False, resume: bool = False,
                 **options: Any):  # fmt: skip
    """``squeezer finetune DIR``: fine-tune the run's compressed model (distilled from its FP32
    model) on the run's data and put it in the run folder in its place, so export, bench and the
    integer path use it; its metrics go beside the PTQ ones (``metrics.json["finetune"]``). Under
    ``torchrun`` every rank trains its slice of each batch and rank 0 alone writes. ``options`` go
    to :func:`squeezer.train.finetune.finetune`. Returns the result and the data set (rank 0),
    None on the other ranks."""
    from pathlib import Path

    from .distributed import process_group_from_env
    from .models import save_weights
    from .pipeline import test_metrics
    from .quant.storage import packed_state_dict
    from .report import write_report
    from .runfolder import MODEL_FILE, load_compressed, read_metrics, require_run_folder
    from .train.finetune import finetune

    d = require_run_folder(run_dir)
    model, qmodel, _, data = load_compressed(d)
    if data is None:
        raise ConfigError(f"{d} has no training data (a zero-shot run without --data); "
                          "fine-tuning needs the data the run names")  # fmt: skip
    ckpt = Path(d) / FINETUNE_CHECKPOINT
    with process_group_from_env() as (rank, _):
        result = finetune(qmodel, data, teacher=model, progress=progress and rank == 0,
                          checkpoint=ckpt, resume=resume, **options)  # fmt: skip
        if rank != 0:
            return None
    metrics = read_metrics(d)
    # "after" describes the model in the folder (what export and bench check against); the
    # post-training-quantized row it replaces is kept in finetune.ptq_after (from the first
    # fine-tuning, if the model was fine-tuned before)
    ptq_after = (metrics.get("finetune") or {}).get("ptq_after") or metrics.get("after") or {}
    if not ptq_after:
        ptq_after = {"name": "compressed", "metric": test_metrics(qmodel, data)[0]}
    after, extra = test_metrics(result.model, data)
    epochs = len(result.history) - 1
    row = {**ptq_after, **extra, "name": f"{ptq_after.get('name', 'compressed')} + QAT "
           f"({epochs} ep)", "metric": after}  # fmt: skip
    record = {**result.to_dict(), "ptq": ptq_after.get("metric"), "after": after, **extra,
              "ptq_after": ptq_after, "fp32": (metrics.get("before") or {}).get("metric")}  # fmt: skip
    variants = [v for v in metrics.get("variants", []) if "+ QAT" not in str(v.get("name"))]
    with Stage(d, update=True) as stage:
        save_weights(packed_state_dict(result.model), stage.path(MODEL_FILE),
                     metadata={"format": "squeezer-packed", "plan": "plan.json",
                               "finetuned": "true"})  # fmt: skip
        stage.write_json("metrics.json", {**metrics, "after": row, "variants": [*variants, row],
                                          "finetune": record})  # fmt: skip
        stage.path(FINETUNE_CHECKPOINT).unlink(missing_ok=True)
        write_report(stage.dir)
    ckpt.unlink(missing_ok=True)
    return result, data
