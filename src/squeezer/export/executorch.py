"""ExecuTorch export: a squeezer-quantized model lowered through ``torch.export``, PT2E
quantization and the XNNPACK partitioner to a ``.pte`` program, with squeezer's own scales and
bit-widths (no re-calibration where XNNPACK's patterns let them through), run in the ExecuTorch
runtime and checked against squeezer's simulation as :func:`squeezer.export.export_onnx` does.

How the graph is built:

1. The float twin of the model (:func:`squeezer.export.layers._float_twin`): float layers holding
   squeezer's dequantized weights, so that quantizing them again with squeezer's scales gives
   squeezer's codes back exactly, whatever their bit-width (4-bit codes are int8 values in
   -7..7). A BatchNorm right after a quantized convolution is folded into it, its factor moving
   into the per-channel weight scale (codes unchanged but for sign), as the ONNX export does.
2. ``torch.export`` at batch 1 (the embedded case), then ExecuTorch's ``XNNPACKQuantizer``
   annotates the quantized layers only (per-channel symmetric int8 weights, int8 activations),
   so the Q/DQ pattern is the one XNNPACK's integer kernels take.
3. Every observer the quantizer placed is given squeezer's parameters where squeezer has them:
   each layer's weight scale, and its input quantizer's scale and zero point (squeezer's uint8
   codes shifted by 128 to int8, the same real values). The others, on tensors squeezer keeps in
   float (a layer's output that no squeezer quantizer reads, e.g. the logits), XNNPACK's static
   kernels still need quantized; they keep the range observed on the example
   (:attr:`ExecutorchReport.observed`): one rounding squeezer does not do, hence the looser
   default tolerance of :func:`export_executorch`.
4. ``convert_pt2e``, ``to_edge_transform_and_lower`` with the ``XnnpackPartitioner`` and
   ``to_executorch``; the program is run in ``executorch.runtime`` on the example, one sample at a
   time, and compared with squeezer's outputs before the file is written.

Needs the optional extra ``executorch`` (``pip install 'squeezer[executorch]'``); verified with
executorch 1.5.1 (which pulls torchao 0.18) beside torch 2.13.0.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..atomic import write_bytes_atomic
from ..config import Plan
from ..data import batch_size, forward
from ..errors import ExportError, first_line
from ..graph import copy_model, get_module, set_module
from .common import CheckedExport
from .executorch_embedding import code_embeddings
from .executorch_qparams import (
    _ELEMENTWISE,
    _fix_qparams,
    _floating,
    _int8_chain,
    _integer_constants,
    _module_of,
)
from .executorch_split import split_wide_channels
from .layers import _collect_layers, _float_twin, _Layer
from .onnx import CHECK_FIELDS, _outputs, _verify

#: Name of the latency row of the exported program (and of its FP32 twin).
ROW = "ExecuTorch (squeezer)"
FLOAT_ROW = "ExecuTorch FP32"
_KINDS = ("conv", "linear")


@dataclass(frozen=True)
class ExecutorchReport(CheckedExport):
    """What :func:`export_executorch` wrote and how well the ExecuTorch runtime agrees with
    squeezer: the fields of :class:`~squeezer.export.common.CheckedExport` (the ``.pte``, checked
    sample by sample at batch 1), and

    Attributes:
        float_size_bytes: size of the FP32 model's ``.pte`` lowered the same way (None if not made).
        samples: how many samples were checked (each at batch 1).
        layers: {FQN: how the layer was lowered} ("xnnpack-int8-w4" for 4-bit codes in int8, ...).
        squeezer_qparams: how many quantizers carry squeezer's own scales.
        observed: how many carry a range observed on the example (tensors squeezer keeps in float
            that XNNPACK's static kernels quantize).
        outside_delegate: the program's ops that XNNPACK did not take (ExecuTorch's portable
            kernels run them), e.g. ``aten.mean.dim``; the quantized layers are never among them.
        latency: {"batch_B": {row: Latency.to_dict()}} per batch size, timed through
            ``squeezer.measure.time_calls``.
        threads: XNNPACK threads (and torch's) during the check and timing.
        versions: executorch, torchao and torch versions used.
    """

    float_size_bytes: int | None
    samples: int
    layers: dict[str, str] = field(default_factory=dict)
    squeezer_qparams: int = 0
    observed: int = 0
    outside_delegate: list[str] = field(default_factory=list)
    latency: dict[str, dict] = field(default_factory=dict)
    threads: int = 1
    versions: dict[str, str] = field(default_factory=dict)
    batches: list[int] = field(default_factory=lambda: [1])


def executorch_available() -> bool:
    """True if ExecuTorch (with its XNNPACK backend and runtime) can be imported."""
    try:
        _imports()
    except ExportError:
        return False
    return True


def _imports():
    try:
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
            XNNPACKQuantizer,
            get_symmetric_quantization_config,
        )
        from executorch.exir import to_edge_transform_and_lower
        from executorch.runtime import Runtime
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    except ImportError as exc:
        raise ExportError(
            f"ExecuTorch export needs executorch and torchao ({first_line(exc)}); "
            "pip install 'squeezer[executorch]'"
        ) from None
    return {
        "XnnpackPartitioner": XnnpackPartitioner,
        "XNNPACKQuantizer": XNNPACKQuantizer,
        "config": get_symmetric_quantization_config,
        "lower": to_edge_transform_and_lower,
        "Runtime": Runtime,
        "prepare": prepare_pt2e,
        "convert": convert_pt2e,
    }


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"torch": torch.__version__}
    for name in ("executorch", "torchao"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:  # pragma: no cover
            out[name] = "?"
    return out


# --------------------------------------------------------------------------------------------------
# public entry points


def export_executorch(
    qmodel: nn.Module,
    path: str | os.PathLike,
    example: torch.Tensor,
    *,
    verify: bool = True,
    atol: float | None = None,
    threads: int | None = None,
    samples: int = 32,
    float_model: nn.Module | None = None,
    runs: int = 30,
    warmup: int = 5,
    batches: tuple[int, ...] = (1,),
) -> ExecutorchReport:
    """Lower a fake-quantized model to an ExecuTorch ``.pte`` (XNNPACK, int8 kernels) with
    squeezer's scales, run it in the ExecuTorch runtime, check and time it.

    Args:
        qmodel: a model from :func:`squeezer.quantize`. Its Conv/Linear layers with per-channel or
            per-tensor symmetric weights of at most 8 bits and 8-bit input quantizers run on
            XNNPACK's int8 kernels (codes of fewer bits are stored as int8); weight-only layers
            run in FP32 with the dequantized weights.
        path: the ``.pte`` file to write (atomically; nothing is written if the check fails).
        example: an input tensor (a batch of samples). Its first sample fixes the program's input
            shape (batch 1); its first ``samples`` samples are the check, and its samples also
            calibrate the few quantizers squeezer has no scale for.
        verify: run the program and compare with ``qmodel`` sample by sample.
        atol: max |ExecuTorch − squeezer| allowed. By default, as in ``export_onnx``: the
            typical sample within max(1 output step, 10% of max |squeezer − FP32|), or, when some
            quantizer has an observed range (one rounding squeezer does not do, as with
            ``requantize``), max(2 steps, 100%); and no sample farther than twice that or twice
            the quantization's own effect.
        threads: threads of XNNPACK's process-wide threadpool (default: torch's thread count).
        samples: how many samples to check.
        float_model: the FP32 model; if given, it is lowered too, for the size and latency rows.
        runs, warmup: timed and untimed calls of ``squeezer.measure.time_calls`` (runs=0: no
            timing).
        batches: batch sizes to build programs for (the program's input shape is fixed): batch
            1 is ``path``, each other one is written beside it (:func:`batch_path`), checked on
            one batch and timed with the others.

    Returns:
        An :class:`ExecutorchReport`.

    Raises:
        ExportError: executorch is missing, a layer cannot be lowered with squeezer's parameters,
            or the runtime disagrees beyond ``atol``.
    """
    et = _imports()
    if not isinstance(example, torch.Tensor | Mapping):
        raise ExportError(
            f"ExecuTorch export takes a tensor or a dict of tensors, not {type(example).__name__}"
        )
    batches = tuple(dict.fromkeys((1, *(int(b) for b in batches))))
    threads = threads or torch.get_num_threads()
    _set_threads(threads)
    qmodel = copy_model(qmodel).eval()
    layers = _collect_layers(qmodel)
    status = {fqn: _lowering(layer) for fqn, layer in layers.items()}
    scales = {fqn: layer.scale[:, 0].astype(np.float64) for fqn, layer in layers.items()}
    twin = _float_twin(qmodel, layers)
    coded = code_embeddings(twin, layers)  # tables as int8 codes, not FP32
    status.update(coded)
    with torch.no_grad():
        _fold_batchnorm(twin, _rows(example, 0, 1), status, scales)
    int8 = {fqn for fqn, s in status.items() if s.startswith("xnnpack-int8")}
    # Global config, filtered: a per-module config would split XNNPACK's fused patterns
    # (conv + relu: the relu is another module), and the float layers must stay float.
    float_layers = {
        fqn
        for fqn, m in twin.named_modules()
        if isinstance(m, nn.Linear | nn.modules.conv._ConvNd) and fqn not in int8
    } | set(coded)
    # Linears whose int8 output only XNNPACK rounds: their wide channels stay in float
    lay, st, sc = dict(layers), dict(status), dict(scales)
    observed = _observed_linears(et, twin, example, lay, st, sc, float_layers)
    for fqn, n_wide in split_wide_channels(twin, observed, layers, _rows(example, 0, 64)).items():
        lay[f"{fqn}.q"], st[f"{fqn}.q"], sc[f"{fqn}.q"] = layers[fqn], status[fqn], scales[fqn]
        int8.add(f"{fqn}.q")
        float_layers |= {fqn, f"{fqn}.f", f"{fqn}.place"}
        status[fqn] += f" ({n_wide} wide output channels in float)"
    programs = {
        b: _program(et, twin, example, b, lay, st, sc, int8, float_layers) for b in batches
    }
    data, n_fixed, n_observed, outside = programs[1]

    runtime = et["Runtime"].get()
    # The runtime reads a program's bytes in place: they (and the program) must outlive its
    # method, or a call reads freed memory.
    keep: list = []
    methods = {b: _method(runtime, p[0], keep) for b, p in programs.items()}
    checks = dict.fromkeys(CHECK_FIELDS)
    n = min(samples, batch_size(example))
    if verify:
        with torch.no_grad():
            ref = _outputs(forward(qmodel, _rows(example, 0, n)))
            fp32 = _outputs(forward(_float_twin(qmodel, layers, dequantized=False),
                                    _rows(example, 0, n)))  # fmt: skip
        runs_out = [methods[1].execute(_flat(_rows(example, i, i + 1))) for i in range(n)]
        got = [
            torch.cat([r[k] for r in runs_out]).detach().float().numpy() for k in range(len(ref))
        ]
        checks = _verify("the ExecuTorch runtime", ref, got, fp32, atol, loose=n_observed > 0,
                         max_slack=2.0)  # fmt: skip
        for b in batches[1:]:  # each larger program against squeezer on one batch of its size
            with torch.no_grad():
                ref_b = _outputs(forward(qmodel, _rows(example, 0, b)))
                fp_b = _outputs(forward(_float_twin(qmodel, layers, dequantized=False),
                                        _rows(example, 0, b)))  # fmt: skip
            got_b = [
                o.detach().float().numpy() for o in methods[b].execute(_flat(_rows(example, 0, b)))
            ]
            _verify(f"the ExecuTorch runtime at batch {b}", ref_b, got_b, fp_b, atol,
                    loose=n_observed > 0, max_slack=2.0)  # fmt: skip
    write_bytes_atomic(path, data)
    for b in batches[1:]:
        write_bytes_atomic(batch_path(path, b), programs[b][0])

    float_size = None
    feeds = {b: _flat(_rows(example, 0, b)) for b in batches}  # made once, outside the timing
    calls = {b: {ROW: (lambda m=m, x=feeds[b]: m.execute(x))} for b, m in methods.items()}
    if float_model is not None:
        for b in batches:
            xb = _rows(example, 0, b)
            args, kwargs = _call(xb)
            fmodule = torch.export.export(copy_model(float_model).eval(), args, kwargs).module()
            fdata, _ = _lower(et, fmodule, xb)
            float_size = len(fdata) if b == 1 else float_size
            fmethod = _method(runtime, fdata, keep)
            calls[b][FLOAT_ROW] = lambda m=fmethod, x=feeds[b]: m.execute(x)
    latency = {}
    if runs > 0:
        from ..measure import time_calls

        for b in batches:
            t = time_calls(calls[b], warmup=warmup, runs=runs)
            latency[f"batch_{b}"] = {k: {**v.to_dict(), "batch": b} for k, v in t.items()}

    from ..measure import model_bytes

    plan = Plan({fqn: layer.spec for fqn, layer in layers.items()})
    return ExecutorchReport(
        path=str(path),
        size_bytes=len(data),
        theoretical_bytes=model_bytes(_float_twin(qmodel, layers), plan),
        float_size_bytes=float_size,
        **checks,
        samples=n if verify else 0,
        layers=status,
        squeezer_qparams=n_fixed,
        observed=n_observed,
        outside_delegate=outside,
        latency=latency,
        threads=threads,
        versions=_versions(),
        batches=list(batches),
    )


def _method(runtime, data: bytes, keep: list):
    """The program's ``forward``, with the bytes and the program kept alive in ``keep``."""
    program = runtime.load_program(data)
    keep += [data, program]
    return program.load_method("forward")


def batch_path(path: str | os.PathLike, batch: int) -> Path:
    """Where the program for ``batch`` samples sits beside the batch-1 ``path``
    (``model.pte`` → ``model.b32.pte``); batch 1 is ``path`` itself."""
    p = Path(path)
    return p if batch == 1 else p.with_name(f"{p.stem}.b{batch}{p.suffix}")


class PteModule(nn.Module):
    """The ``.pte`` programs of one export (``model.pte`` at batch 1 and each ``model.bB.pte``
    beside it) as a module: a call runs the program made for its batch size in the ExecuTorch
    runtime. What ``squeezer bench`` times.

    Example:
        >>> m = PteModule.load("RUN/model.pte")        # doctest: +SKIP
        >>> m.batches, m(x[:1]).shape                  # doctest: +SKIP
    """

    def __init__(self, methods: Mapping[int, object], keep: list) -> None:
        super().__init__()
        self._methods, self._keep = dict(methods), keep

    @property
    def batches(self) -> list[int]:
        return sorted(self._methods)

    @classmethod
    def load(cls, path: str | os.PathLike) -> PteModule:
        runtime, keep = _imports()["Runtime"].get(), []
        p = Path(path)
        found = {1: p} | {
            int(q.suffixes[-2][2:]): q
            for q in p.parent.glob(f"{p.stem}.b*{p.suffix}")
            if q.suffixes[-2][2:].isdigit()
        }
        return cls({b: _method(runtime, q.read_bytes(), keep) for b, q in found.items()}, keep)

    def forward(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
        xs = [*args, *kwargs.values()]
        b = int(xs[0].shape[0])
        if b not in self._methods:
            raise ExportError(f"no ExecuTorch program for batch {b} (made for {self.batches})")
        out = self._methods[b].execute([x.contiguous() for x in xs])
        return out[0] if len(out) == 1 else tuple(out)


def _rows(example: torch.Tensor | Mapping, i: int, j: int) -> torch.Tensor | dict:
    """Samples ``i:j`` of a tensor or of each tensor of a dict, repeated to ``j - i`` rows if
    there are fewer."""
    n = batch_size(example)
    idx = torch.arange(i, j) % n
    if isinstance(example, Mapping):
        return {k: v[idx].contiguous() for k, v in example.items()}
    return example[idx].contiguous()


def _call(x: torch.Tensor | Mapping) -> tuple[tuple, dict]:
    """``(args, kwargs)`` for ``torch.export`` and the prepared module: a tensor is the one
    positional input, a dict's entries are keyword inputs (``input_ids``, ``attention_mask``)."""
    return ((), dict(x)) if isinstance(x, Mapping) else ((x,), {})


def _flat(x: torch.Tensor | Mapping) -> list[torch.Tensor]:
    """The program's inputs in order (a dict's entries in their order, as ``torch.export``
    flattens keyword inputs)."""
    return list(x.values()) if isinstance(x, Mapping) else [x]


def _quantizer(et, float_layers):
    """XNNPACK's quantizer on the lowered layers only (``float_layers``: modules whose ops stay
    float), integer arithmetic kept integer."""
    quantizer = et["XNNPACKQuantizer"]()
    quantizer.set_global(et["config"](is_per_channel=True)).set_filter_function(
        lambda node: (
            _module_of(node) not in float_layers
            and _floating(node)
            and (node.target not in _ELEMENTWISE or _int8_chain(node))
        )
    )
    transform = quantizer.transform_for_annotation
    quantizer.transform_for_annotation = lambda gm: _integer_constants(transform(gm))
    return quantizer


def _observed_linears(et, twin, example, layers, status, scales, float_layers) -> set[str]:
    """The lowered layers whose output XNNPACK quantizes and no squeezer quantizer reads (from
    the annotation alone, without calibration)."""
    try:
        gm = torch.export.export(twin, *_call(_rows(example, 0, 1))).module()
        prepared = et["prepare"](gm, _quantizer(et, float_layers))
    except Exception as exc:  # the torch.export / PT2E stack raises many kinds
        raise ExportError(f"ExecuTorch lowering failed ({first_line(exc)})") from exc
    return _fix_qparams(prepared, layers, status, scales)[2]


def _program(et, twin, example, b, layers, status, scales, int8, float_layers):
    """The lowered program for batches of ``b``: ``(bytes, squeezer's quantizers, observed
    quantizers, ops outside the delegate)``."""
    xb = _rows(example, 0, b)
    args, kwargs = _call(xb)
    quantizer = _quantizer(et, float_layers)
    try:
        gm = torch.export.export(twin, args, kwargs).module()
        prepared = et["prepare"](gm, quantizer)
        with torch.no_grad():
            for i in range(0, min(batch_size(example), 64), b):
                a, k = _call(_rows(example, i, i + b))
                prepared(*a, **k)
        n_fixed, n_observed, _ = _fix_qparams(prepared, layers, status, scales)
        converted = et["convert"](prepared)
        data, outside = _lower(et, converted, xb)
        left = [op for op in outside if any(k in op for k in ("convolution", "linear", "mm"))]
        if int8 and left:
            raise ExportError(
                f"XNNPACK did not take {left} (they would run in ExecuTorch's portable kernels, "
                "not as integer kernels); keep those layers' activations in float"
            )
    except ExportError:
        raise
    except Exception as exc:  # the torch.export / PT2E / lowering stack raises many kinds
        raise ExportError(f"ExecuTorch lowering failed at batch {b} ({first_line(exc)})") from exc
    return data, n_fixed, n_observed, outside


# --------------------------------------------------------------------------------------------------
# steps


def _set_threads(threads: int) -> None:
    try:
        from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

        _unsafe_reset_threadpool(int(threads))
    except (ImportError, RuntimeError):  # pragma: no cover - older builds: keep the default
        pass


def _lowering(layer: _Layer) -> str:
    """How a layer can be lowered: ``xnnpack-int8-w{bits}``, or why it runs in float."""
    if layer.kind not in _KINDS:
        if layer.act is not None:
            raise ExportError(
                f"layer {layer.fqn!r} ({layer.kind}) quantizes its input, which the ExecuTorch "
                "export supports only for Conv and Linear layers"
            )
        return f"float ({layer.kind}: fp32 dequantized weights)"
    if layer.act is None:
        return "float (weight-only: fp32 dequantized weights)"
    reasons = []
    if layer.scale.shape[1] != 1:
        reasons.append("group-wise weight scales (XNNPACK's static int8 kernels take per-channel)")
    if np.any(layer.zero_point != 0) or layer.qmin < -128 or layer.qmax > 127:
        reasons.append("asymmetric weights (XNNPACK takes symmetric int8 weights)")
    if layer.act.qmax - layer.act.qmin != 255:
        reasons.append(f"{layer.spec.act_bits}-bit activations (XNNPACK's kernels take 8)")
    if reasons:
        raise ExportError(
            f"layer {layer.fqn!r} cannot run on XNNPACK with squeezer's parameters: "
            + "; ".join(reasons)
            + " (use --format onnx, or a plan without them)"
        )
    return f"xnnpack-int8-w{layer.spec.bits}"


def _fold_batchnorm(
    twin: nn.Module, x1, status: dict[str, str], scales: dict[str, np.ndarray]
) -> None:
    """Fold each BatchNorm that alone reads a quantized Conv's output into that Conv: weight and
    per-channel scale times γ/σ, bias (b − μ)·γ/σ + β; the BatchNorm becomes an Identity."""
    graph = torch.export.export(twin, *_call(x1)).graph
    for node in graph.nodes:
        if node.op != "call_function" or "batch_norm" not in str(node.target):
            continue
        src = node.args[0]
        if not hasattr(src, "op") or len(src.users) != 1 or "conv" not in str(src.target):
            continue
        conv_fqn, bn_fqn = _module_of(src), _module_of(node)
        if conv_fqn not in status or not status[conv_fqn].startswith("xnnpack"):
            continue
        conv, bn = get_module(twin, conv_fqn), get_module(twin, bn_fqn)
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or not bn.track_running_stats:
            continue
        f = (bn.weight if bn.affine else 1) / torch.sqrt(bn.running_var + bn.eps)
        f = f.detach().double()
        shape = (-1,) + (1,) * (conv.weight.dim() - 1)
        w = (conv.weight.detach().double() * f.reshape(shape)).float()
        b = conv.bias.detach().double() if conv.bias is not None else torch.zeros_like(f)
        b = (b - bn.running_mean.double()) * f
        if bn.affine:
            b = b + bn.bias.detach().double()
        conv.weight = nn.Parameter(w, requires_grad=False)
        conv.bias = nn.Parameter(b.float(), requires_grad=False)
        scales[conv_fqn] = scales[conv_fqn] * np.abs(f.numpy())
        set_module(twin, bn_fqn, nn.Identity())
        status[conv_fqn] += f" (BatchNorm {bn_fqn} folded)"


def _lower(et, module: nn.Module, x) -> tuple[bytes, list[str]]:
    """The program's bytes, and the ops left outside the XNNPACK delegate (run by ExecuTorch's
    portable kernels), by name."""
    args, kwargs = _call(x)
    ep = torch.export.export(module, args, kwargs)
    edge = et["lower"](ep, partitioner=[et["XnnpackPartitioner"]()])
    outside = sorted(
        {
            str(getattr(n.target, "__name__", n.target))
            for n in edge.exported_program().graph_module.graph.nodes
            if n.op == "call_function"
            and "executorch_call_delegate" not in str(n.target)
            and "getitem" not in str(n.target)
        }
    )
    return bytes(edge.to_executorch().buffer), outside


__all__ = [
    "FLOAT_ROW",
    "ROW",
    "batch_path",
    "ExecutorchReport",
    "PteModule",
    "executorch_available",
    "export_executorch",
]
