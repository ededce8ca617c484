"""An integer-only BERT encoder: I-BERT (Kim et al., "I-BERT: Integer-only BERT Quantization",
arXiv:2101.01321) compiled from a fake-quantized sentence encoder.

Every activation between the token ids and the final sentence embedding is an integer tensor:

* embeddings: int8 table codes, gathered and rescaled per row to one wide (int32) scale, summed;
* every ``Linear``: int8 activation codes times int8 weight codes with int32 accumulation
  (``torch._int_mm``); the bias and the activation zero point fold into one int32 constant;
* every rescaling between scales: a dyadic multiply and a rounding shift (HAWQ-V3,
  arXiv:2011.10680; :func:`squeezer.integer.dyadic.requantize`);
* attention: Q, K, V requantized to int8, Q·Kᵀ in integers, :func:`~squeezer.integer.kernels.
  i_softmax` to 8-bit probabilities, P·V in integers;
* :func:`~squeezer.integer.kernels.i_gelu`, :func:`~squeezer.integer.kernels.i_layernorm`
  (integer square root), residual adds at a common int32 scale;
* the sentence embedding: masked integer sum over tokens, then an integer L2 normalisation
  (:func:`~squeezer.integer.dyadic.isqrt`) to 16-bit codes.

Floats appear only when the program is built (scales turned into integer constants, as I-BERT
and HAWQ-V3 do) and at the two boundaries: ``forward`` returns ``codes · 2^-15`` as a float tensor
for comparison with the float model. The points the fake-quantized model leaves in float (Q/K/V,
the softmax output, GELU and LayerNorm inputs, residual sums) get scales from a calibration pass:
int8 for Q/K/V (percentile range), a wide int32 scale elsewhere (calibrated maximum at 2^22).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, DataError, UnsupportedModelError
from ..quant.modules import ActQuantizer, QuantEmbedding, QuantLinear
from ..quant.primitives import grouped_view
from .dyadic import bit_length, isqrt, requantize, shift_round, to_dyadic
from .kernels import i_gelu, i_layernorm, i_softmax

#: A calibrated maximum of a wide (int32) tensor maps to this many steps: 2^9 headroom below 2^31.
WIDE_STEPS = 2**22
INT32_MAX = 2**31 - 1
#: Bits of the integer sentence embedding (codes in [-2^15, 2^15], scale 2^-15).
OUT_BITS = 15
#: Score given to padding keys before the integer softmax: its exp rounds to exactly zero.
_MASKED = -(2**40)


def int_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` of int8 matrices with int32 accumulation, returned as int64.

    Uses ``torch._int_mm`` (an int8 GEMM) where PyTorch has it, else an exact int64 product.

    Example:
        >>> a = torch.tensor([[1, -2], [3, 4]], dtype=torch.int8)
        >>> int_matmul(a, a).tolist()
        [[-5, -10], [15, 10]]
    """
    if a.dtype != torch.int8 or b.dtype != torch.int8:
        raise DataError(f"int_matmul takes int8 matrices, got {a.dtype} and {b.dtype}")
    try:
        return torch._int_mm(a, b).to(torch.int64)
    except (RuntimeError, AttributeError):  # no int8 GEMM for this shape/build: exact fallback
        return a.to(torch.int64) @ b.to(torch.int64)


