"""Typed errors. Each message says what is wrong and how to fix it, in one line.

The CLI maps :class:`SqueezerError` subclasses to exit code 2 (bad input or an infeasible request)
and anything else to exit code 1 (an internal failure).
"""

from __future__ import annotations


class SqueezerError(Exception):
    """Base class of every error squeezer raises on purpose."""


class ConfigError(SqueezerError, ValueError):
    """A configuration, budget or plan is malformed or inconsistent."""


class InfeasibleBudgetError(ConfigError):
    """No plan meets the budget; the message names the smallest feasible value."""


class UnsupportedModelError(SqueezerError):
    """The model spec cannot be resolved, or the model holds something squeezer cannot handle."""


class DataError(SqueezerError):
    """A data spec cannot be read, or the data does not fit the model or the task."""


class ExportError(SqueezerError):
    """An export failed, or the exported file disagrees with squeezer's own outputs."""


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (at most ``limit`` characters), or its type name:
    what a one-line error quotes from an underlying library.

    Example:
        >>> first_line(ValueError("bad shape\\nmore detail"))
        'bad shape'
    """
    text = str(exc).strip().splitlines()
    return text[0][:limit] if text else type(exc).__name__
