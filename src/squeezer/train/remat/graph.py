"""A training step as Checkmate's data-flow graph: segments of a model's forward, their backwards,
and what each costs, measured.

The model and its loss are traced with ``torch.fx`` into one graph of calls; the calls are cut into
``segments`` contiguous runs (cuts placed near equal shares of the bytes the forward writes, at the
positions where the fewest bytes cross). Each segment ``s`` gives two nodes of the graph Checkmate
schedules (Jain et al., "Checkmate: Breaking the Memory Wall with Optimal Tensor
Rematerialization", arXiv:1910.02653):

- ``F_s``, its forward with autograd: its value is the segment's outputs *and* the tensors its
  autograd graph saved for backward (the "internals"), so keeping ``F_s`` means keeping what its
  backward needs, and recomputing it means running the segment again. The value has two parts:
  ``memory``, what ``B_s`` reads (the internals and the outputs its own graph saved), and
  ``output``, the outputs only later segments read: those live until their last reader, not until
  ``B_s`` (a BatchNorm's output feeding a ReLU is gone once the ReLU has run);
- ``B_s``, its backward: its value is the gradient with respect to the segment's inputs. It needs
  ``F_s``, the backwards of the segments that read its outputs, and the forward values of those of
  its inputs that its autograd graph saved (the executor hands them over by reference, so a saved
  input is not a second copy).

Compute times are medians of repeated runs; memories are storage bytes (each storage once); the
transient of a node is the extra the allocator peaked at while running it, from the profiler's
allocation events (:func:`allocation_peak`).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import fx, nn

from ...errors import ConfigError, UnsupportedModelError
from .memory import allocation_peak as allocation_peak
from .memory import storage_bytes as storage_bytes

LossFn = Callable[[Any, Any], torch.Tensor]


@dataclass(frozen=True)
class Node:
    """One node of the schedule graph: a segment's forward (``kind="F"``) or backward (``"B"``).

    Attributes:
        name: ``F3``, ``B3``, ...
        segment: the segment's index.
        kind: ``"F"`` or ``"B"``.
        deps: indices of the nodes whose values it reads.
        cost: measured compute time in seconds.
        memory: bytes of its value while kept (of a forward: the part its own backward reads).
        transient: extra bytes the allocator held at the peak of computing it.
        output: of a forward, the bytes of the outputs its own backward does not read: they are
            held only while a later reader (any user but its own backward) still needs them.
    """

    name: str
    segment: int
    kind: str
    deps: tuple[int, ...]
    cost: float
    memory: int
    transient: int = 0
    output: int = 0


@dataclass(frozen=True)
class TrainGraph:
    """Checkmate's graph of one training step: nodes in a topological order (forwards, then the
    backwards in reverse), as plain data that round-trips through JSON."""

    nodes: tuple[Node, ...]
    version: int = 2

    @property
    def n(self) -> int:
        return len(self.nodes)

    def own_backward(self) -> list[int]:
        """``own_backward()[i]``: the index of forward ``i``'s backward (-1 for a backward)."""
        b = {nd.segment: j for j, nd in enumerate(self.nodes) if nd.kind == "B"}
        return [b.get(nd.segment, -1) if nd.kind == "F" else -1 for nd in self.nodes]

    def output_users(self) -> list[list[int]]:
        """``output_users()[i]``: the users of forward ``i`` that read its ``output`` part (all
        but its own backward; none for a backward)."""
        own = self.own_backward()
        return [
            [j for j in us if j != own[i]] if self.nodes[i].kind == "F" else []
            for i, us in enumerate(self.users())
        ]

    def users(self) -> list[list[int]]:
        """``users()[i]``: the nodes that read node ``i``'s value, ascending."""
        out: list[list[int]] = [[] for _ in self.nodes]
        for j, node in enumerate(self.nodes):
            for i in node.deps:
                out[i].append(j)
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainGraph:
        nodes = tuple(Node(**{**n, "deps": tuple(n["deps"])}) for n in d["nodes"])
        return cls(nodes, d.get("version", 2))

    @staticmethod
    def chain(
        costs: Sequence[float], memories: Sequence[int], grads: Sequence[int] | None = None
    ) -> TrainGraph:
        """The graph of a chain of ``len(costs)`` segments, each saving its input (for tests and
        examples): backward costs twice the forward; ``grads[s]`` is the size of the gradient
        ``B_s`` passes back (default: as big as the value of the segment before).

        Example:
            >>> [n.name for n in TrainGraph.chain([1, 1], [4, 4]).nodes]
            ['F0', 'F1', 'B1', 'B0']
        """
        k = len(costs)
        if grads is None:
            grads = [int(memories[s - 1]) if s else 0 for s in range(k)]
        nodes = [
            Node(f"F{s}", s, "F", (s - 1,) if s else (), float(costs[s]), int(memories[s]))
            for s in range(k)
        ]
        for s in reversed(range(k)):
            f, b = s, 2 * k - 1 - s
            deps = [f] + ([b - 1] if s < k - 1 else []) + ([s - 1] if s else [])
            nodes.append(Node(f"B{s}", s, "B", tuple(sorted(deps)), 2.0 * costs[s], int(grads[s])))
        return TrainGraph(tuple(nodes))


