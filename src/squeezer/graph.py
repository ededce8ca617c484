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
    """True for a plain Linear, Conv1d, Conv2d, ConvTranspose1d, ConvTranspose2d or Embedding: of
    exactly one of these types (not squeezer's quantized wrappers).

    A subclass stays in float (:func:`float_weights` names it): swapping it for a quantized layer
    would drop its own ``forward``, or quantize nothing when its parent reads its ``.weight``
    directly, as ``nn.MultiheadAttention`` reads its ``out_proj`` (a
    ``NonDynamicallyQuantizableLinear``). :func:`split_attention` turns MultiheadAttention's
    projections into plain Linear layers.

    Example:
        >>> is_quantizable(nn.Linear(2, 2)), is_quantizable(nn.MultiheadAttention(4, 2).out_proj)
        (True, False)
    """
    return type(module) in QUANTIZABLE_TYPES


def quantizable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every quantizable layer of ``model``, keyed by FQN, in module order.

    These are the layers of ``model`` as it is: an ``nn.MultiheadAttention``'s projections count
    only in ``split_attention(model)``, which is what :func:`squeezer.quantize`, the planner and the
    CLI work on.

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
    normalisation layer (a GRU, a ConvTranspose3d, a subclass of Linear; an ``nn.MultiheadAttention``
    left unsplit, see :func:`split_attention`).

    A user-defined module with sub-modules that also holds tensors of its own (a positional
    embedding, a layer scale) has each such tensor listed by name, as a ``Parameter``.

    Example:
        >>> float_weights(nn.Sequential(nn.Linear(4, 4), nn.GRU(4, 2), nn.LayerNorm(2)))
        {'1': ('GRU', 36)}
    """
    out = {}
    for name, m in model.named_modules():
        if is_quantizable(m) or isinstance(m, _NORM_TYPES):
            continue
        own = [
            (pname, p)
            for pname, p in m.named_parameters(recurse=False)
            if not pname.endswith("bias") and not pname.startswith("bias")
        ]
        if not own:
            continue
        # A user's own module holding tensors next to its sub-modules: name each tensor (a torch
        # layer such as a GRU or MultiheadAttention is listed whole).
        if not type(m).__module__.startswith("torch.") and any(True for _ in m.children()):
            for pname, p in own:
                out[f"{name}.{pname}" if name else pname] = ("Parameter", int(p.numel()))
        else:
            out[name] = (type(m).__name__, int(sum(p.numel() for _, p in own)))
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


def split_attention(model: nn.Module) -> nn.Module:
    """``model`` with every ``nn.MultiheadAttention`` replaced by an equivalent
    :class:`squeezer.attention.SplitAttention`, whose projections are plain ``nn.Linear`` layers
    that squeezer quantizes: ``<mha>.q_proj``, ``<mha>.k_proj``, ``<mha>.v_proj`` and
    ``<mha>.out_proj`` (the FQN ``out_proj`` already had).

    Returns ``model`` itself if it holds no ``nn.MultiheadAttention`` (so splitting twice costs
    nothing), else a copy; the caller's model is never changed. Subclasses of MultiheadAttention
    (their own ``forward``) and hooks registered on a MultiheadAttention are not carried over: the
    former stay as they are (in float), the latter are dropped. An ``nn.TransformerEncoder`` that
    holds split attention stops using its nested-tensor fast path (which reads the packed weights);
    ``nn.TransformerEncoderLayer`` takes its ordinary path by itself.

    Example:
        >>> enc = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
        >>> list(quantizable_layers(split_attention(enc)))[:4]
        ['self_attn.q_proj', 'self_attn.k_proj', 'self_attn.v_proj', 'self_attn.out_proj']
        >>> lin = nn.Linear(2, 2)
        >>> split_attention(lin) is lin
        True
    """
    from .attention import SplitAttention

    if not any(type(m) is nn.MultiheadAttention for m in model.modules()):
        return model
    if type(model) is nn.MultiheadAttention:
        return SplitAttention.from_mha(model)
    out = copy_model(model)
    split: dict[int, nn.Module] = {}  # one replacement per instance: shared attention stays shared
    for name, m in list(out.named_modules(remove_duplicate=False)):
        if type(m) is nn.MultiheadAttention:
            if id(m) not in split:
                split[id(m)] = SplitAttention.from_mha(m)
            set_module(out, name, split[id(m)])
    for m in out.modules():
        if isinstance(m, nn.TransformerEncoder) and any(
            isinstance(a, SplitAttention) for a in m.modules()
        ):
            m.use_nested_tensor = m.enable_nested_tensor = False
    return out


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")
