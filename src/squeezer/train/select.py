"""Which fine-tuning epoch to keep: the held-out measurements of an epoch and the rules that rank
epochs by them (``finetune(select=...)``).

After every epoch (and before training, epoch 0) the trainer measures on its held-out batches the
task's loss (``val_loss``: cross-entropy on the labels, or the error to the FP32 embeddings), its
metric (``val_metric``) and, when it distils a classifier from a teacher, ``val_kd``: the
distillation term ``T² · KL(softmax(t/T) ‖ softmax(s/T))`` to the teacher's outputs on the same
samples, the quantity distillation optimises (:func:`squeezer.train.distill.kd_loss`). A rule of
:data:`SELECT` turns one history row into a rank key, lower is better, ties broken by the next
entry of the key:

- ``"loss"``: lowest held-out loss, then best metric. A small held-out split saturates the metric
  (a trained digits net is right on all of its 144 held-out images before fine-tuning), while the
  loss still tells the epochs apart.
- ``"metric"``: best held-out metric, then lowest loss.
- ``"kd"``: lowest held-out distillation loss to the teacher, then lowest loss (needs a teacher
  for a classifier; an embedding task's loss already is its distance to the FP32 outputs, so there
  it is the loss).
- ``"last"``: the last epoch trained (held-out data only measures; nothing is restored).

Which rule to trust is measured, not assumed, and not on the test split: from every epoch's
held-out logits (:func:`per_sample`), :func:`split_half_scores` picks an epoch by a rule on one
half of the held-out samples and scores it on the other half (``python benchmarks/finetune.py
sweep``; docs/benchmarks.md, issue 14).

Example:
    >>> from squeezer.data import Classification
    >>> row = {"epoch": 2, "val_loss": 0.3, "val_metric": 91.0, "val_kd": 0.8}
    >>> score(row, Classification(), "loss"), score(row, Classification(), "kd")
    ((0.3, -91.0), (0.8, 0.3))
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data import Classification, _accumulate, batch_size, forward, to_device
from ..errors import ConfigError

Key = tuple[float, ...]


def _loss(row: dict[str, Any], m: float) -> Key:
    return (row["val_loss"], m)


def _metric(row: dict[str, Any], m: float) -> Key:
    return (m, row["val_loss"])


def _kd(row: dict[str, Any], m: float) -> Key:
    kd = row.get("val_kd")
    return (row["val_loss"] if kd is None else kd, row["val_loss"])


def _last(row: dict[str, Any], m: float) -> Key:
    return (-float(row["epoch"]),)


#: name: rank key of a history row (``m``: the metric, sign flipped when higher is better).
SELECT: dict[str, Callable[[dict[str, Any], float], Key]] = {
    "loss": _loss,
    "metric": _metric,
    "kd": _kd,
    "last": _last,
}


def check_select(select: str, task: Any, has_teacher: bool) -> None:
    """A one-line :class:`ConfigError` for an unknown rule, or ``"kd"`` with nothing to distil."""
    if select not in SELECT:
        raise ConfigError(f"unknown select {select!r}; use one of {', '.join(SELECT)}")
    if select == "kd" and not has_teacher and not task.targets_from_model:
        raise ConfigError(
            "select='kd' ranks epochs by the distillation loss to the teacher: pass teacher=... "
            "with distill=True, or choose select='loss'"
        )


def score(row: dict[str, Any], task: Any, select: str) -> Key | None:
    """An epoch's rank key, lower is better, by the rule ``select`` of :data:`SELECT` (None when
    the row has no held-out measurements)."""
    loss, metric = row["val_loss"], row["val_metric"]
    if loss is None or metric is None:
        return None
    m = -metric if task.higher_is_better else metric
    return SELECT[select](row, m)


def best_epoch(history: list[dict[str, Any]], task: Any, select: str) -> int:
    """The epoch of ``history`` (rows as :func:`~squeezer.train.finetune.finetune` writes them)
    that the rule ``select`` keeps: the lowest key, the earliest epoch on a tie, as the trainer.

    Example:
        >>> from squeezer.data import Classification
        >>> rows = [{"epoch": e, "val_loss": l, "val_metric": m, "val_kd": k}
        ...         for e, l, m, k in ((0, 0.5, 90.0, 0.9), (1, 0.4, 89.0, 0.7), (2, 0.45, 92.0, 0.6))]
        >>> [best_epoch(rows, Classification(), r) for r in ("loss", "metric", "kd", "last")]
        [1, 2, 2, 2]
    """
    keys = [(score(r, task, select), i) for i, r in enumerate(history)]
    keys = [(k, i) for k, i in keys if k is not None]
    if not keys:
        raise ConfigError("no epoch of the history has held-out measurements to select by")
    return int(history[min(keys)[1]]["epoch"])


@torch.no_grad()
def teacher_outputs(teacher: nn.Module | None, val: Any, task: Any) -> list[torch.Tensor] | None:
    """The teacher's logits on each held-out batch, computed once (the teacher does not train);
    None unless a classifier is distilled from a teacher."""
    if teacher is None or val is None or not isinstance(task, Classification):
        return None
    device = next((p.device for p in teacher.parameters()), torch.device("cpu"))
    return [forward(teacher, to_device(x, device)).detach() for x, _ in val]


def validate(net: nn.Module, val: Any, task: Any, reference: list[torch.Tensor] | None = None,
             temperature: float = 1.0) -> tuple[float | None, float | None, float | None]:  # fmt: skip
    """The held-out ``(loss, metric, kd)`` from one pass over ``val`` (all None without a held-out
    split): the loss sample-weighted as :func:`~squeezer.data.mean_loss` weights it, the metric as
    :func:`~squeezer.data.evaluate` sums it, and with ``reference`` (the teacher's outputs of
    each batch, :func:`teacher_outputs`) the mean ``T² · KL`` to them, else None."""
    if val is None:
        return None, None, None
    sums = [0.0, 0, 0.0]
    t = float(temperature)

    def each(out: Any, targets: Any) -> tuple[float, int]:
        n = batch_size(targets) if isinstance(targets, torch.Tensor) else batch_size(out)
        sums[0] += float(task.loss(out, targets)) * n
        if reference is not None:
            ref = reference[len(seen)].to(out.device)
            kl = F.kl_div(F.log_softmax(out / t, -1), F.log_softmax(ref / t, -1),
                          reduction="sum", log_target=True)  # fmt: skip
            sums[2] += float(kl) * t * t
        seen.append(n)
        sums[1] += n
        return task.metric_sums(out, targets)

    seen: list[int] = []  # the batches so far: the index of the teacher's outputs
    total, count = _accumulate(net, val, each)
    kd = sums[2] / sums[1] if reference is not None else None
    return sums[0] / sums[1], total / count, kd


# --------------------------------------------------------------------------------------------------
# Judging a rule fairly: pick on one half of the held-out samples, score on the other


def per_sample(val_logits: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor,
               temperature: float) -> dict[str, torch.Tensor]:  # fmt: skip
    """Per epoch and held-out sample, from every epoch's logits ``val_logits`` [E, N, C]: the
    cross-entropy ``ce``, ``right`` (100 or 0) and the distillation term ``kd`` (T² KL to the
    teacher's logits [N, C]), each [E, N]."""
    t = float(temperature)
    e, n = val_logits.shape[:2]
    ce = F.cross_entropy(val_logits.flatten(0, 1), labels.repeat(e), reduction="none").view(e, n)
    ref = F.log_softmax(teacher / t, -1).expand_as(val_logits)
    kd = F.kl_div(F.log_softmax(val_logits / t, -1), ref, reduction="none", log_target=True)
    kd = kd.sum(-1) * t * t
    return {"ce": ce, "right": (val_logits.argmax(-1) == labels).double() * 100, "kd": kd}


def pick_on(samples: dict[str, torch.Tensor], idx: torch.Tensor, select: str) -> int:
    """The epoch the rule ``select`` keeps when the held-out split is the samples ``idx`` of
    :func:`per_sample`'s measurements."""
    ce, acc, kd = (samples[k][:, idx].mean(1).tolist() for k in ("ce", "right", "kd"))
    rows = [{"epoch": e, "val_loss": ce[e], "val_metric": acc[e], "val_kd": kd[e]}
            for e in range(len(ce))]  # fmt: skip
    return best_epoch(rows, Classification(), select)


def split_half_scores(samples: dict[str, torch.Tensor], select: str, *, seed: int = 0,
                      splits: int = 1) -> list[float]:  # fmt: skip
    """A rule judged without a test split: the held-out samples halved at random (seeded), the
    epoch picked on one half, its top-1 on the other, and the halves swapped; ``splits`` such
    halvings, two scores each.

    Example:
        >>> v = torch.randn(3, 40, 4); y = torch.randint(0, 4, (40,))
        >>> len(split_half_scores(per_sample(v, y, v[0], 2.0), "loss", splits=2))
        4
    """
    n = samples["right"].shape[1]
    out = []
    for k in range(splits):
        a, b = halves(n, seed, k)
        for pick, score_on in ((a, b), (b, a)):
            out.append(float(samples["right"][pick_on(samples, pick, select), score_on].mean()))
    return out


def halves(n: int, seed: int, k: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k``-th seeded random halving of ``n`` sample indices."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + k))
    return perm[: n // 2], perm[n // 2:]


__all__ = ["SELECT", "best_epoch", "check_select", "halves", "per_sample", "pick_on", "score",
           "split_half_scores", "teacher_outputs", "validate"]
