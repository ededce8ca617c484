"""The model registry: name -> factory, the data set it is meant for, its input shape and, for the
architectures of published papers, the reference figures the implementation must reproduce."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

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
    #: tag -> loader of a state dict (``zoo:NAME:TAG``), e.g. weights an installed package ships
    pretrained: Mapping[str, Callable[[], dict[str, torch.Tensor]]] = field(default_factory=dict)
    #: how inputs must be prepared for the pretrained weights (recorded in the run's manifest)
    preprocessing: Mapping[str, Any] | None = None


MODELS: dict[str, ModelEntry] = {}


def register_model(
    name: str,
    *,
    data: str,
    input_shape: tuple[int, ...],
    description: str = "",
    reference: Reference | None = None,
    pretrained: Mapping[str, Callable[[], dict[str, torch.Tensor]]] | None = None,
    preprocessing: Mapping[str, Any] | None = None,
):
    """Decorator adding a factory to the registry (``zoo:NAME`` on the command line).

    ``reference`` holds the published parameter count and MACs the architecture must match
    (``tests/zoo`` checks every registered reference). ``pretrained`` maps a tag to a loader of
    the weights ``zoo:NAME:TAG`` loads (from an installed package: never downloaded), and
    ``preprocessing`` says how inputs must be prepared for them.
    """

    def deco(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        MODELS[name] = ModelEntry(name, factory, data, tuple(input_shape), description, reference,
                                  dict(pretrained or {}), preprocessing)  # fmt: skip
        return factory

    return deco


def preprocessing_of(spec: str) -> dict[str, Any] | None:
    """The input preprocessing a ``zoo:NAME:TAG`` spec's pretrained weights expect (None for any
    other spec, or for randomly initialised ``zoo:NAME``).

    Example:
        >>> preprocessing_of("zoo:efficientnet_lite0:imagenet")["size"]
        224
        >>> preprocessing_of("zoo:efficientnet_lite0") is None
        True
    """
    name, _, tag = str(spec).removeprefix("zoo:").partition(":")
    entry = MODELS.get(name)
    if not str(spec).startswith("zoo:") or not tag or entry is None or not entry.preprocessing:
        return None
    return dict(entry.preprocessing)


def list_models() -> list[str]:
    """Names of the registered models, sorted."""
    return sorted(MODELS)


def create(name: str, *, seed: int = 0, **kwargs) -> nn.Module:
    """A freshly initialised model ``name`` (weights drawn from ``seed``, without touching the global
    random state) with its ``input_shape`` attribute set: the registered shape, unless the factory
    set its own (one that depends on its arguments, e.g. ``image_size``). ``NAME:TAG`` loads the
    entry's ``pretrained[TAG]`` weights instead (e.g. ``efficientnet_lite0:imagenet``)."""
    name, _, tag = name.partition(":")
    if name not in MODELS:
        raise UnsupportedModelError(
            f"no built-in model {name!r}; choose one of {', '.join(list_models())}"
        )
    entry = MODELS[name]
    if tag and tag not in entry.pretrained:
        have = ", ".join(f"zoo:{name}:{t}" for t in entry.pretrained) or f"none (use zoo:{name})"
        raise UnsupportedModelError(f"zoo:{name} has no weights {tag!r}; pretrained: {have}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = entry.factory(**kwargs)
    if tag:
        model.load_state_dict(entry.pretrained[tag]())
    if getattr(model, "input_shape", None) is None:
        model.input_shape = entry.input_shape
    return model
