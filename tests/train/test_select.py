"""Which fine-tuning epoch to keep (squeezer.train.select): the rules' rank keys against hand-worked
histories, the held-out distillation loss against the batch-free formula, the trainer keeping the
epoch each rule names, and the split-half judgement of a rule."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from squeezer.data import Batches, Classification, Dataset
from squeezer.errors import ConfigError
from squeezer.train.finetune import finetune
from squeezer.train.select import (
    SELECT,
    best_epoch,
    per_sample,
    pick_on,
    split_half_scores,
    teacher_outputs,
    validate,
)

pytestmark = pytest.mark.usefixtures("one_thread")

TASK = Classification()


def _rows(*cells):
    return [{"epoch": e, "val_loss": loss, "val_metric": m, "val_kd": kd}
            for e, (loss, m, kd) in enumerate(cells)]  # fmt: skip


def test_each_rule_keeps_the_epoch_worked_out_by_hand():
    rows = _rows((0.50, 90.0, 0.90), (0.30, 91.0, 0.70), (0.35, 93.0, 0.40), (0.40, 93.0, 0.50))
    want = {"loss": 1, "metric": 2, "kd": 2, "last": 3}  # metric: 2 and 3 tie, loss breaks it
    assert set(SELECT) == set(want)
    for rule, epoch in want.items():
        assert best_epoch(rows, TASK, rule) == epoch, rule
    # exact ties go to the earliest epoch, as the trainer's strict "<" does
    assert best_epoch(_rows((0.3, 90.0, 0.5), (0.3, 90.0, 0.5)), TASK, "loss") == 0
    with pytest.raises(ConfigError, match="held-out"):
        best_epoch([{"epoch": 0, "val_loss": None, "val_metric": None}], TASK, "loss")


def test_held_out_kd_loss_is_the_distillation_term_over_all_samples():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(70, 5, generator=g), torch.randint(0, 3, (70,), generator=g)
    student, teacher = nn.Linear(5, 3), nn.Linear(5, 3)
    val = Batches(x, y, 32)  # batches of 32, 32 and 6: the mean must weight them by size
    t = 4.0
    loss, metric, kd = validate(student, val, TASK, teacher_outputs(teacher, val, TASK), t)
    with torch.no_grad():
        s, r = student(x), teacher(x)
    want = F.kl_div(F.log_softmax(s / t, -1), F.log_softmax(r / t, -1), reduction="batchmean",
                    log_target=True) * t * t  # fmt: skip
    assert kd == pytest.approx(float(want), rel=1e-5)
    assert loss == pytest.approx(float(F.cross_entropy(s, y)), rel=1e-5)
    assert metric == pytest.approx(float((s.argmax(1) == y).double().mean() * 100))
    assert validate(student, val, TASK)[2] is None  # no teacher, no distillation loss
    # per_sample gives the same numbers sample by sample
    ps = per_sample(s[None], y, r, t)
    assert float(ps["kd"].mean()) == pytest.approx(float(want), rel=1e-5)
    assert float(ps["ce"].mean()) == pytest.approx(loss, rel=1e-5)


def _clusters():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(400) % 2
    x = torch.randn(400, 2, generator=g) * 0.8 + (y[:, None] * 2.0 - 1.0) * torch.tensor([1.0, 0])
    return Dataset("clusters", x[:300], y[:300], x[300:], y[300:], Classification())


@pytest.mark.parametrize("rule", list(SELECT))
def test_the_trainer_keeps_the_epoch_its_rule_names(rule):
    data = _clusters()
    teacher = nn.Linear(2, 2)
    with torch.no_grad():
        teacher.weight.copy_(torch.tensor([[-2.0, 0.0], [2.0, 0.0]]))
        teacher.bias.zero_()
    val = Batches(data.x_test, data.y_test, 64)
    r = finetune(nn.Linear(2, 2), data, teacher=teacher, epochs=4, lr=0.05, batch_size=32,
                 progress=False, select=rule, val_data=val)  # fmt: skip
    assert all(h["val_kd"] is not None for h in r.history)
    assert r.best_epoch == best_epoch(list(r.history), TASK, rule)
    if rule == "last":
        assert r.best_epoch == 4
    # the weights returned are the kept epoch's: their held-out numbers are that row's
    kept = r.history[r.best_epoch]
    loss, metric, kd = validate(r.model, val, TASK, teacher_outputs(teacher, val, TASK), 6.0)
    assert (loss, metric, kd) == pytest.approx((kept["val_loss"], kept["val_metric"],
                                                kept["val_kd"]), rel=1e-6)  # fmt: skip


def test_kd_selection_needs_a_teacher_and_unknown_rules_are_refused():
    data = _clusters()
    kw = dict(epochs=1, progress=False)
    with pytest.raises(ConfigError, match="select='kd'"):
        finetune(nn.Linear(2, 2), data, distill=False, select="kd", **kw)
    with pytest.raises(ConfigError, match="unknown select"):
        finetune(nn.Linear(2, 2), data, distill=False, select="accuracy", **kw)
    r = finetune(nn.Linear(2, 2), data, distill=False, **kw)
    assert all(h["val_kd"] is None for h in r.history)


def test_split_half_scores_pick_on_one_half_and_score_on_the_other():
    # 3 epochs, 8 held-out samples, one class right or wrong per sample: epoch 1 is right on
    # samples 0-3 only, epoch 2 on all; the loss is made lowest at epoch 1 everywhere.
    n = 8
    right = torch.zeros(3, n, dtype=torch.float64)
    right[1, :4] = 100.0
    right[2] = 100.0
    ce = torch.tensor([[1.0] * n, [0.1] * n, [0.5] * n])
    samples = {"ce": ce, "right": right, "kd": torch.tensor([[1.0] * n, [0.5] * n, [0.1] * n])}
    assert pick_on(samples, torch.arange(n), "loss") == 1
    assert pick_on(samples, torch.arange(n), "metric") == 2
    # "metric" and "kd" pick epoch 2 on any half, so score 100 on the other; "loss" picks epoch
    # 1, whose top-1 on a half is the share of samples 0-3 in it (the halves' shares add to 1)
    for rule in ("metric", "kd", "last"):
        assert split_half_scores(samples, rule, splits=3) == [100.0] * 6
    loss = split_half_scores(samples, "loss", splits=3)
    assert len(loss) == 6 and sum(loss) / 6 == pytest.approx(50.0)
