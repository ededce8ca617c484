"""The ``squeezer`` command line. It parses arguments into a :class:`~squeezer.runfolder.RunSpec`,
calls the API (:mod:`squeezer.pipeline`, :mod:`squeezer.runfolder`, ...), prints, and maps errors
to exit codes: 0 done, 2 bad input or infeasible request (one line on stderr), 1 internal failure.
Each command lives in a module of this package and registers itself with :func:`args.command`.
"""

from __future__ import annotations

import argparse
import os
import sys

from .._version import __version__
from ..errors import SqueezerError, first_line
from ..threads import configure_threads
from . import compress, deploy, finetune, train  # noqa: F401  (they register their commands)
from .args import COMMANDS, Parser, command

__all__ = ["COMMANDS", "build_parser", "command", "main"]


EPILOG = """examples:
  squeezer demo                                     # train, compress and report a digits CNN
  squeezer compress zoo:digits_cnn --weights W.safetensors --data digits --budget bits=3 --out R
  squeezer plan R --budget size=40kB                # re-plan from R's analysis in milliseconds
  squeezer export R && squeezer bench R             # ONNX, checked and timed in ONNX Runtime

exit codes: 0 done, 2 bad input or infeasible request (one line on stderr), 1 internal failure.
"squeezer COMMAND --help" describes each command."""


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="squeezer",
        description="Make trained PyTorch models small and fast: Hessian-aware mixed-precision\n"
        "quantization, with or without data, and ONNX deployment.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"squeezer {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for name, fn in COMMANDS.items():
        p = sub.add_parser(name, help=fn.help, description=fn.help)
        fn.configure(p)
        p.add_argument(
            "--threads",
            default=None,
            metavar="N|auto",
            help="CPU threads for PyTorch and ONNX Runtime (default: the cores idle now; "
            "SQUEEZER_THREADS or OMP_NUM_THREADS also set it)",
        )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    try:
        args.threads, args.threads_source = configure_threads(args.threads)
        return COMMANDS[args.command](args)
    except SqueezerError as exc:
        print(f"squeezer: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("squeezer: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # an internal failure: say so, keep the traceback for --debug users
        if os.environ.get("SQUEEZER_DEBUG"):
            raise
        msg = first_line(exc) if str(exc).strip() else ""
        print(
            f"squeezer: internal error: {type(exc).__name__}: {msg} "
            "(set SQUEEZER_DEBUG=1 for the traceback and please report it)",
            file=sys.stderr,
        )
        return 1
