"""The ONNX Runtime side of the export: CPU sessions with explicit thread counts
(:func:`ort_session`), a session behind a module's call (:class:`OrtModule`, for evaluating the
deployed model), input feeds for a model or session (:func:`ort_feeds`), the latency of
PyTorch models and ONNX Runtime sessions side by side (:func:`latency_table`), and the min-max
ranges of graph tensors that ``requantize`` calibrates with (:func:`_observe_ranges`).
"""

from __future__ import annotations

import os
import platform
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data import forward
from ..errors import ConfigError, ExportError, first_line
from .codes import _code_dtype
from .layers import _Act

#: The forms of 8-bit weight codes :func:`~squeezer.export.export_onnx` can write.
WEIGHT_CODES = ("auto", "int8", "uint8")


def u8s8_saturates() -> bool:
    """True if this CPU is one where ONNX Runtime's uint8 × int8 kernels can saturate: x86 without
    VNNI (AVX-512 VNNI or AVX-VNNI). There MLAS multiplies with VPMADDUBSW, which adds two
    products in int16: 255 · 127 · 2 = 64,770 does not fit 32,767. Where it cannot tell (no
    /proc/cpuinfo on x86), it answers True, the safe side.

    Example:
        >>> isinstance(u8s8_saturates(), bool)
        True
    """
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        info = None
    return _saturates(platform.machine(), info)


def _saturates(machine: str, cpuinfo: str | None) -> bool:
    """:func:`u8s8_saturates` for a CPU architecture name and the text of its /proc/cpuinfo."""
    if machine.lower() not in ("x86_64", "amd64", "x86", "i386", "i686"):
        return False
    return cpuinfo is None or re.search(r"\b(avx512_vnni|avx_vnni)\b", cpuinfo) is None


def saturating_layers(qmodel: nn.Module) -> list[str]:
    """The layers of ``qmodel`` whose integer kernel can saturate where :func:`u8s8_saturates`:
    those that quantize their input and store int8 weight codes beyond ±64 with one range per
    row or tensor (group-wise codes run in float ops). Codes within ±64 cannot saturate:
    2 · 255 · 64 = 32,640 fits int16. So 7-bit symmetric weights (codes ±63, what ONNX
    Runtime's own quantizer gets with ``reduce_range``) run exactly in the fast uint8 × int8
    kernels; 8-bit ones (±127) do not.

    Example:
        >>> net = nn.Sequential(nn.Linear(8, 4))
        >>> x = torch.randn(16, 8)
        >>> from squeezer import LayerQuant, QuantConfig, quantize
        >>> saturating_layers(quantize(net, QuantConfig(LayerQuant(8, act_bits=8)), calib=[x]))
        ['0']
        >>> saturating_layers(quantize(net, QuantConfig(LayerQuant(7, act_bits=8)), calib=[x]))
        []
    """
    from ..quant.modules import QuantMixin
    from ..quant.primitives import qrange

    out = []
    for fqn, m in qmodel.named_modules():
        if not isinstance(m, QuantMixin) or m.spec.act_bits is None or m.spec.act_bits > 8:
            continue
        if m.spec.granularity == "group" or m.spec.is_float:
            continue
        lo, hi = qrange(m.spec.bits, m.spec.symmetric)
        if _code_dtype(lo, hi) == np.int8 and max(-lo, hi) > 64:
            out.append(fqn)
    return out


def resolve_weight_codes(weight_codes: str) -> str:
    """``weight_codes`` if it is one of :data:`WEIGHT_CODES`, else a ConfigError. (What
    ``"auto"`` writes depends on the check: :func:`squeezer.export.onnx.weight_code_forms`.)"""
    if weight_codes not in WEIGHT_CODES:
        raise ConfigError(
            f"unknown weight_codes {weight_codes!r}; choose one of {', '.join(WEIGHT_CODES)}"
        )
    return weight_codes


