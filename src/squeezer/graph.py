"""The one module that knows nn layer types: iterate, get and replace layers by fully qualified name.

Everything else addresses layers by FQN (the dotted name `model.named_modules()` gives), so plans,
sensitivities and spectra stay plain data keyed by strings.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import torch
from torch import nn

#: Layer types whose weights squeezer quantizes (and whose Hessian blocks it analyses).
QUANTIZABLE_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.Embedding,
)


def is_quantizable(module: nn.Module) -> bool:
    """True for a plain Linear, Conv1d, Conv2d, ConvTranspose1d, ConvTranspose2d or Embedding (not
    for squeezer's quantized wrappers)."""
    return type(module) in QUANTIZABLE_TYPES or (
        isinstance(module, QUANTIZABLE_TYPES) and not hasattr(module, "weight_quantizer")
    )


def quantizable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every quantizable layer of ``model``, keyed by FQN, in module order.

    Example:
        >>> layers = quantizable_layers(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)))
        >>> list(layers)
        ['0', '2']
    """
    return {name: m for name, m in model.named_modules() if name and is_quantizable(m)}


#: Layers whose weights are meant to stay in float: normalisation scales (folded or tiny).
_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)


def float_weights(model: nn.Module) -> dict[str, tuple[str, int]]:
    """Modules that hold weights squeezer leaves in float, ``{FQN: (type name, weight count)}``:
    everything with its own non-bias parameters that is neither a quantizable layer nor a
    normalisation layer (a GRU, a ConvTranspose3d, MultiheadAttention's packed input projection).

    Example:
        >>> float_weights(nn.Sequential(nn.Linear(4, 4), nn.GRU(4, 2), nn.LayerNorm(2)))
        {'1': ('GRU', 36)}
    """
    out = {}
    for name, m in model.named_modules():
        if is_quantizable(m) or isinstance(m, _NORM_TYPES):
            continue
        n = sum(
            p.numel()
            for pname, p in m.named_parameters(recurse=False)
            if not pname.endswith("bias") and not pname.startswith("bias")
        )
        if n:
            out[name or "(root)"] = (type(m).__name__, int(n))
    return out


def layer_type(module: nn.Module) -> str:
    """A short, stable type name for reports ("Linear", "Conv2d", ...)."""
    for t in QUANTIZABLE_TYPES:
        if isinstance(module, t):
            return t.__name__
    return type(module).__name__


def weight_channel_axis(module: nn.Module) -> int:
    """The axis of ``module.weight`` that runs over output channels, along which "channel"
    granularity quantizes: 1 for a transposed convolution (weight (in, out / groups, k...)), else 0.

    Example:
        >>> weight_channel_axis(nn.ConvTranspose2d(4, 6, 3)), weight_channel_axis(nn.Conv2d(4, 6, 3))
        (1, 0)
    """
    return 1 if isinstance(module, nn.modules.conv._ConvTransposeNd) else 0


def get_module(model: nn.Module, fqn: str) -> nn.Module:
    """The sub-module called ``fqn``; a clear error if there is none."""
    try:
        return model.get_submodule(fqn)
    except AttributeError as exc:
        from .errors import ConfigError

        raise ConfigError(
            f"the model has no layer named {fqn!r}; list the names with squeezer.quantizable_layers(model)"
        ) from exc


def set_module(model: nn.Module, fqn: str, new: nn.Module) -> None:
    """Replace the sub-module ``fqn`` of ``model`` (which must be squeezer's own copy) by ``new``."""
    parent_name, _, child = fqn.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def copy_model(model: nn.Module) -> nn.Module:
    """A deep copy that shares no tensor storage with ``model``: the caller's model stays untouched."""
    return copy.deepcopy(model)


def weight_params(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """(FQN, weight) of every quantizable layer: the parameters the Hessian engine analyses by layer."""
    for name, m in quantizable_layers(model).items():
        yield name, m.weight


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")
