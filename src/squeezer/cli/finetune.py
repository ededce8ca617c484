"""``squeezer finetune DIR``: quantization-aware fine-tuning with distillation of a run's model."""

from __future__ import annotations

import argparse

from .args import command


def finetune_args(p: argparse.ArgumentParser, *, epochs: int | None = 5) -> None:
    """The fine-tuning flags (``squeezer finetune``; ``squeezer compress --finetune N`` shares
    all but ``--epochs``)."""
    from ..train.optim import OPTIMIZERS

    if epochs is not None:
        p.add_argument("--epochs", type=int, default=epochs, help=f"epochs (default {epochs})")
    p.add_argument("--lr", type=float, default=None,
                   help="peak learning rate, cosine-decayed (default: 1e-3 for a quantized "
                        "classifier with BatchNorm, else 1e-4)")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=None,
                   help="global batch (default: 32 for a quantized classifier with BatchNorm, "
                        "else 64)")  # fmt: skip
    p.add_argument("--optimizer", choices=tuple(OPTIMIZERS), default="adamw")
    p.add_argument("--distill", action=argparse.BooleanOptionalAction, default=True,
                   help="distil from the FP32 model (default; --no-distill: labels only)")  # fmt: skip
    p.add_argument("--alpha", type=float, default=0.95, help="weight of the KD term (0.95)")
    p.add_argument("--temperature", type=float, default=6.0, help="KD temperature (6)")
    p.add_argument("--distill-hidden", type=float, default=0.0, metavar="W",
                   help="add W x hidden-state distillation from the FP32 model: every encoder "
                        "block's output (default 0: off; also for a heads/FFN-pruned encoder)")  # fmt: skip
    p.add_argument("--hidden-loss", choices=("mse", "cosine"), default="mse",
                   help="per-token distance of --distill-hidden: relative squared error (mse) "
                        "or 1 - cos")  # fmt: skip
    p.add_argument("--hidden-attention", action="store_true",
                   help="--distill-hidden also matches every block's attention output")  # fmt: skip
    p.add_argument("--lsq", action=argparse.BooleanOptionalAction, default=None,
                   help="learn the quantizers' step sizes (LSQ; default: on for a quantized "
                        "classifier with BatchNorm, else off)")  # fmt: skip
    p.add_argument("--freeze-bn", action=argparse.BooleanOptionalAction, default=None,
                   help="keep BatchNorm statistics and affine frozen (default: frozen, except "
                        "for a quantized classifier with BatchNorm)")  # fmt: skip
    p.add_argument("--patience", type=int, default=None,
                   help="stop after N epochs without a better held-out epoch (lowest held-out "
                        "loss, the metric breaking ties)")  # fmt: skip
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="share of the training split held out (default 0.1)")  # fmt: skip


def finetune_options(args: argparse.Namespace) -> dict:
    """The :func:`squeezer.train.finetune.finetune` options the flags describe."""
    return dict(lr=args.lr, batch_size=args.batch_size, optimizer=args.optimizer,
                distill=args.distill, alpha=args.alpha, temperature=args.temperature,
                lsq=args.lsq, freeze_bn=args.freeze_bn, patience=args.patience,
                val_fraction=args.val_fraction,
                hidden_weight=args.distill_hidden, hidden_loss=args.hidden_loss,
                hidden_attention=args.hidden_attention)  # fmt: skip


def print_finetune(out, record: dict) -> None:
    name = record["metric_name"]
    fp32 = record.get("fp32")
    print(f"fine-tuned {len(record['history']) - 1} epochs in {record['seconds']:.1f} s: {name} "
          f"PTQ {record['ptq']:.4g} -> {record['after']:.4g}"
          + (f" (FP32 {fp32:.4g})" if fp32 is not None else ""))  # fmt: skip
    print(f"wrote {out}/model.safetensors and {out}/report.html")


def _configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", metavar="DIR", help="a run folder written by 'squeezer compress'")
    finetune_args(p)
    p.add_argument("--resume", action="store_true",
                   help="continue from DIR/finetune.ckpt after an interruption")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="print nothing on success")


@command("finetune", "fine-tune DIR's compressed model (QAT, distilled from FP32) in place",
         _configure)  # fmt: skip
def cmd_finetune(args: argparse.Namespace) -> int:
    from ..runfolder import read_metrics
    from ..runs import finetune_run

    out = finetune_run(args.dir, epochs=args.epochs, seed=args.seed, resume=args.resume,
                       progress=not args.quiet, **finetune_options(args))  # fmt: skip
    if out is not None and not args.quiet:
        print_finetune(args.dir, read_metrics(args.dir)["finetune"])
    return 0