def ort_session(
    model: str | os.PathLike | bytes,
    *,
    threads: int | None = None,
    optimized_path: str | os.PathLike | None = None,
):
    """An ONNX Runtime CPU session with every graph optimization on and ``intra_op_num_threads``
    set explicitly (default: torch's thread count), one inter-op thread. With ``optimized_path``
    ONNX Runtime also writes the graph it runs there (after constant folding and its fusions).

    Example:
        >>> sess = ort_session("model.onnx", threads=2)  # doctest: +SKIP
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads or torch.get_num_threads())
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    src = model if isinstance(model, bytes) else str(model)
    try:
        return ort.InferenceSession(src, sess_options=so, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ExportError(f"ONNX Runtime cannot load the model ({first_line(exc)})") from exc


class OrtModule(nn.Module):
    """An ONNX Runtime session behind a PyTorch module's call, so that squeezer's evaluation code
    (``squeezer.data.evaluate``) measures the exported model exactly as it measures the float
    one. Inputs are a tensor or keyword tensors; the output is the graph's first output.

    Example:
        >>> deployed = OrtModule(ort_session("model.onnx"))  # doctest: +SKIP
        >>> evaluate(deployed, data.test_batches(), data.task)  # doctest: +SKIP
    """

    def __init__(self, session: Any):
        super().__init__()
        self.session = session

    def forward(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
        example = kwargs if kwargs else args[0]
        out = self.session.run(None, ort_feeds(example, self.session))[0]
        return torch.from_numpy(out)


def ort_feeds(example: Any, model: Any) -> dict[str, np.ndarray]:
    """ONNX Runtime feeds for ``example`` (a tensor or a dict of tensors) for a model or session.

    Example:
        >>> ort_feeds(torch.zeros(1, 4), sess)  # doctest: +SKIP
        {'input': array([[0., 0., 0., 0.]], dtype=float32)}
    """
    names = (
        [i.name for i in model.graph.input]
        if hasattr(model, "graph")
        else [i.name for i in model.get_inputs()]
    )

    def arr(t: torch.Tensor) -> np.ndarray:
        t = t.detach().cpu()
        return (t.float() if t.is_floating_point() else t).numpy()

    if isinstance(example, Mapping):
        return {n: arr(example[n]) for n in names}
    return {names[0]: arr(example)}


def latency_table(
    variants: Mapping[str, Any],
    examples: Mapping[int, Any],
    *,
    threads: int,
    warmup: int = 5,
    runs: int = 30,
) -> dict[str, Any]:
    """Latency of each variant at each batch size. After ``warmup`` untimed calls of each, the
    timed calls go round-robin over the variants, so a change in machine load hits all alike.

    Args:
        variants: {name: nn.Module (run by PyTorch) or ONNX Runtime session}.
        examples: {batch size: inputs}.
        threads: PyTorch threads and ONNX Runtime intra-op threads (sessions must have been made
            with the same count; :func:`ort_session` does).
        warmup, runs: untimed and timed calls per variant and batch size.

    Returns:
        ``{"threads": n, "warmup": w, "runs": r, "batch_<b>": {name: Latency dict}}`` (median and
        10th/90th percentiles in milliseconds, :class:`squeezer.measure.Latency`).

    Example:
        >>> latency_table({"fp32": net}, {1: x[:1]}, threads=2)  # doctest: +SKIP
    """
    from ..measure import time_calls

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    out: dict[str, Any] = {"threads": threads, "warmup": warmup, "runs": runs}
    try:
        for b, example in examples.items():
            calls = {}
            for name, v in variants.items():
                if isinstance(v, nn.Module):
                    v.eval()

                    def call(v=v, example=example):
                        with torch.no_grad():
                            forward(v, example)

                else:
                    feeds = ort_feeds(example, v)

                    def call(v=v, feeds=feeds):
                        v.run(None, feeds)

                calls[name] = call
            times = time_calls(calls, warmup=warmup, runs=runs, batch=b)
            out[f"batch_{b}"] = {name: lat.to_dict() for name, lat in times.items()}
    finally:
        torch.set_num_threads(old)
    return out


def _observe_ranges(model, names: list[str], example: Any, threads: int) -> dict[str, _Act]:
    """Calibrated 8-bit asymmetric quantizers (min-max over ``example``) of tensors ``names``."""
    from ..quant.primitives import qparams_from_range

    if not names:
        return {}
    sess = ort_session(model.SerializeToString(), threads=threads)
    values = sess.run(names, ort_feeds(example, sess))
    acts = {}
    for name, v in zip(names, values, strict=True):
        if v.dtype != np.float32 or v.size == 0:
            continue
        qp = qparams_from_range(
            torch.tensor(float(v.min())), torch.tensor(float(v.max())), 8, False
        )
        acts[name] = _Act(float(qp.scale), int(qp.zero_point), 0, 255)
    return acts
