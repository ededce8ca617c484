"""The fine-tuning trainer's state between epochs (best epoch, early stop) and its checkpoints:
the whole training state written atomically by rank 0 and restored only into a run with the same
settings (:func:`squeezer.train.finetune.finetune`, ``checkpoint=``)."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..atomic import write_bytes_atomic
from ..distributed import is_active
from ..errors import ConfigError
from ..graph import model_device

CHECKPOINT_FORMAT = "squeezer-finetune-checkpoint/1"


@dataclass
class _State:
    epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best_score: tuple[float, float] | None = None
    best_epoch: int = 0
    best_state: dict[str, torch.Tensor] | None = None
    bad_epochs: int = 0
    stopped_early: bool = False
    done: bool = False

    def update_best(self, score: tuple[float, float] | None, net: nn.Module, keep: bool) -> None:
        if score is None:
            return
        if self.best_score is None or tuple(score) < tuple(self.best_score):
            self.best_score, self.best_epoch, self.bad_epochs = score, self.epoch, 0
            if keep:
                self.best_state = _snapshot(net)
        else:
            self.bad_epochs += 1


def _row(epoch: int, loss: float | None, val_loss: float | None, metric: float | None, lr: float,
         secs: float) -> dict:  # fmt: skip
    return {"epoch": epoch, "train_loss": loss, "val_loss": val_loss, "val_metric": metric,
            "lr": float(lr), "seconds": secs}  # fmt: skip


def _snapshot(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def _save_checkpoint(path: Path, state: _State, opts: dict, net, opt, sched, rank: int) -> None:
    """The whole training state, written atomically by rank 0 (the others wait for it)."""
    if rank == 0:
        doc = {
            "format": CHECKPOINT_FORMAT,
            "options": opts,
            "state": {k: v for k, v in vars(state).items() if k != "best_state"},
            "best_state": state.best_state,
            "model": net.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "rng": torch.get_rng_state(),
        }
        buf = io.BytesIO()
        torch.save(doc, buf)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(path, buf.getvalue())
    if is_active():
        torch.distributed.barrier()


def _load_checkpoint(path: Path, opts: dict, net, opt, sched) -> _State:
    """Restore the training state from ``path``; its settings must be this run's."""
    try:
        doc = torch.load(path, map_location=model_device(net), weights_only=True)
    except Exception as exc:  # a truncated or foreign file
        raise ConfigError(f"cannot read the checkpoint {path} ({type(exc).__name__}); delete it "
                          "to start afresh") from None  # fmt: skip
    if not isinstance(doc, dict) or doc.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(f"{path} is not a squeezer fine-tuning checkpoint; delete it or choose "
                          "another path")  # fmt: skip
    diff = [k for k in opts if doc["options"].get(k) != opts[k]]
    if diff:
        k = diff[0]
        raise ConfigError(
            f"the checkpoint {path} was written with {k}={doc['options'].get(k)!r}, this run has "
            f"{k}={opts[k]!r}; resume with the same settings, or delete the checkpoint"
        )
    net.load_state_dict(doc["model"])
    opt.load_state_dict(doc["optimizer"])
    sched.load_state_dict(doc["scheduler"])
    torch.set_rng_state(doc["rng"])
    state = _State(**doc["state"])
    state.best_state = doc["best_state"]
    return state
