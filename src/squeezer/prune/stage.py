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
) -> PruneStage:
    """Prune ``model`` as ``spec`` asks, then fine-tune it ``finetune_epochs`` epochs with
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
    pruned = prune(model, spec, data)
    record: dict[str, Any] = {"seconds": {"prune": time.perf_counter() - t}}
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
    return PruneStage(pruned, out.eval(), record)


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
