"""Layer-wise adaptive optimizers for large-batch training: LARS and LAMB.

LARS (You, Gitman and Ginsburg, "Large Batch Training of Convolutional Networks", arXiv:1708.03888)
scales each layer's SGD step by a *trust ratio* ``η‖w‖ / (‖g‖ + λ‖w‖)``, so every layer moves by
about the same fraction of its weight norm whatever its gradient scale. LAMB (You et al., "Large
Batch Optimization for Deep Learning: Training BERT in 76 minutes", arXiv:1904.00962) applies the
same idea to the Adam direction: ``w ← w − lr · φ(‖w‖)/‖u‖ · u`` with ``u = m̂/(√v̂ + ε) + λw``.

The pitfalls each implementation has to get right, and what we do:

- **Biases and normalisation parameters** have tiny norms (often zero at init): adapting them by
  ``‖w‖`` freezes them and decaying them hurts accuracy. :func:`param_groups` puts them in their own
  group with ``weight_decay=0`` and ``adapt=False`` (a plain SGD-momentum / Adam step).
- **Zero norms**: a zero weight norm (a freshly zeroed layer) or a zero update norm would give a
  trust ratio of 0 or ∞; the ratio is then 1.
- **Trust-ratio clipping**: ``trust_clip=True`` caps LAMB's ratio at 1 (LAMBC) and LARS's effective
  rate at the global rate (LARC, ``min(ratio/lr, 1)``).
- **Debiasing**: LAMB divides both moments by ``1 − βᵗ`` (the paper's Algorithm 2), on by default.

With the same settings the trajectories equal timm's ``Lamb``/``Lars`` (tests compare 100 steps).

Example:
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))
    >>> opt = LAMB(param_groups(net, weight_decay=0.01), lr=1e-2)
    >>> [len(g["params"]) for g in opt.param_groups]
    [2, 4]
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

#: Module types whose parameters are normalisation scales and shifts (no decay, no adaptation).
NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)


def param_groups(
    model: nn.Module,
    *,
    weight_decay: float = 0.0,
    exclude: Callable[[str, nn.Parameter, nn.Module], bool] | None = None,
) -> list[dict[str, Any]]:
    """Two parameter groups: weights (decayed and adapted) and the rest (neither).

    By default a parameter is excluded when it belongs to a normalisation layer, is named ``bias``,
    or has fewer than two dimensions (scales, shifts, positional gains). Empty groups are dropped.

    Args:
        model: the network whose trainable parameters are grouped.
        weight_decay: the decay of the first group.
        exclude: ``exclude(name, param, owner_module) -> bool`` to replace the default rule.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
        >>> [(len(g["params"]), g["weight_decay"], g["adapt"]) for g in param_groups(net, weight_decay=0.1)]
        [(1, 0.1, True), (3, 0.0, False)]
    """

    def default(name: str, p: nn.Parameter, owner: nn.Module) -> bool:
        return isinstance(owner, NORM_TYPES) or name.rsplit(".", 1)[-1] == "bias" or p.ndim < 2

    rule = exclude or default
    decay: list[nn.Parameter] = []
    rest: list[nn.Parameter] = []
    seen: set[int] = set()
    for mod_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            name = f"{mod_name}.{p_name}" if mod_name else p_name
            (rest if rule(name, p, module) else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "adapt": True},
        {"params": rest, "weight_decay": 0.0, "adapt": False},
    ]
    return [g for g in groups if g["params"]]


def _ratio(w_norm: torch.Tensor, u_norm: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
    """``raw`` where both norms are positive, else 1 (a zero norm says nothing about scale)."""
    return torch.where((w_norm > 0) & (u_norm > 0), raw, torch.ones_like(raw))


def _evaluate(closure: Callable[[], torch.Tensor] | None) -> torch.Tensor | None:
    """The loss from ``closure`` (with gradients on, as ``step`` runs under no_grad), or None."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def _check(name: str, value: float, low: float = 0.0) -> None:
    if not value >= low:
        raise ValueError(f"{name}={value} is invalid; use a value >= {low}")


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise trust ratios (LARS; LARC with ``trust_clip``).

    Per parameter of an adapted group: ``r = η‖w‖ / (‖g‖ + λ‖w‖ + ε)`` (1 if a norm is zero; with
    ``trust_clip`` ``min(r / lr, 1)``), ``d = r (g + λw)``, ``buf = μ buf + (1 − dampening) d``
    (``buf = d`` on the first step), ``w ← w − lr · buf`` (Nesterov: ``d + μ buf``). A group with
    ``adapt=False`` takes ``d = g + λw`` (plain SGD).

    Args:
        params: parameters or groups (see :func:`param_groups`); a group may set ``adapt``.
        lr: global learning rate.
        momentum: momentum factor μ.
        dampening: dampening of the momentum.
        weight_decay: λ (L2 penalty folded into the direction, as in the paper).
        nesterov: Nesterov momentum.
        trust_coeff: η, the trust coefficient.
        eps: guards the ratio's denominator.
        trust_clip: LARC clipping.

    Example:
        >>> w = torch.nn.Parameter(torch.ones(2, 2))
        >>> opt = LARS([w], lr=1.0, trust_coeff=0.1)
        >>> w.grad = torch.ones(2, 2); _ = opt.step()
        >>> round(float(w[0, 0]), 4)   # moved by 10% of its norm, not by lr·g
        0.9
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1.0,
        *,
        momentum: float = 0.9,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        trust_coeff: float = 0.001,
        eps: float = 1e-8,
        trust_clip: bool = False,
    ) -> None:
        for name, v in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay)):
            _check(name, v)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("nesterov=True needs momentum > 0 and dampening = 0")
        defaults = dict(
            lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
            nesterov=nesterov, trust_coeff=trust_coeff, eps=eps, trust_clip=trust_clip, adapt=True,
        )  # fmt: skip
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """One update; ``closure`` re-evaluates the loss if given."""
        loss = _evaluate(closure)
        for group in self.param_groups:
            lr, wd, mom = group["lr"], group["weight_decay"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                d = g.add(p, alpha=wd) if wd != 0 else g.clone()
                if group["adapt"]:
                    w_norm, g_norm = p.norm(), g.norm()
                    r = group["trust_coeff"] * w_norm / (g_norm + wd * w_norm + group["eps"])
                    r = _ratio(w_norm, g_norm, r)
                    if group["trust_clip"]:
                        r = torch.clamp(r / lr, max=1.0)
                    d.mul_(r)
                if mom != 0:
                    state = self.state[p]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = d.clone()
                    else:
                        buf.mul_(mom).add_(d, alpha=1 - group["dampening"])
                    d = d.add(buf, alpha=mom) if group["nesterov"] else buf
                p.add_(d, alpha=-lr)
        return loss


class LAMB(torch.optim.Optimizer):
    """Adam with layer-wise trust ratios (LAMB), debiased by default.

    Per parameter: ``m ← β₁m + (1−β₁)g``, ``v ← β₂v + (1−β₂)g²``, ``u = (m/c₁) / (√(v/c₂) + ε) + λw``
    with ``cᵢ = 1 − βᵢᵗ`` (``cᵢ = 1`` without ``debias``); in an adapted group
    ``r = ‖w‖/‖u‖`` (1 if a norm is zero; ``min(r, 1)`` with ``trust_clip``), else ``r = 1``;
    ``w ← w − lr · r · u``. With ``max_grad_norm`` the gradients are first divided by
    ``max(‖g‖_global / max_grad_norm, 1)`` (as NVIDIA's FusedLAMB does).

    Args:
        params: parameters or groups (see :func:`param_groups`); a group may set ``adapt``.
        lr: global learning rate.
        betas: (β₁, β₂).
        eps: added to √v̂.
        weight_decay: λ (added to the update before the trust ratio, as in the paper).
        debias: Adam's bias correction of both moments.
        trust_clip: cap the trust ratio at 1 (LAMBC).
        max_grad_norm: global gradient-norm clipping before the moments; None for none.

    Example:
        >>> w = torch.nn.Parameter(torch.full((3,), 2.0))
        >>> opt = LAMB([w], lr=0.1)
        >>> w.grad = torch.tensor([1.0, -1.0, 0.5]); _ = opt.step()
        >>> round(float((w - 2.0).norm()), 4)   # a step of lr·‖w‖
        0.3464
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        *,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        debias: bool = True,
        trust_clip: bool = False,
        max_grad_norm: float | None = None,
    ) -> None:
        _check("lr", lr)
        _check("eps", eps)
        _check("weight_decay", weight_decay)
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas={betas} are invalid; use values in [0, 1)")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm={max_grad_norm} is invalid; use > 0 or None")
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, debias=debias,
            trust_clip=trust_clip, adapt=True,
        )  # fmt: skip
        super().__init__(params, defaults)
        self.max_grad_norm = max_grad_norm

    def _clip_divisor(self) -> torch.Tensor | None:
        if self.max_grad_norm is None:
            return None
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            return None
        total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        return torch.clamp(total / self.max_grad_norm, min=1.0)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """One update; ``closure`` re-evaluates the loss if given."""
        loss = _evaluate(closure)
        divisor = self._clip_divisor()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad if divisor is None else p.grad / divisor
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = state["step"]
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.lerp_(g, 1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                c1, c2 = (1 - beta1**t, 1 - beta2**t) if group["debias"] else (1.0, 1.0)
                u = (m / c1).div_((v.sqrt() / c2**0.5).add_(group["eps"]))
                if group["weight_decay"] != 0:
                    u.add_(p, alpha=group["weight_decay"])
                if group["adapt"]:
                    w_norm, u_norm = p.norm(), u.norm()
                    r = _ratio(w_norm, u_norm, w_norm / u_norm)
                    if group["trust_clip"]:
                        r = torch.clamp(r, max=1.0)
                    u.mul_(r)
                p.add_(u, alpha=-group["lr"])
        return loss


def cosine_schedule(opt: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning rate decayed from its start to 0 over ``steps`` steps along half a cosine
    (then held at 0), as training and fine-tuning use it.

    Example:
        >>> opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=1.0)
        >>> sched = cosine_schedule(opt, 2); opt.step(); sched.step(); opt.param_groups[0]["lr"]
        0.5
    """
    import math

    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / max(steps, 1)))
    )


