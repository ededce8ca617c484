"""Weight-only Linear layers as ONNX Runtime's block-quantized ``MatMulNBits`` (com.microsoft):
:func:`_matmul_nbits`.

Mapping to ``MatMulNBits`` (codes in blocks along K, ``(code − zero point) × scale``): squeezer's
symmetric b-bit codes q are stored as q + 2^(B−1) (B = 4 up to 4 bits, else 8) with the default zero
point 2^(B−1); asymmetric codes and their zero points are stored as they are. Groups of
g ∈ {16, …, 256} entries along a row map to blocks of g; per-channel and per-tensor scales are
repeated over the row's blocks. Other layers keep their codes in int8 QDQ (sub-8-bit codes still
take a byte each there).
"""

from __future__ import annotations

import math

import numpy as np

from .codes import _pack, _WeightCodes
from .common import NBITS_BLOCKS
from .layers import _Layer
from .onnx_graph import _Graph


def _matmul_nbits(
    graph: _Graph,
    n,
    layer: _Layer,
    w: _WeightCodes,
    bias: np.ndarray | None,
    accuracy_level: int | None,
):
    """A MatMulNBits node (4-bit codes up to 4 bits, else 8-bit) for a weight-only Linear, or
    None if the layout does not fit (then the caller falls back to int8 QDQ).

    Weight-only layers go here even at 8 bits: left as DequantizeLinear → MatMul, ONNX Runtime
    turns them into MatMulNBits itself with ``accuracy_level`` 4, which quantizes the float
    input to int8 on the fly (measured: ~0.5 output step off squeezer). The nodes written
    here leave ``accuracy_level`` unset unless asked, so the input stays float, as squeezer
    computes it.
    """
    bits = 4 if layer.qmax - layer.qmin <= 15 else 8
    rows, k = w.codes.shape
    groups = w.scale.shape[1]
    if groups > 1:
        block = k // groups
        if block not in NBITS_BLOCKS:
            return None
        scale, zp = w.scale, w.zero_point
    else:
        fits = [b for b in NBITS_BLOCKS if k % b == 0]
        block = fits[-1] if fits else min([b for b in NBITS_BLOCKS if b >= k] or [32])
        nb = math.ceil(k / block)
        scale = np.repeat(w.scale, nb, axis=1)
        zp = np.repeat(w.zero_point, nb, axis=1)
    nb = scale.shape[1]
    symmetric = layer.qmin < 0
    offset = 2 ** (bits - 1)  # MatMulNBits' default zero point
    u = w.codes + offset if symmetric else w.codes.copy()
    pad_value = offset if symmetric else zp[:, -1:]
    if nb * block > k:
        pad = np.broadcast_to(pad_value, (rows, nb * block - k))
        u = np.concatenate([u, pad], axis=1)
    if u.min() < 0 or u.max() >= 2**bits:
        return None
    u = u.astype(np.uint8).reshape(rows, nb, block)
    base = f"{layer.fqn}.weight"
    ins = [
        n.input[0],
        graph.add_init(f"{base}_q{bits}", _pack(u, bits)),
        graph.add_init(f"{base}_scales", scale.astype(np.float32).reshape(-1)),
    ]
    if symmetric:
        ins.append("")
    else:
        z = _pack(zp.astype(np.uint8), bits).reshape(-1)  # packed per row
        ins.append(graph.add_init(f"{base}_zero_points", z))
    if bias is not None:
        ins += ["", graph.add_init(f"{layer.fqn}.bias", bias.astype(np.float32))]
    graph.uses_ms = True
    layer.status, layer.block = f"matmulnbits-{bits}", int(block)
    node = graph.node(
        "MatMulNBits",
        ins,
        [n.output[0]],
        K=int(k),
        N=int(rows),
        bits=bits,
        block_size=int(block),
        **({} if accuracy_level is None else {"accuracy_level": int(accuracy_level)}),
        name=n.name,
    )
    return [node]
