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
    g.add_argument("--prune-ratio", default="0.5", metavar="R",
                   help="fraction removed of the --prune-target (default 0.5), or auto with "
                   "--prune structured: one plan picks each channel group's ratio "
                   "(--prune-ratios) and each layer's bits under --budget size=...,latency=...")  # fmt: skip
    g.add_argument("--prune-ratios", default="0,0.25,0.5", metavar="R,R,...",
                   help="candidate ratios per channel group for --prune-ratio auto "
                   "(default 0,0.25,0.5)")  # fmt: skip
    g.add_argument("--prune-omega", choices=("hessian", "measured"), default="hessian",
                   help="the loss estimate of --prune-ratio auto: 1/2 Tr(H)/n |dW|^2 (default) "
                   "or the loss increase measured per layer and choice")  # fmt: skip
    g.add_argument("--prune-target", choices=("macs", "params", "weights"), default=None,
                   help="what the ratio is a fraction of (default: macs for structured and "
                   "heads, weights for zeroing methods and leap; --prune leap --prune-target "
                   "macs learns thresholds on whole channels and removes them)")  # fmt: skip
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
    ratio, options = _ratio(args)
    spec = PruneSpec(args.prune, ratio, target=target, importance=args.prune_importance,
                     scope=args.prune_scope, n=n, m=m, seed=args.seed, options=options)  # fmt: skip
    return {"prune": spec.to_dict(), "prune_finetune": args.prune_finetune}


def _ratio(args: argparse.Namespace) -> tuple[float, dict[str, Any]]:
    """The ratio and options of ``--prune-ratio`` (a number, or ``auto``: the joint plan)."""
    if args.prune_ratio != "auto":
        try:
            return float(args.prune_ratio), {}
        except ValueError:
            raise ConfigError(
                f"--prune-ratio takes a number in [0, 1) or auto, got {args.prune_ratio!r}"
            ) from None
    if args.prune != "structured":
        raise ConfigError(
            f"--prune-ratio auto plans structured channel ratios only, not --prune {args.prune}; "
            "use --prune structured, or a number such as --prune-ratio 0.5"
        )
    if getattr(args, "method", None) == "uniform":
        raise ConfigError("--prune-ratio auto plans bits per layer; drop --method uniform")
    try:
        ratios = [float(r) for r in args.prune_ratios.split(",")]
    except ValueError:
        raise ConfigError(f"--prune-ratios takes numbers such as 0,0.25,0.5, got "
                          f"{args.prune_ratios!r}") from None  # fmt: skip
    if 0.0 not in ratios or any(not 0 <= r < 1 for r in ratios):
        raise ConfigError(f"--prune-ratios must lie in [0, 1) and include 0, got {args.prune_ratios}")
    return 0.0, {"auto": True, "ratios": ratios, "omega": args.prune_omega}
