"""The model registry: name -> factory, the data set it is meant for, its input shape and, for the
architectures of published papers, the reference figures the implementation must reproduce."""

from __future__ import annotations

import ast
import inspect
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
    name, _, tag = str(spec).removeprefix("zoo:").split(",")[0].partition(":")
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
    entry's ``pretrained[TAG]`` weights instead (e.g. ``efficientnet_lite0:imagenet``). Factory
    arguments can ride in the name as ``NAME,KEY=VALUE,...`` (``zoo:sqnxt23,classes=10,width=1.5``
    on the command line, where the spec is all a run folder records of the model).

    Example:
        >>> create("squeezenet1_1,classes=10").classifier[1].out_channels
        10
    """
    base, *options = str(name).split(",")
    name, _, tag = base.partition(":")
    if name not in MODELS:
        raise UnsupportedModelError(
            f"no built-in model {name!r}; choose one of {', '.join(list_models())}"
        )
    entry = MODELS[name]
    if tag and tag not in entry.pretrained:
        have = ", ".join(f"zoo:{name}:{t}" for t in entry.pretrained) or f"none (use zoo:{name})"
        raise UnsupportedModelError(f"zoo:{name} has no weights {tag!r}; pretrained: {have}")
    kwargs = {**_options(name, options, entry.factory), **kwargs}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = entry.factory(**kwargs)
    if tag:
        model.load_state_dict(entry.pretrained[tag]())
    if getattr(model, "input_shape", None) is None:
        model.input_shape = entry.input_shape
    return model


def model_options(factory: Callable[..., nn.Module]) -> dict[str, Any]:
    """The keyword arguments a zoo factory takes, with their defaults (``squeezer zoo`` lists
    them)."""
    return {
        p.name: p.default
        for p in inspect.signature(factory).parameters.values()
        if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is not p.empty
    }


def _options(name: str, options: list[str], factory: Callable[..., nn.Module]) -> dict[str, Any]:
    """``["classes=10", "width=1.5"]`` -> ``{"classes": 10, "width": 1.5}``, checked against the
    factory's keyword arguments; a one-line UnsupportedModelError otherwise."""
    known, out = model_options(factory), {}
    for text in options:
        key, eq, value = text.partition("=")
        key = key.strip()
        if not eq or not key:
            raise UnsupportedModelError(
                f"zoo:{name}: model options are KEY=VALUE after a comma (e.g. zoo:{name},"
                f"{next(iter(known), 'classes')}=...), got {text!r}"
            )
        if key not in known:
            have = ", ".join(f"{k}={v!r}" for k, v in known.items()) or "none"
            raise UnsupportedModelError(f"zoo:{name} has no option {key!r}; its options: {have}")
        out[key] = _literal(value.strip())
    return out


def _literal(text: str) -> Any:
    """A command-line option value: int, float, bool or None where it reads as one, else text."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return {"true": True, "false": False, "none": None}.get(text.lower(), text)
