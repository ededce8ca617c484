"""Hessian-vector products of a model's loss, as pure functions of (params, batch, vector).

The Hessian engine never forms the Hessian: every estimate (Lanczos eigenvalues, Hutchinson traces,
stochastic Lanczos quadrature) only needs products ``H v``. Pearlmutter ("Fast exact multiplication
by the Hessian", Neural Computation 1994) showed ``H v`` costs a small constant times a gradient; we
compute it by double backpropagation, ``H v = d/dθ (∇_θ L · v)``, which on CPU is about twice as fast
here as ``torch.func``'s forward-over-reverse (kept as ``backend="func"``). The usage follows PyHessian
(Yao et al., "PyHessian: Neural Networks Through the Lens of the Hessian", arXiv:1912.07145) and
"Hessian-based analysis of large batch training" (arXiv:1802.08241).

The loss analysed is the dataset mean ``L(θ) = Σ_b n_b L_b(θ) / N`` over the batches ``b`` of a
data iterable, so its Hessian is the batch-size-weighted mean of the batch Hessians. Under
``torch.distributed`` each rank sums its own shard and the sums are all-reduced (see
:mod:`squeezer.distributed`); one process is the same code with world size 1.

Example:
    >>> model = nn.Sequential(nn.Linear(3, 2))
    >>> op = HessianOperator(model, nn.functional.cross_entropy, [(torch.randn(8, 3), torch.zeros(8).long())])
    >>> op.matvec(torch.ones(op.dim, dtype=torch.float64)).shape
    torch.Size([8])
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from . import distributed
from .data import batch_size, forward, to_device
from .errors import ConfigError, DataError
from .graph import copy_model, model_device, quantizable_layers

LossFn = Callable[[Any, Any], torch.Tensor]
Params = dict[str, torch.Tensor]
Batch = tuple[Any, Any]

#: Backends for one Hessian-vector product.
BACKENDS = ("double_backprop", "func")


class _Forward(nn.Module):
    """``data.forward(model, inputs)`` as a module, so ``functional_call`` can substitute params."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs: Any) -> Any:
        return forward(self.model, inputs)


def batch_loss(model: nn.Module, loss_fn: LossFn, params: Params, batch: Batch) -> torch.Tensor:
    """The mean loss of ``batch`` with ``params`` substituted into ``model`` (nothing is mutated).

    Example:
        >>> m = nn.Linear(2, 1)
        >>> p = {"weight": torch.zeros(1, 2), "bias": torch.zeros(1)}
        >>> float(batch_loss(m, nn.functional.mse_loss, p, (torch.ones(4, 2), torch.ones(4, 1))))
        1.0
    """
    inputs, targets = batch
    # Through data.forward, so tensor and dict inputs are called exactly as everywhere else.
    wrapped = {f"model.{k}": v for k, v in params.items()}
    outputs = functional_call(_Forward(model), wrapped, (inputs,))
    loss = loss_fn(outputs, targets)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ConfigError(
            "loss_fn(outputs, targets) must return a scalar tensor (the batch mean); "
            "use reduction='mean'"
        )
    return loss.reshape(())


