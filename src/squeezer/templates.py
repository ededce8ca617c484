"""Layer templates: what differs between model families in the one compression chain.

A template says how each layer of a family is quantized (its granularity, group size, activation
quantizer; the planner only chooses widths), which widths the planner may choose, how the Hessian
analysis is run for it (how many samples, probes, which parameters), and which layers must share a
width. The pipeline (:mod:`squeezer.pipeline`) asks :func:`template_for` and never branches on the
kind of model itself.

Three templates ship: ``"default"`` (every layer per output channel, residual adds tied, HAWQ-V2/V3
style), ``"qbert"`` (BERT-family encoders, :mod:`squeezer.qbert`: Linears in groups of 128) and
``"qbert-channel"`` (the same with one range per output row, which ONNX Runtime runs as integer
kernels; chosen by name only). A new family registers one with :func:`register_template`; a run
may name its template and the planner's widths (``squeezer compress --template NAME --bits
4,7``, :func:`template_for` and :func:`with_bits`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace

from torch import nn

from .config import LayerQuant, Plan, QuantConfig
from .errors import ConfigError
from .graph import quantizable_layers, split_attention

Ties = tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class AnalysisSettings:
    """How the Hessian analysis of a family runs (see :func:`squeezer.spectrum.analyze`).

    Attributes:
        samples: training samples the traces average over.
        batch_size: samples per batch.
        max_probes, min_probes, rel_stderr: Hutchinson's stopping rule.
        top_k: top eigenvalues of the whole Hessian (0 skips them).
        weights_only: restrict the Hessian to the quantizable layers' weights.
        probe_batch: probes per Hessian-vector product batch (None: the engine's default).
    """

    samples: int = 512
    batch_size: int = 128
    max_probes: int = 100
    min_probes: int = 10
    rel_stderr: float | None = 0.05
    top_k: int = 1
    weights_only: bool = False
    probe_batch: int | None = None


@dataclass(frozen=True)
class LayerTemplate:
    """A model family's part in the chain (see the module docstring).

    Attributes:
        name: registry key, recorded in the run.
        label: how plans made with it are named ("Hessian mixed", "Q-BERT mixed").
        matches: ``matches(model)``: True if the template applies to ``model``.
        mixed: ``mixed(model, act_bits) -> Plan``: each layer's quantizer for a mixed-precision
            plan (the widths in it are placeholders).
        uniform: ``uniform(model, bits, act_bits) -> Plan``: every layer at ``bits``.
        bits: the widths the planner may choose.
        analysis: how the Hessian analysis runs.
        ties: ``ties(model)``: groups of layers that must share one width.
        auto: :func:`template_for` picks it for a model it matches; False: only by name.
    """

    name: str
    label: str
    matches: Callable[[nn.Module], bool]
    mixed: Callable[[nn.Module, int | None], Plan]
    uniform: Callable[[nn.Module, int, int | None], Plan]
    bits: tuple[int, ...]
    analysis: AnalysisSettings
    ties: Callable[[nn.Module], Ties]
    auto: bool = True


#: name -> template; :func:`template_for` tries the ``auto`` ones newest first, "default" last.
TEMPLATES: dict[str, LayerTemplate] = {}


def register_template(template: LayerTemplate) -> LayerTemplate:
    """Add ``template`` to :data:`TEMPLATES` (replacing one of the same name)."""
    TEMPLATES[template.name] = template
    return template


def template_for(model: nn.Module, name: str | None = None) -> LayerTemplate:
    """The template named ``name`` (it must match ``model``), or the newest registered ``auto``
    one that matches ``model``.

    Example:
        >>> template_for(nn.Sequential(nn.Linear(4, 2))).name
        'default'
    """
    if name is not None:
        check_template_name(name)
        t = TEMPLATES[name]
        if not t.matches(model):
            fits = [k for k, v in TEMPLATES.items() if v.matches(model)]
            raise ConfigError(
                f"layer template {name!r} does not apply to this model; choose one of {fits} "
                "(or leave --template out to take the matching one)"
            )
        return t
    for t in reversed(list(TEMPLATES.values())):
        if t.name != "default" and t.auto and t.matches(model):
            return t
    return TEMPLATES["default"]


def check_template_name(name: str) -> None:
    """A ConfigError unless ``name`` is a registered template (checked before any loading)."""
    if name not in TEMPLATES:
        raise ConfigError(f"unknown layer template {name!r}; choose one of {list(TEMPLATES)}")


#: The planner's integer widths a run may ask for (:func:`with_bits`).
INTEGER_BITS = range(2, 9)


def check_widths(bits: tuple[int, ...] | list[int]) -> tuple[int, ...]:
    """``bits`` as the planner's candidate widths (sorted, unique), or a ConfigError unless it is a
    non-empty list of integer widths 2..8.

    Example:
        >>> check_widths([7, 4, 4])
        (4, 7)
    """
    widths = tuple(sorted({int(b) for b in bits}))
    if not widths or any(b not in INTEGER_BITS for b in widths):
        raise ConfigError(
            f"--bits {','.join(map(str, bits)) or '(empty)'}: each integer width must be 2..8, "
            "e.g. --bits 4,8 or --bits 2,3,4,7"
        )
    return widths


def with_bits(template: LayerTemplate, bits: tuple[int, ...] | list[int] | None) -> LayerTemplate:
    """``template`` with the planner's candidate integer widths ``bits`` (None keeps its own).

    Example:
        >>> with_bits(TEMPLATES["default"], (4, 7)).bits
        (4, 7)
    """
    return template if bits is None else replace(template, bits=check_widths(bits))


# --------------------------------------------------------------------------------------------------
# The default template: per-channel weights, residual adds tied


def uniform_plan(
    model: nn.Module,
    bits: int,
    *,
    act_bits: int | None = 8,
    granularity: str = "channel",
    group_size: int | None = None,
) -> Plan:
    """Every quantizable layer at ``bits`` (per-channel by default) with ``act_bits`` activations.

    Embeddings get no activation quantizer (their inputs are indices).

    Example:
        >>> uniform_plan(nn.Sequential(nn.Linear(4, 2)), 4).meta["name"]
        'W4A8'
    """
    model = split_attention(model)
    layers = quantizable_layers(model)
    base = LayerQuant(bits=bits, granularity=granularity, group_size=group_size, act_bits=act_bits)
    plan = QuantConfig(base).to_plan(model)
    specs = {
        k: (replace(v, act_bits=None) if isinstance(layers[k], nn.Embedding) else v)
        for k, v in plan.layers.items()
    }
    name = f"W{bits}A{act_bits}" if act_bits else f"W{bits}"
    return Plan(specs, meta={"method": "uniform", "bits": bits, "act_bits": act_bits, "name": name})


def _default_mixed(model: nn.Module, act_bits: int | None) -> Plan:
    one = LayerQuant(bits=8, granularity="channel", act_bits=act_bits)
    return Plan(dict.fromkeys(quantizable_layers(split_attention(model)), one))


def _default_ties(model: nn.Module) -> Ties:
    from .ties import residual_ties

    with warnings.catch_warnings():  # an untraceable model is planned without ties
        warnings.simplefilter("ignore")
        return tuple(tuple(t) for t in residual_ties(model))


register_template(
    LayerTemplate(
        name="default",
        label="Hessian mixed",
        matches=lambda model: True,
        mixed=_default_mixed,
        uniform=lambda model, bits, act_bits: uniform_plan(model, bits, act_bits=act_bits),
        bits=(2, 3, 4, 8),
        analysis=AnalysisSettings(),
        ties=_default_ties,
    )
)