# ----------------------------------------------------------------------------- memory measurement
class _Step(nn.Module):
    """The traced unit: the model's forward and the loss."""

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, inputs: Any, targets: Any) -> torch.Tensor:
        return self.loss_fn(self.model(inputs), targets)


class _Tracer(fx.Tracer):
    def __init__(self, leaf: Callable[[nn.Module, str], bool] | None) -> None:
        super().__init__()
        self.leaf = leaf

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if self.leaf is not None and qualname:
            return self.leaf(m, qualname)
        return super().is_leaf_module(m, qualname)


@dataclass
class Segment:
    """A contiguous run of the traced graph's calls: the nodes, the values it reads from earlier
    segments (by fx name, with the producing segment, or -1 for the batch and constants) and the
    values later segments (or the loss) read from it."""

    index: int
    nodes: list[fx.Node]
    inputs: dict[str, int]
    outputs: list[str]
    saves_input: tuple[str, ...] = ()
    #: Outputs whose storage the segment's own graph saved or shares (needed by its backward).
    pinned: tuple[str, ...] = ()
    grad_inputs: set[str] = field(default_factory=set)
    #: Inputs that are views of a storage an earlier segment than their producer made: that one.
    bases: dict[str, int] = field(default_factory=dict)


def trace(
    model: nn.Module,
    loss_fn: LossFn,
    *,
    leaf: Callable[[nn.Module, str], bool] | None = None,
) -> fx.GraphModule:
    """``model`` and ``loss_fn`` as one ``torch.fx`` graph ``(inputs, targets) -> loss``.

    ``leaf(module, qualified_name)`` says which submodules stay single calls (default: PyTorch's
    own layers, as ``torch.fx`` does).
    """
    step = _Step(model, loss_fn)
    try:
        graph = _Tracer(leaf).trace(step)
    except Exception as exc:  # fx raises many types for untraceable control flow
        raise UnsupportedModelError(
            f"cannot trace {type(model).__name__} with torch.fx ({type(exc).__name__}: {exc}); "
            "make the data-dependent parts leaf modules with leaf=lambda m, name: ..."
        ) from exc
    return fx.GraphModule(step, graph)


def _calls(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op in ("call_module", "call_function", "call_method")]


def run_nodes(
    gm: fx.GraphModule,
    nodes: Sequence[fx.Node],
    env: dict[str, Any],
    keep: set[str] | None = None,
) -> None:
    """Evaluate ``nodes`` in order, reading and writing values by fx name in ``env``. With
    ``keep``, a value computed here is dropped after its last use here unless it is in ``keep``
    (so a segment holds only what it must while it runs)."""
    modules = dict(gm.named_modules())
    last: dict[str, int] = {}
    if keep is not None:
        for i, node in enumerate(nodes):
            for a in node.all_input_nodes:
                last[a.name] = i
    mine: set[str] = set()

    def load(a: Any) -> Any:
        if isinstance(a, fx.Node):
            if a.op == "get_attr":
                return _fetch(gm, a.target)
            return env[a.name]
        return a

    for i, node in enumerate(nodes):
        args = fx.node.map_aggregate(node.args, load)
        kwargs = fx.node.map_aggregate(node.kwargs, load)
        if node.op == "call_module":
            env[node.name] = modules[node.target](*args, **kwargs)
        elif node.op == "call_function":
            env[node.name] = node.target(*args, **kwargs)
        else:
            env[node.name] = getattr(args[0], node.target)(*args[1:], **kwargs)
        del args, kwargs
        mine.add(node.name)
        if keep is not None:
            for a in node.all_input_nodes:
                if last.get(a.name) == i and a.name in mine and a.name not in keep:
                    del env[a.name]
            if node.name not in last and node.name not in keep:
                del env[node.name]


