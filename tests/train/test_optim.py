"""LARS and LAMB against timm's implementations (the oracle), their pitfalls, and fit's wiring.

The oracle is timm's ``optim/lamb.py`` and ``optim/lars.py``, loaded on their own: timm's package
``__init__`` imports torchvision, which does not import beside this torch. Install it for the test
with ``pip install --no-deps timm``; without it the oracle tests skip.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from squeezer.errors import ConfigError
from squeezer.train import LAMB, LARS, fit, make_optimizer, param_groups

STEPS = 100


def _timm_optim(name: str):
    """``timm.optim.<name>`` without running timm's package ``__init__`` (which needs torchvision)."""
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("oracle peer timm is not installed (pip install --no-deps timm)")
    folder = Path(next(iter(spec.submodule_search_locations))) / "optim"
    pkg = "_timm_optim_oracle"
    if pkg not in sys.modules:
        stub = types.ModuleType(pkg)
        stub.__path__ = [str(folder)]
        sys.modules[pkg] = stub
    return importlib.import_module(f"{pkg}.{name}")


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
        nn.Linear(4 * 6 * 6, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 3),
    )  # fmt: skip


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(32, 1, 8, 8, generator=g), torch.randint(0, 3, (32,), generator=g)


def _trajectory(
    net: nn.Module, opt: torch.optim.Optimizer, steps: int = STEPS
) -> list[torch.Tensor]:
    x, y = _data()
    out = []
    for i in range(steps):
        opt.zero_grad(set_to_none=True)
        xb, yb = x[(i % 4) * 8 : (i % 4 + 1) * 8], y[(i % 4) * 8 : (i % 4 + 1) * 8]
        nn.functional.cross_entropy(net(xb), yb).backward()
        opt.step()
        out.append(torch.cat([p.detach().flatten() for p in net.parameters()]).clone())
    return out


def _oracle_groups(net: nn.Module, wd: float) -> list[dict]:
    # timm adapts exactly the groups with weight_decay != 0: the same split as param_groups'.
    return [
        {k: v for k, v in g.items() if k != "adapt"} for g in param_groups(net, weight_decay=wd)
    ]


def _assert_same(a: list[torch.Tensor], b: list[torch.Tensor], tol: float = 1e-6) -> None:
    worst = max(float((u - v).abs().max()) for u, v in zip(a, b, strict=True))
    assert worst <= tol, f"trajectories differ by {worst:.3g} (tolerance {tol})"
    assert float((a[-1] - a[0]).abs().max()) > 1e-3  # the parameters did move


@pytest.mark.parametrize("trust_clip", [False, True])
@pytest.mark.parametrize("max_grad_norm", [None, 1.0])
def test_lamb_matches_timm(trust_clip, max_grad_norm):
    Lamb = _timm_optim("lamb").Lamb
    kw = dict(lr=5e-3, betas=(0.9, 0.99), eps=1e-6, trust_clip=trust_clip)
    a, b = _net(), _net()
    ours = LAMB(param_groups(a, weight_decay=0.05), max_grad_norm=max_grad_norm, **kw)
    theirs = Lamb(_oracle_groups(b, 0.05), max_grad_norm=max_grad_norm, foreach=False, **kw)
    _assert_same(_trajectory(a, ours), _trajectory(b, theirs))


def test_lamb_without_debias_matches_timm():
    Lamb = _timm_optim("lamb").Lamb
    a, b = _net(), _net()
    ours = LAMB(param_groups(a, weight_decay=0.01), lr=2e-3, debias=False)
    theirs = Lamb(_oracle_groups(b, 0.01), lr=2e-3, bias_correction=False, max_grad_norm=None)
    _assert_same(_trajectory(a, ours), _trajectory(b, theirs))


@pytest.mark.parametrize("trust_clip", [False, True])
@pytest.mark.parametrize("nesterov", [False, True])
def test_lars_matches_timm(trust_clip, nesterov):
    Lars = _timm_optim("lars").Lars
    kw = dict(lr=0.5, momentum=0.9, nesterov=nesterov, trust_coeff=0.02, trust_clip=trust_clip)
    a, b = _net(), _net()
    ours = LARS(param_groups(a, weight_decay=1e-3), **kw)
    theirs = Lars(_oracle_groups(b, 1e-3), foreach=False, **kw)
    _assert_same(_trajectory(a, ours), _trajectory(b, theirs))


def test_param_groups_split():
    net = _net()
    groups = param_groups(net, weight_decay=0.1)
    decayed = {id(p) for p in groups[0]["params"]}
    names = {n for n, p in net.named_parameters() if id(p) in decayed}
    assert names == {"0.weight", "4.weight", "7.weight"}  # conv and linear weights only
    assert groups[1] == {**groups[1], "weight_decay": 0.0, "adapt": False}
    assert sum(len(g["params"]) for g in groups) == len(list(net.parameters()))
    custom = param_groups(net, exclude=lambda name, p, m: True)
    assert len(custom) == 1 and custom[0]["adapt"] is False


def test_zero_norm_guards():
    # A zero weight (fresh zero init) and a zero gradient give finite steps, not 0/0 or frozen.
    w = nn.Parameter(torch.zeros(3, 3))
    for opt in (LAMB([w], lr=0.1), LARS([w], lr=0.1, momentum=0.0)):
        w.grad = torch.ones(3, 3)
        opt.step()
        assert torch.isfinite(w).all() and float(w.detach().abs().max()) > 0
        w.grad = torch.zeros(3, 3)
        opt.step()
        assert torch.isfinite(w).all()
        with torch.no_grad():
            w.zero_()


def test_lamb_trust_clip_caps_ratio():
    # ‖w‖ ≫ ‖u‖: unclipped the step is lr·‖w‖; clipped it is lr·‖u‖.
    for clip, expected in ((False, 0.1 * 100.0), (True, 0.1 * 1.0)):
        w = nn.Parameter(torch.tensor([100.0, 0.0]))
        opt = LAMB([w], lr=0.1, trust_clip=clip)
        w.grad = torch.tensor([0.0, 1.0])
        opt.step()
        step = float((w.detach() - torch.tensor([100.0, 0.0])).norm())
        assert step == pytest.approx(expected, rel=1e-4)


def test_invalid_settings_say_what():
    w = [nn.Parameter(torch.ones(2))]
    with pytest.raises(ValueError, match="lr"):
        LAMB(w, lr=-1.0)
    with pytest.raises(ValueError, match="nesterov"):
        LARS(w, momentum=0.0, nesterov=True)
    with pytest.raises(ConfigError, match="lamb"):
        make_optimizer("adam", nn.Linear(2, 2))


def test_adamw_default_is_unchanged():
    # fit's default must stay plain AdamW over all parameters, one group, as before issue 17.
    net = nn.Linear(3, 2)
    opt = make_optimizer("adamw", net, weight_decay=1e-4)
    assert type(opt) is torch.optim.AdamW and len(opt.param_groups) == 1
    assert opt.param_groups[0]["lr"] == 3e-3 and opt.param_groups[0]["weight_decay"] == 1e-4


@pytest.mark.parametrize("name", ["lamb", "lars", "sgd"])
def test_fit_with_each_optimizer_learns(digits, name):
    from squeezer.zoo import create

    net, info = fit(create("digits_cnn"), digits, epochs=2, optimizer=name, seed=0)
    assert info[digits.task.metric_name] > 0.6, info
