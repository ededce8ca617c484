"""What every command shares: the command registry, the argument helpers and the run spec an
invocation describes."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import NoReturn

from ..errors import ConfigError

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2 (argparse prints usage too)
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def command(name: str, help: str, configure: Callable[[argparse.ArgumentParser], None]):
    """Register ``fn(args) -> exit code`` as a subcommand whose flags ``configure`` adds."""

    def deco(fn):
        COMMANDS[name] = fn
        fn.help, fn.configure = help, configure
        return fn

    return deco


# --------------------------------------------------------------------------------------------------
# arguments


def model_args(p: argparse.ArgumentParser, *, data: bool = True, out: bool = True) -> None:
    p.add_argument(
        "model",
        metavar="MODEL",
        help="zoo:NAME, zoo:NAME:imagenet (pretrained, e.g. zoo:efficientnet_lite0:imagenet), "
        "module:factory, hf:minilm or hf:DIR",
    )
    p.add_argument("--weights", metavar="FILE", help=".safetensors or torch state-dict file")
    p.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow a weights file that is a full pickle (it can run code)",
    )
    if data:
        p.add_argument(
            "--data",
            metavar="DATA",
            help="digits, mnist1d, sentences, photos (real photographs; labels = the FP32 "
            "model's predictions), a .npz (x, y[, x_test, y_test]), an image folder, a "
            ".txt file, or pkg.module:factory (a Dataset, DataLoader or iterable of batches)",
        )
    if out:
        p.add_argument("--out", required=True, metavar="DIR", help="run folder to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="print nothing on success")


def latency_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--latency-backend", choices=("onnxruntime", "proxy"), default="onnxruntime",
                   help="where a latency budget's per-layer table is measured (default: ONNX "
                   "Runtime at --threads; proxy: PyTorch float time x bits/32)")  # fmt: skip


def spec_of(args: argparse.Namespace, command: str, **fields):
    """The run spec an invocation describes (the weights path made absolute)."""
    from pathlib import Path

    from ..runfolder import RunSpec
    from ..zoo import preprocessing_of

    weights = str(Path(args.weights).resolve()) if getattr(args, "weights", None) else None
    fields.setdefault("weights", weights)
    fields.setdefault("preprocessing", preprocessing_of(args.model))  # zoo:NAME:TAG's weights
    return RunSpec(
        command=command,
        model=args.model,
        trust_pickle=bool(getattr(args, "trust_pickle", False)),
        data=getattr(args, "data", None),
        max_len=getattr(args, "max_len", 128),
        seed=getattr(args, "seed", 0),
        **fields,
    )


def parse_shape(text: str | None) -> tuple[int, ...] | None:
    if not text:
        return None
    try:
        return tuple(int(v) for v in text.replace("x", ",").split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"--input-shape {text!r} is not a shape like 1,8,8") from None


def parse_bits(text: str | None) -> tuple[int, ...] | None:
    """``--bits 2,3,4,7`` as the planner's candidate widths (None: the template's)."""
    if text is None:
        return None
    from ..templates import check_widths

    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--bits {text!r} is not a comma list of widths like 2,3,4,8") from None
    return check_widths(values)


def print_summary(result, data, out) -> None:
    from ..report import text_summary

    print(text_summary(result.metrics(data)))
    print(f"\nwrote {out}/report.html")