def hvp(
    model: nn.Module,
    loss_fn: LossFn,
    params: Params,
    batch: Batch,
    vector: Params,
    *,
    backend: str = "double_backprop",
) -> Params:
    """``H v`` for the mean loss of one batch, where ``H`` is the Hessian with respect to ``params``.

    A pure function: ``model`` only supplies the architecture (and any tensor not in ``params``);
    no ``.grad`` is written and no module state changes. Put ``model`` in eval mode first if it has
    BatchNorm or dropout (:class:`HessianOperator` does this on its own copy).

    Args:
        model: the network; called through ``torch.func.functional_call``.
        loss_fn: ``loss_fn(outputs, targets)`` returning the batch-mean loss.
        params: the parameters to differentiate, by name (a subset of ``model.named_parameters()``).
        batch: ``(inputs, targets)``; inputs a tensor or a dict of tensors.
        vector: a tensor of the same shape for every entry of ``params``.
        backend: ``"double_backprop"`` (reverse-over-reverse) or ``"func"`` (forward-over-reverse).

    Example:
        >>> m = nn.Linear(2, 1, bias=False)
        >>> p = {"weight": torch.zeros(1, 2)}
        >>> x, y = torch.eye(2), torch.zeros(2, 1)
        >>> hvp(m, nn.functional.mse_loss, p, (x, y), {"weight": torch.tensor([[1.0, 0.0]])})["weight"]
        tensor([[1., 0.]])
    """
    names = list(params)
    if backend == "func":

        def grad_fn(*flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
            g = torch.func.grad(lambda p: batch_loss(model, loss_fn, p, batch))(
                dict(zip(names, flat, strict=True))
            )
            return tuple(g[n] for n in names)

        _, out = torch.func.jvp(
            grad_fn,
            tuple(params[n].detach() for n in names),
            tuple(vector[n] for n in names),
        )
        return dict(zip(names, out, strict=True))
    if backend != "double_backprop":
        raise ConfigError(f"unknown HVP backend {backend!r}; use one of {BACKENDS}")
    leaves = {n: params[n].detach().requires_grad_(True) for n in names}
    grads = _gradients(model, loss_fn, leaves, batch)
    return _grad_dot(grads, leaves, vector, retain=False)


def _gradients(model: nn.Module, loss_fn: LossFn, leaves: Params, batch: Batch) -> list:
    """∇L of one batch with the graph kept, so it can be differentiated again."""
    with torch.enable_grad():
        loss = batch_loss(model, loss_fn, leaves, batch)
        return list(
            torch.autograd.grad(loss, list(leaves.values()), create_graph=True, allow_unused=True)
        )


def _grad_dot(
    grads: list, leaves: Params, vector: Params, *, retain: bool, batched: bool = False
) -> Params:
    """d(g · v)/dθ for gradients ``g`` that carry their graph: one Hessian-vector product.

    With ``batched``, every entry of ``vector`` has a leading dimension of probes and one vmapped
    backward pass gives all the products (``is_grads_batched``).
    """
    names = list(leaves)
    lead = next(iter(vector.values())).shape[:1] if batched else ()
    out = {n: leaves[n].new_zeros(*lead, *leaves[n].shape) for n in names}
    # A gradient that does not depend on θ (or a parameter the loss never uses) adds nothing to Hv.
    live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
    if not live:
        return out
    with torch.enable_grad():
        hv = torch.autograd.grad(
            [grads[i] for i in live],
            list(leaves.values()),
            grad_outputs=[vector[names[i]].to(grads[i].dtype) for i in live],
            retain_graph=retain,
            allow_unused=True,
            is_grads_batched=batched,
        )
    for n, h in zip(names, hv, strict=True):
        if h is not None:
            out[n] = h.detach()
    return out


@dataclass(frozen=True)
class ParamLayout:
    """How a dict of named parameters maps onto one flat vector (in insertion order).

    ``blocks`` maps a layer FQN to the name of that layer's weight; a layer's Hessian block is the
    slice of the flat vector holding its weight. The coordinates outside every block (biases,
    normalisation parameters, ...) are the "rest" of the full Hessian.
    """

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    offsets: tuple[int, ...]
    blocks: Mapping[str, str]

    @property
    def dim(self) -> int:
        """Total number of analysed parameters."""
        return self.offsets[-1]

    def slice_of(self, name: str) -> slice:
        """The coordinates of parameter ``name`` in the flat vector."""
        i = self.names.index(name)
        return slice(self.offsets[i], self.offsets[i + 1])

    def block_slices(self) -> dict[str, slice]:
        """``{layer FQN: slice}`` of every layer block."""
        return {fqn: self.slice_of(name) for fqn, name in self.blocks.items()}

    def flatten(
        self, tensors: Mapping[str, torch.Tensor], dtype: torch.dtype, lead: int = 0
    ) -> torch.Tensor:
        """Concatenate ``tensors`` (one per name) into one flat vector of ``dtype``.

        With ``lead=b`` every tensor has a leading dimension of ``b`` and the result is ``(b, dim)``.
        """
        shape = (lead, -1) if lead else (-1,)
        return torch.cat([tensors[n].reshape(shape).to(dtype) for n in self.names], dim=-1)

    def unflatten(self, flat: torch.Tensor, dtype: torch.dtype | None = None) -> Params:
        """Split a flat vector (or the rows of a ``(b, dim)`` matrix) into one tensor per name."""
        out = {}
        lead = tuple(flat.shape[:-1])
        for i, (n, shape) in enumerate(zip(self.names, self.shapes, strict=True)):
            part = flat[..., self.offsets[i] : self.offsets[i + 1]].reshape(*lead, *shape)
            out[n] = part.to(dtype) if dtype is not None else part
        return out


def as_batches(data: Any) -> Iterable[Batch]:
    """Accept one ``(inputs, targets)`` batch or a re-iterable of batches; materialise iterators."""
    if (
        isinstance(data, tuple)
        and len(data) == 2
        and isinstance(data[0], torch.Tensor | Mapping)
        and isinstance(data[1], torch.Tensor)
    ):
        return [data]
    try:
        it = iter(data)
    except TypeError as exc:
        raise DataError(
            "data must be an (inputs, targets) batch or an iterable of such batches, "
            f"not {type(data).__name__}"
        ) from exc
    # A one-shot iterator would be exhausted after the first Hessian-vector product.
    return list(it) if it is data else data


class HessianOperator:
    """The Hessian of a model's dataset-mean loss as a linear operator on flat vectors.

    Works on its own eval-mode copy of ``model`` (BatchNorm uses running statistics, dropout is
    off), so the caller's model, its modes and its ``.grad`` are untouched. ``matvec`` takes and
    returns float64 vectors of length :attr:`dim` on the model's device; the products themselves
    run in each parameter's dtype. Under ``torch.distributed`` each rank uses its shard of
    ``data`` and the products are all-reduced, so every rank gets the same ``H v`` as one process
    on all the data.

    Args:
        model: the trained network (not modified).
        loss_fn: ``loss_fn(outputs, targets)`` returning the batch-mean loss.
        data: an iterable of ``(inputs, targets)`` batches, or one such batch; read once.
        params: names of the parameters to analyse; default every parameter with ``requires_grad``.
        backend: ``"double_backprop"`` (default, fastest on CPU here) or ``"func"``.
        cache_samples: keep the differentiable gradient graph of the first batches, up to this many
            samples, so later products skip the forward and first backward pass (PyHessian does the
            same for one batch). Costs memory of the order of a training step per cached batch.
        shard: under ``torch.distributed``, take every ``world_size``-th batch starting at this
            rank's index; pass ``False`` if ``data`` is already this rank's shard.
        stream: re-iterate ``data`` for every product instead of reading it once into a list
            (for data too big to hold; it must then yield the same batches on every pass).

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> batch = (torch.randn(16, 4), torch.zeros(16).long())
        >>> op = HessianOperator(net, nn.functional.cross_entropy, batch)
        >>> sorted(op.layout.blocks)
        ['0', '2']
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        data: Any,
        *,
        params: Sequence[str] | None = None,
        backend: str = "double_backprop",
        cache_samples: int = 4096,
        shard: bool = True,
        stream: bool = False,
    ) -> None:
        if backend not in BACKENDS:
            raise ConfigError(f"unknown HVP backend {backend!r}; use one of {BACKENDS}")
        self.model = copy_model(model).eval()
        self.loss_fn = loss_fn
        self.backend = backend
        self.device = model_device(self.model)
        named = dict(self.model.named_parameters())
        if params is None:
            names = [n for n, p in named.items() if p.requires_grad]
        else:
            names = list(params)
            unknown = [n for n in names if n not in named]
            if unknown:
                raise ConfigError(
                    f"the model has no parameter {unknown[0]!r}; "
                    "pick names from model.named_parameters()"
                )
        if not names:
            raise ConfigError(
                "no parameter to analyse: the model has no trainable parameters; "
                "pass params=[...] with names from model.named_parameters()"
            )
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.params: Params = {n: named[n].detach() for n in names}
        self.layout = _layout(self.model, self.params)

        batches = as_batches(data)
        if not stream:
            # One pass, kept: a shuffling loader would otherwise give other batches every pass.
            batches = list(batches)
        rank, world = distributed.world()
        self.batches: Iterable[Batch] = (
            distributed.shard(batches, rank, world) if shard and world > 1 else batches
        )
        # The cache holds double-backprop graphs; the "func" backend recomputes every product.
        self.cache_samples = cache_samples if backend == "double_backprop" else 0
        self._vmap_ok = True
        local = sum(self._check(batch) for batch in self.batches)
        self.samples = int(distributed.all_reduce_sum(torch.tensor([float(local)]))[0].item())
        if self.samples == 0:
            raise DataError("data holds no samples; pass at least one (inputs, targets) batch")
        self._build_cache()
        #: Number of full-data Hessian-vector products computed so far.
        self.hvp_count = 0
        self.on_hvp: Callable[[], None] | None = None

    @property
    def dim(self) -> int:
        """Number of analysed parameters (the side of the Hessian)."""
        return self.layout.dim

    @staticmethod
    def _check(batch: Any) -> int:
        if not (isinstance(batch, tuple | list) and len(batch) == 2):
            raise DataError(
                "each batch must be a pair (inputs, targets); wrap your loader so it yields pairs"
            )
        return batch_size(batch[0])

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``H v`` for a flat float64 vector ``v`` (all ranks must call this together)."""
        return self.matmat(v[:, None])[:, 0]

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """``H V`` for a float64 matrix ``V`` of shape ``(dim, b)``: ``b`` products.

        Several columns share one vmapped backward pass (``is_grads_batched``), which on small
        models is many times faster than ``b`` separate passes; a model whose backward cannot be
        vmapped falls back to one pass per column.
        """
        rows = V.T.to(self.device)
        if rows.shape[0] > 1 and self.backend == "double_backprop" and self._vmap_ok:
            try:
                out = self._products(rows, batched=True)
            except RuntimeError:
                self._vmap_ok = False
                out = self._products(rows, batched=False)
        else:
            out = self._products(rows, batched=False)
        out = distributed.all_reduce_sum(out) / self.samples
        for _ in range(rows.shape[0]):
            self.hvp_count += 1
            if self.on_hvp is not None:
                self.on_hvp()
        return out.T

    def _products(self, rows: torch.Tensor, *, batched: bool) -> torch.Tensor:
        """This rank's ``Σ_b n_b H_b v`` for every row ``v`` of ``rows`` (unnormalised)."""
        b = rows.shape[0]
        # Each parameter's part of the vector in that parameter's dtype (models may mix dtypes).
        vec = {k: t.to(self.params[k].dtype) for k, t in self.layout.unflatten(rows).items()}
        acc = torch.zeros(b, self.dim, dtype=torch.float64, device=self.device)
        lay = self.layout

        def add(n: int, grads: list, leaves: Params, retain: bool) -> None:
            if batched:
                hv = _grad_dot(grads, leaves, vec, retain=retain, batched=True)
                acc.add_(lay.flatten(hv, torch.float64, lead=b), alpha=n)
                return
            for j in range(b):
                one = {k: t[j] for k, t in vec.items()}
                hv = _grad_dot(grads, leaves, one, retain=retain or j < b - 1)
                acc[j].add_(lay.flatten(hv, torch.float64), alpha=n)

        for n, grads, leaves in self._cache:
            add(n, grads, leaves, retain=True)
        for i, batch in enumerate(self.batches):
            if i < self._uncached_from:
                continue
            n = self._check(batch)
            batch = to_device(batch, self.device)
            if self.backend == "func":
                for j in range(b):
                    one = {k: t[j] for k, t in vec.items()}
                    hv = hvp(self.model, self.loss_fn, self.params, batch, one, backend="func")
                    acc[j].add_(lay.flatten(hv, torch.float64), alpha=n)
                continue
            leaves = {k: v.clone().requires_grad_(True) for k, v in self.params.items()}
            add(n, _gradients(self.model, self.loss_fn, leaves, batch), leaves, retain=False)
        return acc

    def restricted(self, names: Sequence[str]) -> HessianOperator:
        """The operator of the diagonal block of the parameters ``names`` (same model, same data).

        Its gradient graphs are taken with respect to ``names`` only, so each product is cheaper
        than a full one followed by slicing.
        """
        op = HessianOperator.__new__(HessianOperator)
        op.__dict__.update(self.__dict__)
        op.params = {n: self.params[n] for n in names}
        op.layout = _layout(self.model, op.params)
        op.hvp_count = 0
        op.on_hvp = None
        op._build_cache()
        return op

    def release(self) -> None:
        """Drop the cached gradient graphs (later products recompute them batch by batch)."""
        self._cache = []
        self._uncached_from = 0

    def _build_cache(self) -> None:
        """Keep the differentiable gradients of the leading batches (up to ``cache_samples``)."""
        self._cache: list[tuple[int, list, Params]] = []
        self._uncached_from = 0
        held = 0
        for batch in self.batches:
            n = self._check(batch)
            if held + n > self.cache_samples:
                break
            leaves = {k: v.clone().requires_grad_(True) for k, v in self.params.items()}
            grads = _gradients(self.model, self.loss_fn, leaves, to_device(batch, self.device))
            self._cache.append((n, grads, leaves))
            self._uncached_from += 1
            held += n


def _layout(model: nn.Module, params: Params) -> ParamLayout:
    """Flat-vector layout of ``params``; a layer's block is its weight (tied weights share one)."""
    names = tuple(params)
    offsets = [0]
    for n in names:
        offsets.append(offsets[-1] + params[n].numel())
    name_of = {id(p): n for n, p in model.named_parameters()}
    blocks = {}
    for fqn, layer in quantizable_layers(model).items():
        name = name_of.get(id(getattr(layer, "weight", None)))
        if name in params:
            blocks[fqn] = name
    return ParamLayout(
        names=names,
        shapes=tuple(params[n].shape for n in names),
        offsets=tuple(offsets),
        blocks=blocks,
    )
