"""Embedding tables stored as their codes in the ExecuTorch program
(:mod:`squeezer.export.executorch`).

XNNPACK has no embedding kernel, and a weight-only table of the float twin is stored in FP32:
MiniLM's 30522 x 384 word table alone is 47 MB of a 59 MB program whose plan is 23 MB. A table
with symmetric per-row (or per-tensor) codes of at most 8 bits is kept here as its int8 codes
and its row scales; a lookup gathers the rows' codes and scales and multiplies them
(ExecuTorch's portable ``embedding`` and ``mul``), which is squeezer's dequantized row, so the
program reads the same values from a quarter of the bytes.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from ..graph import get_module, set_module
from .layers import _Layer


class _CodeEmbedding(nn.Module):
    """An ``nn.Embedding`` whose table is int8 codes times per-row scales."""

    def __init__(self, codes: np.ndarray, scale: np.ndarray, padding_idx: int | None) -> None:
        super().__init__()
        self.register_buffer("codes", torch.from_numpy(codes.astype(np.int8)))
        self.register_buffer("row_scale", torch.from_numpy(scale.astype(np.float32)))
        self.padding_idx = padding_idx

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = nn.functional.embedding(ids, self.codes).to(torch.float32)
        return rows * nn.functional.embedding(ids, self.row_scale)


def code_embeddings(twin: nn.Module, layers: Mapping[str, _Layer]) -> dict[str, str]:
    """Replace each plain ``nn.Embedding`` of ``twin`` whose layer has symmetric per-row or
    per-tensor codes within int8 by a :class:`_CodeEmbedding`, in place. Returns {FQN: how it
    is stored}; the other tables stay FP32."""
    out = {}
    for fqn, layer in layers.items():
        if layer.kind != "embedding" or layer.scale.shape[1] != 1:
            continue
        if np.any(layer.zero_point != 0) or layer.qmin < -128 or layer.qmax > 127:
            continue
        emb = get_module(twin, fqn)
        if type(emb) is not nn.Embedding or emb.max_norm is not None:
            continue
        set_module(twin, fqn, _CodeEmbedding(layer.codes, layer.scale, emb.padding_idx))
        out[fqn] = f"int8 codes x row scales ({layer.spec.bits}-bit embedding, portable kernels)"
    return out


__all__ = ["code_embeddings"]
