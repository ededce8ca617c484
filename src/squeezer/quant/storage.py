"""Compact storage of a quantized model: weight codes packed at their bit-width (two 4-bit codes per
byte, one code per byte up to 8 bits) beside their scales, so ``model.safetensors`` is really small.

The dequantized weight s · (q − z) re-quantizes to the same codes (quantization is idempotent), so a
model rebuilt from packed codes computes exactly what the saved one did.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .modules import QuantMixin

#: State-dict entry name (beside the layer's other entries) holding its packed weight codes.
CODES_KEY = "weight_codes"


def pack_codes(codes: torch.Tensor, bits: int, qmin: int) -> torch.Tensor:
    """Codes → a flat uint8 bit stream of ``bits`` bits per code (little-endian within each byte).

    Example:
        >>> pack_codes(torch.tensor([-7, 7, 0]), 4, -7)
        tensor([224,   7], dtype=torch.uint8)
    """
    u = (codes.reshape(-1).to(torch.int16) - qmin).to(torch.uint8)
    if bits == 8:
        return u
    planes = (u.unsqueeze(1) >> torch.arange(bits, dtype=torch.uint8)) & 1  # (n, bits)
    return torch.from_numpy(np.packbits(planes.reshape(-1).numpy(), bitorder="little"))


def unpack_codes(packed: torch.Tensor, bits: int, qmin: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: an int16 tensor of ``numel`` codes."""
    if bits == 8:
        return packed[:numel].to(torch.int16) + qmin
    flat = np.unpackbits(packed.numpy(), count=numel * bits, bitorder="little")
    planes = torch.from_numpy(flat).reshape(numel, bits).to(torch.int16)
    return (planes << torch.arange(bits, dtype=torch.int16)).sum(1).to(torch.int16) + qmin


def packed_state_dict(qmodel: nn.Module) -> dict[str, torch.Tensor]:
    """``qmodel.state_dict()`` with every quantized weight replaced by its packed codes."""
    sd = dict(qmodel.state_dict())
    for fqn, m in qmodel.named_modules():
        if isinstance(m, QuantMixin) and m.spec.bits <= 8:
            qp = m.weight_quantizer.qparams()
            codes = m.weight_quantizer.codes(m.weight)
            prefix = f"{fqn}." if fqn else ""
            del sd[f"{prefix}weight"]
            if m.spec.symmetric:  # zero points are all zero: not worth storing
                del sd[f"{prefix}weight_quantizer.zero_point"]
            sd[f"{prefix}{CODES_KEY}"] = pack_codes(codes, m.spec.bits, qp.qmin)
    return sd


@torch.no_grad()
def unpack_into(qmodel: nn.Module, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Turn packed codes in ``sd`` back into dequantized float weights of ``qmodel``'s layers
    (whose quantizer buffers must already hold the saved scales); returns the rest of ``sd``."""
    sd = dict(sd)
    for fqn, m in qmodel.named_modules():
        prefix = f"{fqn}." if fqn else ""
        key = f"{prefix}{CODES_KEY}"
        if key in sd and isinstance(m, QuantMixin):
            wq = m.weight_quantizer
            wq.scale = sd[f"{prefix}weight_quantizer.scale"].to(wq.scale.dtype)
            zp_key = f"{prefix}weight_quantizer.zero_point"
            sd.setdefault(zp_key, torch.zeros_like(wq.scale))
            wq.zero_point = sd[zp_key].to(wq.scale.dtype)
            qp = wq.qparams()
            codes = unpack_codes(sd.pop(key), m.spec.bits, qp.qmin, m.weight.numel())
            codes = codes.reshape(m.weight.shape).to(m.weight.dtype)
            g = wq.grouped(codes)  # rows along the layer's channel axis, as the scales are
            w = wq.ungrouped((g - qp.zero_point) * qp.scale, m.weight.shape)
            m.weight.copy_(w)
            sd[f"{prefix}weight"] = m.weight.detach().clone()
    return sd
