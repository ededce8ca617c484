"""squeezer: Hessian-aware compression of PyTorch models for embedded and edge deployment.

The public surface is what this module re-exports; everything else is internal. Heavy optional
packages (onnx, onnxruntime, matplotlib, transformers) are imported only inside the functions that
need them, so ``import squeezer`` stays light.

Example:
    >>> import squeezer as sq
    >>> model = sq.load_model("zoo:digits_cnn")
    >>> qmodel = sq.quantize(model, sq.QuantConfig(sq.LayerQuant(bits=8)))
"""

__version__ = "0.1.0"

from .config import Budget, LayerQuant, Plan, QuantConfig
from .data import Batches, Dataset, evaluate, load_data
from .errors import (
    ConfigError,
    DataError,
    ExportError,
    InfeasibleBudgetError,
    SqueezerError,
    UnsupportedModelError,
)
from .graph import quantizable_layers
from .measure import average_bits, latency, model_bytes, profile_layers
from .models import load_model, save_weights
from .pipeline import compress
from .quant.apply import calibrate, load_quantized, quantize

__all__ = [
    "Batches",
    "Budget",
    "ConfigError",
    "DataError",
    "Dataset",
    "ExportError",
    "InfeasibleBudgetError",
    "LayerQuant",
    "Plan",
    "QuantConfig",
    "SqueezerError",
    "UnsupportedModelError",
    "__version__",
    "average_bits",
    "calibrate",
    "compress",
    "evaluate",
    "latency",
    "load_data",
    "load_model",
    "load_quantized",
    "model_bytes",
    "profile_layers",
    "quantizable_layers",
    "quantize",
    "save_weights",
]
