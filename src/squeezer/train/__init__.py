"""Training and fine-tuning: plain supervised training of the built-in nets (QAT and distillation
build on the same loop); large-batch optimizers (LARS, LAMB); Hessian-driven adaptive batch size;
optimal rematerialization of a training step (Checkmate)."""

from .abs import ABSRun, fit_abs
from .fit import fit
from .optim import LAMB, LARS, OPTIMIZERS, make_optimizer, param_groups
from .remat import Rematerialized, remat

__all__ = [
    "ABSRun",
    "LAMB",
    "LARS",
    "OPTIMIZERS",
    "fit",
    "fit_abs",
    "make_optimizer",
    "param_groups",
    "remat",
    "Rematerialized",
]
