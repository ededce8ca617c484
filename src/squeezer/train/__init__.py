"""Training and fine-tuning: plain supervised training of the built-in nets (QAT and distillation
build on the same loop)."""

from .fit import fit

__all__ = ["fit"]
