"""The model registry: name -> factory, the data set it is meant for, its input shape and, for the
architectures of published papers, the reference figures the implementation must reproduce."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UnsupportedModelError
from .reference import Reference


@dataclass(frozen=True)
class ModelEntry:
    name: str
    factory: Callable[..., nn.Module]
    data: str
    input_shape: tuple[int, ...]
    description: str
    reference: Reference | None = None


MODELS: dict[str, ModelEntry] = {}


def register_model(
    name: str,
    *,
    data: str,
    input_shape: tuple[int, ...],
    description: str = "",
    reference: Reference | None = None,
):
    """Decorator adding a factory to the registry (``zoo:NAME`` on the command line).

    ``reference`` holds the published parameter count and MACs the architecture must match
    (``tests/zoo`` checks every registered reference).
    """

    def deco(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        MODELS[name] = ModelEntry(name, factory, data, tuple(input_shape), description, reference)
        return factory

    return deco


def list_models() -> list[str]:
    """Names of the registered models, sorted."""
    return sorted(MODELS)


def create(name: str, *, seed: int = 0, **kwargs) -> nn.Module:
    """A freshly initialised model ``name`` (weights drawn from ``seed``, without touching the global
    random state) with its ``input_shape`` attribute set: the registered shape, unless the factory
    set its own (one that depends on its arguments, e.g. ``image_size``)."""
    if name not in MODELS:
        raise UnsupportedModelError(
            f"no built-in model {name!r}; choose one of {', '.join(list_models())}"
        )
    entry = MODELS[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = entry.factory(**kwargs)
    if getattr(model, "input_shape", None) is None:
        model.input_shape = entry.input_shape
    return model
