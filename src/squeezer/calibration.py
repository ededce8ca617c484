"""Calibration sources: where the inputs that set activation ranges come from.

A source is a registered handler (``compress(..., calib=NAME)``, ``--calib NAME``) that returns a
:class:`Calibration`: the calibration batches, the sensitivity method the planner then uses, an
example input, and what the run must keep. Two ship:

- ``"real"``: a seeded subset of the data set's training split; plans from Hessian traces.
- ``"zeroshot"``: ZeroQ (arXiv:2001.00281): inputs distilled to match the model's BatchNorm
  statistics, no data at all; plans from the KL divergence each layer's quantization causes on
  those inputs. The run folder keeps the distilled inputs, so re-planning calibrates on the same.
- ``"noise"``: seeded standard-normal inputs shaped like the model's (noise in the normalised
  input space), planned like ``"zeroshot"``: the data-free baseline ZeroQ is measured against.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .data import Dataset
from .errors import ConfigError

#: Training samples used to calibrate activation ranges.
CALIB_SAMPLES = 512
#: What a run calibrating on real data without any says.
NEEDS_DATA = (
    "--data is required to calibrate on real data; give --data DATA, or use --calib zeroshot to "
    "quantize without any data"
)


@dataclass(frozen=True)
class Calibration:
    """What a calibration source gives the chain.

    Attributes:
        batches: the batches activation ranges are calibrated on.
        method: the sensitivity method this source plans with ("trace" needs a Hessian analysis
            of real data; "kl" scores on ``batches`` themselves).
        example: one input batch (for MACs and shapes).
        label: the name plans made from it carry, or None for the template's.
        record: what the run's metrics.json records about the source.
        inputs: inputs the run folder must keep to re-plan (distilled data), or None.
    """

    batches: Any
    method: str
    example: Any
    label: str | None = None
    record: dict[str, Any] = field(default_factory=dict)
    inputs: list[torch.Tensor] | None = None


CalibrationSource = Callable[..., Calibration]
#: name -> ``source(model, data, *, act_bits, seed, progress, saved, **options)``.
CALIBRATION_SOURCES: dict[str, CalibrationSource] = {}


def register_calibration(name: str) -> Callable[[CalibrationSource], CalibrationSource]:
    """Register a calibration source as ``compress(..., calib=name)`` (``--calib name``)."""

    def deco(fn: CalibrationSource) -> CalibrationSource:
        CALIBRATION_SOURCES[name] = fn
        return fn

    return deco


@register_calibration("real")
def _real(model: nn.Module, data: Dataset | None, **_: Any) -> Calibration:
    if data is None:
        raise ConfigError(NEEDS_DATA)
    return Calibration(data.calibration_batches(CALIB_SAMPLES), "trace", data.example(1))


#: The name of plans made from distilled data.
ZEROSHOT_NAME = "zero-shot mixed"


@register_calibration("zeroshot")
def _zeroshot(
    model: nn.Module,
    data: Dataset | None,
    *,
    act_bits: int | None = 8,
    seed: int = 0,
    progress: bool = False,
    saved: list[torch.Tensor] | None = None,
    samples: int = 64,
    input_shape: tuple[int, ...] | None = None,
    **_: Any,
) -> Calibration:
    """ZeroQ: inputs distilled to match the BatchNorm statistics (or the run's saved ones)."""
    from .zeroshot import zeroshot_batches

    # Per-sample statistics give narrower activation ranges: better at 4-bit activations, worse
    # at 8 (docs/benchmarks.md, "Data-free quantization").
    match = "sample" if act_bits is not None and act_bits <= 4 else "batch"
    t = time.perf_counter()
    distilled = saved
    if distilled is None:
        distilled = zeroshot_batches(
            model, samples, seed=seed, input_shape=input_shape, match=match, progress=progress
        )
    record = {
        "calibration": {
            "source": "distilled (ZeroQ)" + (", saved with the run" if saved else ""),
            "samples": sum(int(x.shape[0]) for x in distilled),
            "match": match,
            "seconds": None if saved else time.perf_counter() - t,
        }
    }
    return Calibration(distilled, "kl", distilled[0][:1], ZEROSHOT_NAME, record, distilled)


#: The name of plans made from Gaussian noise.
NOISE_NAME = "noise mixed"


@register_calibration("noise")
def _noise(
    model: nn.Module,
    data: Dataset | None,
    *,
    seed: int = 0,
    samples: int = 64,
    input_shape: tuple[int, ...] | None = None,
    **_: Any,
) -> Calibration:
    """Standard-normal inputs (one seeded draw, so re-planning redraws the same): shaped as
    ``input_shape``, else as the data's inputs (used for nothing else), else as the model's
    ``input_shape`` attribute."""
    from .zeroshot import _resolve_shape

    example = data.example(1) if data is not None and input_shape is None else None
    shape, dtype = _resolve_shape(model, input_shape, example)
    gen = torch.Generator().manual_seed(int(seed))
    x = torch.randn((int(samples), *shape), generator=gen, dtype=dtype)
    batches = list(x.split(64))
    record = {"calibration": {"source": "Gaussian noise N(0, 1)", "samples": int(samples)}}
    return Calibration(batches, "kl", batches[0][:1], NOISE_NAME, record)


def source(name: str) -> CalibrationSource:
    """The registered calibration source ``name``, or a ConfigError listing them."""
    if name not in CALIBRATION_SOURCES:
        raise ConfigError(
            f"unknown calibration {name!r}; choose one of {', '.join(CALIBRATION_SOURCES)}"
        )
    return CALIBRATION_SOURCES[name]
