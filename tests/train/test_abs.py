"""Adaptive batch size: the eigenvalue drives growth, accumulation equals a large batch, runs repeat."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from squeezer.data import Dataset
from squeezer.errors import ConfigError
from squeezer.train.abs import ABSRun, fit_abs, top_eigenvalue


def _small(digits) -> Dataset:
    return Dataset(
        "digits-small", digits.x_train[:512], digits.y_train[:512], digits.x_test, digits.y_test,
        digits.task,
    )  # fmt: skip


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def test_top_eigenvalue_matches_dense_hessian():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x, y = torch.randn(16, 3), torch.randint(0, 2, (16,))
    params = dict(net.named_parameters())
    names = list(params)

    def loss(*flat):
        out = torch.func.functional_call(net, dict(zip(names, flat, strict=True)), (x,))
        return nn.functional.cross_entropy(out, y)

    blocks = torch.autograd.functional.hessian(loss, tuple(params[n].detach() for n in names))
    sizes = [params[n].numel() for n in names]
    dense = torch.cat(
        [torch.cat([blocks[i][j].reshape(sizes[i], sizes[j]) for j in range(len(names))], 1)
         for i in range(len(names))]
    )  # fmt: skip
    exact = float(torch.linalg.eigvalsh(dense.double())[-1])
    assert top_eigenvalue(net, nn.functional.cross_entropy, (x, y)) == pytest.approx(
        exact, rel=1e-2
    )


def test_fixed_batch_is_plain_sgd(digits):
    # max_batch_size == batch_size: no eigenvalues, no growth, one step per batch.
    data = _small(digits)
    _, run = fit_abs(_net(), data, epochs=2, batch_size=64, max_batch_size=64, lr=0.05)
    assert run.eigenvalues == (None, None)
    assert [e.batch_size for e in run.epochs] == [64, 64] and run.steps == 2 * 8


def test_growth_follows_the_eigenvalue_and_repeats(digits):
    data = _small(digits)
    kw = dict(epochs=4, batch_size=32, max_batch_size=128, lr=0.05, decrease=1.0001, seed=3)
    net1, run1 = fit_abs(_net(), data, **kw)
    net2, run2 = fit_abs(_net(), data, **kw)
    assert run1 == run2  # seeded: same trace, same batches
    assert all(
        torch.equal(a, b)
        for a, b in zip(net1.state_dict().values(), net2.state_dict().values(), strict=True)
    )
    lam = run1.eigenvalues
    sizes = [e.batch_size for e in run1.epochs]
    for i in range(1, 4):  # grown exactly when λ fell below the reference
        assert (sizes[i] > sizes[i - 1]) == (
            sizes[i - 1] < 128 and lam[i] < _ref(lam, sizes, i) / 1.0001
        )
    # lr scaled linearly with the effective batch
    assert all(e.lr == pytest.approx(0.05 * e.batch_size / 32) for e in run1.epochs)
    assert run1.steps == sum(-(-512 // e.batch_size) for e in run1.epochs)
    assert ABSRun.from_dict(json.loads(json.dumps(run1.to_dict()))) == run1


def _ref(lam, sizes, i):
    # the largest λ since the last growth (or epoch 0) before epoch i, from that growth on
    j = max([0] + [k for k in range(1, i) if sizes[k] > sizes[k - 1]])
    return max(lam[j:i])


def test_patience_forces_growth(digits):
    data = _small(digits)
    _, run = fit_abs(_net(), data, epochs=3, batch_size=32, max_batch_size=64, lr=0.05,
                     decrease=1e9, patience=1)  # fmt: skip
    assert [e.batch_size for e in run.epochs] == [32, 64, 64]


def test_accumulation_equals_one_large_batch(digits):
    # Epoch 1 accumulates four micro-batches of 32 into one step on all 128 samples: the same
    # update as one batch of 128 (replayed here by hand, with the same optimizer and shuffling).
    from squeezer.graph import copy_model
    from squeezer.train import make_optimizer

    d = Dataset("d", digits.x_train[:128], digits.y_train[:128], digits.x_test, digits.y_test,
                digits.task)  # fmt: skip
    net, run = fit_abs(_net(), d, epochs=2, batch_size=32, max_batch_size=128, growth=4, lr=0.1,
                       decrease=1e9, patience=1, lr_scaling="none", seed=0)  # fmt: skip
    assert [(e.batch_size, e.steps) for e in run.epochs] == [(32, 4), (128, 1)]
    torch.manual_seed(0)
    ref = copy_model(_net()).train()
    opt = make_optimizer("sgd", ref, lr=0.1)
    for x, y in d.train_batches(32, shuffle=True, seed=0):
        opt.zero_grad()
        d.task.loss(ref(x), y).backward()
        opt.step()
    opt.zero_grad()
    d.task.loss(ref(d.x_train), d.y_train).backward()
    opt.step()
    for a, b in zip(net.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_bad_settings_say_what(digits):
    with pytest.raises(ConfigError, match="batch_size"):
        fit_abs(_net(), digits, batch_size=64, max_batch_size=32)
    with pytest.raises(ConfigError, match="lr_scaling"):
        fit_abs(_net(), digits, lr_scaling="cubic")


def test_input_model_unchanged(digits):
    net = _net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    fit_abs(net, _small(digits), epochs=1, batch_size=64, max_batch_size=128, lr=0.05)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
