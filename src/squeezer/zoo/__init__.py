"""Built-in architectures, listed in one registry so tests and the CLI can enumerate them.

Example:
    >>> from squeezer.zoo import list_models, create
    >>> "digits_cnn" in list_models()
    True
    >>> create("digits_cnn").input_shape
    (1, 8, 8)
"""

from __future__ import annotations

from . import small  # noqa: F401  (registers the built-in nets)
from .registry import MODELS, ModelEntry, create, list_models, register_model

__all__ = ["MODELS", "ModelEntry", "create", "list_models", "register_model"]
