"""Structured pruning of BERT-style encoders: whole attention heads and FFN neurons, removed for real.

A head is ``d`` rows of the query, key and value projections and the same ``d`` input columns of the
attention output projection; an FFN neuron is one row of ``intermediate.dense`` and one input column
of ``output.dense``. Removing them leaves a plain ``BertModel`` whose Linear layers are smaller, so
it is faster on any dense runtime, saves and reloads (:func:`rebuild` makes the same shapes before
the weights load), quantizes and exports like the unpruned model.

Importance (which heads and neurons go):

- ``"l1"`` / ``"l2"``: magnitude of the weights a head or neuron owns, normalised per layer as
  Michel et al. normalise their head scores ("Are Sixteen Heads Really Better than One?",
  arXiv:1905.10650), then ranked globally.
- ``"hessian"``: second order. Each head and neuron gets a gate ``ξ = 1`` on its output (Michel
  et al.'s head mask); the loss increase of closing it is ``½·G_ξξ``, the Gauss–Newton diagonal of
  the distortion ``½‖e(ξ) − e(1)‖²`` of the model's outputs ``e``. Random-sign probes ``v`` give it
  with one backward pass each: ``E[(vᵀ ∂e/∂ξ)²] = ‖∂e/∂ξ‖²``. Unlike Michel et al.'s first-order
  ``|∂L/∂ξ|``, it needs no labels and is not zero at the teacher (whose distillation loss has zero
  gradient). The scores are loss units, comparable across layers and between heads and neurons,
  so one global ranking by loss per MAC removes what costs least for what it saves.

Example:
    >>> from squeezer.prune import PruneSpec, prune                    # doctest: +SKIP
    >>> p = prune(encoder, PruneSpec("heads", ratio=0.4, importance="hessian"), data)  # doctest: +SKIP
    >>> p.stats["macs_after"] / p.stats["macs_before"]                  # doctest: +SKIP
    0.6
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..data import Dataset, forward
from ..encoders import bert_of
from ..errors import ConfigError, UnsupportedModelError
from ..graph import copy_model
from .base import Pruned, PruneSpec

#: Sequence length the MACs of attention (scores and context) are counted at.
MACS_SEQ = 128


@dataclass(frozen=True)
class Block:
    """The prunable modules of one encoder block, and their FQNs' common prefix."""

    prefix: str
    attention: nn.Module  # attention.self: query, key, value, num_attention_heads
    attn_out: nn.Linear  # attention.output.dense
    ffn_in: nn.Linear  # intermediate.dense
    ffn_out: nn.Linear  # output.dense

    @property
    def heads(self) -> int:
        return int(self.attention.num_attention_heads)

    @property
    def head_dim(self) -> int:
        return int(self.attention.attention_head_size)

    @property
    def neurons(self) -> int:
        return int(self.ffn_in.out_features)


def encoder_blocks(model: nn.Module) -> list[Block]:
    """The encoder blocks of ``model`` (a BERT-style encoder or a ``SentenceEncoder``), in order.

    Example:
        >>> [b.heads for b in encoder_blocks(encoder)]           # doctest: +SKIP
        [12, 12, 12, 12, 12, 12]
    """
    bert = bert_of(model)
    prefix = next(name for name, m in model.named_modules() if m is bert)
    prefix = f"{prefix}." if prefix else ""
    out = []
    for i, layer in enumerate(bert.encoder.layer):
        try:
            att = layer.attention.self
            block = Block(f"{prefix}encoder.layer.{i}", att, layer.attention.output.dense,
                          layer.intermediate.dense, layer.output.dense)  # fmt: skip
            _ = (att.query, att.key, att.value, att.num_attention_heads, att.attention_head_size)
        except AttributeError as exc:
            raise UnsupportedModelError(
                f"encoder block {i} of {type(bert).__name__} is not BERT-shaped "
                "(attention.self.query/key/value, intermediate.dense, output.dense); head pruning "
                "supports BERT and RoBERTa-style encoders"
            ) from exc
        out.append(block)
    return out


def _head_rows(block: Block, heads: torch.Tensor | list[int]) -> torch.Tensor:
    d = block.head_dim
    idx = torch.as_tensor(list(heads), dtype=torch.long)
    return (idx[:, None] * d + torch.arange(d)[None]).flatten()