class Rescale(nn.Module):
    """``clamp(round(x · m) + zero_point, qmin, qmax)`` of an integer tensor, with the real
    multiplier ``m`` (a float or one per channel) turned into a dyadic number ``b / 2^c``.

    The input is first clamped to the range that can still reach ``[qmin, qmax]`` (so the result is
    unchanged and the product cannot overflow), then, where that range is wider than 2^30, shifted
    right (rounded) so that ``x · b`` stays below 2^61.

    Args:
        m: positive multiplier(s), broadcastable against the input (e.g. shape ``(C,)`` for the
            last dimension, or ``(V, G, 1)`` with ``gather=True``).
        zero_point: added after rounding.
        qmin, qmax: output range.
        x_bound: a bound on ``|x|`` known from the program (tightens the clamp).
        gather: constants are tables indexed by the ``index`` argument of ``forward``.

    Example:
        >>> r = Rescale(0.25, qmin=-127, qmax=127, x_bound=10**6)
        >>> r(torch.tensor([-6, -2, 2, 6, 1000])).tolist()
        [-2, 0, 0, 2, 127]
    """

    def __init__(
        self,
        m: float | torch.Tensor,
        *,
        zero_point: int = 0,
        qmin: int = -INT32_MAX,
        qmax: int = INT32_MAX,
        x_bound: int = 2**62,
        gather: bool = False,
    ) -> None:
        super().__init__()
        m = torch.as_tensor(m, dtype=torch.float64)
        if not bool(torch.isfinite(m).all()) or bool((m <= 0).any()):
            raise ConfigError("rescale multipliers must be positive and finite; check the scales")
        span_lo, span_hi = qmin - 1 - zero_point, qmax + 1 - zero_point
        lo = torch.clamp(torch.floor(span_lo / m), min=-float(x_bound))
        hi = torch.clamp(torch.ceil(span_hi / m), max=float(x_bound))
        reach = torch.maximum(lo.abs(), hi.abs())
        # Pre-shift so that |x >> r| < 2^30; the rounding it adds is ≤ 2^(r−1) · m output steps.
        r = torch.clamp(torch.ceil(torch.log2(reach.clamp(min=1))) - 30, min=0).to(torch.int64)
        b, c = to_dyadic(m * torch.pow(2.0, r.double()), bits=31)
        for name, t in (("lo", lo), ("hi", hi)):
            self.register_buffer(name, t.to(torch.int64))
        self.register_buffer("pre", r)
        self.register_buffer("b", b)
        self.register_buffer("c", c)
        self.zero_point, self.qmin, self.qmax = int(zero_point), int(qmin), int(qmax)
        self.gather = gather
        self.has_pre = bool((r > 0).any())

    def forward(self, x: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        lo, hi, pre, b, c = self.lo, self.hi, self.pre, self.b, self.c
        if self.gather:
            if index is None:
                raise DataError("this rescale holds per-row tables; pass index=<row ids>")
            lo, hi, pre, b, c = (t[index] for t in (lo, hi, pre, b, c))
        x = torch.minimum(torch.maximum(x.to(torch.int64), lo), hi)
        if self.has_pre:
            x = shift_round(x, pre)
        return requantize(x, b, c, self.zero_point, self.qmin, self.qmax)


class IntLinear(nn.Module):
    """A ``QuantLinear`` on activation codes: int8 × int8 GEMM, int32 accumulator.

    With input codes ``q`` (zero point ``z``) and weight codes ``W`` (per output row ``j``, scale
    ``s_w[j]``), the accumulator ``Σ_k (q_k − z) W_jk + round(bias_j / (s_x s_w[j]))`` at scale
    ``s_x · s_w[j]`` is exactly what the fake-quantized layer computes, up to the rounding of the
    bias. Unsigned codes are shifted by 128 into int8 and the shift folds into the constant.
    """

    def __init__(self, layer: QuantLinear) -> None:
        super().__init__()
        spec = layer.spec
        if spec.granularity not in ("channel", "tensor") or not spec.symmetric or spec.bits > 8:
            raise UnsupportedModelError(
                f"the integer encoder needs symmetric per-channel weights of ≤ 8 bits, got "
                f"{spec.bits}-bit {spec.granularity} (symmetric={spec.symmetric}); quantize with "
                "squeezer.qbert.qbert_plan(model, 8, group_size=None)"
            )
        aq = layer.input_quantizer
        if aq is None or not bool(aq.calibrated) or aq.bits > 8:
            raise UnsupportedModelError(
                "every Linear needs calibrated activation quantization of ≤ 8 bits (act_bits=8); "
                "quantize with calib=... and a plan with act_bits=8"
            )
        qp = aq.qparams()
        self.s_x = float(qp.scale)
        self.zero_point = int(qp.zero_point)
        self.act_range = (qp.qmin, qp.qmax)
        self.shift = 128 if qp.qmin >= 0 else 0
        codes = layer.weight_quantizer.codes(layer.weight).to(torch.int64)  # [out, in]
        s_w = layer.weight_quantizer.scale.reshape(-1).double().expand(codes.shape[0])
        acc_scale = self.s_x * s_w
        bias = layer.bias.detach().double() if layer.bias is not None else torch.zeros(len(s_w))
        const = torch.round(bias / acc_scale).to(torch.int64)
        const = const + (self.shift - self.zero_point) * codes.sum(1)
        self.register_buffer("weight_t", codes.t().contiguous().to(torch.int8))
        self.register_buffer("const", const.to(torch.int32))  # bias + zero-point term, int32
        self.register_buffer("acc_scale", acc_scale.clone())
        k = codes.shape[1]
        self.acc_bound = int(k * int(codes.abs().max()) * 128 + int(const.abs().max()))
        if self.acc_bound >= 2**31:  # also keeps const itself within int32
            raise UnsupportedModelError(
                "a Linear's accumulator could exceed int32; its bias is degenerate at this scale"
            )

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        lead = q.shape[:-1]
        x8 = (q.to(torch.int64) - self.shift).to(torch.int8).reshape(-1, q.shape[-1])
        acc = int_matmul(x8, self.weight_t) + self.const.to(torch.int64)
        return acc.reshape(*lead, -1)

    def input_rescale(self, scale: float, x_bound: int) -> Rescale:
        """The rescale from a tensor at real ``scale`` to this layer's input codes."""
        return Rescale(
            scale / self.s_x,
            zero_point=self.zero_point,
            qmin=self.act_range[0],
            qmax=self.act_range[1],
            x_bound=x_bound,
        )


class IntTable(nn.Module):
    """A ``QuantEmbedding``'s int8 codes, gathered by id and rescaled per row (or row group) to a
    common wide scale."""

    def __init__(self, emb: QuantEmbedding, wide: float) -> None:
        super().__init__()
        spec = emb.spec
        if not spec.symmetric or spec.bits > 8:
            raise UnsupportedModelError(
                f"embedding tables need symmetric codes of ≤ 8 bits, got {spec.bits} bits"
            )
        w = emb.weight.detach()
        codes = emb.weight_quantizer.codes(w).to(torch.int64)
        scale = emb.weight_quantizer.scale.double()
        if spec.granularity == "tensor":
            scale = scale.reshape(1, 1, 1).expand(w.shape[0], 1, 1)
            g = codes.reshape(w.shape[0], 1, -1)
        else:
            g = grouped_view(codes, spec.granularity, spec.group_size)
        self.register_buffer("codes", g.to(torch.int8))
        self.rescale = Rescale(scale / wide, x_bound=127, gather=True)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        q = self.rescale(self.codes[ids].to(torch.int64), index=ids)
        return q.reshape(*ids.shape, -1)


def _ln_scale(ln: nn.LayerNorm, weight_bits: int, frac_bits: int) -> tuple[float, int]:
    """Output scale of :func:`i_layernorm` for this LayerNorm (it does not depend on the input
    scale) and a bound on its output codes: ``|norm| ≤ √n · 2^frac_bits``, times ``|q_γ|``, plus
    ``|q_β|``."""
    n = ln.normalized_shape[-1]
    zeros = torch.zeros(1, n, dtype=torch.int64)
    _, scale = i_layernorm(
        zeros, 1.0, ln.weight, ln.bias, frac_bits=frac_bits, weight_bits=weight_bits
    )
    q_beta = 0 if ln.bias is None else int((ln.bias.detach().double() / scale).round().abs().max())
    bound = math.ceil(math.sqrt(n) * 2**frac_bits + 1) * 2 ** (weight_bits - 1) + q_beta
    return float(scale), int(bound)


class IntLayerNorm(nn.Module):
    """:func:`i_layernorm` with the module's affine parameters and eps, at a fixed input scale."""

    def __init__(self, ln: nn.LayerNorm, in_scale: float, weight_bits: int, frac_bits: int):
        super().__init__()
        self.in_scale, self.eps = float(in_scale), float(ln.eps)
        self.weight_bits, self.frac_bits = weight_bits, frac_bits
        self.register_buffer("weight", ln.weight.detach().clone())
        self.register_buffer("bias", ln.bias.detach().clone())
        self.scale, self.bound = _ln_scale(ln, weight_bits, frac_bits)

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        out, _ = i_layernorm(
            q,
            self.in_scale,
            self.weight,
            self.bias,
            eps=self.eps,
            frac_bits=self.frac_bits,
            weight_bits=self.weight_bits,
        )
        return out


class IntBertLayer(nn.Module):
    """One BERT encoder block on integer tensors (see the module docstring)."""

    def __init__(
        self, layer: nn.Module, h_scale: float, h_bound: int, cal: Mapping[str, Any], opts: dict
    ):
        super().__init__()
        att, ffn_in, ffn_out = layer.attention, layer.intermediate, layer.output
        self.heads = int(att.self.num_attention_heads)
        self.head_dim = int(att.self.attention_head_size)
        self.softmax_bits = int(opts["softmax_bits"])
        wb, fb = int(opts["ln_weight_bits"]), int(opts["ln_frac_bits"])
        qkv = {}
        for name in ("query", "key", "value"):
            lin = IntLinear(_quant_linear(getattr(att.self, name), name))
            s_out = float(cal[name])
            qkv[name] = (lin, lin.input_rescale(h_scale, h_bound), s_out)
        self.lin = nn.ModuleDict({k: v[0] for k, v in qkv.items()})
        self.lin_in = nn.ModuleDict({k: v[1] for k, v in qkv.items()})
        qmax = 2 ** (int(opts["qkv_bits"]) - 1) - 1
        self.lin_out = nn.ModuleDict(
            {
                k: Rescale(lin.acc_scale / s, qmin=-qmax, qmax=qmax, x_bound=lin.acc_bound)
                for k, (lin, _, s) in qkv.items()
            }
        )
        s_q, s_k, s_v = (qkv[k][2] for k in ("query", "key", "value"))
        self.score_scale = s_q * s_k / math.sqrt(self.head_dim)

        self.attn_out = IntLinear(_quant_linear(att.output.dense, "attention.output.dense"))
        p_scale = 2.0**-self.softmax_bits * s_v
        ctx_bound = opts["max_tokens"] * (2**self.softmax_bits - 1) * qmax
        self.ctx_in = self.attn_out.input_rescale(p_scale, ctx_bound)
        wide1 = float(cal["attention_ln"])
        self.res1_a = Rescale(self.attn_out.acc_scale / wide1, x_bound=self.attn_out.acc_bound)
        self.res1_h = Rescale(h_scale / wide1, x_bound=h_bound)
        self.ln1 = IntLayerNorm(att.output.LayerNorm, wide1, wb, fb)

        self.ffn_in = IntLinear(_quant_linear(ffn_in.dense, "intermediate.dense"))
        self.ffn_in_q = self.ffn_in.input_rescale(self.ln1.scale, self.ln1.bound)
        self.gelu_scale = float(cal["gelu"])
        self.gelu_in = Rescale(
            self.ffn_in.acc_scale / self.gelu_scale, x_bound=self.ffn_in.acc_bound
        )
        _, gelu_out_scale = i_gelu(torch.zeros(1, dtype=torch.int64), self.gelu_scale)
        self.ffn_out = IntLinear(_quant_linear(ffn_out.dense, "output.dense"))
        self.ffn_out_q = self.ffn_out.input_rescale(gelu_out_scale, INT32_MAX * 2**23)
        wide2 = float(cal["output_ln"])
        self.res2_a = Rescale(self.ffn_out.acc_scale / wide2, x_bound=self.ffn_out.acc_bound)
        self.res2_h = Rescale(self.ln1.scale / wide2, x_bound=self.ln1.bound)
        self.ln2 = IntLayerNorm(ffn_out.LayerNorm, wide2, wb, fb)

    def forward(self, h: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """``h``: [B, T, D] integer hidden states at the previous LayerNorm's scale; ``keep``:
        [B, 1, 1, T] bool, True for real (not padding) keys."""
        b, t, _ = h.shape
        heads = {}
        for name in ("query", "key", "value"):
            acc = self.lin[name](self.lin_in[name](h))
            q = self.lin_out[name](acc)
            heads[name] = q.reshape(b, t, self.heads, self.head_dim).transpose(1, 2)
        scores = heads["query"] @ heads["key"].transpose(-1, -2)  # [B, H, T, T], exact int64
        scores = torch.where(keep, scores, torch.full_like(scores, _MASKED))
        probs, _ = i_softmax(scores, self.score_scale, dim=-1, out_bits=self.softmax_bits)
        ctx = (probs @ heads["value"]).transpose(1, 2).reshape(b, t, -1)
        a = self.attn_out(self.ctx_in(ctx))
        h1 = self.ln1(self.res1_a(a) + self.res1_h(h))
        g_in = self.gelu_in(self.ffn_in(self.ffn_in_q(h1)))
        g, _ = i_gelu(g_in, self.gelu_scale)
        o = self.ffn_out(self.ffn_out_q(g))
        return self.ln2(self.res2_a(o) + self.res2_h(h1))


class IntegerEncoder(nn.Module):
    """The integer-only program of a BERT sentence encoder (see :func:`to_integer_encoder`).

    ``run(input_ids, attention_mask)`` returns the int64 embedding codes (real value
    ``codes · 2^-15``, unit L2 norm); ``forward`` returns that real value as a float tensor.
    """

    def __init__(self, bert: nn.Module, cal: Mapping[str, Any], opts: dict) -> None:
        super().__init__()
        emb = bert.embeddings
        wide = float(cal["embeddings_ln"])
        self.tables = nn.ModuleDict(
            {
                name: IntTable(_quant_embedding(getattr(emb, name), name), wide)
                for name in ("word_embeddings", "position_embeddings", "token_type_embeddings")
            }
        )
        wb, fb = int(opts["ln_weight_bits"]), int(opts["ln_frac_bits"])
        self.ln = IntLayerNorm(emb.LayerNorm, wide, wb, fb)
        layers = []
        h_scale, h_bound = self.ln.scale, self.ln.bound
        for i, layer in enumerate(bert.encoder.layer):
            layers.append(IntBertLayer(layer, h_scale, h_bound, cal["layers"][i], opts))
            h_scale, h_bound = layers[-1].ln2.scale, layers[-1].ln2.bound
        self.layers = nn.ModuleList(layers)
        self.max_tokens = int(opts["max_tokens"])
        self.options = dict(opts)

    def run(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Integer sentence-embedding codes [B, D] (int64, real value ``codes · 2^-15``)."""
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int32, torch.int64):
            raise DataError(
                f"input_ids must be integer token ids of shape [B, T], got {input_ids.dtype} "
                f"{tuple(input_ids.shape)}; tokenize with squeezer.text.tokenize"
            )
        b, t = input_ids.shape
        if t > self.max_tokens:
            raise DataError(f"{t} tokens exceed the model's {self.max_tokens} positions; truncate")
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        mask = mask.to(torch.int64)
        types = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids
        pos = torch.arange(t, device=input_ids.device).expand(b, t)
        h = (
            self.tables["word_embeddings"](input_ids)
            + self.tables["position_embeddings"](pos)
            + self.tables["token_type_embeddings"](types)
        )
        h = self.ln(h)
        keep = (mask != 0)[:, None, None, :]
        for layer in self.layers:
            h = layer(h, keep)
        return integer_normalize((h * mask[..., None]).sum(dim=1))

    @torch.no_grad()
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The sentence embedding as floats (the integer codes times 2^-15)."""
        return (
            self.run(input_ids, attention_mask, token_type_ids).double().mul(2.0**-OUT_BITS).float()
        )


def integer_normalize(v: torch.Tensor) -> torch.Tensor:
    """Integer L2 normalisation of the rows of ``v``: ``round(v · 2^15 / ‖v‖)``.

    Each row is first shifted (left or right, rounded) so its largest entry has ~``(61 −
    bits(D)) / 2`` bits and the sum of squares fits int64; the norm is the exact :func:`isqrt`. An
    all-zero row stays zero.

    Example:
        >>> integer_normalize(torch.tensor([[3, 4], [0, 0]])).tolist()
        [[19661, 26214], [0, 0]]
    """
    v = v.to(torch.int64)
    target = (61 - int(v.shape[-1]).bit_length()) // 2
    t = bit_length(v.abs().amax(dim=-1, keepdim=True)) - target
    left = (-t).clamp(min=0)
    v = torch.where(t > 0, shift_round(v, t.clamp(min=0)), v << left)
    n = isqrt((v * v).sum(dim=-1, keepdim=True)).clamp(min=1)
    return torch.div((v << (OUT_BITS + 1)) + n, 2 * n, rounding_mode="floor")


# --------------------------------------------------------------------------------------------------
# Building the program


def _quant_linear(m: nn.Module, name: str) -> QuantLinear:
    if not isinstance(m, QuantLinear):
        raise UnsupportedModelError(
            f"{name} is a {type(m).__name__}, not a quantized Linear; quantize every Linear "
            "(e.g. squeezer.qbert.qbert_plan(model, 8, group_size=None)) before to_integer_encoder"
        )
    return m


def _quant_embedding(m: nn.Module, name: str) -> QuantEmbedding:
    if not isinstance(m, QuantEmbedding):
        raise UnsupportedModelError(
            f"{name} is a {type(m).__name__}, not a quantized Embedding; quantize the embedding "
            "tables too (squeezer.qbert.qbert_plan does)"
        )
    return m


def _check_bert(bert: nn.Module) -> None:
    cfg = getattr(bert, "config", None)
    if getattr(cfg, "model_type", "bert") != "bert":
        raise UnsupportedModelError(
            f"the integer encoder supports BERT models, not {cfg.model_type!r}"
        )
    act = getattr(cfg, "hidden_act", "gelu")
    if act != "gelu":
        raise UnsupportedModelError(f"the integer encoder implements GELU (erf), not {act!r}")
    if getattr(cfg, "position_embedding_type", "absolute") != "absolute":
        raise UnsupportedModelError("the integer encoder needs absolute position embeddings")


@torch.no_grad()
def _calibrate(bert: nn.Module, run: Any, calib: Iterable[Any], bits: int, pct: float) -> dict:
    """Ranges of the points the fake-quantized model keeps in float, from one pass over ``calib``:
    percentile scales of Q/K/V (symmetric, ``bits``) and maxima of the wide (int32) points."""
    maxima: dict[str, float] = {}
    qkv: dict[str, ActQuantizer] = {}
    hooks = []

    def record_max(key: str, pre: bool):
        def fn(mod: nn.Module, inp: tuple, out: Any = None) -> None:
            x = inp[0] if pre else out
            maxima[key] = max(maxima.get(key, 0.0), float(x.detach().abs().max()))

        return fn

    def observe_into(aq: ActQuantizer):
        def fn(mod: nn.Module, inp: tuple, out: torch.Tensor) -> None:
            aq(out)  # observing: keeps a sample of the values, returns them unchanged

        return fn

    def add(mod: nn.Module, key: str, pre: bool) -> None:
        register = mod.register_forward_pre_hook if pre else mod.register_forward_hook
        hooks.append(register(record_max(key, pre)))

    add(bert.embeddings.LayerNorm, "embeddings_ln", pre=True)
    for i, layer in enumerate(bert.encoder.layer):
        att = layer.attention
        add(att.output.LayerNorm, f"{i}.attention_ln", pre=True)
        add(layer.intermediate.dense, f"{i}.gelu", pre=False)
        add(layer.output.LayerNorm, f"{i}.output_ln", pre=True)
        for name in ("query", "key", "value"):
            aq = ActQuantizer(bits, True, "percentile", pct)
            aq.observing = True
            qkv[f"{i}.{name}"] = aq
            hooks.append(getattr(att.self, name).register_forward_hook(observe_into(aq)))
    n = 0
    try:
        for batch in calib:
            inputs = batch[0] if isinstance(batch, tuple | list) else batch
            run(inputs)
            n += 1
    finally:
        for h in hooks:
            h.remove()
    if n == 0:
        raise DataError("the calibration data held no batches; pass at least one batch of inputs")
    for aq in qkv.values():
        aq.freeze()

    def wide(key: str) -> float:
        return max(maxima.get(key, 0.0), 1e-8) / WIDE_STEPS

    layers = []
    for i in range(len(bert.encoder.layer)):
        d = {k: float(qkv[f"{i}.{k}"].scale) for k in ("query", "key", "value")}
        d.update({k: wide(f"{i}.{k}") for k in ("attention_ln", "gelu", "output_ln")})
        layers.append(d)
    return {"embeddings_ln": wide("embeddings_ln"), "layers": layers, "batches": n}


@torch.no_grad()
def to_integer_encoder(
    qmodel: nn.Module,
    calib: Iterable[Any],
    *,
    qkv_bits: int = 8,
    softmax_bits: int = 8,
    qkv_percentile: float = 99.999,
    ln_weight_bits: int = 12,
    ln_frac_bits: int = 12,
) -> IntegerEncoder:
    """Compile a fake-quantized BERT sentence encoder into an integer-only :class:`IntegerEncoder`.

    ``qmodel`` is the output of :func:`squeezer.quantize` on a :class:`squeezer.hf.SentenceEncoder`
    (or a ``BertModel``) with every ``Linear`` quantized per channel with ``act_bits=8`` and every
    embedding table quantized (:func:`squeezer.qbert.qbert_plan` with ``group_size=None`` does
    this). ``qmodel`` is not modified.

    Args:
        qmodel: the fake-quantized encoder (in eval mode).
        calib: batches of token inputs (dicts, or ``(inputs, targets)`` pairs) for the ranges of
            Q/K/V and of the wide int32 points; a few hundred sentences suffice.
        qkv_bits: bits of the query, key and value codes (I-BERT: 8).
        softmax_bits: bits of the attention probabilities (unsigned, scale 2^-bits).
        qkv_percentile: percentile range of Q/K/V.
        ln_weight_bits: bits of the LayerNorm γ codes.
        ln_frac_bits: fractional bits of the normalised LayerNorm output.

    Returns:
        An :class:`IntegerEncoder`; ``imodel(input_ids, attention_mask)`` approximates
        ``qmodel(input_ids, attention_mask)``.

    Raises:
        UnsupportedModelError: a layer is not quantized in a form the integer program has.

    Example:
        >>> plan = qbert_plan(encoder, 8, group_size=None)       # doctest: +SKIP
        >>> qmodel = quantize(encoder, plan, calib=batches)     # doctest: +SKIP
        >>> imodel = to_integer_encoder(qmodel, batches)        # doctest: +SKIP
        >>> imodel.run(**tokenize(tokenizer, ["A sentence."])).dtype  # doctest: +SKIP
        torch.int64
    """
    from ..data import forward
    from ..encoders import bert_of

    bert = bert_of(qmodel)
    _check_bert(bert)
    for name, bits in (("qkv_bits", qkv_bits), ("softmax_bits", softmax_bits)):
        if not 2 <= int(bits) <= 8:
            raise ConfigError(f"{name} must be between 2 and 8, got {bits}")
    was_training = qmodel.training
    qmodel.eval()
    try:
        cal = _calibrate(
            bert, lambda x: forward(qmodel, x), calib, int(qkv_bits), float(qkv_percentile)
        )
    finally:
        qmodel.train(was_training)
    opts = {
        "qkv_bits": int(qkv_bits),
        "softmax_bits": int(softmax_bits),
        "ln_weight_bits": int(ln_weight_bits),
        "ln_frac_bits": int(ln_frac_bits),
        "max_tokens": int(bert.embeddings.position_embeddings.num_embeddings),
    }
    return IntegerEncoder(bert, cal, opts).eval()
