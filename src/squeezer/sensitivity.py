"""Per-layer, per-bit-width sensitivity: how much the loss grows when one layer is quantized.

Methods (a registry; a new method registers a handler, ``register_sensitivity``):

- ``"trace"`` (default), HAWQ-V2 (Dong et al., arXiv:1911.03852):
  Ω_i(b) = ½ · Tr(H_i) / n_i · ‖Q_b(W_i) − W_i‖², the average Hessian eigenvalue of layer i's
  weight block times the squared quantization perturbation. The paper's score omits the ½, which
  changes no ranking; we keep it so Ω is the second-order Taylor estimate of the loss increase
  (its expectation for a perturbation of that size in a random direction) and can be compared
  with the measured increase.
- ``"eigen"``, HAWQ (Dong et al., arXiv:1905.03696): ½ · λ_max(H_i) · ‖Q_b(W_i) − W_i‖², the worst
  case over directions. HAWQ-V1 ranked blocks by λ_max / n_i and fine-tuned; multiplying by the
  perturbation instead makes the score comparable across bit widths, which the planner needs.
- ``"measured"``: the loss increase on ``data`` when only layer i's weight is quantized to b bits
  (no Taylor expansion; costs one pass over ``data`` per layer and bit width).
- Activation sensitivity (``activations=True``): the loss increase when only layer i's *input
  activations* are quantized to b bits (per tensor, percentile range from the same data), stored in
  :attr:`Sensitivity.act`.

ZeroQ's KL-divergence sensitivity (arXiv:2001.00281) plugs in as ``method="kl"`` through the same
registry (:mod:`squeezer.zeroshot`; registered when the package is imported). The result is plain
data keyed by the layer's fully qualified name (FQN).
"""

from __future__ import annotations

import collections
import itertools
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from .config import JsonFile, LayerQuant, Plan
from .errors import ConfigError
from .graph import (
    quantizable_layers,
    split_attention,
    weight_channel_axis,
)
from .measured import (  # noqa: F401  (forward_with, mean_loss: their old import path)
    _cross_entropy,
    _eval_copy,
    _require_data,
    activation_sensitivity,
    forward_with,
    mean_loss,
)
from .quant.primitives import GRANULARITIES, quantize_weight

SENSITIVITY_VERSION = 1
DEFAULT_BITS = (2, 3, 4, 8)

LossFn = Callable[[Any, Any], torch.Tensor]


# --------------------------------------------------------------------------------------------------
# The result


