"""Q-BERT for BERT-family encoders: group-wise weight quantization, per-layer and per-block Hessian
traces, and Hessian-driven mixed precision through the shared planner.

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
* :func:`analyze_encoder` runs the Hessian engine (:func:`squeezer.spectrum.analyze`) on the
  labels-free embedding task (loss ``½‖e − e_fp32‖²``, whose Hessian at the FP32 point is the
  Gauss–Newton matrix, :mod:`squeezer.text`); :func:`block_traces` sums the per-layer traces of each
  encoder block (Q-BERT ranks whole blocks).
* :func:`qbert_sensitivity` turns the traces into HAWQ-V2 scores Ω = ½ Tr(H_l)/n_l · ‖Q_b(W_l) −
  W_l‖² with each layer's *own* granularity, and :func:`mixed_precision_plan` hands them to the ILP
  planner (:func:`squeezer.plan.plan`), per layer or per block (all layers of an encoder block
  tied, as in Q-BERT; the embedding tables are planned one by one). :func:`encoder_plan` chains
  the three for a :class:`squeezer.data.Dataset` of sentences.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any, NamedTuple

import torch
from torch import nn

from .config import Budget, LayerQuant, Plan
from .errors import ConfigError, DataError, UnsupportedModelError
from .graph import quantizable_layers, weight_channel_axis

#: Candidate weight widths of the mixed-precision search.
#: Training sentences the encoder's Hessian averages over by default.
HESSIAN_SAMPLES = 64
MIXED_BITS = (2, 3, 4, 5, 6, 8)
#: Embedding tables added to every token whatever the text; :func:`qbert_plan` keeps them at 8 bits
#: (they are tiny, and their error is systematic: it shifts every token the same way).
POSITION_TABLES = ("position_embeddings", "token_type_embeddings")

_LAYER = re.compile(r"(?:^|\.)encoder\.layer\.(\d+)\.")


def bert_of(model: nn.Module) -> nn.Module:
    """The BERT-style module inside ``model`` (``model`` itself, or ``model.model`` of a
    :class:`squeezer.hf.SentenceEncoder`): the one with ``embeddings`` and ``encoder.layer``.

    Example:
        >>> bert_of(load_hf("hf:minilm").model).config.num_hidden_layers  # doctest: +SKIP
        6
    """
    for m in (model, getattr(model, "model", None)):
        if (
            m is not None
            and hasattr(m, "embeddings")
            and hasattr(getattr(m, "encoder", None), "layer")
        ):
            return m
    raise UnsupportedModelError(
        f"{type(model).__name__} is not a BERT-style encoder (no .embeddings and .encoder.layer); "
        "load one with squeezer.hf.load_hf('hf:DIR')"
    )


def layer_roles(model: nn.Module) -> dict[str, str]:
    """``{FQN: role}`` of every quantizable layer: ``word_embeddings``, ``position_embeddings``,
    ``token_type_embeddings``, ``query``, ``key``, ``value``, ``attention_output``,
    ``intermediate``, ``output`` (or ``other``).

    Example:
        >>> layer_roles(encoder)["model.encoder.layer.0.attention.output.dense"]  # doctest: +SKIP
        'attention_output'
    """
    bert_of(model)
    roles = {}
    for fqn in quantizable_layers(model):
        last = fqn.rsplit(".", 1)[-1]
        if last.endswith("_embeddings"):
            roles[fqn] = last
        elif last in ("query", "key", "value"):
            roles[fqn] = last
        elif fqn.endswith("attention.output.dense"):
            roles[fqn] = "attention_output"
        elif fqn.endswith("intermediate.dense"):
            roles[fqn] = "intermediate"
        elif fqn.endswith("output.dense"):
            roles[fqn] = "output"
        else:
            roles[fqn] = "other"
    return roles


def blocks(model: nn.Module) -> dict[str, str]:
    """``{FQN: block}`` of every quantizable layer: ``"embeddings"`` or ``"layer.<i>"`` (the i-th
    encoder block), ``"other"`` for anything else.

    Example:
        >>> blocks(encoder)["model.encoder.layer.3.intermediate.dense"]  # doctest: +SKIP
        'layer.3'
    """
    roles = layer_roles(model)
    out = {}
    for fqn, role in roles.items():
        m = _LAYER.search(fqn)
        if m:
            out[fqn] = f"layer.{int(m.group(1))}"
        elif role.endswith("_embeddings"):
            out[fqn] = "embeddings"
        else:
            out[fqn] = "other"
    return out


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


# --------------------------------------------------------------------------------------------------
# Hessian traces on the embedding task


def token_batches(
    inputs: Mapping[str, torch.Tensor],
    targets: torch.Tensor | None = None,
    batch_size: int = 32,
) -> list[Any]:
    """Length-sorted batches of token inputs, each cut to its longest sentence.

    Padding tokens never change a BERT sentence embedding (attention masks them, mean pooling skips
    them), so cutting padding columns leaves every output the same while saving most of the
    compute on short sentences. Returns ``[inputs_dict, ...]``, or ``[(inputs, targets), ...]``
    when ``targets`` is given; :func:`restore_order` puts per-batch outputs back in input order.

    Example:
        >>> x = {"input_ids": torch.tensor([[1, 2, 0], [1, 0, 0]]),
        ...      "attention_mask": torch.tensor([[1, 1, 0], [1, 0, 0]])}
        >>> [b["input_ids"].shape[1] for b in token_batches(x, batch_size=1)]
        [2, 1]
    """
    if "attention_mask" not in inputs:
        raise DataError("token inputs need an 'attention_mask'; tokenize with squeezer.text")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be positive, got {batch_size}")
    lens = inputs["attention_mask"].sum(1)
    order = torch.argsort(lens, descending=True, stable=True)
    out: list[Any] = []
    for i in range(0, len(order), batch_size):
        idx = order[i : i + batch_size]
        width = max(1, int(lens[idx].max()))
        x = {k: v[idx, :width] for k, v in inputs.items()}
        out.append(x if targets is None else (x, targets[idx]))
    return out


def restore_order(
    outputs: Sequence[torch.Tensor], inputs: Mapping[str, torch.Tensor]
) -> torch.Tensor:
    """Concatenate per-batch outputs of :func:`token_batches` and return them in input order.

    Example:
        >>> x = {"attention_mask": torch.tensor([[1, 0], [1, 1]])}
        >>> restore_order([torch.tensor([[2.0]]), torch.tensor([[1.0]])], x).flatten().tolist()
        [1.0, 2.0]
    """
    lens = inputs["attention_mask"].sum(1)
    order = torch.argsort(lens, descending=True, stable=True)
    cat = torch.cat(list(outputs))
    out = torch.empty_like(cat)
    out[order] = cat
    return out


@torch.no_grad()
def embed_batches(model: nn.Module, inputs: Mapping[str, torch.Tensor], batch_size: int = 32):
    """``model``'s outputs over token ``inputs`` through :func:`token_batches` (eval mode, restored).

    Example:
        >>> e = embed_batches(encoder, tokenize(tokenizer, sentences))  # doctest: +SKIP
    """
    was = model.training
    model.eval()
    try:
        outs = [model(**b).float() for b in token_batches(inputs, batch_size=batch_size)]
    finally:
        model.train(was)
    return restore_order(outs, inputs)


def analyze_encoder(
    model: nn.Module,
    inputs: Mapping[str, torch.Tensor],
    *,
    batch_size: int = 16,
    max_probes: int = 32,
    min_probes: int = 8,
    rel_stderr: float | None = 0.1,
    top_k: int = 1,
    seed: int = 0,
    progress: bool = False,
    **kwargs: Any,
) -> Any:
    """Hessian analysis of a sentence encoder on the embedding task: per-layer traces (Hutchinson)
    of the Gauss–Newton Hessian of ``½‖e − e_fp32‖²`` over the quantizable layers' weights.

    The targets are the model's own FP32 embeddings of ``inputs`` (no labels). The analysis covers
    the weights of the quantizable layers only (biases and LayerNorms stay in float). Cost: one
    Hessian-vector product is ~3 forward passes over ``inputs``; keep ``inputs`` small (32–128
    sentences).

    Args:
        model: the float encoder (not modified).
        inputs: ``{"input_ids", "attention_mask"}`` from :func:`squeezer.text.tokenize`.
        batch_size: sentences per batch.
        max_probes, min_probes, rel_stderr: Hutchinson's stopping rule (see
            :func:`squeezer.spectrum.analyze`).
        top_k: top eigenvalues of the whole Hessian to compute (0 skips them).
        seed: seeds the probes.
        progress: progress bar on stderr.
        **kwargs: passed to :func:`squeezer.spectrum.analyze`.

    Returns:
        A :class:`squeezer.spectrum.Spectrum`.

    Example:
        >>> spec = analyze_encoder(encoder, tokenize(tok, sentences[:64]))  # doctest: +SKIP
        >>> block_traces(spec, encoder)["layer.0"] > 0                      # doctest: +SKIP
        True
    """
    from .spectrum import analyze
    from .text import EmbeddingTask

    targets = embed_batches(model, inputs, batch_size)
    data = token_batches(inputs, targets, batch_size)
    weights = {id(m.weight) for m in quantizable_layers(model).values()}
    params = [n for n, p in model.named_parameters() if id(p) in weights]
    kwargs.setdefault("per_layer_eig", False)
    kwargs.setdefault("probe_batch", 1)
    return analyze(
        model,
        EmbeddingTask().loss,
        data,
        params=params,
        top_k=top_k,
        max_probes=max_probes,
        min_probes=min_probes,
        rel_stderr=rel_stderr,
        seed=seed,
        progress=progress,
        **kwargs,
    )


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


# --------------------------------------------------------------------------------------------------
# Sensitivity and mixed precision with per-layer granularity


def qbert_sensitivity(
    model: nn.Module,
    spectrum: Any,
    template: Plan,
    *,
    bits: Sequence[int] = MIXED_BITS,
    method: str = "trace",
    inputs: Mapping[str, torch.Tensor] | None = None,
    batch_size: int = 32,
) -> Any:
    """HAWQ-V2 trace sensitivity Ω_l(b) = ½ Tr(H_l)/n_l · ‖Q_b(W_l) − W_l‖², with each layer's
    quantizer taken from ``template`` (its granularity, group size, symmetry and observer).

    :func:`squeezer.sensitivity.sensitivity` scores all layers with one granularity; this runs it
    once per distinct quantizer in ``template`` and merges the tables. ``method="measured"``
    instead measures the embedding loss with one layer quantized at a time on ``inputs`` (no
    Taylor expansion; one pass over ``inputs`` per layer and width).

    Args:
        model: the float encoder.
        spectrum: from :func:`analyze_encoder` (its ``layer_trace``); ignored by "measured".
        template: a plan naming the layers to score and how each is quantized (e.g.
            :func:`qbert_plan`); its bit widths are ignored.
        bits: candidate widths.
        method: ``"trace"``, ``"eigen"`` or ``"measured"`` (see :mod:`squeezer.sensitivity`).
        inputs: token inputs for ``"measured"`` (targets: the model's own embeddings).
        batch_size: sentences per batch for ``"measured"``.

    Returns:
        A :class:`squeezer.sensitivity.Sensitivity`; ``meta["granularity"]`` holds the per-layer
        ``[granularity, group_size]``.

    Example:
        >>> sens = qbert_sensitivity(encoder, spec, qbert_plan(encoder))  # doctest: +SKIP
    """
    from .sensitivity import Sensitivity, sensitivity

    data = loss_fn = None
    if method == "measured":
        if inputs is None:
            raise ConfigError("method='measured' needs inputs=<token inputs> to measure on")
        from .text import EmbeddingTask

        data = token_batches(inputs, embed_batches(model, inputs, batch_size), batch_size)
        loss_fn = EmbeddingTask().loss
    kinds: dict[tuple, list[str]] = {}
    for fqn, spec in template.layers.items():
        key = (spec.granularity, spec.group_size, spec.symmetric, spec.observer)
        kinds.setdefault(key, []).append(fqn)
    omega: dict[str, dict[int, float]] = {}
    for (gran, gs, sym, obs), names in kinds.items():
        s = sensitivity(
            model,
            spectrum,
            bits=bits,
            method=method,
            granularity=gran,
            group_size=gs,
            symmetric=sym,
            observer=obs,
            layers=names,
            data=data,
            loss_fn=loss_fn,
        )
        omega.update({k: dict(v) for k, v in s.omega.items()})
    layers = quantizable_layers(model)
    order = [k for k in layers if k in omega]
    main = max(kinds, key=lambda k: len(kinds[k]))
    return Sensitivity(
        omega={k: omega[k] for k in order},
        method=method,
        bits=tuple(sorted({int(b) for b in bits})),
        params={k: int(layers[k].weight.numel()) for k in order},
        granularity=main[0],
        group_size=main[1],
        meta={
            "granularity": {
                k: [template.layers[k].granularity, template.layers[k].group_size] for k in order
            },
            "probes": getattr(spectrum, "probes", None),
            "seed": getattr(spectrum, "seed", None),
        },
    )


def mixed_precision_plan(
    model: nn.Module,
    sens: Any,
    budget: Budget,
    template: Plan,
    *,
    per_block: bool = False,
    pin: Mapping[str, int] | None = None,
    bits: Sequence[int] | None = None,
) -> Plan:
    """The ILP plan (:func:`squeezer.plan.plan`) minimising ΣΩ under ``budget``, with every layer
    keeping ``template``'s quantizer (granularity, activations) at its chosen width.

    Args:
        model: the float encoder (for sizes).
        sens: from :func:`qbert_sensitivity`, on the same ``template``.
        budget: e.g. ``Budget(bits=4.5)`` (average weight bits over the planned layers) or a size.
        template: the per-layer quantizers (:func:`qbert_plan`).
        per_block: tie the widths of all layers of each encoder block (Q-BERT's granularity of
            mixed precision) instead of choosing per layer (HAWQ-V2/V3); the embedding tables are
            planned one by one either way.
        pin: ``{FQN: bits}`` fixed choices.
        bits: restrict the candidate widths.

    Returns:
        A :class:`~squeezer.config.Plan`; ``meta`` carries the planner's record.

    Example:
        >>> tpl = qbert_plan(encoder)                            # doctest: +SKIP
        >>> plan = mixed_precision_plan(encoder, sens, Budget(bits=4.5), tpl)  # doctest: +SKIP
    """
    from . import measure
    from .plan import Costs, plan

    layers = quantizable_layers(model)
    names = [k for k in sens.layers if k in template.layers]
    if len(names) != len(sens.layers):
        raise ConfigError("the sensitivity names layers the template does not; use one template")
    cand = sorted(sens.bits if bits is None else {int(b) for b in bits})
    axis = {k: weight_channel_axis(layers[k]) for k in names}
    size = {
        k: {
            b: measure.weight_bytes(layers[k].weight, replace(template.layers[k], bits=b), axis[k])
            for b in cand
        }
        for k in names
    }
    ref = Plan({k: replace(template.layers[k], bits=8) for k in names})
    fixed = measure.model_bytes(model, ref) - sum(
        measure.weight_bytes(layers[k].weight, ref.layers[k], axis[k]) for k in names
    )
    costs = Costs(
        params={k: int(layers[k].weight.numel()) for k in names},
        size_bytes=size,
        act_bits=None,
        fixed_bytes=float(fixed),
    )
    ties: list[tuple[str, ...]] = []
    if per_block:
        groups: dict[str, list[str]] = {}
        for k, b in blocks(model).items():
            if k in names and b.startswith("layer."):
                groups.setdefault(b, []).append(k)
        ties = [tuple(g) for g in groups.values() if len(g) > 1]
    p = plan(sens, budget, costs=costs, ties=ties, bits=cand, pin=pin)
    specs = {k: replace(template.layers[k], bits=p.layers[k].bits) for k in names}
    specs.update({k: v for k, v in template.layers.items() if k not in specs})
    meta = {**p.meta, "method": "qbert-hessian", "per_block": per_block}
    meta["name"] = f"mixed-{budget}" + ("-block" if per_block else "")
    return Plan(specs, meta=meta)


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


class EncoderPlan(NamedTuple):
    """What :func:`encoder_plan` returns: the plan and the analysis behind it."""

    plan: Plan
    spectrum: Any
    sensitivity: Any


def encoder_plan(
    model: nn.Module,
    data: Any,
    budget: Budget,
    *,
    act_bits: int | None = 8,
    group_size: int | None = 128,
    samples: int = HESSIAN_SAMPLES,
    probes: int = 32,
    per_block: bool = False,
    bits: Sequence[int] = MIXED_BITS,
    seed: int = 0,
    progress: bool = False,
) -> EncoderPlan:
    """Q-BERT end to end for a sentence encoder: Hessian traces on ``samples`` training sentences,
    per-layer Ω with the :func:`qbert_plan` template, and the ILP plan for ``budget``.

    What ``squeezer compress hf:... --budget bits=4.5`` needs for an encoder: the generic path
    analyses per-channel layers on padded batches, which is far slower for a transformer and
    ignores the group-wise template.

    Args:
        model: the float encoder.
        data: a :class:`squeezer.data.Dataset` of token inputs (``--data sentences``).
        budget: e.g. ``Budget(bits=4.5)``.
        act_bits: activation bits of every Linear.
        group_size: the template's weight groups (None: per channel).
        samples: training sentences the Hessian averages over.
        probes: Hutchinson probes.
        per_block: one width per encoder block (Q-BERT) instead of per layer.
        bits: candidate widths.
        seed: seeds the probes.
        progress: progress bar on stderr.

    Returns:
        ``(plan, spectrum, sensitivity)``.

    Example:
        >>> ep = encoder_plan(encoder, load_data("sentences", model=encoder, tokenizer=tok),
        ...                   Budget(bits=4.5))                  # doctest: +SKIP
        >>> ep.plan.meta["achieved"]["bits"] <= 4.5              # doctest: +SKIP
        True
    """
    x = data.x_train
    if not isinstance(x, Mapping) or "attention_mask" not in x:
        raise DataError(
            "encoder_plan needs token inputs (a text data set such as --data sentences)"
        )
    n = min(int(samples), int(x["attention_mask"].shape[0]))
    if n < 1:
        raise DataError("the training split holds no sentences to analyse")
    inputs = {k: v[:n] for k, v in x.items()}
    template = qbert_plan(model, 8, group_size=group_size, act_bits=act_bits)
    spectrum = analyze_encoder(
        model,
        inputs,
        max_probes=probes,
        min_probes=probes,
        rel_stderr=None,
        top_k=0,
        seed=seed,
        progress=progress,
    )
    sens = qbert_sensitivity(model, spectrum, template, bits=bits)
    plan = mixed_precision_plan(model, sens, budget, template, per_block=per_block)
    meta = {**plan.meta, "block_traces": block_traces(spectrum, model), "samples": n}
    return EncoderPlan(Plan(plan.layers, meta=meta), spectrum, sens)
