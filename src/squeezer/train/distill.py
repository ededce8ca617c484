"""Fine-tuning losses: knowledge distillation from the FP32 model, or the task's own loss.

- **Classifiers** (Hinton et al., arXiv:1503.02531; the HAWQ / HAWQ-V3 QAT recipe is α = 0.95,
  T = 6): ``α · T² · KL(softmax(t/T) ‖ softmax(s/T)) + (1 − α) · CE(s, y)``, with ``t`` the
  teacher's logits on the same batch. The T² keeps the soft term's gradient scale independent of T.
- **Encoders** (a labels-free embedding task, whose targets are the FP32 model's own embeddings):
  ``1 − cos(s, t)`` (``"cosine"``, the metric the pipeline reports) or the task's
  ``½‖s − t‖²`` (``"mse"``); no labels are needed.
- Anything else, or ``distill=False``: the task's loss on the labels.

Every loss is a mean over the batch, so a data-parallel rank can weight its share of a global
batch by its sample count (see :mod:`squeezer.train.finetune`).

Example:
    >>> from squeezer.data import Classification
    >>> loss = make_loss(Classification(), distill=True, alpha=0.95, temperature=6.0)
    >>> s = torch.tensor([[2.0, 0.0]]); y = torch.tensor([0])
    >>> float(loss(s, y, s))  # the teacher agrees: only the (1 - α) CE term is left
    0.0063...
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from ..data import Classification, Task
from ..errors import ConfigError

#: loss(student_outputs, targets, teacher_outputs_or_None) -> a scalar batch mean
Loss = Callable[[Any, Any, Any], torch.Tensor]

EMBEDDING_LOSSES = ("cosine", "mse")


def kd_loss(
    student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None, *,
    alpha: float, temperature: float,
) -> torch.Tensor:  # fmt: skip
    """Hinton's distillation loss on logits: α T² KL(teacher_T ‖ student_T) + (1 − α) CE."""
    t = float(temperature)
    soft = F.kl_div(
        F.log_softmax(student / t, dim=-1), F.log_softmax(teacher / t, dim=-1),
        reduction="batchmean", log_target=True,
    )  # fmt: skip
    loss = alpha * t * t * soft
    if alpha < 1.0 and labels is not None:
        loss = loss + (1.0 - alpha) * F.cross_entropy(student, labels)
    return loss


def cosine_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean ``1 − cos`` between each embedding and its teacher embedding."""
    return (1.0 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)).mean()


def make_loss(
    task: Task, *, distill: bool, alpha: float = 0.95, temperature: float = 6.0,
    embedding_loss: str = "cosine",
) -> Loss:  # fmt: skip
    """The fine-tuning loss for ``task``: distillation as the module docstring says, or the task's
    loss. ``alpha`` in [0, 1], ``temperature`` > 0."""
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"alpha={alpha} is out of range; give a weight in [0, 1]")
    if not temperature > 0:
        raise ConfigError(f"temperature={temperature} is invalid; give a positive number")
    if embedding_loss not in EMBEDDING_LOSSES:
        raise ConfigError(
            f"unknown embedding loss {embedding_loss!r}; use one of {', '.join(EMBEDDING_LOSSES)}"
        )
    if task.targets_from_model:  # the targets are the FP32 model's outputs: always distillation

        def embed(s: Any, y: Any, t: Any) -> torch.Tensor:
            ref = y if t is None else t
            return cosine_loss(s, ref) if embedding_loss == "cosine" else task.loss(s, ref)

        return embed
    if distill and isinstance(task, Classification):

        def kd(s: Any, y: Any, t: Any) -> torch.Tensor:
            return kd_loss(s, t, y, alpha=alpha, temperature=temperature)

        return kd
    return lambda s, y, t: task.loss(s, y)


def needs_teacher(task: Task, distill: bool) -> bool:
    """True when the loss :func:`make_loss` builds reads a teacher's outputs."""
    return distill and not task.targets_from_model and isinstance(task, Classification)
