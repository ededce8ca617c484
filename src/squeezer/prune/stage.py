"""Pruning as a stage of a compression run: prune, recover by fine-tuning with distillation from
the unpruned model (the one trainer, :func:`squeezer.train.finetune.finetune`), evaluate; and the
files a run folder keeps so the pruned model reloads (``prune.json`` with the architecture, the
pruned float weights beside the quantized ones).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ..config import Plan
from ..data import Dataset, evaluate
from ..errors import ConfigError
from ..measure import model_bytes, profile_layers
from . import prune
from .base import Pruned, PruneSpec
from .unstructured import hold_zeros, release_zeros

#: The run-folder files of a pruned run.
PRUNE_FILE = "prune.json"
PRUNED_WEIGHTS = "pruned.safetensors"


@dataclass
class PruneStage:
    """A pruned model and its record: the metric of the dense model, of the pruned one before
    and after recovery, MACs and sizes, the per-layer ratios and the architecture."""

    pruned: Pruned
    model: nn.Module
    record: dict[str, Any] = field(default_factory=dict)
    plan: Plan | None = None  # the bits a joint (--prune-ratio auto) plan chose per layer

    def summary(self) -> dict[str, Any]:
        """The ``prune.json`` document (also ``metrics.json``'s ``prune`` entry)."""
        return {**self.pruned.summary(), **self.record}


def _macs(model: nn.Module, example: Any) -> float:
    return float(sum(v.macs for v in profile_layers(model, example).values()))


def prune_stage(
    model: nn.Module,
    data: Dataset | None,
    spec: PruneSpec,
    *,
    finetune_epochs: int = 0,
    lr: float | None = 1e-3,
    seed: int = 0,
    progress: bool = False,
    budget: Any = None,
    act_bits: int | None = 8,
    threads: int = 1,
) -> PruneStage:
    """Prune ``model`` as ``spec`` asks (``spec.options["auto"]``: at the per-group ratios the
    joint bits + structured-sparsity plan picks under ``budget``, :func:`joint_prune`), then
    fine-tune it ``finetune_epochs`` epochs with
    knowledge distillation from ``model`` (BatchNorm statistics re-estimated: the channels
    feeding each BatchNorm changed). ``model`` is not modified.

    Example:
        >>> st = prune_stage(net, load_data("digits"), PruneSpec("structured", 0.5),
        ...                  finetune_epochs=10)  # doctest: +SKIP
    """
    if finetune_epochs < 0:
        raise ConfigError(f"--prune-finetune must be 0 or more epochs, got {finetune_epochs}")
    if finetune_epochs and data is None:
        raise ConfigError("fine-tuning after pruning needs --data")
    t = time.perf_counter()
    plan, joint = None, None
    if spec.options.get("auto"):
        pruned, plan, joint = joint_prune(model, data, spec, budget, act_bits=act_bits,
                                          threads=threads)  # fmt: skip
    else:
        pruned = prune(model, spec, data)
    record: dict[str, Any] = {"seconds": {"prune": time.perf_counter() - t}}
    if joint is not None:
        record["joint"] = joint
    out = pruned.model
    if data is not None:
        example = data.example(1)
        dense_metric = evaluate(model.eval(), data.test_batches(), data.task)
        record["dense"] = {"metric": dense_metric, "macs": _macs(model, example),
                           "size_bytes": model_bytes(model)}  # fmt: skip
        record["pruned"] = {"metric": evaluate(out.eval(), data.test_batches(), data.task),
                            "macs": _macs(out, example), "size_bytes": model_bytes(out)}  # fmt: skip
    if finetune_epochs:
        from ..train.finetune import finetune

        t = time.perf_counter()
        zeros = not pruned.architecture  # zeros folded into the weights must stay zero
        r = finetune(
            hold_zeros(out) if zeros else out, data, teacher=model, epochs=finetune_epochs, lr=lr,
            seed=seed, freeze_bn=False,
            progress=progress,
        )  # fmt: skip
        out = release_zeros(r.model) if zeros else r.model
        record["seconds"]["finetune"] = time.perf_counter() - t
        record["finetune"] = {"epochs": finetune_epochs, "lr": lr, "distill": True,
                              "best_epoch": r.best_epoch,
                              "metric": evaluate(out.eval(), data.test_batches(), data.task)}  # fmt: skip
    return PruneStage(pruned, out.eval(), record, plan)


def _limits(budget: Any) -> dict[str, float]:
    """The joint plan's limits from a :class:`~squeezer.budget.Budget` (absolute size and
    latency only)."""
    if budget is None:
        raise ConfigError("--prune-ratio auto needs a budget, e.g. --budget size=40kB")
    lim = budget.limits()
    other = [k for k in lim if k not in ("size_bytes", "latency_ms")]
    if other or budget.relative:
        raise ConfigError(
            f"--prune-ratio auto plans under absolute size and latency budgets only, got {budget}; "
            "use e.g. --budget size=40kB,latency=1.5ms"
        )
    return dict(lim)


def joint_prune(
    model: nn.Module,
    data: Dataset | None,
    spec: PruneSpec,
    budget: Any,
    *,
    act_bits: int | None = 8,
    threads: int = 1,
) -> tuple[Pruned, Plan, dict[str, Any]]:
    """One plan for bits and structured sparsity (:func:`squeezer.plan_joint.plan_structured`):
    per channel group a ratio from ``spec.options["ratios"]``, per layer a width from
    ``options["bits"]``, Ω from ``options["omega"]`` (``"hessian"`` or ``"measured"``), under
    ``budget``'s size and latency (a per-layer ONNX Runtime table at ``options["latency_batch"]``,
    32 by default). Returns the really pruned copy, the bits plan and the record of the choice."""
    from ..layer_timing import exported_latency
    from ..plan_joint import plan_structured
    from ..quant.apply import quantize
    from ..templates import uniform_plan
    from . import joint as jp
    from .structured import hessian_traces

    limits = _limits(budget)
    if data is None:
        raise ConfigError("--prune-ratio auto needs --data (the Hessian traces and the plan's "
                          "latency table are measured on it)")  # fmt: skip
    opts = spec.options
    bits = tuple(int(b) for b in opts.get("bits", (2, 3, 4, 8)))
    omega_kind = opts.get("omega", "hessian")
    if omega_kind not in ("hessian", "measured"):
        raise ConfigError(f"--prune-omega must be hessian or measured, got {omega_kind!r}")
    template = next(iter(uniform_plan(model, max(bits), act_bits=act_bits).layers.values()))
    traces = hessian_traces(model, data, spec) if "hessian" in (omega_kind, spec.importance) else None
    space = jp.joint_space(model, data.example(2), ratios=tuple(opts.get("ratios", jp.DEFAULT_RATIOS)),
                           round_to=spec.round_to, importance=spec.importance, traces=traces,
                           skip=spec.skip)  # fmt: skip
    if omega_kind == "hessian":
        omega = jp.omega_hessian(space, traces, bits, template)
    else:
        omega = jp.omega_measured(space, data, bits, template, seed=spec.seed)
    meta: dict[str, Any] = {"omega": omega_kind, "bits": list(bits), "importance": spec.importance}
    latency, whole = None, None
    if "latency_ms" in limits:
        batch = int(opts.get("latency_batch", 32))
        example = data.example(batch)
        latency = jp.latency_rows(space, example, bits, threads=threads)
        dense = quantize(model, uniform_plan(model, max(bits), act_bits=act_bits),
                         calib=data.calibration_batches(seed=spec.seed))  # fmt: skip
        whole = exported_latency(dense, example, threads=threads)
        meta.update(latency_batch=batch, threads=threads, dense_latency_ms=whole)
    table = jp.joint_table(space, omega, bits, template, latency=latency, whole_latency_ms=whole,
                           meta=meta)  # fmt: skip
    choice = plan_structured(table, limits)
    pruned = jp.apply_choice(model, space, choice, spec)
    plan = jp.bits_plan(pruned.model, choice, template)
    plan = Plan(plan.layers, meta={**plan.meta, "budget": str(budget), "achieved": choice.achieved})
    return pruned, plan, {**choice.to_dict(), "table": meta, "limits": limits}


def write_stage(stage_dir: Any, st: PruneStage) -> None:
    """``prune.json`` and the pruned float weights into a run folder being written (a
    :class:`squeezer.runfolder.Stage` or anything with ``path`` and ``write_json``)."""
    from ..models import save_weights

    stage_dir.write_json(PRUNE_FILE, st.summary())
    save_weights(st.model, stage_dir.path(PRUNED_WEIGHTS))


def read_record(run_dir: str | Path) -> dict[str, Any]:
    """A pruned run's ``prune.json``."""
    path = Path(run_dir) / PRUNE_FILE
    if not path.is_file():
        raise ConfigError(f"{run_dir} is a pruned run without {PRUNE_FILE}; run compress again")
    return json.loads(path.read_text())


def skeleton(model: nn.Module, run_dir: str | Path) -> nn.Module:
    """The pruned architecture of a run folder's model, built from ``model`` (the dense model the
    run was made from), its weights not yet loaded. Shape-preserving pruners record no
    architecture: the skeleton is the model itself."""
    from .structured import rebuild

    rec = read_record(run_dir)
    arch, method = rec.get("architecture", {}), rec.get("spec", {}).get("method")
    if method in ("heads", "tokens"):  # encoder pruners rebuild their own modules
        from .heads import rebuild as rebuild_heads
        from .tokens import TokenPruned

        net = rebuild_heads(model, arch) if arch else model
        return TokenPruned(net, [0.0] * len(net.model.encoder.layer)) if method == "tokens" else net
    if not arch:
        return model
    return rebuild(model, arch)


def load_pruned(model: nn.Module, run_dir: str | Path) -> nn.Module:
    """The pruned (and recovered) float model of a run folder."""
    from ..models import load_weights

    net = skeleton(model, run_dir)
    if net is model:
        from ..graph import copy_model

        net = copy_model(model)
    load_weights(net, Path(run_dir) / PRUNED_WEIGHTS)
    return net.eval()
