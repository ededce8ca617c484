"""The pruning flags of ``squeezer compress`` (a stage before quantization)."""

from __future__ import annotations

import argparse
from typing import Any

from ..errors import ConfigError


def prune_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "pruning (before quantization)",
        "e.g. --prune structured --prune-ratio 0.5 --prune-finetune 10: remove half the MACs "
        "(whole channels, the model really shrinks), then fine-tune 10 epochs distilled from "
        "the unpruned model; --budget then sets the quantization of what is left (bits=8)",
    )
    g.add_argument("--prune", metavar="METHOD",
                   help="structured (channels), heads (attention heads + FFN neurons of "
                   "encoders), tokens (learned token pruning of encoders, PyTorch only), "
                   "unstructured (magnitude zeros), nm (N:M zeros), leap (learned "
                   "thresholds); zeros give no speed-up on dense runtimes")  # fmt: skip
    g.add_argument("--prune-ratio", type=float, default=0.5, metavar="R",
                   help="fraction removed of the --prune-target (default 0.5)")  # fmt: skip
    g.add_argument("--prune-target", choices=("macs", "params", "weights"), default=None,
                   help="what the ratio is a fraction of (default: macs for structured and "
                   "heads, weights for zeroing methods)")  # fmt: skip
    g.add_argument(
        "--prune-importance",
        choices=("l1", "l2", "hessian"),
        default="l1",
        help="channel/weight score: magnitude, or 1/2 Tr(H)/n |dW|^2 (default l1)",
    )
    g.add_argument(
        "--prune-scope",
        choices=("global", "layer"),
        default="global",
        help="one ranking across layers (default) or the same ratio in each",
    )
    g.add_argument(
        "--prune-nm",
        default="2:4",
        metavar="N:M",
        help="the N:M pattern for --prune nm (default 2:4)",
    )
    g.add_argument("--prune-finetune", type=int, default=0, metavar="EPOCHS",
                   help="fine-tuning epochs after pruning, distilled from the unpruned model "
                   "(default 0)")  # fmt: skip


def prune_of(args: argparse.Namespace) -> dict[str, Any]:
    """The RunSpec fields of the pruning flags (none without ``--prune``)."""
    if not args.prune:
        if args.prune_finetune:
            raise ConfigError("--prune-finetune needs --prune METHOD (e.g. --prune structured)")
        return {}
    from ..prune import PRUNERS, PruneSpec

    if args.prune not in PRUNERS:
        raise ConfigError(f"unknown --prune {args.prune!r}; choose one of {', '.join(PRUNERS)}")
    try:
        n, m = (int(v) for v in args.prune_nm.split(":"))
    except ValueError:
        raise ConfigError(f"--prune-nm takes N:M such as 2:4, got {args.prune_nm!r}") from None
    macs_first = ("structured", "heads", "tokens")
    target = args.prune_target or ("macs" if args.prune in macs_first else "weights")
    spec = PruneSpec(args.prune, args.prune_ratio, target=target, importance=args.prune_importance,
                     scope=args.prune_scope, n=n, m=m, seed=args.seed)  # fmt: skip
    return {"prune": spec.to_dict(), "prune_finetune": args.prune_finetune}