@dataclass(frozen=True)
class Sensitivity(JsonFile):
    """Ω per layer and bit width, keyed by FQN; what the planner minimises (summed over layers).

    Attributes:
        omega: {FQN: {bits: Ω}}, the predicted (or measured) loss increase of quantizing that
            layer's weight alone to that many bits. Float widths (16, 32) have Ω = 0.
        method: the method that produced ``omega`` ("trace", "eigen", "measured", "kl", ...).
        bits: the candidate bit widths, ascending.
        params: {FQN: number of weight entries}, for parameter-weighted average bits.
        granularity: the weight granularity Ω was computed for ("tensor", "channel", "group").
        group_size: group length for granularity "group", else None.
        act: {FQN: {bits: loss increase}} of quantizing the layer's input activations alone, or {}.
        meta: free-form provenance (observer, number of batches, clamped layers, ...).

    Example:
        >>> s = Sensitivity({"fc": {2: 0.5, 8: 0.001}}, "trace", (2, 8), {"fc": 64})
        >>> Sensitivity.from_json(s.to_json()) == s
        True
        >>> s.total({"fc": 8})
        0.001
    """

    omega: Mapping[str, Mapping[int, float]]
    method: str
    bits: tuple[int, ...]
    params: Mapping[str, int]
    granularity: str = "channel"
    group_size: int | None = None
    act: Mapping[str, Mapping[int, float]] = field(default_factory=dict)
    meta: Mapping[str, Any] = field(default_factory=dict)
    version: int = SENSITIVITY_VERSION

    _json_kind = "sensitivity"
    _json_version = SENSITIVITY_VERSION

    def __post_init__(self) -> None:
        missing = [k for k in self.omega if k not in self.params]
        if missing:
            raise ConfigError(f"sensitivity has no parameter count for layers {missing[:3]}")
        for fqn, row in self.omega.items():
            absent = [b for b in self.bits if b not in row]
            if absent:
                raise ConfigError(f"sensitivity of layer {fqn!r} lacks bit widths {absent}")

    @property
    def layers(self) -> list[str]:
        """Layer FQNs in model order."""
        return list(self.omega)

    def total(self, bits: Mapping[str, int]) -> float:
        """Predicted loss increase ΣΩ_i(b_i) of a bit assignment {FQN: bits}."""
        return float(sum(self.omega[fqn][int(b)] for fqn, b in bits.items()))

    def with_float_width(self, bits: int = 32) -> Sensitivity:
        """This table with ``bits`` (16 or 32: the layer stays in float) as one more candidate
        width of every layer, at Ω = 0 (a float layer adds no quantization error)."""
        if bits < 16:
            raise ConfigError(f"only float widths (16, 32) can be added without scoring; got {bits}")
        omega = {k: {**row, bits: 0.0} for k, row in self.omega.items()}
        return replace(self, omega=omega, bits=tuple(sorted({*self.bits, bits})))

    def ranking(self, bits: int | None = None) -> list[str]:
        """Layers from most to least sensitive at ``bits`` (default: the lowest candidate)."""
        b = min(self.bits) if bits is None else bits
        return sorted(self.omega, key=lambda k: self.omega[k][b], reverse=True)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sensitivity) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(self.to_json())

    def to_dict(self) -> dict[str, Any]:
        def table(t: Mapping[str, Mapping[int, float]]) -> dict[str, dict[str, float]]:
            return {k: {str(b): float(v) for b, v in row.items()} for k, row in t.items()}

        return {
            "version": self.version,
            "method": self.method,
            "bits": list(self.bits),
            "granularity": self.granularity,
            "group_size": self.group_size,
            "params": {k: int(v) for k, v in self.params.items()},
            "omega": table(self.omega),
            "act": table(self.act),
            "meta": json.loads(json.dumps(dict(self.meta), default=str)),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Sensitivity:
        if not isinstance(d, Mapping) or "omega" not in d:
            raise ConfigError("a sensitivity is a JSON object with an 'omega' table; regenerate it")
        version = cls._checked_version(d)

        def table(t: Mapping[str, Mapping[str, float]]) -> dict[str, dict[int, float]]:
            return {k: {int(b): float(v) for b, v in row.items()} for k, row in t.items()}

        return cls(
            omega=table(d["omega"]),
            method=str(d["method"]),
            bits=tuple(int(b) for b in d["bits"]),
            params={k: int(v) for k, v in d["params"].items()},
            granularity=str(d.get("granularity", "channel")),
            group_size=d.get("group_size"),
            act=table(d.get("act", {})),
            meta=dict(d.get("meta", {})),
            version=version,
        )


# --------------------------------------------------------------------------------------------------
# What a method handler receives, and the registry


@dataclass(frozen=True)
class SensitivityRequest:
    """Everything a sensitivity handler may use. Handlers must not mutate ``model``.

    Attributes:
        model: the caller's float model (read only).
        layers: {FQN: layer} of the layers to score, in model order.
        bits: candidate bit widths, ascending.
        spectrum: a Hessian ``Spectrum`` (or None).
        data: a list of (inputs, targets) batches (or None).
        loss_fn: ``loss_fn(outputs, targets) -> scalar mean loss`` (or None).
        granularity, group_size, symmetric, observer: how weights are quantized.
        quantizers: {FQN: LayerQuant} for layers quantized differently from the above (a
            per-layer template); their widths are ignored.
        options: extra keyword arguments given to :func:`sensitivity`, for the handler.
    """

    model: nn.Module
    layers: Mapping[str, nn.Module]
    bits: tuple[int, ...]
    spectrum: Any = None
    data: Sequence[Any] | None = None
    loss_fn: LossFn | None = None
    granularity: str = "channel"
    group_size: int | None = None
    symmetric: bool = True
    observer: str = "minmax"
    quantizers: Mapping[str, LayerQuant] = field(default_factory=dict)
    options: Mapping[str, Any] = field(default_factory=dict)

    def quantized_weight(self, fqn: str, bits: int) -> torch.Tensor:
        """Q_b(W) of layer ``fqn`` (the original weight for float widths ≥ 16)."""
        layer = self.layers[fqn]
        w = layer.weight.detach()
        if bits >= 16:
            return w
        q = self.quantizers.get(fqn)
        wq, _ = quantize_weight(
            w,
            bits,
            granularity=self.granularity if q is None else q.granularity,
            group_size=self.group_size if q is None else q.group_size,
            symmetric=self.symmetric if q is None else q.symmetric,
            observer=self.observer if q is None else q.observer,
            channel_axis=weight_channel_axis(layer),
        )
        return wq

    def perturbation(self, fqn: str, bits: int) -> float:
        """‖Q_b(W) − W‖² of layer ``fqn``."""
        w = self.layers[fqn].weight.detach()
        return float((self.quantized_weight(fqn, bits) - w).double().pow(2).sum())


SensitivityHandler = Callable[[SensitivityRequest], Mapping[str, Mapping[int, float]]]

#: method name -> handler returning {FQN: {bits: Ω}}. Extend with :func:`register_sensitivity`.
SENSITIVITY_METHODS: dict[str, SensitivityHandler] = {}


def register_sensitivity(name: str) -> Callable[[SensitivityHandler], SensitivityHandler]:
    """Register ``handler(request) -> {FQN: {bits: Ω}}`` as ``sensitivity(..., method=name)``.

    Example:
        >>> @register_sensitivity("size_only")
        ... def _size_only(req):
        ...     return {k: {b: req.perturbation(k, b) for b in req.bits} for k in req.layers}
        >>> "size_only" in SENSITIVITY_METHODS
        True
        >>> del SENSITIVITY_METHODS["size_only"]
    """

    def deco(fn: SensitivityHandler) -> SensitivityHandler:
        SENSITIVITY_METHODS[name] = fn
        return fn

    return deco


# --------------------------------------------------------------------------------------------------
# The verb


def sensitivity(
    model: nn.Module,
    spectrum: Any = None,
    *,
    bits: Sequence[int] = DEFAULT_BITS,
    method: str = "trace",
    granularity: str = "channel",
    group_size: int | None = None,
    symmetric: bool = True,
    observer: str = "minmax",
    data: Iterable[Any] | None = None,
    loss_fn: LossFn | None = None,
    layers: Sequence[str] | None = None,
    template: Plan | None = None,
    activations: bool = False,
    act_percentile: float = 99.99,
    max_batches: int | None = None,
    **options: Any,
) -> Sensitivity:
    """Per-layer, per-bit sensitivity Ω of ``model``; the model is not modified.

    Args:
        model: the float model.
        spectrum: a ``Spectrum`` from the Hessian engine for "trace" and "eigen"; when None and
            ``data`` is given, one is computed (``squeezer.spectrum.analyze``, ``seed`` option).
        bits: candidate weight bit widths (2–8, or 16/32 for "stay in float", whose Ω is 0).
        method: a key of :data:`SENSITIVITY_METHODS` ("trace", "eigen", "measured", ...).
        granularity, group_size, symmetric, observer: the weight quantizer Ω is computed for; plan
            and quantize with the same settings.
        data: batches of ``(inputs, targets)`` (needed by "measured" and ``activations=True``).
        loss_fn: ``loss_fn(outputs, targets) -> mean loss``; cross-entropy when None.
        layers: FQNs to score (default: every quantizable layer, or ``template``'s layers).
        template: a plan whose per-layer quantizers (granularity, group size, symmetry,
            observer; not widths) override the four arguments above layer by layer, e.g. Q-BERT's
            groups for Linears and rows for embedding tables (:func:`squeezer.qbert.qbert_plan`).
            ``meta["granularity"]`` of the result then records ``[granularity, group_size]`` per
            layer, and the top-level granularity is the most common one.
        activations: also measure the input-activation sensitivity into ``Sensitivity.act``.
        act_percentile: percentile clipping of the activation range (asymmetric, per tensor).
        max_batches: use at most this many batches of ``data``.
        **options: passed to the method's handler.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> g = torch.Generator().manual_seed(0)
        >>> batches = [(torch.randn(32, 4, generator=g), torch.randint(3, (32,), generator=g))]
        >>> s = sensitivity(net, method="measured", data=batches, bits=(2, 8))
        >>> sorted(s.omega), s.bits
        (['0', '2'], (2, 8))
    """
    if method not in SENSITIVITY_METHODS:
        raise ConfigError(
            f"unknown sensitivity method {method!r}; choose one of {', '.join(SENSITIVITY_METHODS)}"
        )
    if granularity not in GRANULARITIES:
        raise ConfigError(
            f"unknown granularity {granularity!r}; choose one of {', '.join(GRANULARITIES)}"
        )
    cand = tuple(sorted({int(b) for b in bits}))
    if not cand:
        raise ConfigError("no candidate bit widths; pass e.g. bits=(2, 4, 8)")
    for b in cand:
        if not (2 <= b <= 8 or b in (16, 32)):
            raise ConfigError(f"candidate bit width {b} is not 2–8, 16 or 32; e.g. bits=(2, 4, 8)")
    model = split_attention(model)  # the layers quantize() sees
    all_layers = quantizable_layers(model)
    quantizers: dict[str, LayerQuant] = {}
    if template is not None:
        quantizers = dict(template.layers)
        layers = list(quantizers) if layers is None else layers
        granularity, group_size, symmetric, observer = _most_common(
            [(q.granularity, q.group_size, q.symmetric, q.observer) for q in quantizers.values()]
        ) or (granularity, group_size, symmetric, observer)
    if layers is None:
        chosen = all_layers
    else:
        unknown = [k for k in layers if k not in all_layers]
        if unknown:
            raise ConfigError(
                f"layers {unknown[:3]} are not quantizable layers of the model; "
                f"known: {list(all_layers)[:8]}"
            )
        chosen = {k: all_layers[k] for k in all_layers if k in set(layers)}
    batches = _take(data, max_batches) if data is not None else None
    meta: dict[str, Any] = {"symmetric": symmetric, "observer": observer}
    if spectrum is None and method in ("trace", "eigen") and batches:
        from .spectrum import analyze

        spectrum = analyze(
            model,
            loss_fn or _cross_entropy,
            batches,
            top_k=0,
            per_layer_eig=method == "eigen",
            seed=int(options.pop("seed", 0)),
        )
        meta["spectrum"] = {"probes": spectrum.probes, "seed": spectrum.seed}
    req = SensitivityRequest(
        model=model,
        layers=chosen,
        bits=cand,
        spectrum=spectrum,
        data=batches,
        loss_fn=loss_fn,
        granularity=granularity,
        group_size=group_size,
        symmetric=symmetric,
        observer=observer,
        quantizers={k: v for k, v in quantizers.items() if k in chosen},
        options=options,
    )
    omega = SENSITIVITY_METHODS[method](req)
    omega = {k: {b: float(omega[k][b]) for b in cand} for k in chosen}
    act: dict[str, dict[int, float]] = {}
    if activations:
        act = activation_sensitivity(
            model,
            _require_data(batches, "activations=True"),
            bits=[b for b in cand if b < 16],
            loss_fn=loss_fn,
            layers=list(chosen),
            percentile=act_percentile,
        )
    if batches is not None:
        meta["batches"] = len(batches)
    if quantizers:
        meta["granularity"] = {
            k: [quantizers[k].granularity, quantizers[k].group_size] for k in chosen
        }
    attr = {"trace": "layer_trace", "eigen": "layer_top_eigenvalue"}.get(method)
    if attr is not None:
        # Floored in Ω (see _floored): a noisy trace estimate or a saddle direction.
        table = getattr(spectrum, attr, None) or {}
        meta["negative_curvature"] = [k for k in chosen if float(table.get(k, 0.0)) < 0]
    return Sensitivity(
        omega=omega,
        method=method,
        bits=cand,
        params={k: int(m.weight.numel()) for k, m in chosen.items()},
        granularity=granularity,
        group_size=group_size,
        act=act,
        meta=meta,
    )


# --------------------------------------------------------------------------------------------------
# Built-in methods


def _spectrum_value(req: SensitivityRequest, attr: str, fqn: str, method: str) -> float:
    spec = req.spectrum
    if spec is None:
        raise ConfigError(
            f"method {method!r} needs a Hessian spectrum: pass spectrum=analyze(...) or "
            "data=[(inputs, targets), ...] to compute one"
        )
    table = getattr(spec, attr, None) or {}
    if fqn not in table:
        raise ConfigError(
            f"the spectrum has no {attr} for layer {fqn!r}; re-run the analysis on this model"
            + (" with top-eigenvalues per layer" if attr == "layer_top_eigenvalue" else "")
        )
    return float(table[fqn])


def _floored(curvature: dict[str, float]) -> dict[str, float]:
    """Non-positive curvatures (per parameter) replaced by the least positive one of the others.

    A zero Ω at every width would leave the integer program indifferent, and it then gives the
    layer the fewest bits; a noisy or saddle estimate is no evidence the layer is insensitive."""
    positive = [v for v in curvature.values() if v > 0]
    floor = min(positive) if positive else 1e-12
    return {k: v if v > 0 else floor for k, v in curvature.items()}


@register_sensitivity("trace")
def _trace(req: SensitivityRequest) -> dict[str, dict[int, float]]:
    """HAWQ-V2: ½ Tr(H_i)/n_i · ‖Q_b(W_i) − W_i‖². A non-positive trace estimate is replaced by
    its standard error where the spectrum has one, else by the least positive Tr/n of the others."""
    stderr = getattr(req.spectrum, "layer_trace_stderr", None) or {}
    params = getattr(req.spectrum, "layer_params", None) or {}
    avg = {}
    for fqn, m in req.layers.items():
        tr = _spectrum_value(req, "layer_trace", fqn, "trace")
        if tr <= 0:
            tr = float(stderr.get(fqn, 0.0))
        avg[fqn] = tr / int(params.get(fqn, m.weight.numel()))
    avg = _floored(avg)
    return {f: {b: 0.5 * avg[f] * req.perturbation(f, b) for b in req.bits} for f in req.layers}


@register_sensitivity("eigen")
def _eigen(req: SensitivityRequest) -> dict[str, dict[int, float]]:
    """HAWQ-V1: ½ λ_max(H_i) · ‖Q_b(W_i) − W_i‖²; a non-positive top eigenvalue is replaced by the
    least positive one of the others."""
    lam = _floored({f: _spectrum_value(req, "layer_top_eigenvalue", f, "eigen") for f in req.layers})
    return {f: {b: 0.5 * lam[f] * req.perturbation(f, b) for b in req.bits} for f in req.layers}


@register_sensitivity("measured")
def _measured(req: SensitivityRequest) -> dict[str, dict[int, float]]:
    """Loss with layer i's weight replaced by Q_b(W_i), minus the float loss, over ``req.data``."""
    batches = _require_data(req.data, "method='measured'")
    net = _eval_copy(req.model)
    loss_fn = req.loss_fn or _cross_entropy
    base = mean_loss(net, batches, loss_fn)
    out: dict[str, dict[int, float]] = {}
    for fqn in req.layers:
        row = {}
        for b in req.bits:
            if b >= 16:
                row[b] = 0.0
                continue
            overrides = {f"{fqn}.weight": req.quantized_weight(fqn, b)}
            row[b] = mean_loss(net, batches, loss_fn, overrides) - base
        out[fqn] = row
    return out


# --------------------------------------------------------------------------------------------------
# Helpers


def _take(data: Iterable[Any], max_batches: int | None) -> list[Any]:
    return list(itertools.islice(data, max_batches))


def _most_common(items: list[tuple]) -> tuple | None:
    """The most frequent item (the first seen among ties), or None for no items."""
    return collections.Counter(items).most_common(1)[0][0] if items else None


# --------------------------------------------------------------------------------------------------
# Bits and sparsity together


def magnitude_mask(weight: torch.Tensor, ratio: float) -> torch.Tensor:
    """The keep-mask of one layer's weight with its ``ratio`` smallest magnitudes zeroed.

    Example:
        >>> magnitude_mask(torch.tensor([3.0, -1.0, 2.0, 0.5]), 0.5).tolist()
        [True, False, True, False]
    """
    k = int(round(ratio * weight.numel()))
    mask = torch.ones(weight.numel(), dtype=torch.bool)
    if k > 0:
        mask[weight.detach().abs().flatten().argsort()[:k]] = False
    return mask.reshape(weight.shape)


def joint_sensitivity(
    model: nn.Module,
    traces: Mapping[str, float],
    bits: Sequence[int],
    ratios: Sequence[float],
    *,
    layers: Sequence[str] | None = None,
    granularity: str = "channel",
) -> dict[str, dict[tuple[int, float], float]]:
    """Ω of every (bit width, prune ratio) pair per layer: ½·Tr(H_i)/n_i·‖Q_b(M_r⊙W_i) − W_i‖².

    The same second-order estimate as HAWQ-V2's ``"trace"`` sensitivity, with the perturbation of
    magnitude pruning at ratio r (per layer) followed by quantization of what is left, measured
    on the weight itself (so the two interact: zeroed weights carry no quantization error, and a
    pruned layer's range shrinks nothing). Ratio 0 gives the quantization sensitivity; 32 bits
    the pruning sensitivity ½·Tr(H_i)/n_i·‖ΔW_i‖².

    Args:
        model: the float model (not modified).
        traces: {FQN: Tr(H_i)} per layer (``Spectrum.layer_trace``).
        bits: candidate widths (≥ 16: float).
        ratios: candidate prune ratios in [0, 1).
        layers: FQNs to score (default: every layer with a trace).
        granularity: weight quantizer granularity ("channel" or "tensor").

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 2))
        >>> om = joint_sensitivity(net, {"0": 8.0}, (8, 32), (0.0, 0.5))
        >>> dropped = net[0].weight.detach().abs().flatten().sort().values[:4]
        >>> om["0"][32, 0.0], round(om["0"][32, 0.5] / float(dropped.pow(2).sum()), 4)
        (0.0, 0.5)
    """
    if any(not 0 <= r < 1 for r in ratios):
        raise ConfigError(f"prune ratios must lie in [0, 1), got {list(ratios)}")
    named = quantizable_layers(model)
    names = list(traces) if layers is None else list(layers)
    out: dict[str, dict[tuple[int, float], float]] = {}
    for fqn in names:
        if fqn not in named or fqn not in traces:
            raise ConfigError(f"layer {fqn!r} has no trace or is not a quantizable layer")
        layer = named[fqn]
        w = layer.weight.detach()
        avg = max(float(traces[fqn]), 0.0) / w.numel()
        row = {}
        for r in ratios:
            kept = w * magnitude_mask(w, r)
            for b in bits:
                wq = kept
                if b < 16:
                    wq, _ = quantize_weight(kept, b, granularity=granularity,
                                            channel_axis=weight_channel_axis(layer))  # fmt: skip
                    wq = wq * (kept != 0)
                row[int(b), float(r)] = 0.5 * avg * float((wq - w).double().pow(2).sum())
        out[fqn] = row
    return out