# --------------------------------------------------------------------------------------------------
# Gates: each head's and neuron's output times a scalar (1 leaves the model as it is).


@contextlib.contextmanager
def gated(
    model: nn.Module, head_gates: list[torch.Tensor], neuron_gates: list[torch.Tensor]
) -> Iterator[nn.Module]:
    """Within the block, ``model``'s head outputs (the context vectors entering the attention output
    projection) and FFN activations are multiplied by the gates, one tensor per block; the hooks
    are removed on exit, whatever happens.

    Example:
        >>> g = [torch.ones(b.heads) for b in encoder_blocks(enc)]  # doctest: +SKIP
        >>> with gated(enc, g, [torch.ones(b.neurons) for b in encoder_blocks(enc)]):  # doctest: +SKIP
        ...     out = enc(**batch)
    """
    handles = []
    try:
        for block, gh, gn in zip(encoder_blocks(model), head_gates, neuron_gates, strict=True):
            if gh.shape != (block.heads,) or gn.shape != (block.neurons,):
                raise ConfigError(
                    f"{block.prefix}: gates of shape {tuple(gh.shape)} and {tuple(gn.shape)} do not "
                    f"fit its {block.heads} heads and {block.neurons} neurons"
                )
            hd = gh.repeat_interleave(block.head_dim)
            handles.append(block.attn_out.register_forward_pre_hook(_times(hd)))
            handles.append(block.ffn_out.register_forward_pre_hook(_times(gn)))
        yield model
    finally:
        for h in handles:
            h.remove()


def _times(gate: torch.Tensor):
    def hook(module: nn.Module, args: tuple) -> tuple:
        return (args[0] * gate.to(args[0].dtype), *args[1:])

    return hook


# --------------------------------------------------------------------------------------------------
# Importance.


@dataclass
class Importance:
    """Per block, a score per head and per neuron (higher = more important)."""

    heads: list[torch.Tensor]
    neurons: list[torch.Tensor]


def magnitude_importance(model: nn.Module, p: int = 1) -> Importance:
    """Weight-norm scores (``p`` = 1 or 2) of every head and neuron, each block's scores divided by
    their ℓ2 norm so that one global ranking compares layers fairly (Michel et al.).

    Example:
        >>> imp = magnitude_importance(encoder)                  # doctest: +SKIP
        >>> imp.heads[0].shape                                   # doctest: +SKIP
        torch.Size([12])
    """
    heads, neurons = [], []
    with torch.no_grad():
        for b in encoder_blocks(model):
            per_head = (
                sum(
                    lin.weight.view(b.heads, b.head_dim, -1).norm(p=p, dim=(1, 2)) ** p
                    for lin in (b.attention.query, b.attention.key, b.attention.value)
                )
                + b.attn_out.weight.view(-1, b.heads, b.head_dim).norm(p=p, dim=(0, 2)) ** p
            )
            per_neuron = b.ffn_in.weight.norm(p=p, dim=1) * b.ffn_out.weight.norm(p=p, dim=0)
            heads.append(_unit(per_head.double()))
            neurons.append(_unit(per_neuron.double()))
    return Importance(heads, neurons)


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm().clamp(min=1e-30)


def hessian_importance(
    model: nn.Module, batches: Any, *, probes: int = 4, seed: int = 0
) -> Importance:
    """``½·G_ξξ`` for every head and neuron gate ``ξ``: the Gauss–Newton estimate of the mean loss
    increase ``½‖Δe‖²`` per sample when that head or neuron alone is removed.

    ``batches`` yields inputs or ``(inputs, targets)`` (the targets are not used). Each batch costs
    one forward and ``probes`` backward passes; the probes are seeded Rademacher vectors.

    Example:
        >>> imp = hessian_importance(encoder, data.analysis_batches(128), probes=4)  # doctest: +SKIP
    """
    if probes < 1:
        raise ConfigError(f"probes must be at least 1, got {probes}")
    net = copy_model(model).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    blocks = encoder_blocks(net)
    gh = [torch.ones(b.heads, dtype=torch.float64, requires_grad=True) for b in blocks]
    gn = [torch.ones(b.neurons, dtype=torch.float64, requires_grad=True) for b in blocks]
    acc = [torch.zeros_like(g) for g in gh + gn]
    gen = torch.Generator().manual_seed(seed)
    n = 0
    with gated(net, gh, gn):
        for batch in batches:
            x = batch[0] if isinstance(batch, tuple | list) else batch
            e = forward(net, x)
            n += int(e.shape[0])
            for k in range(probes):
                v = torch.randint(0, 2, e.shape, generator=gen).to(e.dtype) * 2 - 1
                grads = torch.autograd.grad((e * v).sum(), gh + gn, retain_graph=k < probes - 1)
                for a, g in zip(acc, grads, strict=True):
                    a += g.detach() ** 2
    if n == 0:
        raise ConfigError("hessian importance needs data: the batches were empty")
    scores = [0.5 * a / (probes * n) for a in acc]
    return Importance(scores[: len(blocks)], scores[len(blocks) :])


