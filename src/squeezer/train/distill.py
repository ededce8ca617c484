"""Fine-tuning losses: knowledge distillation from the FP32 model, or the task's own loss.

- **Classifiers** (Hinton et al., arXiv:1503.02531; the HAWQ / HAWQ-V3 QAT recipe is α = 0.95,
  T = 6): ``α · T² · KL(softmax(t/T) ‖ softmax(s/T)) + (1 − α) · CE(s, y)``, with ``t`` the
  teacher's logits on the same batch. The T² keeps the soft term's gradient scale independent of T.
- **Encoders** (a labels-free embedding task, whose targets are the FP32 model's own embeddings):
  ``1 − cos(s, t)`` (``"cosine"``, the metric the pipeline reports) or the task's
  ``½‖s − t‖²`` (``"mse"``); no labels are needed.
- Anything else, or ``distill=False``: the task's loss on the labels.
- **Hidden states** (encoders; TinyBERT, Jiao et al., arXiv:1909.10351, and MiniLM's layer-wise
  transfer): on top of any of these, ``w · mean over layers of d(h_s, h_t)`` between the output of
  every block of the student's layer stack and the FP32 teacher's (optionally each block's
  attention output too), read with forward hooks (:class:`HiddenStates`) that are removed after
  every forward. ``d`` is the per-token relative squared error ``‖h_s − h_t‖² / ‖h_t‖²``
  (``"mse"``) or ``1 − cos`` (``"cosine"``), averaged over each sample's real tokens (the
  attention mask) and then over the batch. Heads and FFN pruning keep the hidden size, so a pruned
  encoder is distilled layer by layer from the unpruned one the same way.

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
from torch import nn

from ..data import Classification, Task
from ..errors import ConfigError

#: loss(student_outputs, targets, teacher_outputs_or_None) -> a scalar batch mean
Loss = Callable[[Any, Any, Any], torch.Tensor]

EMBEDDING_LOSSES = ("cosine", "mse")
HIDDEN_LOSSES = ("mse", "cosine")


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


def needs_teacher(task: Task, distill: bool, hidden_weight: float = 0.0) -> bool:
    """True when the loss :func:`make_loss` builds (plus the hidden-state term, if
    ``hidden_weight`` > 0) reads a teacher's outputs."""
    if hidden_weight > 0:
        return True
    return distill and not task.targets_from_model and isinstance(task, Classification)


# --------------------------------------------------------------------------------------------------
# Hidden-state distillation


def hidden_modules(model: nn.Module, *, attention: bool = False) -> list[str]:
    """The FQNs whose outputs hidden-state distillation matches: the blocks of ``model``'s layer
    stack (its longest ``nn.ModuleList`` of modules of one class, e.g. BERT's ``encoder.layer``),
    in order, and with ``attention`` each block's attention sub-module (its first child whose name
    holds ``attn`` or ``attention``) before the block.

    Example:
        >>> hidden_modules(encoder)[:2]                          # doctest: +SKIP
        ['model.encoder.layer.0', 'model.encoder.layer.1']
    """
    stacks = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList)
              and len(m) >= 2 and len({type(c) for c in m}) == 1]  # fmt: skip
    if not stacks:
        raise ConfigError(
            f"{type(model).__name__} has no stack of layers (an nn.ModuleList of blocks of one "
            "class) to distil hidden states from; set the hidden-state weight to 0"
        )
    prefix, stack = max(stacks, key=lambda s: len(s[1]))
    prefix = f"{prefix}." if prefix else ""
    names = []
    for i, block in enumerate(stack):
        if attention:
            att = next((n for n, _ in block.named_children()
                        if "attn" in n.lower() or "attention" in n.lower()), None)  # fmt: skip
            if att is not None:
                names.append(f"{prefix}{i}.{att}")
        names.append(f"{prefix}{i}")
    return names


class HiddenStates:
    """Forward hooks that keep the outputs of ``names`` of ``model`` (the first tensor of a
    tuple output), registered on ``__enter__`` and always removed on ``__exit__``.

    Example:
        >>> with HiddenStates(encoder, hidden_modules(encoder)) as hs:   # doctest: +SKIP
        ...     encoder(**batch)
        >>> len(hs.outputs)                                      # doctest: +SKIP
        6
    """

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        missing = [n for n in names if _submodule(model, n) is None]
        if missing:
            raise ConfigError(
                f"the student has no module {missing[0]!r} that the teacher has; hidden-state "
                "distillation needs the same layer stack in both (heads/FFN pruning keeps it)"
            )
        self.model, self.names = model, list(names)
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> HiddenStates:
        for n in self.names:
            self._handles.append(_submodule(self.model, n).register_forward_hook(self._keep(n)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _keep(self, name: str):
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            self.outputs[name] = out[0] if isinstance(out, tuple | list) else out

        return hook


def _submodule(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def hidden_loss(
    student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor],
    mask: torch.Tensor | None = None, *, kind: str = "mse",
) -> torch.Tensor:  # fmt: skip
    """Mean over the layers of the per-token distance (module docstring) between the student's and
    the teacher's hidden states [B, T, D], averaged over each sample's tokens where ``mask`` [B, T]
    is 1 (all tokens without a mask), then over the batch.

    Example:
        >>> h = {"l0": torch.ones(2, 3, 4)}
        >>> float(hidden_loss(h, h))
        0.0
    """
    if kind not in HIDDEN_LOSSES:
        raise ConfigError(f"unknown hidden loss {kind!r}; use one of {', '.join(HIDDEN_LOSSES)}")
    if not teacher or student.keys() != teacher.keys():
        raise ConfigError("the student's and the teacher's hidden states do not match")
    terms = []
    for name, t in teacher.items():
        s = student[name]
        if s.shape != t.shape:
            raise ConfigError(
                f"hidden state {name!r} is {tuple(s.shape)} in the student but {tuple(t.shape)} "
                "in the teacher; hidden-state distillation needs the same hidden size and tokens"
            )
        s, t = s.float(), t.float()
        if kind == "mse":
            d = (s - t).pow(2).sum(-1) / t.pow(2).sum(-1).clamp_min(1e-12)
        else:
            d = 1.0 - F.cosine_similarity(s, t, dim=-1)
        if d.ndim == 1:  # one vector per sample
            terms.append(d.mean())
            continue
        d = d.flatten(1)
        m = torch.ones_like(d) if mask is None or mask.shape != d.shape else mask.to(d.dtype)
        terms.append(((d * m).sum(1) / m.sum(1).clamp_min(1.0)).mean())
    return torch.stack(terms).mean()
