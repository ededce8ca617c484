"""Learned Token Pruning (LTP; Kim et al., arXiv:2107.00910) for BERT-style sentence encoders, with
the pruned tokens really dropped, so later layers run on shorter sequences.

In every encoder block, after its attention, each token ``j`` gets LTP's importance score: the
attention it receives, averaged over heads and over the ``N`` live query tokens,
``s_j = (1/(H·N))·Σ_h Σ_i p_h(i, j)``. A sequence's scores sum to 1, so a fixed threshold prunes
long sequences more than short ones, as LTP intends (normalising by the length instead, to make
the mean score 1, was tried and fails: the [CLS] attention sink takes most of the attention of a
short sentence, so its content tokens score far lower than a long text's). A token whose score is
below the block's learned threshold ``θ_l`` leaves
the sequence before the block's FFN and takes no part in later blocks. At least one token (the
highest scored) stays.

The sentence embedding is the mean over the tokens alive after the last block (``pool="kept"``).
``pool="exit"`` instead averages *all* the input tokens, each at the state it left in (a token
pruned at block ``l`` with its state after that block's attention): it keeps the content of the
pruned tokens at no cost, but on all-MiniLM-L6-v2 it is far worse before recovery (cosine to FP32
on 64 passages of 128 tokens with calibrated thresholds: 0.649 against 0.948 at 20% of the token
positions removed, 0.403 against 0.873 at 40%): the intermediate states are not in the space of
the final ones (their scale differs per dimension), so mixing them spoils the mean.

Three modes of :class:`TokenPruned`:

- ``"hard"`` (inference): the kept tokens are gathered to the front and the batch is cut to the
  longest kept row, so attention and FFN run on fewer tokens: the speed-up is real.
- ``"mask"``: the same decisions, tokens left in place and masked out of attention and pooling
  (the oracle the tests hold ``"hard"`` to).
- ``"soft"`` (threshold training): the mask is ``σ((s − θ)/T)``, multiplied along the blocks; it
  enters later attention as ``log m`` added to the scores and weights the mean pool (with
  ``pool="exit"``, a token's exit weight ``m_{l−1} − m_l`` weights its state at block ``l``), so
  that as ``T → 0`` it becomes the hard mask.

Thresholds start where a linear schedule of kept fractions over the blocks meets the requested
ratio on calibration data (LTP keeps more tokens early, fewer late), then train in soft mode with
the distillation loss plus ``λ·(kept − target)²``: a penalty tied to the target ratio (as LEAP ties
its thresholds) in place of LTP's plain L1 on the mask, whose λ would have to be searched per
ratio. The thresholds, the temperature and the step size are in units of the mean score ``1/N``
(``N`` the calibration data's mean number of tokens): scores are ≈ 1/128 on 128-token inputs, and
a step size in absolute units that suits one length is 100 times too large or too small for
another (the first measurement moved the thresholds several mean scores in 15 steps and ended with
nothing or almost everything pruned). Weight recovery afterwards is
:func:`squeezer.train.finetune.finetune` on the hard model.

PyTorch only: the number of kept tokens depends on the data, which the TorchScript ONNX exporter
freezes to the example's; the ONNX export of a token-pruned model is refused (export the
unpruned or head-pruned encoder instead).

Example:
    >>> p = prune(encoder, PruneSpec("tokens", ratio=0.4), data)       # doctest: +SKIP
    >>> p.model(**batch).shape, p.stats["kept_fraction"]              # doctest: +SKIP
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import nn

from ..data import Dataset, forward
from ..encoders import bert_of
from ..errors import ConfigError, ExportError
from ..graph import copy_model
from .base import Pruned, PruneSpec

MODES = ("hard", "mask", "soft")
POOLS = ("kept", "exit")


class TokenPruned(nn.Module):
    """A BERT-style sentence encoder that drops unimportant tokens block by block (see the module
    docstring).

    Args:
        encoder: a :class:`squeezer.hf.SentenceEncoder` (or a BERT-style model) with eager
            attention; its BERT becomes ``.model`` (pass a copy to keep yours).
        thresholds: one per encoder block; 0 keeps every token.
        mode: ``"hard"``, ``"mask"`` or ``"soft"``.
        temperature: of the soft mask.
        pool: ``"kept"`` (the mean over the tokens alive after the last block, as LTP) or
            ``"exit"`` (every token at the state it left in; see the module docstring).

    Example:
        >>> ltp = TokenPruned(copy_model(enc), torch.zeros(6))  # doctest: +SKIP
        >>> torch.allclose(ltp(**batch), enc(**batch), atol=1e-6)  # doctest: +SKIP
        True
    """

    def __init__(
        self,
        encoder: nn.Module,
        thresholds: torch.Tensor | list[float],
        *,
        mode: str = "hard",
        temperature: float = 1e-3,
        pool: str = "kept",
    ) -> None:
        super().__init__()
        # The BERT itself is ``.model``, as in a SentenceEncoder: same FQNs, so every part of
        # squeezer that finds an encoder's layers (roles, templates, quantization) finds them here.
        self.model = bert_of(encoder)
        n = len(self.model.encoder.layer)
        th = torch.as_tensor(thresholds, dtype=torch.float32).flatten()
        if th.numel() != n or not bool(torch.isfinite(th).all()):
            raise ConfigError(
                f"give {n} finite thresholds (one per encoder block), got {th.tolist()}"
            )
        self.thresholds = nn.Parameter(th, requires_grad=False)
        self.mode = mode
        if pool not in POOLS:
            raise ConfigError(f"token pooling {pool!r} is not one of {', '.join(POOLS)}")
        self.pool = pool
        self.temperature = float(temperature)
        self.kept: list[torch.Tensor] = []  # per block, the live fraction of the batch's tokens
        self.record: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # (scores, live)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        if self.mode not in MODES:
            raise ConfigError(f"TokenPruned mode {self.mode!r} is not one of {', '.join(MODES)}")
        if torch.jit.is_tracing() or torch.compiler.is_compiling():
            raise ExportError(
                "a token-pruned encoder is PyTorch only: how many tokens it keeps depends on the "
                "input, which an exported graph would freeze; export the unpruned or head-pruned model"
            )
        bert = self.model
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        h = bert.embeddings(input_ids=input_ids)
        live = attention_mask.to(h.dtype)
        n0 = live.sum().clamp(min=1)
        pooled = torch.zeros(h.shape[0], h.shape[-1], dtype=h.dtype)  # exit pooling's running sum
        self.kept = []
        hard = live > 0  # soft mode: the hard decisions alongside, for the ratio penalty
        for i, layer in enumerate(bert.encoder.layer):
            # log m on the attention scores (−∞ as the dtype's min, NaN-free gradients at m = 0).
            lo = torch.finfo(h.dtype).min
            additive = torch.where(live > 0, torch.log(live.clamp(min=1e-30)), lo)[:, None, None, :]
            att, probs = layer.attention(h, attention_mask=additive)
            if probs is None:
                raise ConfigError(
                    "token pruning needs the attention probabilities: load the encoder with "
                    "attn_implementation='eager' (load_hf's default)"
                )
            n_live = live.sum(1, keepdim=True).clamp(min=1e-6)
            s = (probs * live[:, None, :, None]).sum(dim=(1, 2)) / (probs.shape[1] * n_live)
            if self.record is not None:
                self.record.append((s.detach(), live.detach()))
            leaving, live, kept_att = self._prune(s, live, att, self.thresholds[i])
            if self.pool == "exit":
                pooled = pooled + (leaving.unsqueeze(-1) * att).sum(1)  # they leave in this state
            att = kept_att
            kept = live.sum() / n0.sum()
            if self.mode == "soft":
                # Straight-through: the value is the hard kept fraction, the gradient the soft
                # one's. The product of sigmoids along the blocks keeps fewer tokens than the hard
                # thresholds do, so a penalty on the soft value alone lowers every threshold.
                hard = hard & (s >= self.thresholds[i].detach())
                kept = kept - kept.detach() + hard.sum() / n0.sum()
            self.kept.append(kept)
            h = layer.feed_forward_chunk(att)
        pooled = pooled + (live.unsqueeze(-1) * h).sum(1)
        count = (attention_mask.to(h.dtype) if self.pool == "exit" else live).sum(1, keepdim=True)
        count = count.clamp(min=1e-9)
        return nn.functional.normalize(pooled / count, p=2.0, dim=-1)

    def _prune(self, s, live, att, theta):
        """(weight of each token leaving here, at ``att``'s positions; the new live weights;
        the states that go on), with the tokens gathered to the front in hard mode."""
        if self.mode == "soft":
            new = live * torch.sigmoid((s - theta) / self.temperature)
            return live - new, new, att
        keep = (s >= theta) & (live > 0)
        best = s.masked_fill(live <= 0, float("-inf")).argmax(dim=1, keepdim=True)
        keep = keep.scatter(1, best, True)
        leaving = live * (~keep).to(live.dtype)
        if self.mode == "mask":
            return leaving, keep.to(live.dtype), att
        # Stable sort: kept tokens first, in their order; then cut at the longest kept row.
        order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)
        width = int(keep.sum(1).max())
        idx = order[:, :width]
        att = att.gather(1, idx[:, :, None].expand(-1, -1, att.shape[-1]))
        return leaving, keep.gather(1, idx).to(live.dtype), att


def kept_schedule(ratio: float, blocks: int) -> list[float]:
    """Fractions of the input tokens alive after each block: falling linearly so that on average
    over the blocks ``ratio`` of the token positions are removed.

    Example:
        >>> [round(k, 3) for k in kept_schedule(0.3, 4)]
        [0.88, 0.76, 0.64, 0.52]
    """
    top = 2 * blocks * ratio / (blocks + 1)
    if not 0 <= top < 1:
        raise ConfigError(
            f"token prune ratio {ratio} is too high for {blocks} blocks with a linear schedule; "
            f"use at most {(blocks + 1) / (2 * blocks) * 0.95:.2f}"
        )
    return [1 - top * (i + 1) / blocks for i in range(blocks)]


@torch.no_grad()
def calibrate_thresholds(model: TokenPruned, batches: list, kept: list[float]) -> torch.Tensor:
    """Block by block, the threshold at which the live tokens of ``batches`` fall to ``kept[l]`` of
    the input tokens, given the thresholds before it (bisection on the recorded scores)."""
    mode, model.mode = model.mode, "mask"
    th = model.thresholds
    th.zero_()
    try:
        for i, k in enumerate(kept):
            model.record = []
            for x in batches:
                forward(model, x)
            blocks = len(kept)
            recs = model.record[i::blocks]
            total = sum(float(r[1].sum()) for r in model.record[0::blocks])  # input tokens

            def alive(theta: float, recs=recs) -> float:  # one token per sequence always stays
                return sum(float(((sc >= theta) & (lv > 0)).sum(1).clamp(min=1).sum())
                           for sc, lv in recs)  # fmt: skip

            lo, hi = 0.0, max(float(sc.max()) for sc, _ in recs)
            for _ in range(40):  # bisection: alive() falls as theta rises
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if alive(mid) > k * total else (lo, mid)
            th[i] = hi if abs(alive(hi) - k * total) <= abs(alive(lo) - k * total) else lo
    finally:
        model.record = None
        model.mode = mode
    return th.detach().clone()


def train_thresholds(
    model: TokenPruned,
    data: Dataset,
    target_kept: float,
    *,
    unit: float,
    steps: int = 50,
    lr: float = 0.05,
    weights_lr: float = 0.0,
    penalty: float = 10.0,
    batch_size: int = 32,
    seed: int = 0,
) -> dict[str, Any]:
    """LTP's soft stage: train the thresholds (and, with ``weights_lr`` > 0, the weights) of
    ``model`` in place on ``data`` with ``1 − cos`` to the FP32 embeddings plus
    ``penalty·(mean kept − target_kept)²``. A minimal loop on the trainer's own pieces (its
    distillation loss and cosine schedule); the weights' recovery afterwards is
    :func:`squeezer.train.finetune.finetune`.

    The thresholds are learned in units of ``unit`` (the mean score, ``1/N``): Adam's step is about
    its learning rate whatever the gradient's scale, so training ``θ / unit`` at ``lr`` is training
    ``θ`` at ``lr · unit``; ``lr`` = 0.05 moves a threshold by at most ≈ 5% of the mean score per
    step, whatever the sequence length."""
    from ..train.distill import cosine_loss
    from ..train.optim import cosine_schedule

    if steps < 1:
        raise ConfigError(f"threshold training needs at least 1 step, got {steps}")
    if not unit > 0:
        raise ConfigError(f"the threshold unit must be positive, got {unit}")
    torch.manual_seed(seed)
    model.mode = "soft"
    model.train()
    model.thresholds.requires_grad_(True)
    groups = [{"params": [model.thresholds], "lr": lr * unit}]
    weights = [p for n, p in model.named_parameters() if n != "thresholds"]
    for p in weights:
        p.requires_grad_(weights_lr > 0)
    if weights_lr > 0:
        groups.append({"params": weights, "lr": weights_lr})
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    sched = cosine_schedule(opt, steps)
    batches = data.train_batches(batch_size, shuffle=True, seed=seed)
    t0, step, hist = time.perf_counter(), 0, []
    try:
        while step < steps:
            for x, y in batches:
                if step >= steps:
                    break
                out = forward(model, x)
                kept = torch.stack(model.kept).mean()
                loss = cosine_loss(out, y) + penalty * (kept - target_kept) ** 2
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                with torch.no_grad():  # a negative threshold keeps every token: no use learning one
                    model.thresholds.clamp_(min=0.0)
                step += 1
                hist.append(
                    {"step": step, "loss": float(loss.detach()), "kept": float(kept.detach())}
                )
    finally:
        model.thresholds.requires_grad_(False)
        for p in weights:
            p.requires_grad_(True)
        model.mode = "hard"
        model.eval()
        model.kept = []
    return {"seconds": time.perf_counter() - t0, "history": hist}


@torch.no_grad()
def kept_fractions(model: TokenPruned, batches: Any) -> list[float]:
    """Per block, the fraction of all input tokens of ``batches`` still alive after it."""
    mode, model.mode = model.mode, "mask"
    sums, n = None, 0
    try:
        for b in batches:
            x = b[0] if isinstance(b, tuple | list) else b
            forward(model, x)
            tokens = _tokens(x)
            k = torch.stack(model.kept).double() * tokens
            sums = k if sums is None else sums + k
            n += tokens
    finally:
        model.mode = mode
    return [] if sums is None else (sums / n).tolist()


def _tokens(x: dict) -> int:
    return int(x["attention_mask"].sum()) if "attention_mask" in x else x["input_ids"].numel()


def prune_tokens(model: nn.Module, spec: PruneSpec, data: Dataset | None) -> Pruned:
    """The ``"tokens"`` pruner (LTP): a :class:`TokenPruned` copy of the encoder whose thresholds
    remove ``spec.ratio`` of the token positions over the blocks on ``data`` (≈ that fraction of
    the encoder's MACs).

    Options: ``steps`` (50) of soft threshold training, ``lr`` (0.05) and ``temperature`` (0.25),
    both in units of the mean score ``1/N`` (N: the calibration data's mean tokens per sequence),
    ``weights_lr`` (0: the thresholds alone), ``penalty`` (10), ``samples`` (128) to calibrate on.

    Example:
        >>> p = prune_tokens(enc, PruneSpec("tokens", ratio=0.4), data)  # doctest: +SKIP
    """
    if data is None:
        raise ConfigError("token pruning learns its thresholds on data: give --data")
    if spec.target != "macs":
        raise ConfigError(
            f"token pruning removes token positions (MACs); use target 'macs', not {spec.target!r}"
        )
    o = spec.options
    net = TokenPruned(copy_model(model).eval(), torch.zeros(len(bert_of(model).encoder.layer)))
    kept = kept_schedule(spec.ratio, len(net.thresholds))
    calib = [x for x, _ in data.calibration_batches(int(o.get("samples", 128)), seed=spec.seed)]
    if not calib:
        raise ConfigError("token pruning saw no calibration data: the training split is empty")
    # The mean score is 1/N: the unit of the thresholds, their step size and the temperature.
    seqs = sum(int(x["input_ids"].shape[0]) for x in calib)
    unit = seqs / max(sum(_tokens(x) for x in calib), 1)
    net.temperature = float(o.get("temperature", 0.25)) * unit
    calibrate_thresholds(net, calib, kept)
    steps = int(o.get("steps", 50))
    info: dict[str, Any] = {"seconds": 0.0, "history": []}
    if steps > 0:
        info = train_thresholds(net, data, 1 - spec.ratio, unit=unit, steps=steps,
                                lr=float(o.get("lr", 0.05)), weights_lr=float(o.get("weights_lr", 0.0)),
                                penalty=float(o.get("penalty", 10.0)), seed=spec.seed)  # fmt: skip
    fractions = kept_fractions(net, calib)
    ratios = {f"model.encoder.layer.{i}": 1 - f for i, f in enumerate(fractions)}
    mean_kept = sum(fractions) / max(len(fractions), 1)
    soft = info["history"]
    stats = {"kept_fraction": mean_kept, "macs_removed_approx": 1 - mean_kept,
             "threshold_seconds": float(info["seconds"]), "threshold_unit": unit,
             **({"soft_kept_first": soft[0]["kept"], "soft_kept_last": soft[-1]["kept"]}
                if soft else {}),
             **{f"threshold_{i}": float(t) for i, t in enumerate(net.thresholds)}}  # fmt: skip
    if not math.isfinite(mean_kept):
        raise ConfigError("token pruning saw no tokens in the calibration data")
    return Pruned(net.eval(), spec, ratios, {}, stats)


__all__ = [
    "MODES", "TokenPruned", "calibrate_thresholds", "kept_fractions", "kept_schedule",
    "prune_tokens", "train_thresholds",
]  # fmt: skip
