"""Multi-head attention built from four plain ``nn.Linear`` layers, so that squeezer can quantize
its projections.

``nn.MultiheadAttention`` (Vaswani et al., "Attention Is All You Need", arXiv:1706.03762) keeps the
query, key and value projections packed in one ``in_proj_weight`` parameter and hands its
``out_proj.weight`` straight to ``F.multi_head_attention_forward``: neither is a layer whose forward
runs, so neither can be swapped for a quantized one. :class:`SplitAttention` computes the same
function with ``q_proj``, ``k_proj``, ``v_proj`` and ``out_proj`` as ``nn.Linear`` modules that it
calls; :func:`squeezer.graph.split_attention` puts it in place of every ``nn.MultiheadAttention``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class SplitAttention(nn.Module):
    """``nn.MultiheadAttention`` with separate ``q_proj``, ``k_proj``, ``v_proj`` and ``out_proj``
    linear layers: same constructor arguments, same ``forward`` signature and results (to float
    round-off), eval and train mode (dropout on the attention weights), ``batch_first``, unbatched
    inputs, bool and float masks, ``add_bias_kv`` and ``add_zero_attn``.

    It has no fused fast path: it always computes the attention weights explicitly, as
    ``nn.MultiheadAttention`` does when ``need_weights=True``. ``in_proj_weight`` and
    ``in_proj_bias`` are None, which sends ``nn.TransformerEncoderLayer`` down its ordinary path.

    Example:
        >>> mha = nn.MultiheadAttention(8, 2, batch_first=True).eval()
        >>> split = SplitAttention.from_mha(mha).eval()
        >>> x = torch.randn(3, 5, 8)
        >>> torch.allclose(split(x, x, x)[0], mha(x, x, x)[0], atol=1e-6)
        True
    """

    # No packed projection: nn.TransformerEncoder(Layer) checks these before its fused kernels.
    in_proj_weight: Tensor | None = None
    in_proj_bias: Tensor | None = None

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if embed_dim <= 0 or num_heads <= 0 or embed_dim % num_heads:
            raise ValueError(
                f"embed_dim ({embed_dim}) must be a positive multiple of num_heads ({num_heads})"
            )
        kw = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.head_dim = embed_dim // num_heads
        self.dropout = dropout
        self.batch_first = batch_first
        self.add_zero_attn = add_zero_attn
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **kw)
        self.k_proj = nn.Linear(self.kdim, embed_dim, bias=bias, **kw)
        self.v_proj = nn.Linear(self.vdim, embed_dim, bias=bias, **kw)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **kw)
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.zeros(1, 1, embed_dim, **kw))
            self.bias_v = nn.Parameter(torch.zeros(1, 1, embed_dim, **kw))
        else:
            self.bias_k = self.bias_v = None

    @classmethod
    @torch.no_grad()
    def from_mha(cls, mha: nn.MultiheadAttention) -> SplitAttention:
        """The equivalent of ``mha``, with copies of its weights (split from ``in_proj_weight`` and
        ``in_proj_bias``, or taken from ``q/k/v_proj_weight`` when ``kdim``/``vdim`` differ), in the
        same training mode and on the same device and dtype."""
        out_w = mha.out_proj.weight
        new = cls(
            mha.embed_dim,
            mha.num_heads,
            dropout=mha.dropout,
            bias=mha.in_proj_bias is not None,
            add_bias_kv=mha.bias_k is not None,
            add_zero_attn=mha.add_zero_attn,
            kdim=mha.kdim,
            vdim=mha.vdim,
            batch_first=mha.batch_first,
            device=out_w.device,
            dtype=out_w.dtype,
        )
        if mha.in_proj_weight is not None:
            weights = mha.in_proj_weight.chunk(3)
            grad = (mha.in_proj_weight.requires_grad,) * 3
        else:
            weights = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
            grad = tuple(w.requires_grad for w in weights)
        biases = (None,) * 3 if mha.in_proj_bias is None else mha.in_proj_bias.chunk(3)
        layers = (new.q_proj, new.k_proj, new.v_proj)
        for layer, w, b, g in zip(layers, weights, biases, grad, strict=True):
            layer.weight.copy_(w)
            layer.weight.requires_grad_(g)
            if b is not None:
                layer.bias.copy_(b)
                layer.bias.requires_grad_(mha.in_proj_bias.requires_grad)
        new.out_proj.load_state_dict(mha.out_proj.state_dict())
        new.out_proj.requires_grad_(out_w.requires_grad)
        if mha.bias_k is not None:
            new.bias_k.copy_(mha.bias_k)
            new.bias_v.copy_(mha.bias_v)
            new.bias_k.requires_grad_(mha.bias_k.requires_grad)
            new.bias_v.requires_grad_(mha.bias_v.requires_grad)
        return new.train(mha.training)

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, dropout={self.dropout}, "
            f"batch_first={self.batch_first}"
        )

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """As ``nn.MultiheadAttention.forward``: the attention output, shaped like ``query``, and
        the attention weights (averaged over heads unless ``average_attn_weights=False``) if
        ``need_weights``, else None.

        Masks: a bool ``True`` blocks a position; a float mask is added to the attention scores.
        ``key_padding_mask`` is (N, S) (or (S,) for unbatched inputs); ``attn_mask`` is (L, S) or
        (N * num_heads, L, S). ``is_causal`` is a hint that ``attn_mask`` is the causal mask; as in
        ``nn.MultiheadAttention`` it needs ``attn_mask``, and without a key padding mask or weights
        the causal mask is built instead of reading ``attn_mask``.
        """
        batched = query.dim() == 3
        if query.dim() not in (2, 3) or key.dim() != query.dim() or value.dim() != query.dim():
            raise AssertionError(
                "query, key and value must all be 2-D (unbatched) or 3-D (batched); got "
                f"{query.dim()}-D, {key.dim()}-D and {value.dim()}-D"
            )
        if not batched:  # work on a batch of one, in (L, N, E) layout
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        if is_causal and attn_mask is None:
            raise RuntimeError(
                "Need attn_mask if specifying the is_causal hint. You may use the Transformer "
                "module method `generate_square_subsequent_mask` to create this mask."
            )
        tgt_len, bsz, embed_dim = query.shape
        if embed_dim != self.embed_dim:
            raise AssertionError(
                f"was expecting embedding dimension of {self.embed_dim}, but got {embed_dim}"
            )
        heads, head_dim = self.num_heads, self.head_dim
        key_padding_mask = _float_mask(key_padding_mask, query.dtype)
        # nn.MultiheadAttention trusts the hint here: it applies its own causal mask over every
        # key position (added ones included) instead of reading attn_mask.
        causal = is_causal and key_padding_mask is None and not need_weights
        attn_mask = None if causal else _float_mask(attn_mask, query.dtype)

        q = self.q_proj(query)
        k = self.k_proj(key)
        v = self.v_proj(value)
        if attn_mask is not None and attn_mask.dim() == 2:
            attn_mask = attn_mask.unsqueeze(0)
        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat([k, self.bias_k.repeat(1, bsz, 1)])
            v = torch.cat([v, self.bias_v.repeat(1, bsz, 1)])
            attn_mask = _pad_last(attn_mask)
            key_padding_mask = _pad_last(key_padding_mask)
        q = q.reshape(tgt_len, bsz * heads, head_dim).transpose(0, 1)
        k = k.reshape(k.shape[0], bsz * heads, head_dim).transpose(0, 1)
        v = v.reshape(v.shape[0], bsz * heads, head_dim).transpose(0, 1)
        if self.add_zero_attn:
            zeros = torch.zeros(bsz * heads, 1, head_dim, dtype=k.dtype, device=k.device)
            k, v = torch.cat([k, zeros], dim=1), torch.cat([v, zeros], dim=1)
            attn_mask = _pad_last(attn_mask)
            key_padding_mask = _pad_last(key_padding_mask)
        src_len = k.shape[1]
        if causal:
            blocked = torch.ones(tgt_len, src_len, dtype=torch.bool, device=q.device).triu(1)
            attn_mask = _float_mask(blocked, q.dtype).unsqueeze(0)
        if key_padding_mask is not None:
            kpm = key_padding_mask.reshape(bsz, 1, 1, src_len).expand(-1, heads, -1, -1)
            kpm = kpm.reshape(bsz * heads, 1, src_len)
            attn_mask = kpm if attn_mask is None else attn_mask + kpm

        q_scaled = q * math.sqrt(1.0 / float(head_dim))
        if attn_mask is not None:
            scores = torch.baddbmm(attn_mask, q_scaled, k.transpose(-2, -1))
        else:
            scores = torch.bmm(q_scaled, k.transpose(-2, -1))
        weights = torch.softmax(scores, dim=-1)
        if self.training and self.dropout > 0.0:
            weights = F.dropout(weights, p=self.dropout)
        out = torch.bmm(weights, v)
        out = out.transpose(0, 1).reshape(tgt_len * bsz, embed_dim)
        out = self.out_proj(out).reshape(tgt_len, bsz, embed_dim)

        if not batched:
            out = out.squeeze(1)
        elif self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        weights = weights.reshape(bsz, heads, tgt_len, src_len)
        if average_attn_weights:
            weights = weights.mean(dim=1)
        if not batched:
            weights = weights.squeeze(0)
        return out, weights


def _float_mask(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """``mask`` as scores to add: a bool mask becomes 0 where allowed and -inf where blocked."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))
    if not torch.is_floating_point(mask):
        raise AssertionError(f"only bool and floating masks are supported, got {mask.dtype}")
    return mask


def _pad_last(mask: Tensor | None) -> Tensor | None:
    """``mask`` with one more allowed key position (a zero) at the end of its last axis."""
    return None if mask is None else F.pad(mask, (0, 1))