def importance_of(model: nn.Module, spec: PruneSpec, data: Dataset | None) -> Importance:
    """The scores ``spec.importance`` asks for (``options``: ``samples`` (256), ``probes`` (4))."""
    if spec.importance in ("l1", "l2"):
        return magnitude_importance(model, p=1 if spec.importance == "l1" else 2)
    if data is None:
        raise ConfigError(
            "hessian head importance needs data (--data); or use importance l1 or l2 (magnitude)"
        )
    samples = int(spec.options.get("samples", 256))
    batches = data.analysis_batches(samples, batch_size=32, seed=spec.seed)
    return hessian_importance(
        model, batches, probes=int(spec.options.get("probes", 4)), seed=spec.seed
    )


# --------------------------------------------------------------------------------------------------
# Costs and selection.


def block_macs(block: Block, heads: int, neurons: int, seq: int = MACS_SEQ) -> int:
    """Multiply-accumulates per token of one block with ``heads`` heads and ``neurons`` neurons:
    q, k, v and output projections, attention scores and context at ``seq`` tokens, and the FFN."""
    hidden = int(block.attention.query.in_features)
    d = block.head_dim
    return heads * d * (4 * hidden + 2 * seq) + 2 * hidden * neurons


def encoder_macs(model: nn.Module, seq: int = MACS_SEQ) -> int:
    """MACs per sample of ``model``'s encoder blocks at ``seq`` tokens (embedding lookups are free).

    Example:
        >>> encoder_macs(load_hf("hf:minilm").model)             # doctest: +SKIP
        1438646272
    """
    return seq * sum(block_macs(b, b.heads, b.neurons, seq) for b in encoder_blocks(model))


@dataclass(frozen=True)
class Selection:
    """Per block (by FQN prefix), the indices of the heads and neurons kept."""

    heads: dict[str, list[int]]
    neurons: dict[str, list[int]]

    def to_dict(self) -> dict[str, Any]:
        return {"heads": self.heads, "neurons": self.neurons}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Selection:
        return cls({k: list(v) for k, v in d["heads"].items()},
                   {k: list(v) for k, v in d["neurons"].items()})  # fmt: skip


def select(
    model: nn.Module,
    imp: Importance,
    *,
    heads: float | None = None,
    neurons: float | None = None,
    macs: float | None = None,
    min_heads: int = 1,
    min_neurons: int = 1,
    seq: int = MACS_SEQ,
) -> Selection:
    """Which heads and neurons to keep.

    Either ``heads`` and ``neurons`` (the fractions of all heads and of all neurons removed, each
    ranked globally by score), or ``macs`` (the fraction of encoder MACs removed: heads and neurons
    ranked together by score per MAC saved, cheapest loss first). Every block keeps at least
    ``min_heads`` heads and ``min_neurons`` neurons.

    Example:
        >>> sel = select(enc, magnitude_importance(enc), heads=0.5, neurons=0.5)  # doctest: +SKIP
    """
    blocks = encoder_blocks(model)
    units = []  # (score, cost, kind, block index, unit index)
    for i, b in enumerate(blocks):
        head_cost = b.head_dim * (4 * int(b.attention.query.in_features) + 2 * seq)
        neuron_cost = 2 * int(b.attention.query.in_features)
        units += [(float(s), head_cost, "h", i, j) for j, s in enumerate(imp.heads[i])]
        units += [(float(s), neuron_cost, "n", i, j) for j, s in enumerate(imp.neurons[i])]
    keep_h = [set(range(b.heads)) for b in blocks]
    keep_n = [set(range(b.neurons)) for b in blocks]

    def remove(order: list, budget: float, count_cost: bool) -> None:
        done = 0.0
        for _, cost, kind, i, j in order:
            if done >= budget:
                break
            keep, floor = (keep_h, min_heads) if kind == "h" else (keep_n, min_neurons)
            if len(keep[i]) <= floor:
                continue
            # With a MACs target, skip a unit that would overshoot it by more than half its cost.
            if count_cost and done + cost > budget + cost / 2:
                continue
            keep[i].discard(j)
            done += cost if count_cost else 1

    if macs is not None:
        if heads is not None or neurons is not None:
            raise ConfigError("give either macs or heads/neurons fractions, not both")
        _fraction(macs, "macs")
        total = sum(block_macs(b, b.heads, b.neurons, seq) for b in blocks)
        remove(sorted(units, key=lambda u: (u[0] / u[1], u[2], u[3], u[4])), macs * total, True)
    else:
        for kind, frac in (("h", heads or 0.0), ("n", neurons or 0.0)):
            _fraction(frac, "heads" if kind == "h" else "neurons")
            mine = sorted((u for u in units if u[2] == kind), key=lambda u: (u[0], u[3], u[4]))
            remove(mine, round(frac * len(mine)), False)
    return Selection({b.prefix: sorted(k) for b, k in zip(blocks, keep_h, strict=True)},
                     {b.prefix: sorted(k) for b, k in zip(blocks, keep_n, strict=True)})  # fmt: skip


