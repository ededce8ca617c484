"""The model registry: name -> factory, the data set it is meant for, and its input shape."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UnsupportedModelError


@dataclass(frozen=True)
class ModelEntry:
    name: str
    factory: Callable[..., nn.Module]
    data: str
    input_shape: tuple[int, ...]
    description: str


MODELS: dict[str, ModelEntry] = {}


def register_model(name: str, *, data: str, input_shape: tuple[int, ...], description: str = ""):
    """Decorator adding a factory to the registry (``zoo:NAME`` on the command line)."""

    def deco(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        MODELS[name] = ModelEntry(name, factory, data, tuple(input_shape), description)
        return factory

    return deco


def list_models() -> list[str]:
    """Names of the registered models, sorted."""
    return sorted(MODELS)


def create(name: str, *, seed: int = 0, **kwargs) -> nn.Module:
    """A freshly initialised model ``name`` (weights drawn from ``seed``, without touching the global
    random state) with its ``input_shape`` attribute set."""
    if name not in MODELS:
        raise UnsupportedModelError(
            f"no built-in model {name!r}; choose one of {', '.join(list_models())}"
        )
    entry = MODELS[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = entry.factory(**kwargs)
    model.input_shape = entry.input_shape
    return model