def _fetch(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _crossing_ok(v: Any) -> bool:
    return isinstance(v, torch.Tensor | int | float | bool | torch.Size | type(None))


def segment(
    gm: fx.GraphModule, example: tuple[Any, Any], segments: int
) -> tuple[list[Segment], dict[str, Any]]:
    """Cut ``gm``'s calls into about ``segments`` contiguous segments of about equal work (bytes
    written), each cut where the fewest bytes cross; return them and the values of one probe run
    (by fx name)."""
    calls = _calls(gm)
    if not calls:
        raise UnsupportedModelError("the traced step has no operations to schedule")
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    env: dict[str, Any] = {p.name: v for p, v in zip(placeholders, example, strict=True)}
    # Which call first saves each storage for backward: a value crossing a cut that no call before
    # the cut saved is dead weight the schedule would keep (its segment's backward never reads it).
    saver: dict[int, list[int]] = {}
    current = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        saver.setdefault(t.untyped_storage().data_ptr(), []).append(current[0])
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        for i, node in enumerate(calls):
            current[0] = i
            run_nodes(gm, [node], env)
    # Work of a call ~ the bytes it writes: deterministic, unlike timings on a shared machine.
    times = [
        float(env[n.name].numel() * env[n.name].element_size())
        if isinstance(env[n.name], torch.Tensor)
        else 0.0
        for n in calls
    ]
    position = {n.name: i for i, n in enumerate(calls)}
    last_use = {n.name: position.get(n.name, -1) for n in gm.graph.nodes}
    for i, node in enumerate(calls):
        for a in node.all_input_nodes:
            last_use[a.name] = max(last_use[a.name], i)
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    for a in out_node.all_input_nodes:
        last_use[a.name] = len(calls)

    # The call that made each value's storage (a view's or an in-place result's is its base's).
    fixed = {t.untyped_storage().data_ptr() for t in (*gm.parameters(), *gm.buffers())}
    fixed |= {env[p.name].untyped_storage().data_ptr() for p in placeholders
              if isinstance(env[p.name], torch.Tensor)}  # fmt: skip
    first: dict[int, int] = {}
    maker: dict[str, int] = {}
    for i, node in enumerate(calls):
        v = env[node.name]
        if isinstance(v, torch.Tensor) and v.untyped_storage().data_ptr() not in fixed:
            maker[node.name] = first.setdefault(v.untyped_storage().data_ptr(), i)

    # Bytes crossing a cut before call p, whether every crossing value can be handed over, and
    # whether the cut is clean (every crossing value already saved for backward before it).
    crossing = []
    for p in range(1, len(calls)):
        live = [n.name for n in calls[:p] if last_use[n.name] >= p]
        ok = all(_crossing_ok(env[v]) for v in live)
        size, clean = 0, True
        for v in live:
            t = env[v]
            if isinstance(t, torch.Tensor):
                size += t.numel() * t.element_size()
                clean &= any(i < p for i in saver.get(t.untyped_storage().data_ptr(), ()))
        # The earliest call that made the storage of a value produced at or after call j.
        crossing.append((p, ok, size, clean, {position[v]: maker.get(v, p) for v in live}))
    total = sum(times)
    cum = [sum(times[:p]) for p in range(len(calls) + 1)]
    cuts: list[int] = []
    k = max(1, min(segments, len(calls)))

    def joins(c: tuple, start: int) -> bool:
        # A value crossing the cut that views (or overwrote) a storage an earlier segment made
        # would keep that segment's storage alive beyond what the model counts for it: a view
        # goes in its base's segment.
        return all(m >= start for j, m in c[4].items() if j >= start)

    for j in range(1, k):
        target, half = total * j / k, total / (2 * k)
        start = cuts[-1] if cuts else 0
        valid = [c for c in crossing if c[1] and c[0] > start and joins(c, start)]
        window = [c for c in valid if abs(cum[c[0]] - target) <= half]
        clean = [c for c in valid if c[3] and abs(cum[c[0]] - target) <= 2 * half]
        if clean:  # the clean cut nearest the target share of the work
            cuts.append(min(clean, key=lambda c: (abs(cum[c[0]] - target), c[2]))[0])
        elif window:  # else the cheapest cut near it
            cuts.append(min(window, key=lambda c: (c[2], abs(cum[c[0]] - target)))[0])
        elif valid:
            cuts.append(min(valid, key=lambda c: abs(cum[c[0]] - target))[0])
    bounds = [0, *cuts, len(calls)]
    owner = {}
    segs = []
    for s in range(len(bounds) - 1):
        nodes = calls[bounds[s] : bounds[s + 1]]
        inputs: dict[str, int] = {}
        for node in nodes:
            for a in node.all_input_nodes:
                if a.op == "get_attr" or a.name in inputs or any(a is m for m in nodes):
                    continue
                inputs[a.name] = owner.get(a.name, -1)
        for node in nodes:
            owner[node.name] = s
        outputs = [n.name for n in nodes if last_use[n.name] >= bounds[s + 1]]
        segs.append(Segment(s, nodes, inputs, outputs))
    return segs, env


def leaf_inputs(seg: Segment, values: dict[str, Any]) -> dict[str, Any]:
    """The segment's inputs as fresh autograd leaves (sharing storage) where they carry a
    gradient, else as they are."""
    out = {}
    for name, producer in seg.inputs.items():
        v = values[name]
        if isinstance(v, torch.Tensor) and producer >= 0 and v.requires_grad:
            v = v.detach().requires_grad_(True)
        out[name] = v
    return out


def _median_time(fn: Callable[[], Any], reps: int) -> float:
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def measure(
    gm: fx.GraphModule,
    segs: list[Segment],
    env: dict[str, Any],
    *,
    reps: int = 3,
    transients: bool = True,
) -> TrainGraph:
    """Measure every segment's forward and backward (time, value bytes, saved internals,
    transient peak) on the probe values ``env`` and build the :class:`TrainGraph`."""
    params = {p.untyped_storage().data_ptr() for p in gm.parameters()}
    params |= {b.untyped_storage().data_ptr() for b in gm.buffers()}
    k = len(segs)
    consumers: list[set[int]] = [set() for _ in segs]
    for seg in segs:
        for name, p in seg.inputs.items():
            if p >= 0 and isinstance(env[name], torch.Tensor) and env[name].requires_grad:
                consumers[p].add(seg.index)
    # The segment that made each storage: a view (a reshape, a transpose, an unbind) crossing
    # into a later segment keeps its base alive, which the base's maker holds and the model counts.
    made: dict[int, int] = {}
    for seg in segs:
        for o in seg.outputs:
            if isinstance(env[o], torch.Tensor):
                ptr = env[o].untyped_storage().data_ptr()
                if ptr not in params:
                    made.setdefault(ptr, seg.index)
    for seg in segs:
        seg.bases = {
            n: made[ptr]
            for n, p in seg.inputs.items()
            if p >= 0 and isinstance(env[n], torch.Tensor)
            and made.get(ptr := env[n].untyped_storage().data_ptr(), p) != p
        }  # fmt: skip
    fwd: list[Node] = []
    bwd: dict[int, Node] = {}
    for seg in segs:
        state: dict[str, Any] = {}

        def forward(seg: Segment = seg, state: dict[str, Any] = state) -> None:
            local = leaf_inputs(seg, env)
            saved: list[torch.Tensor] = []

            def pack(x: torch.Tensor) -> torch.Tensor:
                saved.append(x)
                return x

            with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
                run_nodes(gm, seg.nodes, local, keep=set(seg.outputs))
            state.update(local=local, saved=saved)

        def backward(seg: Segment = seg, state: dict[str, Any] = state) -> None:
            outs = [state["local"][o] for o in seg.outputs]
            outs = [o for o in outs if isinstance(o, torch.Tensor) and o.requires_grad]
            if outs:
                torch.autograd.backward(outs, state["grads"])

        def forward_and_grads(seg: Segment = seg, state: dict[str, Any] = state) -> None:
            forward()
            outs = [state["local"][o] for o in seg.outputs]
            state["grads"] = [
                torch.ones_like(o) for o in outs if isinstance(o, torch.Tensor) and o.requires_grad
            ]

        forward_and_grads()
        leaves = {n: v for n, v in state["local"].items() if n in seg.inputs}
        in_ptr = {
            v.untyped_storage().data_ptr(): n
            for n, v in leaves.items()
            if isinstance(v, torch.Tensor)
        }
        outs = [
            state["local"][o] for o in seg.outputs if isinstance(state["local"][o], torch.Tensor)
        ]
        saved = state["saved"]
        seg.saves_input = tuple(
            sorted(
                {
                    in_ptr[t.untyped_storage().data_ptr()]
                    for t in saved
                    if t.untyped_storage().data_ptr() in in_ptr
                }
            )
        )
        own = {t.untyped_storage().data_ptr() for t in saved} | set(in_ptr)
        ptrs: dict[int, int] = {}
        for o in outs:
            ptrs[o.untyped_storage().data_ptr()] = ptrs.get(o.untyped_storage().data_ptr(), 0) + 1
        seg.pinned = tuple(
            o
            for o in seg.outputs
            if not isinstance(state["local"][o], torch.Tensor)
            or state["local"][o].untyped_storage().data_ptr() in own
            or ptrs[state["local"][o].untyped_storage().data_ptr()] > 1
        )
        # What B_s reads (internals, pinned outputs) is held until B_s; the other outputs only
        # until their last reader.
        pinned = [
            state["local"][o] for o in seg.pinned if isinstance(state["local"][o], torch.Tensor)
        ]
        loose = [state["local"][o] for o in seg.outputs if o not in seg.pinned]
        kept = storage_bytes(pinned, skip=params | set(in_ptr))
        internal = storage_bytes(
            saved, skip=params | set(in_ptr) | {o.untyped_storage().data_ptr() for o in outs}
        )
        out_bytes = storage_bytes(
            loose, skip=params | set(in_ptr) | {o.untyped_storage().data_ptr() for o in pinned}
        )
        backward()  # warm-up: parameter gradients exist from now on, as in training
        t_f = _median_time(forward, reps)
        t_b = []
        for _ in range(reps):
            forward_and_grads()
            t_b.append(_median_time(backward, 1))
        w_f = w_b = 0
        grad_bytes = storage_bytes(
            [v for v in leaves.values() if isinstance(v, torch.Tensor) and v.requires_grad]
        )
        if transients:  # what the allocator peaked at beyond the value the node leaves
            peak, _, _ = allocation_peak(forward)
            w_f = max(0, peak - (kept + internal + out_bytes))
            peak, _, _ = allocation_peak(backward, setup=forward_and_grads)
            w_b = max(0, peak - grad_bytes)
        state.clear()
        deps = tuple(sorted({p for p in seg.inputs.values() if p >= 0} | set(seg.bases.values())))
        fwd.append(
            Node(f"F{seg.index}", seg.index, "F", deps, t_f, kept + internal, w_f, out_bytes)
        )
        bwd[seg.index] = Node(
            f"B{seg.index}", seg.index, "B", (), statistics.median(t_b), grad_bytes, w_b
        )
    for p in gm.parameters():
        p.grad = None
    index_f = {s: s for s in range(k)}
    index_b = {s: 2 * k - 1 - s for s in range(k)}
    nodes = list(fwd)
    for s in reversed(range(k)):
        seg = segs[s]
        deps = {index_f[s]} | {index_b[c] for c in consumers[s]}
        deps |= {index_f[seg.inputs[n]] for n in seg.saves_input if seg.inputs[n] >= 0}
        deps |= {index_f[seg.bases[n]] for n in seg.saves_input if n in seg.bases}
        b = bwd[s]
        nodes.append(Node(b.name, s, "B", tuple(sorted(deps)), b.cost, b.memory, b.transient))
    return TrainGraph(tuple(nodes))


def trace_step(
    model: nn.Module,
    loss_fn: LossFn,
    example: tuple[Any, Any],
    *,
    segments: int = 8,
    leaf: Callable[[nn.Module, str], bool] | None = None,
    reps: int = 3,
) -> tuple[TrainGraph, fx.GraphModule, list[Segment]]:
    """Trace one training step of ``model`` (train mode, on ``example = (inputs, targets)``) into
    a :class:`TrainGraph` of ``segments`` forward and as many backward nodes, with measured times
    and sizes. ``model`` is not modified (the graph module works on a copy).

    Example:
        >>> net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> g, _, _ = trace_step(net, nn.functional.cross_entropy,
        ...                      (torch.randn(4, 8), torch.zeros(4).long()), segments=2)
        >>> [n.name for n in g.nodes]
        ['F0', 'F1', 'B1', 'B0']
    """
    from ...graph import copy_model

    if segments < 1:
        raise ConfigError(f"segments={segments}; use at least 1")
    net = copy_model(model).train()
    gm = trace(net, loss_fn, leaf=leaf)
    segs, env = segment(gm, example, segments)
    graph = measure(gm, segs, env, reps=reps)
    return graph, gm, segs
