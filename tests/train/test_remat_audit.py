"""Rematerialization's memory model against what the executor really holds: the storages alive
after every node (the audit) and the profiler's allocation peak of a recomputing schedule, on a
per-op graph of an attention block (views of the QKV projection cross segments)."""

from __future__ import annotations

import copy
from dataclasses import replace

import torch
from torch import nn

from squeezer.train.remat import TrainGraph, allocation_peak, remat, solve, store_all
from squeezer.train.remat.audit import audit, summary


class _Attention(nn.Module):
    def __init__(self, d: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.ln = nn.LayerNorm(d)
        self.qkv, self.proj, self.fc = nn.Linear(d, 3 * d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln(x)).reshape(b, t, 3, self.heads, d // self.heads).unbind(2)
        a = nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        )
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.fc(torch.relu(x))


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(_Attention(), _Attention(), _Attention())
        self.head = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x).mean(1))


def _setup():
    torch.manual_seed(0)
    x, y = torch.randn(32, 64, 32), torch.randint(0, 3, (32,))
    rm = remat(_Net(), nn.functional.cross_entropy, (x, y), segments=1000, reps=1)
    return rm, x, y


def test_views_join_their_base_and_the_model_counts_what_stays():
    rm, x, y = _setup()
    full = store_all(rm.graph)
    s = solve(rm.graph, int(0.5 * full.peak), rounding=True)
    assert s is not None and s.recomputed > 0
    r = copy.copy(rm)
    r.set_schedule(s)
    r.step(x, y)  # parameter gradients exist from now on, as in the model
    result = audit(r, x, y)
    # after every node, the storages alive are what the model holds (within a few small tensors)
    assert result.excess == [], summary(result)
    t, after, alive, modelled = result.worst
    assert alive <= modelled + 16384, summary(result)
    for p in r.model.parameters():
        p.grad.zero_()
    measured, _, _ = allocation_peak(lambda: r.step(x, y))
    assert measured <= 1.05 * s.peak, (measured, s.peak)
    assert measured <= 0.6 * allocation_peak(lambda: rm.step(x, y))[0]


def test_audit_reports_storage_the_model_does_not_count():
    rm, x, y = _setup()
    # the largest forward value claimed to take no memory: the audit finds it alive
    big = max((nd for nd in rm.graph.nodes if nd.kind == "F"), key=lambda nd: nd.memory)
    nodes = tuple(
        replace(nd, memory=0) if nd.name == big.name else nd for nd in rm.graph.nodes
    )  # fmt: skip
    r = copy.copy(rm)
    r.graph = TrainGraph(nodes)
    r.set_schedule(store_all(r.graph))
    r.step(x, y)
    result = audit(r, x, y)
    found = [e for e in result.excess if e.creator == big.name]
    assert found and max(e.alive for e in found) >= 0.9 * big.memory, summary(result)
    assert result.worst[2] - result.worst[3] >= 0.9 * big.memory
