"""Q-BERT for BERT-family encoders: the layer template (group-wise weights), per-block Hessian
traces, and per-block ties, registered in the one compression chain as the ``"qbert"`` template
(and ``"qbert-channel"``: every Linear per output row, which ONNX Runtime runs in integer kernels).

Q-BERT (Shen et al., "Q-BERT: Hessian Based Ultra Low Precision Quantization of BERT",
arXiv:1909.05840) makes two points. (1) One range per weight matrix is too coarse for BERT; giving
each *group* of weights its own range recovers most of the loss (the paper groups the rows of the
attention matrices by head). (2) Layers differ in Hessian curvature, so bits should go where the
curvature is. Here:

* :func:`qbert_plan` builds the per-layer settings for an encoder: every ``Linear`` with groups of
  ``group_size`` consecutive entries of each output row (so each group lies inside one input head
  when ``group_size`` is a multiple of the head size: for the attention output projection these are
  exactly Q-BERT's "per input head" groups), or per output row (``group_size=None``); word
  embeddings quantized in groups along each token's row; the tiny position and token-type tables at
  8 bits. Measured on all-MiniLM-L6-v2 (``docs/benchmarks.md``): Q-BERT's per-head *row* groups are
  coarser than per-row (per-channel) ranges and lose to them, while groups of 128/64/32 along the
  input dimension beat per-channel at 4 bits, so those are what this module uses.
* The Hessian side is the shared engine: the pipeline analyses the labels-free embedding task
  (loss ``½‖e − e_fp32‖²``, whose Hessian at the FP32 point is the Gauss–Newton matrix,
  :mod:`squeezer.text`) with this template's :class:`~squeezer.templates.AnalysisSettings`, scores
  HAWQ-V2's Ω with each layer's own granularity (``sensitivity(..., template=qbert_plan(...))``)
  and plans with the same ILP as every other model. :func:`block_traces` sums the per-layer traces
  of each encoder block (Q-BERT ranks whole blocks) and :func:`block_ties` ties the widths of each
  block's layers, Q-BERT's granularity of mixed precision (the embedding tables stay separate).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from .config import LayerQuant, Plan
from .encoders import POSITION_TABLES, bert_of, blocks, is_bert_like, layer_roles
from .errors import ConfigError
from .graph import quantizable_layers
from .templates import AnalysisSettings, LayerTemplate, register_template

__all__ = [
    "MIXED_BITS", "POSITION_TABLES", "bert_of", "block_ties", "block_traces", "blocks",
    "describe_bits", "layer_roles", "qbert_plan",
]  # fmt: skip

#: Candidate weight widths of the mixed-precision search.
MIXED_BITS = (2, 3, 4, 5, 6, 8)
#: Training sentences the encoder's Hessian averages over by default.
HESSIAN_SAMPLES = 64


def qbert_plan(
    model: nn.Module,
    bits: int | Mapping[str, int] = 8,
    *,
    group_size: int | None = 128,
    act_bits: int | None = 8,
    embedding_group_size: int | None = -1,
    small_table_bits: int = 8,
    act_percentile: float = 99.999,
) -> Plan:
    """Per-layer quantization settings for a BERT-family encoder (the Q-BERT template).

    Args:
        model: the float encoder (a :class:`squeezer.hf.SentenceEncoder` or a ``BertModel``).
        bits: weight bits of every layer, or ``{FQN: bits}`` (e.g. from a mixed-precision plan);
            a mapping must name every quantizable layer.
        group_size: ``Linear`` weights in groups of this many consecutive entries of each output
            row (falls back to per-row if it does not divide the row); ``None``: one range per
            output row (per channel), which the integer-only encoder needs.
        act_bits: bits of every ``Linear``'s input activations (``None``: float activations).
        embedding_group_size: the word-embedding table's groups along each token row; ``-1``
            (default) follows ``group_size``, ``None`` is one range per row.
        small_table_bits: bits of the position and token-type tables (:data:`POSITION_TABLES`),
            unless ``bits`` is a mapping.
        act_percentile: percentile clipping of the activation ranges (two-sided). 99.999 rather
            than the library's 99.99: on MiniLM W8A8 it gives cosine 0.9933 against 0.9919.

    Returns:
        A :class:`~squeezer.config.Plan` with ``meta["method"] == "qbert"``.

    Example:
        >>> plan = qbert_plan(encoder, 4, group_size=128)        # doctest: +SKIP
        >>> plan.layers["model.encoder.layer.0.attention.self.query"].group_size  # doctest: +SKIP
        128
    """
    layers = quantizable_layers(model)
    roles = layer_roles(model)  # refuses models that are not BERT-style encoders
    if isinstance(bits, Mapping):
        missing = [k for k in layers if k not in bits]
        unknown = [k for k in bits if k not in layers]
        if missing or unknown:
            raise ConfigError(
                f"bits must name every quantizable layer: missing {missing[:3]}, unknown "
                f"{unknown[:3]}; see squeezer.quantizable_layers(model)"
            )
    if group_size is not None and group_size < 1:
        raise ConfigError(f"group_size must be positive or None, got {group_size}")
    emb_gs = group_size if embedding_group_size == -1 else embedding_group_size
    specs: dict[str, LayerQuant] = {}
    for fqn, layer in layers.items():
        w = layer.weight
        is_emb = isinstance(layer, nn.Embedding)
        b = bits[fqn] if isinstance(bits, Mapping) else bits
        if roles[fqn] in POSITION_TABLES and not isinstance(bits, Mapping):
            b = max(b, small_table_bits)
        gs = emb_gs if is_emb else group_size
        row = w.shape[1] if w.dim() > 1 else w.numel()
        if gs is not None and row % gs == 0 and gs < row:
            gran: dict[str, Any] = {"granularity": "group", "group_size": gs}
        else:
            gran = {"granularity": "channel", "group_size": None}
        act = None if is_emb or not isinstance(layer, nn.Linear) else act_bits
        specs[fqn] = LayerQuant(
            bits=int(b),
            act_bits=act,
            act_percentile=act_percentile,
            **gran,
        )
    name = f"qbert-W{bits if not isinstance(bits, Mapping) else 'mixed'}"
    meta = {
        "method": "qbert",
        "name": name + (f"A{act_bits}" if act_bits else ""),
        "group_size": group_size,
        "act_bits": act_bits,
    }
    return Plan(specs, meta=meta)


def block_traces(spectrum: Any, model: nn.Module) -> dict[str, float]:
    """``{block: Tr(H_bb)}``: the trace of each encoder block's diagonal Hessian block, the sum of
    its layers' traces (Q-BERT compares blocks).

    Example:
        >>> block_traces(spec, encoder)                          # doctest: +SKIP
        {'embeddings': 0.41, 'layer.0': 2.3, ...}
    """
    out: dict[str, float] = {}
    for fqn, b in blocks(model).items():
        if fqn in spectrum.layer_trace:
            out[b] = out.get(b, 0.0) + float(spectrum.layer_trace[fqn])
    return out


def describe_bits(plan: Plan, model: nn.Module) -> dict[str, dict[str, int]]:
    """``{block: {role: bits}}``: a plan's widths laid out by encoder block, for reports.

    Example:
        >>> describe_bits(plan, encoder)["layer.0"]["query"]     # doctest: +SKIP
        5
    """
    roles, blk = layer_roles(model), blocks(model)
    out: dict[str, dict[str, int]] = {}
    for fqn, spec in plan.layers.items():
        out.setdefault(blk.get(fqn, "other"), {})[roles.get(fqn, fqn)] = spec.bits
    return out


def block_ties(model: nn.Module) -> tuple[tuple[str, ...], ...]:
    """The layers of each encoder block as one tie group: planned with ties, a block gets one
    width (Q-BERT's granularity); the embedding tables are planned one by one.

    Example:
        >>> block_ties(encoder)[0][:2]                            # doctest: +SKIP
        ('model.encoder.layer.0.attention.self.query', 'model.encoder.layer.0.attention.self.key')
    """
    groups: dict[str, list[str]] = {}
    for k, b in blocks(model).items():
        if b.startswith("layer."):
            groups.setdefault(b, []).append(k)
    return tuple(tuple(g) for g in groups.values() if len(g) > 1)


# 32 Hutchinson probes of the Gauss–Newton Hessian over the quantizable weights only: one product
# costs ~3 forward passes, so the fixed count keeps MiniLM's analysis ~20 minutes.
ANALYSIS = AnalysisSettings(
    samples=HESSIAN_SAMPLES, batch_size=16, max_probes=32, min_probes=32,
    rel_stderr=None, top_k=0, weights_only=True, probe_batch=1,
)  # fmt: skip

register_template(
    LayerTemplate(
        name="qbert",
        label="Q-BERT mixed",
        matches=is_bert_like,
        mixed=lambda model, act_bits: qbert_plan(model, 8, group_size=128, act_bits=act_bits),
        uniform=lambda model, bits, act_bits: qbert_plan(
            model, bits, group_size=None if bits >= 8 else 128, act_bits=act_bits
        ),
        bits=MIXED_BITS,
        analysis=ANALYSIS,
        ties=lambda model: (),
    )
)

# The same with every Linear (and the word embeddings) per output row: ONNX Runtime runs those as
# integer kernels (MatMulIntegerToFloat), while groups are exported as DequantizeLinear + a float
# MatMul, so only this one gives a latency budget on ONNX Runtime int8 layers to trade. Chosen by
# name (``--template qbert-channel``); groups stay the default for their accuracy at <= 4 bits.
register_template(
    LayerTemplate(
        name="qbert-channel",
        label="Q-BERT mixed, per channel",
        matches=is_bert_like,
        mixed=lambda model, act_bits: qbert_plan(model, 8, group_size=None, act_bits=act_bits),
        uniform=lambda model, bits, act_bits: qbert_plan(
            model, bits, group_size=None, act_bits=act_bits
        ),
        bits=MIXED_BITS,
        analysis=ANALYSIS,
        ties=lambda model: (),
        auto=False,
    )
)