#: Names accepted by :func:`make_optimizer` (and ``fit(optimizer=...)``) with their default lr.
OPTIMIZERS: dict[str, float] = {"adamw": 3e-3, "lamb": 1e-2, "lars": 1.0, "sgd": 0.1}


def make_optimizer(
    name: str, model: nn.Module, *, lr: float | None = None, weight_decay: float = 1e-4
) -> torch.optim.Optimizer:
    """An optimizer by name for ``model``: ``"adamw"`` (all parameters decayed, as PyTorch's
    default use), ``"lamb"``, ``"lars"`` or ``"sgd"`` (momentum 0.9; biases and normalisation
    parameters excluded from decay and adaptation by :func:`param_groups`).

    Example:
        >>> make_optimizer("lamb", torch.nn.Linear(2, 2)).__class__.__name__
        'LAMB'
    """
    from ..errors import ConfigError

    if name not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {name!r}; use one of {', '.join(OPTIMIZERS)}")
    lr = OPTIMIZERS[name] if lr is None else lr
    if name == "adamw":
        trainable = [p for p in model.parameters() if p.requires_grad]
        return torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay)
    groups = param_groups(model, weight_decay=weight_decay)
    if name == "lamb":
        return LAMB(groups, lr=lr)
    if name == "lars":
        return LARS(groups, lr=lr, momentum=0.9)
    for g in groups:
        g.pop("adapt")
    return torch.optim.SGD(groups, lr=lr, momentum=0.9)
