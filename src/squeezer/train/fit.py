"""A small, seeded supervised training loop (AdamW by default, or LAMB / LARS / SGD; cosine
schedule) for the built-in nets."""

from __future__ import annotations

import torch
from torch import nn

from ..data import Dataset, evaluate, forward
from ..data import batch_size as batch_length
from ..graph import copy_model
from ..progress import progress
from .optim import cosine_schedule, make_optimizer


def fit(
    model: nn.Module,
    data: Dataset,
    *,
    epochs: int = 30,
    lr: float | None = None,
    batch_size: int = 64,
    weight_decay: float = 1e-4,
    seed: int = 0,
    show_progress: bool = False,
    optimizer: str = "adamw",
) -> tuple[nn.Module, dict[str, float]]:
    """Train a copy of ``model`` on ``data``'s training split; return it with its test metric.

    ``optimizer`` is one of :data:`~squeezer.train.optim.OPTIMIZERS`: ``"adamw"`` (default; all
    parameters decayed), ``"lamb"``, ``"lars"`` or ``"sgd"`` (momentum 0.9; biases and normalisation
    parameters neither decayed nor adapted). ``lr=None`` takes the optimizer's default (AdamW 3e-3,
    LAMB 1e-2, LARS 1.0, SGD 0.1).

    Example:
        >>> from squeezer.zoo import create
        >>> from squeezer.data import load_data
        >>> net, info = fit(create("digits_cnn"), load_data("digits"), epochs=1)  # doctest: +SKIP
    """
    torch.manual_seed(seed)  # dropout and init-time randomness of the copy stay reproducible
    net = copy_model(model)
    net.train()
    opt = make_optimizer(optimizer, net, lr=lr, weight_decay=weight_decay)
    batches = data.train_batches(batch_size, shuffle=True, seed=seed)
    # BatchNorm cannot train on a batch of one sample (no variance), which the last batch of an
    # epoch is when the split is one more than a multiple of batch_size: that sample sits out
    # the epoch (the order is drawn anew each epoch, so it is a different one each time)
    norms = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())
    steps = epochs * len(batches)
    sched = cosine_schedule(opt, steps)
    loss = torch.tensor(0.0)
    with progress(total=epochs, desc="train", unit="epoch", enabled=show_progress) as bar:
        for _ in range(epochs):
            for x, y in batches:
                if norms and batch_length(x) < 2:
                    continue
                opt.zero_grad(set_to_none=True)
                loss = data.task.loss(forward(net, x), y)
                loss.backward()
                opt.step()
                sched.step()
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
            bar.update(1)
    net.eval()
    metric = evaluate(net, data.test_batches(), data.task)
    return net, {
        data.task.metric_name: metric,
        "final_loss": float(loss.detach()),
        "epochs": epochs,
    }
