"""Integer-only inference: dyadic arithmetic (HAWQ-V3, arXiv:2011.10680) and I-BERT's integer
kernels (arXiv:2101.01321)."""

from .cnn import to_integer
from .dyadic import ROUNDINGS, bit_length, dyadic_value, isqrt, requantize, shift_round, to_dyadic
from .encoder import IntegerEncoder, Rescale, int_matmul, to_integer_encoder
from .fold import fold_batchnorm
from .kernels import i_exp, i_gelu, i_layernorm, i_softmax
from .steps import IntegerModel

__all__ = [
    "ROUNDINGS",
    "IntegerEncoder",
    "IntegerModel",
    "Rescale",
    "bit_length",
    "dyadic_value",
    "fold_batchnorm",
    "i_exp",
    "i_gelu",
    "i_layernorm",
    "i_softmax",
    "int_matmul",
    "isqrt",
    "requantize",
    "shift_round",
    "to_dyadic",
    "to_integer",
    "to_integer_encoder",
]
