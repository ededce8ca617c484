"""Training and fine-tuning: plain supervised training of the built-in nets; fine-tuning of any
model (quantization-aware training, LSQ step sizes, distillation; :mod:`.finetune`); large-batch
optimizers (LARS, LAMB); Hessian-driven adaptive batch size; optimal rematerialization of a
training step (Checkmate)."""

from .abs import ABSRun, fit_abs
from .finetune import FinetuneResult, finetune
from .fit import fit
from .optim import LAMB, LARS, OPTIMIZERS, make_optimizer, param_groups
from .remat import Rematerialized, remat

__all__ = [
    "ABSRun",
    "FinetuneResult",
    "LAMB",
    "LARS",
    "OPTIMIZERS",
    "finetune",
    "fit",
    "fit_abs",
    "make_optimizer",
    "param_groups",
    "remat",
    "Rematerialized",
]
