"""Running a training step by a rematerialization schedule, in PyTorch.

Each segment's forward runs on fresh autograd leaves of its inputs, so its autograd graph is its
own: keeping ``F_s`` keeps that graph, freeing it drops the graph and its saved tensors, and a
recomputation builds it anew. A tensor the graph saves that is one of the segment's inputs is not
held by the graph: a ``saved_tensors_hooks`` pack records a reference to the producing segment's
value, which the schedule keeps until the backward that unpacks it (Checkmate's edge from ``B_s``
to that forward). A recomputation that is never backpropagated runs without autograd.

Recomputation must not change what training computes: random draws (dropout) are replayed from the
generator state of the segment's first run (as ``torch.utils.checkpoint`` does), and BatchNorm's
running statistics are updated by the first run only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import fx, nn

from ...errors import ConfigError
from ...graph import copy_model
from .graph import LossFn, Segment, TrainGraph, measure, run_nodes, segment, trace
from .solve import Schedule, matrices, peak_floor, simulate, solve, store_all


@contextlib.contextmanager
def _first_run_stats(modules: list[nn.Module]) -> Iterator[None]:
    """BatchNorm running statistics left as they were (a recomputation's updates are discarded)."""
    saved = []
    for m in modules:
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            saved.append(
                (
                    m,
                    {
                        k: getattr(m, k).clone()
                        for k in ("running_mean", "running_var", "num_batches_tracked")
                        if getattr(m, k, None) is not None
                    },
                )
            )  # noqa: E501
    try:
        yield
    finally:
        with torch.no_grad():
            for m, bufs in saved:
                for k, v in bufs.items():
                    getattr(m, k).copy_(v)


def _tensors(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, dict):
        return [v for v in x.values() if isinstance(v, torch.Tensor)]
    return []


class Rematerialized(nn.Module):
    """A model whose training step follows a rematerialization schedule.

    ``step(inputs, targets)`` runs forward and backward as the schedule says and leaves the
    parameter gradients in :attr:`model` exactly as ``loss_fn(model(inputs), targets).backward()``
    would; ``forward`` is the plain model (for evaluation). Build it with :func:`remat`.

    Attributes:
        model: the trained network (a copy of the one given).
        graph: the measured :class:`~squeezer.train.remat.graph.TrainGraph`.
        schedule: the :class:`~squeezer.train.remat.solve.Schedule` followed.
    """

    def __init__(
        self,
        model: nn.Module,
        gm: fx.GraphModule,
        segments: list[Segment],
        graph: TrainGraph,
        schedule: Schedule,
    ) -> None:
        super().__init__()
        self.model = model
        self.graph = graph
        self.segments = segments
        self._gm = [gm]  # not a submodule: it shares model's parameters
        out = next(n for n in gm.graph.nodes if n.op == "output")
        self._loss_name = out.args[0].name
        self.set_schedule(schedule)
        #: ``probe(event, stage, node, fwd, bwd)``, called with ``"run"`` before each node and
        #: ``"done"`` after it and its frees (the held values by segment); for audits.
        self.probe: Callable[..., None] | None = None
        self._placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
        modules = dict(gm.named_modules())
        self._seg_modules = [
            [modules[n.target] for n in seg.nodes if n.op == "call_module"] for seg in segments
        ]
        self._consumers: list[dict[str, list[int]]] = [{} for _ in segments]
        for seg in segments:
            for name, p in seg.inputs.items():
                if p >= 0:
                    self._consumers[p].setdefault(name, []).append(seg.index)

    def set_schedule(self, schedule: Schedule) -> None:
        """Follow ``schedule`` from the next step on."""
        n = self.graph.n
        R, S = matrices(schedule, n)
        _, _, self._plan = simulate(self.graph, R, S)
        self.schedule = schedule
        self._keep = [set(k) for k in schedule.keep]
        # The instance of F_s that B_s backpropagates is the last one computed before it.
        self._graph_run: set[tuple[int, int]] = set()
        k = len(self.segments)
        for s in range(k):
            b = 2 * k - 1 - s
            last = max(t for t in range(b + 1) if R[t, s])
            self._graph_run.add((last, s))
        # The outputs a segment's own backward does not read are released where the schedule
        # frees the node's output part (after their last reader), though the node is held on.
        self._loose = [
            [o for o in seg.outputs if o not in seg.pinned and o != self._loss_name]
            for seg in self.segments
        ]

    def forward(self, inputs: Any) -> Any:
        return self.model(inputs)

    def step(self, inputs: Any, targets: Any) -> torch.Tensor:
        """One forward and backward by the schedule; returns the (detached) loss."""
        gm = self._gm[0]
        k = len(self.segments)
        env0 = dict(zip(self._placeholders, (inputs, targets), strict=True))
        protected = {
            t.untyped_storage().data_ptr()
            for t in (*gm.parameters(), *gm.buffers(), *_tensors(inputs), *_tensors(targets))
        }
        fwd: dict[int, dict[str, Any]] = {}
        bwd: dict[int, dict[str, torch.Tensor]] = {}
        rng: dict[int, torch.Tensor] = {}
        loss: torch.Tensor | None = None

        def value(name: str, producer: int) -> Any:
            if producer < 0:
                return env0[name]
            if producer not in fwd:
                raise RuntimeError(f"schedule error: F{producer} is not in memory for {name}")
            return fwd[producer]["values"][name]

        def run_forward(s: int, with_graph: bool) -> None:
            nonlocal loss
            seg = self.segments[s]
            local: dict[str, Any] = {}
            leaves: dict[str, torch.Tensor] = {}
            refs: dict[int, tuple[str, int]] = {}
            for name, p in seg.inputs.items():
                v = value(name, p)
                if with_graph and p >= 0 and name in seg.grad_inputs:
                    v = v.detach().requires_grad_(True)
                    leaves[name] = v
                    refs[v.untyped_storage().data_ptr()] = (name, p)
                local[name] = v

            def pack(t: torch.Tensor) -> Any:
                ref = refs.get(t.untyped_storage().data_ptr())
                if ref is None or t.dtype != value(*ref).dtype:
                    return t
                return (ref, tuple(t.shape), t.stride(), t.storage_offset())

            def unpack(packed: Any) -> torch.Tensor:
                if isinstance(packed, torch.Tensor):
                    return packed
                (name, p), shape, stride, offset = packed
                return value(name, p).detach().as_strided(shape, stride, offset)

            first = s not in rng
            if first:
                rng[s] = torch.get_rng_state()
                ctx: Any = contextlib.nullcontext()
            else:
                ctx = _first_run_stats(self._seg_modules[s])
            with contextlib.ExitStack() as stack:
                stack.enter_context(ctx)
                if not first:
                    stack.enter_context(torch.random.fork_rng(devices=[]))
                    torch.set_rng_state(rng[s])
                if with_graph:
                    stack.enter_context(torch.enable_grad())
                    stack.enter_context(torch.autograd.graph.saved_tensors_hooks(pack, unpack))
                else:
                    stack.enter_context(torch.no_grad())
                run_nodes(gm, seg.nodes, local, keep=set(seg.outputs))
            fwd[s] = {"values": {o: local[o] for o in seg.outputs}, "leaves": leaves}
            local.clear()
            if first and self._loss_name in fwd[s]["values"]:
                loss = fwd[s]["values"][self._loss_name].detach().clone()

        def run_backward(s: int) -> None:
            seg = self.segments[s]
            f = fwd[s]
            tensors, grads = [], []
            for o in seg.outputs:
                t = f["values"][o]
                if not isinstance(t, torch.Tensor) or t.grad_fn is None:
                    continue
                if o == self._loss_name:
                    g = torch.ones_like(t)
                else:
                    parts = [
                        bwd[c][o] for c in self._consumers[s].get(o, []) if o in bwd.get(c, {})
                    ]
                    if not parts:
                        continue
                    g = parts[0]
                    for part in parts[1:]:  # in place: each part is a consumer's own buffer
                        g.add_(part)
                tensors.append(t)
                grads.append(g)
            if tensors:
                torch.autograd.backward(tensors, grads)
            bwd[s] = {n: leaf.grad for n, leaf in f["leaves"].items() if leaf.grad is not None}
            f["leaves"] = {}

        def release(t: Any, skip: tuple[int, str]) -> None:
            """Free ``t``'s storage now, unless another value still held shares it. The graphs
            of kept consumers pin their inputs' storage through their autograd leaves, though
            they only need the shapes: without this a value the schedule frees would live on."""
            if not isinstance(t, torch.Tensor) or t.untyped_storage().nbytes() == 0:
                return
            ptr = t.untyped_storage().data_ptr()
            if ptr in protected:  # the caller's batch, parameters and buffers
                return
            for p, held in fwd.items():
                for name, v in held["values"].items():
                    if (p, name) != skip and isinstance(v, torch.Tensor):
                        if v.untyped_storage().data_ptr() == ptr:
                            return
            t.untyped_storage().resize_(0)

        def drop(i: int) -> None:
            s = self.graph.nodes[i].segment
            if self.graph.nodes[i].kind == "B":
                bwd.pop(s, None)
                return
            held = fwd.pop(s, None)
            if held is not None:
                for name, v in held["values"].items():
                    release(v, skip=(s, name))

        for t, stage in enumerate(self._plan):
            for i in list(range(2 * k)):
                held = (fwd if self.graph.nodes[i].kind == "F" else bwd).get(
                    self.graph.nodes[i].segment
                )
                if held is not None and i not in self._keep[t]:
                    drop(i)
            for node_index, freed, released in stage:
                node = self.graph.nodes[node_index]
                if self.probe is not None:
                    self.probe("run", t, node_index, fwd, bwd)
                if node.kind == "F":
                    run_forward(node.segment, (t, node.segment) in self._graph_run)
                else:
                    run_backward(node.segment)
                for i in released:
                    p = self.graph.nodes[i].segment
                    for name in self._loose[p] if p in fwd else ():
                        release(fwd[p]["values"][name], skip=(p, name))
                for i in freed:
                    drop(i)
                if self.probe is not None:
                    self.probe("done", t, node_index, fwd, bwd)
        fwd.clear()
        bwd.clear()
        assert loss is not None
        return loss


def remat(
    model: nn.Module,
    loss_fn: LossFn,
    example: tuple[Any, Any],
    *,
    budget: int | None = None,
    fraction: float | None = None,
    segments: int = 8,
    leaf: Callable[[nn.Module, str], bool] | None = None,
    time_limit: float = 60.0,
    rounding: bool | None = None,
    reps: int = 3,
) -> Rematerialized:
    """Trace ``model``'s training step, solve Checkmate's schedule under a memory budget, and
    return a :class:`Rematerialized` model that trains by it (``model`` itself is not modified).

    Args:
        model: the network (in train mode for the step; a copy is taken).
        loss_fn: ``loss_fn(outputs, targets)`` returning the scalar loss.
        example: one ``(inputs, targets)`` batch of the size training will use.
        budget: the peak memory of saved values allowed, in bytes (as modelled from the
            measurements), or
        fraction: that budget as a fraction of the store-everything schedule's modelled peak.
            Neither: store everything (no recomputation).
        segments: how many forward segments the step is cut into (the graph has twice as many
            nodes; the MILP grows with their square).
        leaf: ``leaf(module, name)``: which submodules stay one call when tracing.
        time_limit: seconds for the MILP before the LP-rounding fallback.
        rounding: ``True`` to use the LP rounding only, ``False`` never.
        reps: timing repetitions per segment.

    Raises:
        ConfigError: if no schedule fits the budget.

    Example:
        >>> net = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 2))
        >>> batch = (torch.randn(8, 16), torch.zeros(8).long())
        >>> rm = remat(net, nn.functional.cross_entropy, batch, segments=2)
        >>> loss = rm.step(*batch)   # gradients now in rm.model's parameters
        >>> rm.schedule.method, [n.name for n in rm.graph.nodes]
        ('store-all', ['F0', 'F1', 'B1', 'B0'])
    """
    net = copy_model(model).train()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    gm = trace(net, loss_fn, leaf=leaf)
    segs, env = segment(gm, example, segments)
    for seg in segs:
        seg.grad_inputs = {
            n for n, p in seg.inputs.items()
            if p >= 0 and isinstance(env[n], torch.Tensor) and env[n].requires_grad
        }  # fmt: skip
    graph = measure(gm, segs, env, reps=reps)
    env.clear()
    net.load_state_dict(state)  # tracing ran BatchNorm many times: restore its statistics
    full = store_all(graph)
    if budget is None and fraction is not None:
        if not 0 < fraction <= 1:
            raise ConfigError(f"fraction={fraction}; use a value in (0, 1]")
        budget = int(fraction * full.peak)
    if budget is None or budget >= full.peak:
        schedule = full
    else:
        found = solve(graph, int(budget), time_limit=time_limit, rounding=rounding)
        if found is None:
            floor = peak_floor(graph)
            raise ConfigError(
                f"no schedule found that fits {budget} bytes (store-all needs {full.peak}; no "
                f"schedule peaks below {floor}, what one node needs at once; the MILP is "
                f"infeasible or found no point "
                f"in {time_limit:g} s and the LP rounding none that fits): raise the budget, the "
                "time limit, or the number of segments"
            )
        schedule = found
    return Rematerialized(net, gm, segs, graph, schedule)
