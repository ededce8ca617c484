"""`quantize`: one verb that turns a float model and a plan (or a uniform config) into a new,
fake-quantized model. The caller's model is never touched."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..config import Plan, QuantConfig
from ..errors import ConfigError
from ..graph import copy_model, quantizable_layers, set_module, split_attention
from .feeding import feed
from .modules import ActQuantizer, QuantMixin, to_quant_module


def quantize(
    model: nn.Module,
    config: Plan | QuantConfig,
    calib: Iterable[Any] | None = None,
    *,
    max_calib_batches: int | None = None,
    bias_correction: bool = False,
) -> nn.Module:
    """A new model whose layers are quantized as ``config`` says; ``model`` stays untouched.

    Every ``nn.MultiheadAttention`` is first split into four Linear layers
    (:func:`squeezer.graph.split_attention`), so the result holds
    :class:`squeezer.attention.SplitAttention` modules whose ``q_proj``, ``k_proj``, ``v_proj`` and
    ``out_proj`` the plan can name.

    Args:
        model: the float model.
        config: a :class:`Plan` (per-layer settings keyed by FQN) or a :class:`QuantConfig`
            (one setting for every layer).
        calib: batches for activation ranges: ``(inputs, targets)`` pairs or bare inputs. Needed when
            any layer quantizes its activations.
        max_calib_batches: stop calibrating after this many batches.
        bias_correction: then subtract each layer's mean output error on ``calib`` from its bias
            (Nagel et al. 2019; :func:`squeezer.quant.bias_correction.correct_bias`).

    Example:
        >>> from squeezer.config import LayerQuant, QuantConfig
        >>> net = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> q = quantize(net, QuantConfig(LayerQuant(bits=4)))
        >>> type(q[0]).__name__, type(net[0]).__name__
        ('QuantLinear', 'Linear')
    """
    model = split_attention(model)  # a private copy if it splits anything
    plan = config.to_plan(model) if isinstance(config, QuantConfig) else config
    if not isinstance(plan, Plan):
        raise ConfigError(f"quantize needs a Plan or a QuantConfig, got {type(config).__name__}")
    layers = quantizable_layers(model)
    unknown = [fqn for fqn in plan.layers if fqn not in layers]
    if unknown:
        raise ConfigError(
            f"the plan names layers the model does not have: {unknown[:3]}; "
            "was the plan made for another model?"
        )
    qmodel = quantized_structure(model, plan)
    act = [m for m in qmodel.modules() if isinstance(m, ActQuantizer)]
    if act:
        if calib is None:
            raise ConfigError(
                "the plan quantizes activations, which needs calibration data: pass calib=batches "
                "(or use --calib zeroshot on the command line)"
            )
        calibrate(qmodel, calib, max_batches=max_calib_batches)
    if bias_correction:
        if calib is None:
            raise ConfigError("bias correction needs calibration data: pass calib=batches")
        from .bias_correction import correct_bias

        correct_bias(qmodel, calib, max_batches=max_calib_batches)
    return qmodel


@torch.no_grad()
def quantized_structure(model: nn.Module, plan: Plan) -> nn.Module:
    """A copy of ``model`` (its attention split, see :func:`squeezer.graph.split_attention`) with the
    plan's layers swapped for quantized ones, weights quantizers set from the weights and activation
    quantizers not yet calibrated (see :func:`calibrate`)."""
    qmodel = split_attention(model)
    if qmodel is model:
        qmodel = copy_model(model)
    qlayers = quantizable_layers(qmodel)
    for fqn, spec in plan.layers.items():
        if fqn not in qlayers:
            raise ConfigError(f"the plan names layer {fqn!r}, which the model does not have")
        if not spec.is_float:
            set_module(qmodel, fqn, to_quant_module(qlayers[fqn], spec))
    return qmodel


def load_quantized(model: nn.Module, plan: Plan, state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """Rebuild a quantized model saved with ``qmodel.state_dict()`` or with
    :func:`squeezer.quant.storage.packed_state_dict` (packed codes, scales, ranges)."""
    from .bias_correction import add_saved_biases
    from .storage import unpack_into

    qmodel = quantized_structure(model, plan)
    add_saved_biases(qmodel, state_dict)  # biases bias correction gave layers without one
    state_dict = unpack_into(qmodel, state_dict)
    result = qmodel.load_state_dict(state_dict, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ConfigError(
            f"saved quantized weights do not fit the plan: missing {result.missing_keys[:3]}, "
            f"unexpected {result.unexpected_keys[:3]}"
        )
    return qmodel


@torch.no_grad()
def calibrate(qmodel: nn.Module, calib: Iterable[Any], *, max_batches: int | None = None) -> None:
    """Run ``calib`` through ``qmodel`` (in eval mode) to fix every activation quantizer's range.

    Layers observe their float inputs in one pass, so the ranges do not depend on the order in which
    layers were quantized. Observing is switched off again even if a batch fails.
    """
    act = [m for m in qmodel.modules() if isinstance(m, ActQuantizer)]
    was_training = qmodel.training
    qmodel.eval()
    # Observe float activations: weights in float too, so each range matches the float model.
    wq = [m.weight_quantizer for m in qmodel.modules() if isinstance(m, QuantMixin)]
    n = 0
    try:
        for w in wq:
            w.enabled = False
        for a in act:
            a.observing = True
        n = feed(qmodel, calib, max_batches=max_batches)
    finally:
        for w in wq:
            w.enabled = True
        for a in act:
            a.observing = False
        qmodel.train(was_training)
    if n == 0:
        raise ConfigError("the calibration data held no batches; pass at least one batch")
    for a in act:
        a.freeze()