def _fraction(x: float, what: str) -> None:
    if not (isinstance(x, int | float) and 0 <= x < 1):
        raise ConfigError(f"the fraction of {what} removed must be in [0, 1), got {x!r}")


# --------------------------------------------------------------------------------------------------
# Physical removal and rebuilding.


def _linear(old: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None):
    w = old.weight.detach()
    w = w if rows is None else w[rows]
    w = w if cols is None else w[:, cols]
    new = nn.Linear(w.shape[1], w.shape[0], bias=old.bias is not None,
                    device=w.device, dtype=w.dtype)  # fmt: skip
    with torch.no_grad():
        new.weight.copy_(w)
        if old.bias is not None:
            new.bias.copy_(old.bias.detach() if rows is None else old.bias.detach()[rows])
    return new


def remove_units(model: nn.Module, selection: Selection) -> nn.Module:
    """A copy of ``model`` keeping only the selected heads and neurons (smaller Linear layers).

    Example:
        >>> small = remove_units(enc, select(enc, magnitude_importance(enc), heads=0.5))  # doctest: +SKIP
    """
    net = copy_model(model)
    for b in encoder_blocks(net):
        kh = selection.heads.get(b.prefix, list(range(b.heads)))
        kn = selection.neurons.get(b.prefix, list(range(b.neurons)))
        if not kh or not kn or max(kh) >= b.heads or max(kn) >= b.neurons or min(kh + kn) < 0:
            raise ConfigError(
                f"{b.prefix}: the selection keeps heads {kh} of {b.heads} and {len(kn)} neurons "
                f"of {b.neurons}; keep at least one of each, with indices in range"
            )
        rows = _head_rows(b, kh)
        att = b.attention
        att.query, att.key, att.value = (
            _linear(m, rows=rows) for m in (att.query, att.key, att.value)
        )
        att.num_attention_heads = len(kh)
        att.all_head_size = len(kh) * b.head_dim
        layer = net.get_submodule(b.prefix)
        layer.attention.output.dense = _linear(b.attn_out, cols=rows)
        idx = torch.as_tensor(kn, dtype=torch.long)
        layer.intermediate.dense = _linear(b.ffn_in, rows=idx)
        layer.output.dense = _linear(b.ffn_out, cols=idx)
    return net


def architecture(model: nn.Module) -> dict[str, dict[str, int]]:
    """Per changed module FQN, the sizes that differ from the model's config (what :func:`rebuild`
    needs): ``{"...attention.self": {"num_attention_heads": 8}, "...intermediate.dense":
    {"out_features": 700}, ...}``."""
    cfg = bert_of(model).config
    out: dict[str, dict[str, int]] = {}
    for b in encoder_blocks(model):
        if b.heads != cfg.num_attention_heads:
            out[f"{b.prefix}.attention.self"] = {"num_attention_heads": b.heads}
        if b.neurons != cfg.intermediate_size:
            out[f"{b.prefix}.intermediate.dense"] = {"out_features": b.neurons}
    return out


