"""Resolving ``pkg.module:factory`` specs, the user's own code: ``--model pkg.module:factory``
(a callable returning an ``nn.Module``) and ``--data pkg.module:factory`` (a data set, loader or
iterable of batches). The module is imported, the dotted attribute looked up and, if callable,
called; each failure is one line naming the flag.
"""

from __future__ import annotations

import importlib
from typing import Any

from torch import nn

from .errors import DataError, UnsupportedModelError, first_line


def resolve_factory(spec: str, what: str = "model") -> Any:
    """What ``pkg.module:factory`` names: the attribute (a dotted path inside the module), called
    if it is callable (an ``nn.Module`` instance is taken as it is). One-line errors say which
    part failed; ``what`` (``"model"``, ``"data"``) names the flag in them.

    Example:
        >>> type(resolve_factory("collections:OrderedDict", "data")).__name__
        'OrderedDict'
    """
    error = UnsupportedModelError if what == "model" else DataError
    mod_name, _, attr = spec.partition(":")
    if not mod_name or not attr:
        raise error(f"--{what} {spec!r} is not pkg.module:factory")
    try:
        module = importlib.import_module(mod_name)
    except Exception as exc:  # ImportError, or the module's own code failing on import
        raise error(
            f"cannot import {mod_name!r} for {what} {spec!r} ({type(exc).__name__}: "
            f"{first_line(exc, 160)}); is it on PYTHONPATH?"
        ) from None
    factory = module
    for part in attr.split("."):
        factory = getattr(factory, part, None)
        if factory is None:
            raise error(f"module {mod_name!r} has no attribute {attr!r} (--{what} {spec})")
    try:
        return factory() if callable(factory) and not isinstance(factory, nn.Module) else factory
    except Exception as exc:
        raise error(f"calling {spec} failed: {type(exc).__name__}: {first_line(exc, 160)}") from None

