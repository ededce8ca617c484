"""Every quantized-module type at every granularity: the quantized layer against its float
reference (an SQNR floor that falls 6 dB a bit), the packed storage round trip, and the caller's
layer untouched. Parametrized over the registries, so a new type or granularity is tested."""

from __future__ import annotations

import math
import zlib

import pytest
import torch
from torch import nn

from squeezer.config import GRANULARITIES, LayerQuant, Plan
from squeezer.measure import model_bytes
from squeezer.quant.apply import load_quantized, quantize
from squeezer.quant.modules import QUANT_MODULES, QuantMixin
from squeezer.quant.storage import packed_state_dict

pytestmark = pytest.mark.usefixtures("one_thread")


def make(kind: type[nn.Module], g: torch.Generator) -> tuple[nn.Module, torch.Tensor]:
    """A seeded layer of ``kind`` with an input batch for it (8 output channels, rows of 16)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=g)))
        layer = {
            nn.Linear: lambda: nn.Linear(16, 8),
            nn.Conv1d: lambda: nn.Conv1d(4, 8, 4),
            nn.Conv2d: lambda: nn.Conv2d(4, 8, 2),
            nn.ConvTranspose1d: lambda: nn.ConvTranspose1d(16, 8, 1),
            nn.ConvTranspose2d: lambda: nn.ConvTranspose2d(16, 8, 1),
            nn.Embedding: lambda: nn.Embedding(8, 16),
        }[kind]()
    x = {
        nn.Linear: lambda: torch.randn(32, 16, generator=g),
        nn.Conv1d: lambda: torch.randn(8, 4, 12, generator=g),
        nn.Conv2d: lambda: torch.randn(8, 4, 6, 6, generator=g),
        nn.ConvTranspose1d: lambda: torch.randn(8, 16, 5, generator=g),
        nn.ConvTranspose2d: lambda: torch.randn(8, 16, 3, 3, generator=g),
        nn.Embedding: lambda: torch.randint(0, 8, (32,), generator=g),
    }[kind]()
    return layer, x


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    return 10 * math.log10(float(ref.pow(2).sum()) / max(float((ref - out).pow(2).sum()), 1e-30))


def test_the_registry_covers_the_quantizable_types():
    from squeezer.graph import QUANTIZABLE_TYPES

    assert set(QUANT_MODULES) == set(QUANTIZABLE_TYPES)


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("kind", list(QUANT_MODULES), ids=lambda k: k.__name__)
@pytest.mark.parametrize("bits", [8, 4])
def test_each_type_and_granularity_against_float(kind, granularity, bits):
    g = torch.Generator().manual_seed(zlib.crc32(f"{kind.__name__}/{granularity}/{bits}".encode()))
    layer, x = make(kind, g)
    net = nn.Sequential(layer)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    spec = LayerQuant(bits=bits, granularity=granularity,
                      group_size=8 if granularity == "group" else None)  # fmt: skip
    plan = Plan({"0": spec})
    q = quantize(net, plan).eval()
    assert isinstance(q[0], QUANT_MODULES[kind]) and isinstance(q[0], QuantMixin)
    with torch.no_grad():
        ref, out = net(x), q(x)
    # Weights only: 6.02 dB a bit less a margin for the range and the sum over inputs.
    floor = 6.02 * bits - (14 if granularity == "tensor" else 11)
    assert sqnr_db(ref, out) > floor, (kind.__name__, granularity, bits, sqnr_db(ref, out))
    # Packed storage: the reloaded model computes the same, and the size is what measure says.
    sd = packed_state_dict(q)
    again = load_quantized(net, plan, sd).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x), out, rtol=0, atol=0)
    assert model_bytes(net, plan) < model_bytes(net) * (bits + 2) / 32 + 200
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # untouched
