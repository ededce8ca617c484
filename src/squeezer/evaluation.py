"""What a compressed model is measured by beside its size: the task's metric on the test split
(with the metrics that need every output at once) and the per-layer table of the run's report."""

from __future__ import annotations

import torch
from torch import nn

from .config import Plan
from .data import Dataset, evaluate, forward
from .errors import DataError
from .quant.modules import QuantMixin


@torch.no_grad()
def test_metrics(model: nn.Module, data: Dataset) -> tuple[float, dict[str, float]]:
    """The task's metric on the test split and, for tasks that define ``metrics``, the metrics
    that need every test output at once (Spearman, top-10 for embeddings), from one pass. The
    metric is summed batch by batch exactly as :func:`squeezer.data.evaluate` sums it."""
    task_metrics = getattr(data.task, "metrics", None)
    if task_metrics is None:
        return evaluate(model, data.test_batches(), data.task), {}
    was_training = model.training
    model.eval()
    try:
        pairs = [(forward(model, x), y) for x, y in data.test_batches()]
    finally:
        model.train(was_training)
    sums = [data.task.metric_sums(o, y) for o, y in pairs]
    if not sums:
        raise DataError("no evaluation data: the test split is empty")
    metric = sum(t for t, _ in sums) / sum(c for _, c in sums)
    outs = torch.cat([o for o, _ in pairs])
    targets = torch.cat([y for _, y in pairs])
    return metric, {k: float(v) for k, v in task_metrics(outs, targets).items()}


@torch.no_grad()
def layer_table(model: nn.Module, qmodel: nn.Module, plan: Plan, profiles: dict) -> list[dict]:
    """Per-layer rows: FQN, type, params, MACs, bits, activation bits, ‖Q(W) − W‖/‖W‖."""
    qlayers = dict(qmodel.named_modules())
    rows = []
    for fqn, prof in profiles.items():
        spec = plan.layers.get(fqn)
        q = qlayers.get(fqn)
        rel = None
        if isinstance(q, QuantMixin):
            w = q.weight
            rel = float((q.qweight() - w).norm() / w.norm().clamp_min(1e-30))
        rows.append(
            {
                "fqn": fqn,
                "type": prof.type,
                "params": prof.params,
                "macs": prof.macs,
                "bits": spec.bits if spec else 32,
                "act_bits": spec.act_bits if spec else None,
                "rel_error": rel,
            }
        )
    return rows
