"""Which storages are alive while a schedule runs, against what its memory model counts.

:func:`audit` runs one :meth:`~squeezer.train.remat.execute.Rematerialized.step` under a
dispatch mode that records every storage an operation creates (with the node of the schedule
that was running, the operation and its shape) and, after each node and the frees that follow
it, compares the bytes still alive per creating node with the model: a forward's storages count
``memory`` while the node is held and ``output`` while its output part is, a backward's
``memory`` while it is held. Storages alive beyond that are the executor's leaks (or the model's
undercount), listed with where they are held: a value of a forward, a gradient a backward passed
on, or nothing the executor holds (an autograd graph's saved tensor, a gradient buffer).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .execute import Rematerialized
from .solve import matrices, output_keep


@dataclass
class Excess:
    """Bytes alive after a node beyond what the model counts for their creating node."""

    stage: int
    after: str
    creator: str
    alive: int
    modelled: int
    #: ``(bytes, operation, shape, held as)`` of the creator's live storages, largest first.
    storages: list[tuple[int, str, tuple[int, ...], str]] = field(default_factory=list)


@dataclass
class Audit:
    """The result of :func:`audit`: per probe point (after each node), the live bytes of the
    storages the step created and the model's count; and the excesses over the model."""

    points: list[tuple[int, str, int, int]]  # (stage, after node, alive, modelled)
    excess: list[Excess]
    #: ``(stage, node) -> (nodes the model holds, segments with forward values held, segments
    #: with gradients held)`` after each node.
    held: dict[tuple[int, int], tuple[list[int], list[int], list[int]]] = field(
        default_factory=dict
    )

    @property
    def worst(self) -> tuple[int, str, int, int]:
        """The point where the live bytes exceed the model's the most."""
        return max(self.points, key=lambda p: p[2] - p[3])

    def at(self, stage: int, after: str) -> list[Excess]:
        return [e for e in self.excess if e.stage == stage and e.after == after]


class _Tracker(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.made: dict[int, tuple[StorageWeakRef, str, tuple[int, ...], int]] = {}
        self.creator = -1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        given = {
            t.untyped_storage()._cdata
            for t in tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor)
        }
        for t in tree_leaves(out):  # new storages only: not in-place results, not views
            if isinstance(t, torch.Tensor) and t.untyped_storage()._cdata not in given:
                st = t.untyped_storage()
                old = self.made.get(st._cdata)
                if old is None or old[0].expired():
                    self.made[st._cdata] = (
                        StorageWeakRef(st), str(func.overloadpacket.__name__), tuple(t.shape),
                        self.creator,
                    )  # fmt: skip
        return out

    def alive(self) -> list[tuple[int, int, str, tuple[int, ...], int]]:
        """``(cdata, bytes, op, shape, creator)`` of the recorded storages still alive."""
        out = []
        for key, (ref, op, shape, creator) in list(self.made.items()):
            if ref.expired():
                del self.made[key]
                continue
            n = torch.UntypedStorage._new_with_weak_ptr(ref.cdata).nbytes()
            if n:
                out.append((key, n, op, shape, creator))
        return out


def _holders(fwd: dict[int, dict[str, Any]], bwd: dict[int, dict[str, Any]]) -> dict[int, str]:
    where: dict[int, str] = {}
    for s, held in fwd.items():
        for name, v in held["values"].items():
            if isinstance(v, torch.Tensor):
                where.setdefault(v.untyped_storage()._cdata, f"F{s} value {name}")
        for name, v in held["leaves"].items():
            where.setdefault(v.untyped_storage()._cdata, f"F{s} input leaf {name}")
    for s, grads in bwd.items():
        for name, v in grads.items():
            where.setdefault(v.untyped_storage()._cdata, f"B{s} gradient of {name}")
    return where


def audit(rm: Rematerialized, inputs: Any, targets: Any, *, slack: int = 4096) -> Audit:
    """Run one step of ``rm`` and compare the storages alive after every node with its model
    (see the module's docstring); excesses of more than ``slack`` bytes per creator are listed."""
    graph = rm.graph
    n = graph.n
    R, S = matrices(rm.schedule, n)
    SO = output_keep(graph, R) & S
    mem = [nd.memory for nd in graph.nodes]
    out = [nd.output for nd in graph.nodes]
    tracker = _Tracker()
    state: dict[str, Any] = {"stage": -1}
    points: list[tuple[int, str, int, int]] = []
    excess: list[Excess] = []

    def probe(event: str, t: int, k: int, fwd: dict, bwd: dict) -> None:
        if state["stage"] != t:  # entering stage t: what the model holds
            state.update(stage=t, present={i for i in range(n) if S[t, i]})
            state["present_o"] = {i for i in state["present"] if SO[t, i]}
        if event == "run":
            tracker.creator = k
            return
        present, present_o = state["present"], state["present_o"]
        _, freed, released = next(e for e in rm._plan[t] if e[0] == k)
        present.add(k)
        if graph.nodes[k].kind == "F":
            present_o.add(k)
        present_o.difference_update(released)
        present.difference_update(freed)
        present_o.difference_update(freed)
        tracker.creator = -1
        with torch.utils._python_dispatch._disable_current_modes():
            live = tracker.alive()
            where = _holders(fwd, bwd)
        by: dict[int, list] = {}
        for key, nbytes, op, shape, creator in live:
            by.setdefault(creator, []).append((nbytes, op, shape, where.get(key, "not held")))
        modelled_total = sum(mem[i] for i in present) + sum(out[i] for i in present_o)
        points.append((t, graph.nodes[k].name, sum(x[1] for x in live), modelled_total))
        state.setdefault("held", {})[(t, k)] = (sorted(present), sorted(fwd), sorted(bwd))
        for c, items in by.items():
            modelled = 0
            if c >= 0:
                modelled = (mem[c] if c in present else 0) + (out[c] if c in present_o else 0)
            alive = sum(x[0] for x in items)
            if alive > modelled + slack:
                excess.append(
                    Excess(
                        t, graph.nodes[k].name, graph.nodes[c].name if c >= 0 else "none",
                        alive, modelled, sorted(items, reverse=True),
                    )
                )  # fmt: skip

    rm.probe = probe
    try:
        with tracker:
            rm.step(inputs, targets)
    finally:
        rm.probe = None
    return Audit(points, excess, state.get("held", {}))


def summary(result: Audit, top: int = 8) -> str:
    """A readable account of the worst point: live against modelled, and the excesses there."""
    t, after, alive, modelled = result.worst
    lines = [f"worst after {after} (stage {t}): alive {alive / 1e6:.1f} MB, "
             f"modelled {modelled / 1e6:.1f} MB"]  # fmt: skip
    for e in sorted(result.at(t, after), key=lambda e: e.modelled - e.alive)[:top]:
        lines.append(
            f"  {e.creator}: alive {e.alive / 1e6:.2f} MB, modelled {e.modelled / 1e6:.2f}"
        )
        for nbytes, op, shape, held in e.storages[:4]:
            lines.append(f"    {nbytes / 1e6:.2f} MB {op}{list(shape)} {held}")
    return "\n".join(lines)


__all__ = ["Audit", "Excess", "audit", "summary"]
