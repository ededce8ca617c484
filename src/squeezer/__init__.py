"""squeezer: Hessian-aware compression of PyTorch models for embedded and edge deployment.

The public surface is what this module re-exports; everything else is internal. Heavy optional
packages (onnx, onnxruntime, matplotlib, transformers) are imported only inside the functions that
need them, so ``import squeezer`` stays light.

Example:
    >>> import squeezer as sq
    >>> model = sq.load_model("zoo:digits_cnn")
    >>> qmodel = sq.quantize(model, sq.QuantConfig(sq.LayerQuant(bits=8)))
"""

# Modules that fill registries on import: the photo and text data sets, Q-BERT's layer template,
# ZeroQ's "kl" sensitivity (imported below for distill_data).
from . import images, qbert, text  # noqa: F401
from ._version import __version__
from .budget import Budget
from .config import LayerQuant, Plan, QuantConfig
from .costs import Costs, plan_costs
from .data import Batches, Dataset, evaluate, load_data
from .errors import (
    ConfigError,
    DataError,
    ExportError,
    InfeasibleBudgetError,
    SqueezerError,
    UnsupportedModelError,
)
from .export import export_onnx
from .graph import quantizable_layers
from .integer import fold_batchnorm, to_integer
from .measure import average_bits, latency, model_bytes, profile_layers
from .models import load_model, save_weights
from .pipeline import compress
from .plan import pareto_frontier, plan
from .quant.apply import calibrate, load_quantized, quantize
from .sensitivity import Sensitivity, sensitivity
from .spectrum import Spectrum, analyze
from .zeroshot import distill_data

__all__ = [
    "Batches",
    "Budget",
    "ConfigError",
    "Costs",
    "Sensitivity",
    "Spectrum",
    "analyze",
    "distill_data",
    "export_onnx",
    "fold_batchnorm",
    "pareto_frontier",
    "plan",
    "plan_costs",
    "sensitivity",
    "to_integer",
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
