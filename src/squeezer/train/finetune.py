"""Fine-tuning of any model — squeezer-quantized (quantization-aware training), pruned or float —
with knowledge distillation from its FP32 teacher: one trainer, used by ``squeezer finetune``, the
``--finetune N`` stage of ``squeezer compress`` and pruning's recovery.

What it does, and the choices it makes:

- **Straight-through fake quantization.** A quantized model's ``Quant*`` layers already quantize in
  ``forward`` through :func:`~squeezer.quant.primitives.fake_quantize`, whose rounding passes
  gradients straight through inside the clip range (zero outside), so the float master weights
  train as they are. Weight scales follow the weights: before every step each layer's weight
  quantizer is re-calibrated with its own observer (``weight_scales="track"``, as HAWQ-V3's QAT
  does), or kept as post-training quantization set them (``"frozen"``). Activation ranges stay
  frozen at their calibrated values. ``lsq=True`` learns every scale instead, weights' and
  activations' (LSQ, :mod:`squeezer.train.lsq`).
- **BatchNorm frozen** (``freeze_bn=True``): its running statistics stay as trained (eval mode),
  its affine parameters train; dropout is off unless ``dropout=True``. A few epochs at a small
  learning rate is a fine-tuning, not a re-training.
- **Defaults by kind of model.** A squeezer-quantized classifier with BatchNorm fine-tunes by
  :data:`BN_CLASSIFIER_RECIPE` (lr 1e-3, LSQ, batch 32, BatchNorm in train mode): on the zoo's
  BN nets at W4A4 the plain defaults (lr 1e-4, batch 64, BatchNorm frozen) recovered a third of
  the gap in 5 epochs, this recipe 37–78% (mnist1d, three seeds, by machine: docs/benchmarks.md).
  Everything else (encoders above all, whose lr 1e-4 stays) takes :data:`PLAIN_RECIPE`. Any
  setting given explicitly wins.
- **Distillation** (:mod:`squeezer.train.distill`): KL with temperature on a classifier's logits
  (``alpha``, ``temperature``; HAWQ's recipe α 0.95, T 6 is the default) from ``teacher``, or
  ``1 − cos`` to the FP32 embeddings of an encoder's labels-free embedding task (no labels needed);
  ``hidden_weight`` > 0 adds hidden-state distillation from ``teacher`` (every block of the layer
  stack, and with ``hidden_attention`` every attention output, read by forward hooks that are on
  only for the length of each training forward), for a quantized or a heads/FFN-pruned encoder.
- **Held-out split and early stop**: ``val_fraction`` of the training split is held out (a seeded
  subset; every k-th batch of a streamed set); its loss (the task's: cross-entropy on the labels,
  or the error to the FP32 embeddings) and metric are measured before training (epoch 0) and after
  every epoch, and with a teacher the distillation loss to it. The best epoch is ranked by the
  rule ``select`` of :data:`~squeezer.train.select.SELECT` (:mod:`squeezer.train.select`: lowest
  held-out loss, best metric, lowest distillation loss, or the last epoch). Training stops after
  ``patience`` epochs without a better epoch, and ``restore_best`` returns the best epoch's
  weights (epoch 0 included: fine-tuning never returns a model worse on the held-out split than
  the one it was given). ``val_data`` validates on batches of your own instead: data the model
  (and the teacher) never trained on, as the held-out split of its training data is not.
- **Seeded and resumable**: batches are drawn from ``seed`` and the epoch; with ``checkpoint`` the
  whole state (weights, optimizer, schedule, history, best weights, RNG) is written atomically
  after every epoch, and ``resume=True`` continues from it to the very weights an uninterrupted run
  ends with.
- **Data-parallel** under ``torchrun`` (or any initialised process group): each rank runs its slice
  of every global batch under :class:`~torch.nn.parallel.DistributedDataParallel` (gloo on CPU,
  nccl on GPUs), its loss weighted by its share of the batch, so the averaged gradient is the one
  process's gradient of the same global batch; only rank 0 writes the checkpoint. With BatchNorm
  in train mode (``freeze_bn=False``, the BN-classifier default) each rank normalises by its own
  slice's statistics (no SyncBatchNorm), so only ``freeze_bn=True`` reproduces one process exactly.

The input model (and teacher) are never modified: the result holds a new model.

Example:
    >>> from squeezer.data import load_data
    >>> from squeezer.zoo import create
    >>> r = finetune(qmodel, load_data("digits"), teacher=fp32, epochs=3)   # doctest: +SKIP
    >>> r.model, r.history[-1]["val_metric"]                                 # doctest: +SKIP
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, is_dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..data import Classification, _index, batch_size, forward, to_device
from ..distributed import all_reduce_sum, world
from ..errors import ConfigError
from ..graph import copy_model, model_device
from ..progress import progress as progress_bar
from ..quant.modules import ActQuantizer, QuantMixin
from .checkpoint import _load_checkpoint, _row, _save_checkpoint, _snapshot, _State
from .distill import (
    HIDDEN_LOSSES,
    HiddenStates,
    hidden_loss,
    hidden_modules,
    make_loss,
    needs_teacher,
)
from .lsq import fix_scales, learn_scales
from .optim import OPTIMIZERS, cosine_schedule, make_optimizer
from .select import check_select, score, teacher_outputs, validate

#: Default fine-tuning learning rates per optimizer (a tenth of training's, or less).
FINETUNE_LR: dict[str, float] = {"adamw": 1e-4, "lamb": 1e-3, "lars": 0.1, "sgd": 1e-3}

#: What ``lr``, ``lsq``, ``batch_size`` and ``freeze_bn`` left at None resolve to for a
#: squeezer-quantized classifier with BatchNorm (AdamW, ``lsq`` not False): the recipe that
#: recovered most of the W4A4 gap on the zoo's BN nets in 5 epochs (issue 14, docs/benchmarks.md:
#: lr 1e-3 with learned step sizes and batch 32, BatchNorm statistics updated while training).
BN_CLASSIFIER_RECIPE: dict[str, Any] = {"lr": 1e-3, "lsq": True, "batch_size": 32,
                                        "freeze_bn": False}  # fmt: skip
#: ... and for everything else (encoders, float or pruned models): lr from :data:`FINETUNE_LR`.
PLAIN_RECIPE: dict[str, Any] = {"lr": None, "lsq": False, "batch_size": 64, "freeze_bn": True}

WEIGHT_SCALES = ("track", "frozen")


@dataclass(frozen=True)
class FinetuneResult:
    """What :func:`finetune` returns.

    Attributes:
        model: the fine-tuned model (a new object, in eval mode).
        history: one row per epoch: ``epoch``, ``train_loss``, ``val_loss``, ``val_metric``,
            ``val_kd`` (None without a teacher), ``lr``, ``seconds``; row 0 is the model as
            given (its held-out metric, no training).
        seconds: wall time of the whole run (this process; a resumed run counts its own part).
        metric_name: the task's metric (``top1``, ``cosine`` ...).
        best_epoch: the epoch whose weights ``model`` holds.
        stopped_early: training stopped before ``epochs`` (patience ran out).
        options: the settings of the run (what the checkpoint is checked against).
        world_size: the data-parallel processes that ran it.
    """

    model: nn.Module
    history: tuple[dict[str, Any], ...]
    seconds: float
    metric_name: str
    best_epoch: int
    stopped_early: bool
    options: dict[str, Any] = field(default_factory=dict)
    world_size: int = 1

    def to_dict(self) -> dict[str, Any]:
        """Everything but the model, as plain data (for metrics.json)."""
        return {
            "metric_name": self.metric_name,
            "history": [dict(r) for r in self.history],
            "seconds": self.seconds,
            "best_epoch": self.best_epoch,
            "stopped_early": self.stopped_early,
            "world_size": self.world_size,
            "options": dict(self.options),
        }


def finetune(
    model: nn.Module,
    data: Any,
    *,
    teacher: nn.Module | None = None,
    epochs: int = 5,
    lr: float | None = None,
    batch_size: int | None = None,
    distill: bool = True,
    alpha: float = 0.95,
    temperature: float = 6.0,
    embedding_loss: str = "cosine",
    hidden_weight: float = 0.0,
    hidden_loss: str = "mse",
    hidden_attention: bool = False,
    lsq: bool | None = None,
    scale_lr: float = 10.0,
    weight_scales: str = "track",
    freeze_bn: bool | None = None,
    dropout: bool = False,
    val_fraction: float = 0.1,
    val_data: Any = None,
    patience: int | None = None,
    restore_best: bool = True,
    select: str = "loss",
    optimizer: str = "adamw",
    weight_decay: float = 0.0,
    steps_per_epoch: int | None = None,
    seed: int = 0,
    progress: bool = True,
    checkpoint: str | Path | None = None,
    resume: bool = False,
) -> FinetuneResult:
    """Fine-tune a copy of ``model`` on ``data``'s training split (see the module docstring).

    Args:
        model: any ``nn.Module``: squeezer-quantized, pruned or float. Not modified.
        data: a :class:`~squeezer.data.Dataset` (a ``TokenDataset`` for text) or a
            :class:`~squeezer.stream.StreamDataset`; its task gives the loss and the metric.
        teacher: the FP32 model to distil from (needed for classifier distillation; an embedding
            task's targets already are the FP32 embeddings). Not modified.
        epochs: passes over the training split (less the held-out part).
        lr: peak learning rate, decayed along a cosine (default: :data:`BN_CLASSIFIER_RECIPE`'s
            for a quantized classifier with BatchNorm, else :data:`FINETUNE_LR`).
        batch_size: the global batch (split across data-parallel ranks; default 32 for a
            quantized BN classifier, else 64).
        distill: distil from ``teacher`` (classifiers) instead of training on the labels alone.
        alpha: weight of the distillation term (the rest goes to cross-entropy on the labels).
        temperature: softmax temperature of the distillation term.
        embedding_loss: ``"cosine"`` (1 − cos) or ``"mse"`` for an embedding task.
        hidden_weight: weight of the hidden-state distillation term (0: off; needs ``teacher``).
        hidden_loss: its per-token distance, ``"mse"`` (relative squared error) or ``"cosine"``.
        hidden_attention: match each block's attention output too, not only the block outputs.
        lsq: learn the quantizers' step sizes (weights and activations); default True for a
            quantized BN classifier, else False (``lsq=False`` also selects the plain
            defaults of the other settings).
        scale_lr: the learned (log) step sizes' learning rate as a multiple of ``lr``, no decay.
        weight_scales: ``"track"`` (re-calibrate weight scales every step) or ``"frozen"``.
        freeze_bn: keep BatchNorm statistics fixed (eval mode); default False (batch
            statistics, running statistics updated) for a quantized BN classifier, else True.
        dropout: dropout on while training (off by default).
        val_fraction: share of the training split held out for the metric and early stopping
            (0: none; then ``patience`` and ``restore_best`` have nothing to go by).
        val_data: held-out ``(inputs, targets)`` batches to validate on instead (re-iterable,
            e.g. a :class:`~squeezer.data.Batches`): data the given model never trained on, so
            the best epoch is chosen on unseen data; the whole training split then trains and
            ``val_fraction`` is ignored.
        patience: stop after this many epochs without a better held-out epoch (None: never).
        restore_best: return the weights of the best held-out epoch (epoch 0 included).
        select: what makes an epoch best, a rule of :data:`~squeezer.train.select.SELECT`:
            ``"loss"`` (lowest held-out loss, then metric), ``"metric"`` (best held-out metric,
            then loss), ``"kd"`` (lowest held-out distillation loss to the teacher) or
            ``"last"``.
        optimizer: one of :data:`~squeezer.train.optim.OPTIMIZERS`.
        weight_decay: decoupled weight decay (AdamW) or L2 (others).
        steps_per_epoch: at most this many steps per epoch (None: the whole split).
        seed: seeds the held-out split, the batch order and any randomness of the model.
        progress: a progress bar with loss and metric (on a terminal; rank 0 only).
        checkpoint: a file to write the training state to after every epoch (atomically).
        resume: continue from ``checkpoint`` if it exists (same settings required).
    """
    recipe = _recipe(model, data.task, lsq, optimizer)
    lr = recipe["lr"] if lr is None else lr
    lsq = recipe["lsq"] if lsq is None else lsq
    batch_size = recipe["batch_size"] if batch_size is None else batch_size
    freeze_bn = recipe["freeze_bn"] if freeze_bn is None else freeze_bn
    opts = _options(**{k: v for k, v in locals().items() if k not in ("model", "data", "teacher",
                                                                        "recipe",
                                                                        "val_data", "progress",
                                                                        "checkpoint", "resume")})  # fmt: skip
    opts["val_data"] = val_data is not None
    task = data.task
    if hidden_weight > 0 and teacher is None:
        raise ConfigError(
            "hidden-state distillation needs the FP32 model: pass teacher=..., or hidden_weight=0"
        )
    if needs_teacher(task, distill) and teacher is None:
        raise ConfigError(
            "classifier distillation needs the FP32 model: pass teacher=..., or distill=False to "
            "fine-tune on the labels alone"
        )
    rank, world_size = world()
    if batch_size < world_size:
        raise ConfigError(f"batch_size {batch_size} is smaller than the {world_size} processes")
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    net = copy_model(model)
    _check_calibrated(net)
    scales = [p for _, p in learn_scales(net)] if lsq else []
    uses_teacher = needs_teacher(task, distill, hidden_weight)
    teach = _frozen_copy(teacher) if teacher is not None and uses_teacher else None
    check_select(select, task, teach is not None and needs_teacher(task, distill))
    loss_fn = make_loss(task, distill=distill, alpha=alpha, temperature=temperature,
                        embedding_loss=embedding_loss)  # fmt: skip
    if hidden_weight > 0:
        loss_fn = _HiddenKD(loss_fn, hidden_modules(teach, attention=hidden_attention),
                            hidden_weight, hidden_loss)  # fmt: skip
    train_epoch, val = _split(data, 0.0 if val_data is not None else val_fraction, seed,
                              batch_size)  # fmt: skip
    val = val if val_data is None else val_data
    ref = teacher_outputs(teach if needs_teacher(task, distill) else None, val, task)

    def measure() -> tuple[float | None, float | None, float | None]:
        return validate(net, val, task, ref, temperature)
    n_steps = _steps(train_epoch(0), steps_per_epoch)
    opt = _optimizer(net, scales, opts)
    sched = cosine_schedule(opt, epochs * n_steps)
    quantized = [m for m in net.modules() if isinstance(m, QuantMixin)]
    track = weight_scales == "track" and not lsq

    state = _State()
    ckpt = Path(checkpoint) if checkpoint is not None else None
    if resume and ckpt is not None and ckpt.is_file():
        state = _load_checkpoint(ckpt, opts, net, opt, sched)
    else:
        vl, vm, vk = measure()
        state.history.append({**_row(0, None, vl, vm, 0.0, 0.0), "val_kd": vk})
        state.best_score = score(state.history[0], task, select)
        state.best_state = _snapshot(net) if restore_best and val is not None else None

    ddp = _data_parallel(net) if world_size > 1 else net
    remaining = 0 if state.done else (epochs - state.epoch) * n_steps
    with progress_bar(total=remaining, desc="finetune", unit="step",
                      enabled=progress and rank == 0) as bar:  # fmt: skip
        while not state.done and state.epoch < epochs:
            t_epoch = time.perf_counter()
            epoch = state.epoch + 1
            _train_mode(net, freeze_bn, dropout)
            total, seen = torch.zeros((), dtype=torch.float64), 0
            for step, (x, y) in enumerate(train_epoch(epoch - 1)):
                if step >= n_steps:
                    break
                if track:
                    _track_scales(quantized)
                loss, n = _step(ddp, teach, loss_fn, x, y, rank, world_size, model_device(net))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total += float(loss.detach()) * n / world_size  # Σ over ranks: the batch's sum
                seen += n
                bar.update(1)
                bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
            if track:
                _track_scales(quantized)
            net.eval()
            val_loss, metric, kd = measure()
            train_loss = float(_summed(total, world_size)) / max(seen, 1)
            state.history.append({**_row(epoch, train_loss, val_loss, metric,
                                         opt.param_groups[0]["lr"], time.perf_counter() - t_epoch),
                                  "val_kd": kd})  # fmt: skip
            state.epoch = epoch
            state.update_best(score(state.history[-1], task, select), net, restore_best)
            if patience is not None and metric is not None and state.bad_epochs >= patience:
                state.stopped_early = True
            state.done = state.stopped_early or state.epoch >= epochs
            if metric is not None:
                bar.set_postfix(loss=f"{train_loss:.4f}", **{task.metric_name: f"{metric:.4g}"})
            if ckpt is not None:
                _save_checkpoint(ckpt, state, opts, net, opt, sched, rank)
    if restore_best and state.best_state is not None:
        net.load_state_dict(state.best_state)
    if lsq:
        fix_scales(net)
    net.eval()
    return FinetuneResult(
        model=net,
        history=tuple(state.history),
        seconds=time.perf_counter() - t0,
        metric_name=task.metric_name,
        best_epoch=state.best_epoch if restore_best and val is not None else state.epoch,
        stopped_early=state.stopped_early,
        options=opts,
        world_size=world_size,
    )


# --------------------------------------------------------------------------------------------------
# Settings


def _options(**kw: Any) -> dict[str, Any]:
    """The run's settings, checked, with the learning rate resolved (plain data)."""
    if kw["optimizer"] not in OPTIMIZERS:
        raise ConfigError(
            f"unknown optimizer {kw['optimizer']!r}; use one of {', '.join(OPTIMIZERS)}"
        )
    if kw["hidden_loss"] not in HIDDEN_LOSSES:
        raise ConfigError(
            f"unknown hidden loss {kw['hidden_loss']!r}; use one of {', '.join(HIDDEN_LOSSES)}"
        )
    if kw["weight_scales"] not in WEIGHT_SCALES:
        raise ConfigError(f"unknown weight_scales {kw['weight_scales']!r}; use 'track' or 'frozen'")
    checks = [
        ("epochs", kw["epochs"] >= 1, "at least 1"),
        ("batch_size", kw["batch_size"] >= 1, "at least 1"),
        ("val_fraction", 0.0 <= kw["val_fraction"] < 1.0, "in [0, 1)"),
        ("patience", kw["patience"] is None or kw["patience"] >= 1, "at least 1"),
        ("steps_per_epoch", kw["steps_per_epoch"] is None or kw["steps_per_epoch"] >= 1,
         "at least 1"),
        ("lr", kw["lr"] is None or kw["lr"] > 0, "positive"),
        ("weight_decay", kw["weight_decay"] >= 0, "0 or more"),
        ("scale_lr", kw["scale_lr"] > 0, "positive"),
        ("hidden_weight", kw["hidden_weight"] >= 0, "0 or more"),
    ]  # fmt: skip
    for name, ok, want in checks:
        if not ok:
            raise ConfigError(f"{name}={kw[name]} is out of range; give a value {want}")
    if kw["lr"] is None:
        kw["lr"] = FINETUNE_LR[kw["optimizer"]]
    return {k: (float(v) if isinstance(v, float) else v) for k, v in kw.items()}


def _recipe(model: nn.Module, task: Any, lsq: bool | None, optimizer: str) -> dict[str, Any]:
    """The defaults of a run: :data:`BN_CLASSIFIER_RECIPE` for a squeezer-quantized classifier
    with BatchNorm under AdamW (unless ``lsq=False``), else :data:`PLAIN_RECIPE`."""
    mods = list(model.modules())
    bn_classifier = (
        isinstance(task, Classification) and not task.targets_from_model
        and any(isinstance(m, QuantMixin) for m in mods)
        and any(isinstance(m, _BatchNorm) for m in mods)
    )  # fmt: skip
    if bn_classifier and optimizer == "adamw" and lsq is not False:
        return BN_CLASSIFIER_RECIPE
    return PLAIN_RECIPE


def _optimizer(net: nn.Module, scales: list[nn.Parameter], opts: dict) -> torch.optim.Optimizer:
    """The named optimizer over the model's parameters, and the learned log step sizes (if any)
    in a group of their own: ``scale_lr`` times the learning rate, no decay, no trust ratio."""
    for p in scales:
        p.requires_grad_(False)
    opt = make_optimizer(opts["optimizer"], net, lr=opts["lr"], weight_decay=opts["weight_decay"])
    for p in scales:
        p.requires_grad_(True)
    if scales:
        lr = opts["lr"] * opts["scale_lr"]
        opt.add_param_group({"params": scales, "lr": lr, "weight_decay": 0.0, "adapt": False})
    return opt


def _check_calibrated(net: nn.Module) -> None:
    if any(isinstance(m, ActQuantizer) and not bool(m.calibrated) for m in net.modules()):
        raise ConfigError(
            "the model's activation quantizers are not calibrated; quantize it with calib=..."
        )


def _frozen_copy(teacher: nn.Module) -> nn.Module:
    """A private eval-mode copy of the teacher without gradients."""
    t = copy_model(teacher).eval()
    for p in t.parameters():
        p.requires_grad_(False)
    return t


def _train_mode(net: nn.Module, freeze_bn: bool, dropout: bool) -> None:
    """Train mode where it matters: everything in train mode only with ``dropout`` (else eval,
    which switches off dropout in every form, HF's attention dropout too); BatchNorm per
    ``freeze_bn``."""
    net.train(dropout)
    for m in net.modules():
        if isinstance(m, _BatchNorm):
            m.train(not freeze_bn)


@torch.no_grad()
def _track_scales(quantized: list[QuantMixin]) -> None:
    for m in quantized:
        m.weight_quantizer.calibrate(m.weight)


# --------------------------------------------------------------------------------------------------
# Data: the held-out split and the batches of each epoch


def _split(data: Any, fraction: float, seed: int, size: int):
    """``(train_epoch, val)``: ``train_epoch(e)`` gives epoch ``e``'s batches (seeded by ``seed``
    and ``e``), ``val`` the held-out batches (None without a held-out split)."""
    if is_dataclass(data) and fraction > 0:  # in memory: a seeded subset of samples
        n = batch_size(data.x_train)
        n_val = min(max(1, round(n * fraction)), n - 1)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        va, tr = order[:n_val].sort().values, order[n_val:].sort().values
        held = replace(data, x_test=_index(data.x_train, va), y_test=_index(data.y_train, va))
        data = replace(data, x_train=_index(data.x_train, tr), y_train=_index(data.y_train, tr))
        val = held.test_batches()
    elif fraction > 0:  # streamed: every k-th batch of the unshuffled split
        k = max(2, round(1 / fraction))
        val = _Every(data, size, k, keep=True)
        return (lambda e: _Every(data, size, k, keep=False)), val
    else:
        val = None

    def train_epoch(epoch: int):
        batches = data.train_batches(size, shuffle=True, seed=seed * 7919 + epoch)
        if isinstance(batches, list):  # e.g. length-sorted token batches: shuffle their order
            g = torch.Generator().manual_seed(seed * 7919 + epoch)
            batches = [batches[i] for i in torch.randperm(len(batches), generator=g)]
        return batches

    return train_epoch, val


class _Every:
    """The batches of a streamed training split whose index is (or is not) a multiple of ``k``."""

    def __init__(self, data: Any, size: int, k: int, keep: bool):
        self.data, self.size, self.k, self.keep = data, size, k, keep

    def __iter__(self):
        for i, b in enumerate(self.data.train_batches(self.size)):
            if (i % self.k == 0) == self.keep:
                yield b

    def __len__(self) -> int:
        n = len(self.data.train_batches(self.size))
        held = -(-n // self.k)
        return held if self.keep else n - held


def _steps(batches: Any, cap: int | None) -> int:
    n = len(batches)
    return n if cap is None else min(n, cap)


# --------------------------------------------------------------------------------------------------
# One step, data-parallel or not


def _data_parallel(net: nn.Module) -> nn.Module:
    """``net`` under DistributedDataParallel (parameters broadcast from rank 0; a static graph,
    so parameters that get no gradient, such as an unused pooler, need no special flag)."""
    from torch.nn.parallel import DistributedDataParallel

    device = model_device(net)
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(net, device_ids=ids, static_graph=True)


def _step(net, teacher, loss_fn, x, y, rank: int, world_size: int, device):
    """This rank's loss on its slice of the global batch ``(x, y)``, weighted so that averaging
    the gradients over ranks (what DDP does) gives the gradient of the global batch mean; and the
    global batch's sample count."""
    n = batch_size(x)
    if world_size > 1:
        part = torch.tensor_split(torch.arange(n), world_size)[rank]
        rows, weight = (part, part.numel() * world_size / n) if part.numel() else (
            torch.arange(1), 0.0)  # fmt: skip
        x, y = _index(x, rows), (_index(y, rows) if _indexable(y, n) else y)
    else:
        weight = 1.0
    x, y = to_device(x, device), to_device(y, device)
    if isinstance(loss_fn, _HiddenKD):
        return loss_fn.step(net, teacher, x, y) * weight, n
    out = forward(net, x)
    t = None
    if teacher is not None:
        with torch.no_grad():
            t = forward(teacher, x)
    return loss_fn(out, y, t) * weight, n


class _HiddenKD:
    """The output loss plus ``weight`` times the hidden-state term of one training forward of the
    student and the teacher, their hooks on only for that forward."""

    def __init__(self, loss_fn, names: list[str], weight: float, kind: str):
        self.loss_fn, self.names, self.weight, self.kind = loss_fn, names, float(weight), kind

    def __call__(self, s: Any, y: Any, t: Any) -> torch.Tensor:  # validation-free output loss
        return self.loss_fn(s, y, t)

    def step(self, net: nn.Module, teacher: nn.Module, x: Any, y: Any) -> torch.Tensor:
        inner = net.module if hasattr(net, "module") else net  # under DDP, hook the wrapped model
        with HiddenStates(inner, self.names) as hs:
            out = forward(net, x)
        with torch.no_grad(), HiddenStates(teacher, self.names) as ht:
            t = forward(teacher, x)
        mask = x.get("attention_mask") if hasattr(x, "get") else None
        extra = hidden_loss(hs.outputs, ht.outputs, mask, kind=self.kind)
        return self.loss_fn(out, y, t) + self.weight * extra


def _indexable(y: Any, n: int) -> bool:
    return isinstance(y, torch.Tensor | dict) and batch_size(y) == n


def _summed(total: torch.Tensor, world_size: int) -> torch.Tensor:
    """``total`` summed over the ranks."""
    return total if world_size == 1 else all_reduce_sum(total.clone())


__all__ = ["BN_CLASSIFIER_RECIPE", "FINETUNE_LR", "PLAIN_RECIPE", "FinetuneResult", "finetune"]