def rebuild(model: nn.Module, arch: dict[str, dict[str, int]]) -> nn.Module:
    """A copy of ``model`` (unpruned, or any weights) with the shapes ``arch`` records, ready for
    the pruned weights to load (``load_state_dict``); the kept units are the first ones.

    Example:
        >>> small = rebuild(load_hf("hf:minilm").model, pruned.architecture)  # doctest: +SKIP
        >>> small.load_state_dict(read_state_dict("model.safetensors"))      # doctest: +SKIP
    """
    known = {b.prefix: b for b in encoder_blocks(model)}
    heads, neurons = {}, {}
    for fqn, sizes in arch.items():
        prefix, _, tail = fqn.rpartition(".attention.self")
        if not tail and prefix in known and set(sizes) == {"num_attention_heads"}:
            heads[prefix] = list(range(int(sizes["num_attention_heads"])))
            continue
        prefix, _, tail = fqn.rpartition(".intermediate.dense")
        if not tail and prefix in known and set(sizes) == {"out_features"}:
            neurons[prefix] = list(range(int(sizes["out_features"])))
            continue
        raise ConfigError(
            f"architecture entry {fqn!r}: {sizes} is not a head or FFN size of this encoder; "
            "the run folder was made from another model"
        )
    return remove_units(model, Selection(heads, neurons))


# --------------------------------------------------------------------------------------------------
# The pruner.


def prune_heads(model: nn.Module, spec: PruneSpec, data: Dataset | None) -> Pruned:
    """The ``"heads"`` pruner: remove attention heads and FFN neurons of a BERT-style encoder.

    ``spec.ratio`` with ``target="macs"`` is the fraction of encoder MACs removed (heads and
    neurons ranked together by importance per MAC); ``spec.options`` ``{"heads": f, "neurons": g}``
    removes those fractions of each instead. Other options: ``min_heads`` (1), ``min_neurons`` (1),
    ``samples`` (256) and ``probes`` (4) for the Hessian scores.

    Example:
        >>> p = prune_heads(enc, PruneSpec("heads", ratio=0.3), None)  # doctest: +SKIP
    """
    if spec.target != "macs":
        raise ConfigError(f"head pruning counts MACs; use target 'macs', not {spec.target!r}")
    encoder_blocks(model)  # a clear error before any scoring for non-encoders
    imp = importance_of(model, spec, data)
    o = spec.options
    floors = {"min_heads": int(o.get("min_heads", 1)), "min_neurons": int(o.get("min_neurons", 1))}
    if "heads" in o or "neurons" in o:
        sel = select(model, imp, heads=float(o.get("heads", 0)),
                     neurons=float(o.get("neurons", 0)), **floors)  # fmt: skip
    else:
        sel = select(model, imp, macs=spec.ratio, **floors)
    small = remove_units(model, sel)
    ratios = {}
    for old, new in zip(encoder_blocks(model), encoder_blocks(small), strict=True):
        for name in ("query", "key", "value"):
            ratios[f"{old.prefix}.attention.self.{name}"] = 1 - new.heads / old.heads
        ratios[f"{old.prefix}.attention.output.dense"] = 1 - new.heads / old.heads
        ratios[f"{old.prefix}.intermediate.dense"] = 1 - new.neurons / old.neurons
        ratios[f"{old.prefix}.output.dense"] = 1 - new.neurons / old.neurons
    before, after = encoder_macs(model), encoder_macs(small)
    stats = {
        "macs_before": float(before),
        "macs_after": float(after),
        "params_before": float(sum(p.numel() for p in model.parameters())),
        "params_after": float(sum(p.numel() for p in small.parameters())),
        "heads_before": float(sum(b.heads for b in encoder_blocks(model))),
        "heads_after": float(sum(b.heads for b in encoder_blocks(small))),
        "neurons_before": float(sum(b.neurons for b in encoder_blocks(model))),
        "neurons_after": float(sum(b.neurons for b in encoder_blocks(small))),
    }
    return Pruned(small.eval(), spec, ratios, architecture(small), stats)


__all__ = [
    "Block", "Importance", "Selection", "architecture", "encoder_blocks", "encoder_macs", "gated",
    "hessian_importance", "magnitude_importance", "prune_heads", "rebuild", "remove_units",
    "select",
]  # fmt: skip
