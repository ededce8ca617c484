"""ONNX export of squeezer's fake-quantized models as QDQ int8 graphs that ONNX Runtime runs with
integer kernels, checked against squeezer's own outputs before the file is written.

The graph is the operator form of uniform affine quantization (Jacob et al., "Quantization and
Training of Neural Networks for Efficient Integer-Arithmetic-Only Inference", arXiv:1712.05877), the
deployment step of HAWQ-V3 (Yao et al., arXiv:2011.10680): QuantizeLinear/DequantizeLinear on every
activation a layer quantizes and DequantizeLinear on its integer weight codes, so that ONNX Runtime's
graph optimizer fuses each group into QLinearConv, QGemm or MatMulIntegerToFloat. Weight-only Linear
layers go to ONNX Runtime's block-quantized ``MatMulNBits`` (com.microsoft).

How the graph is built:

1. The Quant* layers are swapped for float layers holding the dequantized weights, so the float graph
   computes squeezer's numbers, and torch.onnx's TorchScript exporter writes it (BatchNorm kept).
2. Conv/Gemm/MatMul/Gather nodes are matched back to layers by the exact values of their weight
   initializers, which survives the exporter's renaming, transposing and de-duplication.
3. Each matched weight becomes integer codes plus a DequantizeLinear, per tensor or per output channel
   (axis 0 of the layer's weight); group-wise codes are dequantized by Cast/Sub/Mul on initializers,
   which ONNX Runtime folds at load. A Conv followed by BatchNorm is folded: the codes stay, the
   per-channel scale absorbs |γ/σ| (codes mirrored where γ/σ < 0) and the bias absorbs the shift.
   Biases of layers whose inputs are 8-bit quantized are int32 at scale s_x·s_w, as QLinearConv and
   QGemm take them; with narrower activations the bias is a separate float Add (ONNX Runtime would
   otherwise round it to int32 itself, which at 4 bits moves outputs visibly).
4. Quantization commutes with ReLU, MaxPool and reshapes (it is monotone and maps 0 to 0), so a
   tensor all of whose readers quantize it with the same parameters is quantized where it is produced
   as well. That places a QuantizeLinear right after the producing Conv/Gemm, which ONNX Runtime needs
   to fuse an integer op, without changing a single value.
5. Optionally (``requantize=True``) the tensors squeezer keeps in float between int8-capable ops
   (residual sums, pooled maps) are quantized to 8 bits with ranges observed on the example, so that
   every Conv and residual Add runs in int8, as ONNX Runtime's own static quantization does.

Mapping to ``MatMulNBits`` (codes in blocks along K, ``(code − zero point) × scale``): squeezer's
symmetric b-bit codes q are stored as q + 2^(B−1) (B = 4 up to 4 bits, else 8) with the default zero
point 2^(B−1); asymmetric codes and their zero points are stored as they are. Groups of
g ∈ {16, …, 256} entries along a row map to blocks of g; per-channel and per-tensor scales are
repeated over the row's blocks. Other layers keep their codes in int8 QDQ (sub-8-bit codes still
take a byte each there).
"""

from __future__ import annotations

import hashlib
import inspect
import io
import math
import os
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from .config import LayerQuant, Plan, write_bytes_atomic
from .data import forward
from .errors import ExportError, UnsupportedModelError
from .graph import copy_model, set_module
from .quant.modules import QUANT_MODULES, QuantMixin
from .quant.primitives import qrange

#: Opset of the exported graph.
OPSET = 17
MS_DOMAIN = "com.microsoft"
#: Ops through which fake quantization commutes: monotone, selecting or reshaping, and 0 → 0.
COMMUTING_OPS = frozenset(
    {"Relu", "MaxPool", "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Identity"}
)
#: Default tolerance of the typical sample: max(steps × one 8-bit step of squeezer's output range,
#: share × max |squeezer − FP32|), as (steps, share), keyed by whether the export rounds more than
#: squeezer does (``requantize``, or an ``accuracy_level`` below fp32): its extra rounding may
#: add as much as the quantization itself did.
#: Measured: 0.3–0.9 step at worst on the digits nets; on MiniLM at W8A8 most sentences match
#: exactly and a few move by up to 15 steps after one flipped code (see :func:`export_onnx`).
ATOL = {False: (1.0, 0.1), True: (2.0, 1.0)}
#: Block sizes MatMulNBits accepts.
NBITS_BLOCKS = (16, 32, 64, 128, 256)


@dataclass(frozen=True)
class ExportReport:
    """What :func:`export_onnx` wrote and how well ONNX Runtime agrees with squeezer.

    Attributes:
        path: the written file.
        size_bytes: its size.
        theoretical_bytes: Σ params × bits / 8 at the plan's widths plus scales, zero points and the
            parts kept in float (``squeezer.measure.model_bytes``).
        stored_bytes: the same sum with the widths actually stored (8 for QDQ codes, 4 for
            MatMulNBits), the floor this format can reach.
        max_abs_error: max |ONNX Runtime − squeezer| over the example's outputs.
        median_sample_error: the median over samples of each sample's max |Δ|.
        atol: the tolerance it was checked against (see :func:`export_onnx`).
        output_step: one 8-bit step of the outputs' range, (max − min) / 255.
        quant_error: max |squeezer − FP32| over the example: the quantization's own effect.
        argmax_agreement: share of rows whose argmax agrees (2-D outputs), else None.
        layers: {FQN: how the layer was exported} ("qdq-int8", "matmulnbits-4", "float", ...).
        opset: the default-domain opset of the graph.
        threads: ONNX Runtime's intra-op threads during the check.
    """

    path: str
    size_bytes: int
    theoretical_bytes: float
    stored_bytes: float
    max_abs_error: float | None
    median_sample_error: float | None
    atol: float | None
    output_step: float | None
    quant_error: float | None
    argmax_agreement: float | None
    layers: dict[str, str] = field(default_factory=dict)
    opset: int = OPSET
    threads: int = 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------------------
# public entry points


def export_onnx(
    qmodel: nn.Module,
    path: str | os.PathLike,
    example: Any,
    *,
    verify: bool = True,
    atol: float | None = None,
    requantize: bool = False,
    accuracy_level: int | None = None,
    threads: int | None = None,
) -> ExportReport:
    """Export a fake-quantized model to a QDQ int8 ONNX file, verified in ONNX Runtime.

    Args:
        qmodel: a model from :func:`squeezer.quantize` (Quant* layers); float layers stay float.
        path: the ``.onnx`` file to write (atomically; nothing is written if the check fails).
        example: inputs (a tensor, or a dict of tensors for text models) used to trace the graph
            and to check it; a few dozen real samples make a meaningful check.
        verify: run the file in ONNX Runtime and compare with ``qmodel(example)``.
        atol: max |ONNX Runtime − squeezer| allowed over all outputs. By default the check is in
            two parts. The typical sample (median over samples of each one's max |Δ|) must be
            within the larger of one 8-bit step of the outputs' range ((max − min) / 255 over
            ``example``'s outputs) and 10% of the quantization's own effect, max |squeezer −
            FP32| (2 steps and 100% with ``requantize`` or ``accuracy_level`` > 1); and no sample
            may be farther from squeezer than that, or than twice as far as squeezer is from
            FP32 (two equally quantized models, each that far from FP32). Float reassociation
            (and the int32 bias) can move a value across a rounding boundary of an activation
            quantizer; the flipped code can cascade through a deep net (in squeezer's own W8A8
            MiniLM, noise of 1e-6 relative after the embeddings moves 4 of 16 embeddings by up
            to 10 output steps), but it cannot move every sample, as a wrong scale or a missing
            quantizer does.
        requantize: also quantize, to 8 bits per tensor with min-max ranges observed on
            ``example``, the tensors squeezer keeps in float between integer-capable ops
            (residual sums, pooled maps), so that ONNX Runtime runs every Conv as QLinearConv and
            every residual Add as QLinearAdd. Faster; one more rounding per such tensor.
        accuracy_level: ``accuracy_level`` of the MatMulNBits nodes of weight-only layers. Unset
            (default), their inputs stay float, as squeezer computes them; 4 lets ONNX Runtime
            quantize those inputs to int8 on the fly (faster, not what squeezer simulates).
        threads: ONNX Runtime intra-op threads for the check (default: torch's thread count).

    Returns:
        An :class:`ExportReport`.

    Raises:
        ExportError: the graph cannot be exported, or ONNX Runtime disagrees beyond ``atol``.

    Example:
        >>> from squeezer import LayerQuant, QuantConfig, quantize
        >>> net = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> x = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
        >>> q = quantize(net, QuantConfig(LayerQuant(bits=8, act_bits=8)), calib=[x])
        >>> export_onnx(q, "net.onnx", x).layers  # doctest: +SKIP
        {'0': 'qdq-int8', '2': 'qdq-int8'}
    """
    _require_onnx()
    import onnx

    threads = threads or torch.get_num_threads()
    qmodel = copy_model(qmodel).eval()
    layers = _collect_layers(qmodel)
    fmodel = _float_twin(qmodel, layers)
    proto = _torch_export(fmodel, example)
    rewriter = _Rewriter(proto, layers, accuracy_level=accuracy_level)
    proto = rewriter.run(requantize=requantize, example=example, threads=threads)
    lost = [
        f for f, layer in layers.items() if layer.act is not None and "not found" in layer.status
    ]
    if lost:
        raise ExportError(
            f"layers {lost[:3]} quantize their inputs but the exported graph has no node with their "
            "weights (the exporter fused them); keep their activations in float (act_bits=None)"
        )
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as exc:  # pragma: no cover - a bug in the rewriter
        raise ExportError(f"the rewritten ONNX graph is invalid ({_first_line(exc)})") from exc
    data = proto.SerializeToString()

    max_err = median_err = step = agree = tol = quant_err = None
    if verify:
        with torch.no_grad():
            ref = _outputs(forward(qmodel, example))
            fp32 = _outputs(forward(_float_twin(qmodel, layers, dequantized=False), example))
        got = ort_session(data, threads=threads).run(None, ort_feeds(example, proto))
        rows, step, agree = _compare(ref, got)
        max_err, median_err = float(rows.max()), float(np.median(rows))
        quant_err = max(float((r - f).abs().max()) for r, f in zip(ref, fp32, strict=True))
        if atol is None:
            steps, share = ATOL[requantize or (accuracy_level or 0) > 1]
            tol = max(steps * step, share * quant_err)
            ok = median_err <= tol and max_err <= max(tol, 2 * quant_err)
        else:
            tol = float(atol)
            ok = max_err <= tol
        if not ok:
            raise ExportError(
                f"ONNX Runtime disagrees with squeezer: max |Δ| = {max_err:.3g}, median over "
                f"samples {median_err:.3g}, tolerance {tol:.3g} (one output step = {step:.3g}, "
                f"max |squeezer − FP32| = {quant_err:.3g}); pass atol=... if that is expected, or "
                "verify=False to write the file and inspect it"
            )
    write_bytes_atomic(path, data)
    plan = Plan({fqn: layer.spec for fqn, layer in layers.items()})
    return ExportReport(
        path=str(path),
        size_bytes=len(data),
        theoretical_bytes=_plan_bytes(fmodel, plan),
        stored_bytes=_stored_bytes(fmodel, layers),
        max_abs_error=max_err,
        median_sample_error=median_err,
        atol=tol,
        output_step=step,
        quant_error=quant_err,
        argmax_agreement=agree,
        layers={fqn: layer.status for fqn, layer in layers.items()},
        opset=rewriter.opset,
        threads=threads,
    )


def export_float_onnx(model: nn.Module, example: Any) -> bytes:
    """The float model as ONNX bytes (the ORT FP32 baseline), with the same exporter settings.

    Example:
        >>> onnx_bytes = export_float_onnx(nn.Linear(4, 2), torch.zeros(1, 4))  # doctest: +SKIP
    """
    _require_onnx()
    return _torch_export(
        copy_model(model).eval(), example, keep_batchnorm=False
    ).SerializeToString()


def ort_session(model: str | os.PathLike | bytes, *, threads: int | None = None):
    """An ONNX Runtime CPU session with every graph optimization on and ``intra_op_num_threads``
    set explicitly (default: torch's thread count), one inter-op thread.

    Example:
        >>> sess = ort_session("model.onnx", threads=2)  # doctest: +SKIP
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads or torch.get_num_threads())
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    src = model if isinstance(model, bytes) else str(model)
    try:
        return ort.InferenceSession(src, sess_options=so, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ExportError(f"ONNX Runtime cannot load the model ({_first_line(exc)})") from exc


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
    import statistics
    import time

    from .measure import Latency

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
                for _ in range(warmup):
                    call()
            times: dict[str, list[float]] = {name: [] for name in calls}
            for _ in range(runs):
                for name, call in calls.items():
                    t0 = time.perf_counter()
                    call()
                    times[name].append((time.perf_counter() - t0) * 1e3)
            row = {}
            for name, ts in times.items():
                q = statistics.quantiles(ts, n=10) if len(ts) >= 2 else [ts[0]] * 9
                lat = Latency(statistics.median(ts), q[0], q[-1], runs, warmup, b)
                row[name] = lat.to_dict()
            out[f"batch_{b}"] = row
    finally:
        torch.set_num_threads(old)
    return out


def report_section(metrics: Mapping[str, Any] | None) -> tuple[str, str] | None:
    """The report's "Deployment" section from ``metrics.json``'s ``export`` and ``latency`` keys,
    as (markdown, html); None when neither was measured."""
    from .report import fmt_bytes, table

    m = metrics or {}
    ex, lat = m.get("export"), m.get("latency")
    if not ex and not lat:
        return None
    md, body = "", ""
    if ex:
        kinds: dict[str, int] = {}
        for how in (ex.get("layers") or {}).values():
            kinds[how] = kinds.get(how, 0) + 1
        theo = ex.get("theoretical_bytes")
        rows = [
            ["file", ex.get("path")],
            ["size", fmt_bytes(ex.get("size_bytes"))],
            ["theoretical (Σ params × bits / 8 + float parts)", fmt_bytes(theo)],
            ["size / theoretical", f"{ex['size_bytes'] / theo:.3f}" if theo else "–"],
            ["max abs. difference, ONNX Runtime vs squeezer", ex.get("max_abs_error")],
            ["the same, median over samples", ex.get("median_sample_error")],
            ["tolerance", ex.get("atol")],
            ["one 8-bit output step", ex.get("output_step")],
            [
                "max abs. difference, squeezer vs FP32 (the quantization itself)",
                ex.get("quant_error"),
            ],
            ["argmax agreement", ex.get("argmax_agreement")],
            ["layers", ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))],
        ]
        md, body = table(["ONNX export", ""], rows)
    if lat:
        batches = sorted(int(k.split("_")[1]) for k in lat if k.startswith("batch_"))
        names = list(lat[f"batch_{batches[0]}"]) if batches else []
        rows = []
        for name in names:
            row: list[Any] = [name]
            for b in batches:
                t = lat[f"batch_{b}"][name]
                base = lat[f"batch_{b}"][names[0]]["median_ms"]
                row += [
                    f"{t['median_ms']:.2f} ({t['p10_ms']:.2f}–{t['p90_ms']:.2f})",
                    f"{base / t['median_ms']:.2f}×",
                ]
            rows.append(row)
        headers = ["variant"]
        for b in batches:
            headers += [f"batch {b}: median ms (p10–p90)", f"speed-up vs {names[0]}"]
        tmd, tbody = table(headers, rows)
        note = (
            f"{lat.get('runs')} timed runs after {lat.get('warmup')} warm-up runs; PyTorch and "
            f"ONNX Runtime (intra_op_num_threads) both on {lat.get('threads')} threads."
        )
        md += f"\n{tmd}\n{note}\n"
        body += f"{tbody}<p>{note}</p>"
    return md, body


# --------------------------------------------------------------------------------------------------
# layers of the fake-quantized model


@dataclass(frozen=True)
class _Act:
    """An activation quantizer: scale, zero point and code range."""

    scale: float
    zero_point: int
    qmin: int
    qmax: int


@dataclass
class _Layer:
    """One Quant* layer's integer form, rows = output channels (embedding rows)."""

    fqn: str
    kind: str  # "conv", "linear", "embedding"
    spec: LayerQuant
    shape: tuple[int, ...]
    weight: np.ndarray  # the dequantized weight (what the float twin holds), float32
    codes: np.ndarray  # (rows, K) int64
    scale: np.ndarray  # (rows, G) float32
    zero_point: np.ndarray  # (rows, G) int64
    qmin: int
    qmax: int
    act: _Act | None
    status: str = "float (not found in the exported graph)"
    block: int = 0  # MatMulNBits block size, once written

    @property
    def per_tensor(self) -> bool:
        return self.spec.granularity == "tensor"


@torch.no_grad()
def _collect_layers(qmodel: nn.Module) -> dict[str, _Layer]:
    layers = {}
    for fqn, m in qmodel.named_modules():
        if not isinstance(m, QuantMixin):
            continue
        w = m.weight.detach().float()
        wq = m.weight_quantizer
        qp = wq.qparams()
        rows = w.shape[0]
        codes = wq.codes(w).to(torch.int64).reshape(rows, -1)
        scale = qp.scale.float().reshape(qp.scale.shape[0], -1).expand(rows, -1)
        zp = torch.round(qp.zero_point).to(torch.int64).reshape(qp.scale.shape[0], -1)
        zp = zp.expand(rows, -1)
        act = None
        aq = m.input_quantizer
        if aq is not None:
            if not bool(aq.calibrated):
                raise ExportError(
                    f"layer {fqn!r} has an uncalibrated activation quantizer; quantize with "
                    "calib=... before exporting"
                )
            lo, hi = qrange(aq.bits, aq.symmetric)
            act = _Act(float(aq.scale.float()), int(round(float(aq.zero_point))), lo, hi)
        kind = (
            "embedding"
            if isinstance(m, nn.Embedding)
            else ("linear" if isinstance(m, nn.Linear) else "conv")
        )
        layers[fqn] = _Layer(
            fqn=fqn,
            kind=kind,
            spec=m.spec,
            shape=tuple(w.shape),
            weight=wq(w).float().numpy().copy(),
            codes=codes.numpy().copy(),
            scale=scale.numpy().astype(np.float32).copy(),
            zero_point=zp.numpy().copy(),
            qmin=qp.qmin,
            qmax=qp.qmax,
            act=act,
        )
    if not layers:
        raise ExportError(
            "the model has no quantized layers; quantize it first (squeezer.quantize) or export "
            "the float model with export_float_onnx"
        )
    return layers


def _float_twin(
    qmodel: nn.Module, layers: Mapping[str, _Layer], *, dequantized: bool = True
) -> nn.Module:
    """A copy of ``qmodel`` whose Quant* layers are plain float layers holding the dequantized
    weights (or, with ``dequantized=False``, the float weights: the FP32 model)."""
    twin = copy_model(qmodel)
    float_type = {q: f for f, q in QUANT_MODULES.items()}
    for fqn, m in list(twin.named_modules()):
        if not isinstance(m, QuantMixin):
            continue
        base = float_type[type(m)]
        f = base.__new__(base)
        f.__dict__.update(m.__dict__)
        f.__dict__.pop("spec", None)
        f._modules = {
            k: v for k, v in m._modules.items() if k not in ("weight_quantizer", "input_quantizer")
        }
        f._parameters = dict(m._parameters)
        if dequantized:
            f._parameters["weight"] = nn.Parameter(
                torch.from_numpy(layers[fqn].weight.copy()), requires_grad=False
            )
        set_module(twin, fqn, f)
    return twin.eval()


# --------------------------------------------------------------------------------------------------
# the float graph


def _head(example: Any, n: int = 2) -> Any:
    """The first ``n`` samples of a tensor or a dict of tensors (tracing needs no more)."""
    if isinstance(example, Mapping):
        return {k: v[:n] for k, v in example.items()}
    return example[:n]


def _torch_export(model: nn.Module, example: Any, *, keep_batchnorm: bool = True):
    """The model as an ONNX ModelProto from the TorchScript exporter, batch (and sequence) dynamic.

    With ``keep_batchnorm`` BatchNorm stays a node (``TrainingMode.PRESERVE`` on an eval model), so
    weight initializers keep their values and the rewriter folds BatchNorm into the integer
    weights' scales itself; otherwise the exporter folds it into the float weights.
    """
    import onnx

    example = _head(example)
    if isinstance(example, Mapping):
        params = list(inspect.signature(model.forward).parameters)
        names = [p for p in params if p in example]
        unknown = [k for k in example if k not in names]
        if unknown:
            raise ExportError(f"the model's forward takes no inputs named {unknown}")
        args: tuple = ()
        kwargs = {n: example[n] for n in names}
        dynamic = {n: {0: "batch", 1: "sequence"} for n in names}
    elif isinstance(example, torch.Tensor):
        names, args, kwargs = ["input"], (example,), None
        dynamic = {"input": {0: "batch"}}
    else:
        raise ExportError(
            f"example must be a tensor or a dict of tensors, got {type(example).__name__}"
        )
    with torch.no_grad():
        outs = _outputs(forward(model, example))
    out_names = ["output"] if len(outs) == 1 else [f"output_{i}" for i in range(len(outs))]
    dynamic.update({n: {0: "batch"} for n in out_names})
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                args,
                buf,
                kwargs=kwargs,
                dynamo=False,
                input_names=names,
                output_names=out_names,
                opset_version=OPSET,
                dynamic_axes=dynamic,
                training=(
                    torch.onnx.TrainingMode.PRESERVE
                    if keep_batchnorm
                    else torch.onnx.TrainingMode.EVAL
                ),
                do_constant_folding=True,
            )
    except Exception as exc:
        raise UnsupportedModelError(
            f"torch.onnx cannot export this model ({type(exc).__name__}: {_first_line(exc)})"
        ) from exc
    return onnx.load_from_string(buf.getvalue())


def _outputs(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, tuple | list) and all(isinstance(o, torch.Tensor) for o in out):
        return list(out)
    raise ExportError(
        f"the model returns a {type(out).__name__}; export needs a tensor or a tuple of tensors "
        "(wrap the model so that forward returns tensors)"
    )


# --------------------------------------------------------------------------------------------------
# the rewriter


def _digest(a: np.ndarray) -> tuple:
    a = np.ascontiguousarray(a)
    return (a.shape, str(a.dtype), hashlib.blake2b(a.tobytes(), digest_size=16).hexdigest())


class _Rewriter:
    """Turns the float graph into the QDQ/MatMulNBits graph. One instance per export."""

    def __init__(self, proto, layers: Mapping[str, _Layer], *, accuracy_level: int | None = None):
        from onnx import numpy_helper

        self.proto, self.g, self.layers = proto, proto.graph, layers
        self.accuracy_level = accuracy_level
        self.inits = {t.name: t for t in self.g.initializer}
        self._arrays: dict[str, np.ndarray] = {}
        self.new_inits: list = []
        self.opset = OPSET
        self.uses_ms = False
        self.np = numpy_helper
        names = {t.name for t in self.g.initializer}
        for n in self.g.node:
            names.update(n.input)
            names.update(n.output)
        self.names = names | {i.name for i in self.g.input}
        self.act_of: dict[int, _Act] = {}  # id(node) -> activation quantizer of its input 0
        self._act_inits: dict[_Act, tuple[str, str]] = {}
        # weight lookup: digest of the array as a node holds it -> [(layer, layout)]
        self.index: dict[tuple, list[tuple[_Layer, str]]] = {}
        for layer in layers.values():
            views = {"rows": layer.weight}
            if layer.kind == "linear":
                views["cols"] = np.ascontiguousarray(layer.weight.T)
            for layout, arr in views.items():
                self.index.setdefault(_digest(arr), []).append((layer, layout))

    # -- helpers ------------------------------------------------------------------------------

    def fresh(self, base: str) -> str:
        name, i = base, 1
        while name in self.names:
            name, i = f"{base}_{i}", i + 1
        self.names.add(name)
        return name

    def array(self, name: str) -> np.ndarray | None:
        if name not in self.inits:
            return None
        if name not in self._arrays:
            self._arrays[name] = self.np.to_array(self.inits[name])
        return self._arrays[name]

    def add_init(self, base: str, arr: np.ndarray) -> str:
        name = self.fresh(base)
        t = self.np.from_array(np.array(arr, copy=True, order="C"), name)  # keeps 0-d as 0-d
        self.new_inits.append(t)
        self.inits[name] = t
        return name

    def node(self, op: str, inputs: list[str], outputs: list[str], **attrs):
        from onnx import helper

        domain = MS_DOMAIN if op == "MatMulNBits" else ""
        return helper.make_node(op, inputs, outputs, domain=domain, **attrs)

    def resolve(self, name: str, producers: Mapping[str, Any]) -> str | None:
        """The initializer behind ``name``, following Identity nodes."""
        seen = 0
        while name not in self.inits and seen < 8:
            p = producers.get(name)
            if p is None or p.op_type != "Identity":
                return None
            name, seen = p.input[0], seen + 1
        return name if name in self.inits else None

    # -- pass 1: weights ----------------------------------------------------------------------

    def match(self, node, producers) -> tuple[_Layer, str] | None:
        op = node.op_type
        if op in ("Conv", "MatMul", "Gemm"):
            idx = 1
        elif op == "Gather" and _attr(node, "axis", 0) == 0:
            idx = 0
        else:
            return None
        if len(node.input) <= idx:
            return None
        init = self.resolve(node.input[idx], producers)
        if init is None:
            return None
        arr = self.array(init)
        want = {"Conv": "rows", "Gather": "rows", "MatMul": "cols"}.get(op)
        if op == "Gemm":
            if _attr(node, "transA", 0) or _attr(node, "alpha", 1.0) != 1.0:
                return None
            want = "rows" if _attr(node, "transB", 0) else "cols"
        for layer, layout in self.index.get(_digest(arr), []):
            kind_ok = {
                "Conv": "conv",
                "Gather": "embedding",
                "Gemm": "linear",
                "MatMul": "linear",
            }[op] == layer.kind
            if kind_ok and layout == want and np.array_equal(arr, self.weight_view(layer, layout)):
                return layer, layout
        return None

    @staticmethod
    def weight_view(layer: _Layer, layout: str) -> np.ndarray:
        return layer.weight if layout == "rows" else layer.weight.T

    def run(self, *, requantize: bool = False, example: Any = None, threads: int = 1):
        """The rewritten ModelProto (see the module docstring for the steps)."""
        nodes = list(self.g.node)
        producers = {o: n for n in nodes for o in n.output}
        consumers: dict[str, list] = {}
        for n in nodes:
            for i in n.input:
                consumers.setdefault(i, []).append(n)
        outputs = {o.name for o in self.g.output}
        dropped: set[int] = set()
        new_nodes = []
        for n in nodes:
            if id(n) in dropped:
                continue
            hit = self.match(n, producers)
            if hit is None:
                new_nodes.append(n)
                continue
            layer, layout = hit
            w = _WeightCodes.of(layer)
            # the bias as an array; None when there is none or it is computed (then left alone)
            has_bias = len(n.input) > 2 and bool(n.input[2])
            bias = self.array(self.resolve(n.input[2], producers) or "") if has_bias else None
            if n.op_type == "Conv" and (bias is not None or not has_bias):
                bn = _single_consumer(n.output[0], consumers, outputs)
                if bn is not None and bn.op_type == "BatchNormalization":
                    folded = self.fold_bn(w, bias, bn, producers)
                    if folded is not None:
                        w, bias = folded
                        dropped.add(id(bn))
                        n.output[0] = bn.output[0]
            new_nodes.extend(self.rewrite(n, layer, layout, w, bias))
        calib = None
        if requantize:
            names = self.int8_inputs(new_nodes)
            exact = self.build(self.act_pass(new_nodes), extra_outputs=names)
            calib = _observe_ranges(exact, names, example, threads)
        return self.build(self.act_pass(new_nodes, calib))

    def fold_bn(self, w: _WeightCodes, bias: np.ndarray | None, bn, producers):
        if len([o for o in bn.output if o]) != 1 or _attr(bn, "training_mode", 0):
            return None
        params = [self.array(self.resolve(x, producers) or "") for x in bn.input[1:5]]
        if any(p is None for p in params):
            return None
        gamma, beta, mean, var = (p.astype(np.float64) for p in params)
        eps = _attr(bn, "epsilon", 1e-5)
        f = gamma / np.sqrt(var + eps)
        if not np.all(np.isfinite(f)) or np.any(f == 0):
            return None
        b = np.zeros_like(f) if bias is None else bias.astype(np.float64)
        new_bias = ((b - mean) * f + beta).astype(np.float32)
        return w.scaled(f), new_bias

    def rewrite(self, n, layer: _Layer, layout: str, w: _WeightCodes, bias: np.ndarray | None):
        """The nodes replacing ``n``: weight DequantizeLinear (or MatMulNBits), quantized bias."""
        out = []
        if n.op_type == "Gather":
            return self.gather(n, layer, w)
        if (
            layer.kind == "linear"
            and (layer.act is None or _code_dtype(layer.act.qmin, layer.act.qmax) is None)
            and layer.qmax - layer.qmin <= 255
            and (n.op_type == "MatMul" or (n.op_type == "Gemm" and layout == "rows"))
            and _attr(n, "beta", 1.0) == 1.0
        ):
            nb = self.matmul_nbits(n, layer, w, bias)
            if nb is not None:
                return nb
        dtype = _code_dtype(layer.qmin, layer.qmax)
        base = f"{layer.fqn}.weight"
        wscale = ""
        if dtype is None:  # codes wider than 8 bits: keep the dequantized weight in float
            arr = w.dequantized().reshape(layer.shape)
            arr = arr if layout == "rows" else arr.T
            n.input[1] = self.add_init(base, arr.astype(np.float32))
            layer.status = f"float ({layer.spec.bits}-bit codes do not fit int8)"
        else:
            n.input[1], extra = self.weight_dq(layer, layout, w, dtype, base)
            out.extend(extra)
            if extra[0].op_type == "DequantizeLinear":
                wscale = extra[0].input[1]
            layer.status = "qdq-int8" if layer.act is not None else "qdq-int8 weight-only"
        after = []
        if bias is not None:
            n_in = list(n.input)
            while len(n_in) < 3:
                n_in.append("")
            narrow = layer.act is not None and not _full_range_8bit(layer.act)
            if narrow and _attr(n, "beta", 1.0) == 1.0:
                # ONNX Runtime rounds a float bias of DQ → Conv/Gemm to int32 at s_x·s_w (its
                # WeightBiasQuantization pass), up to 0.5 s_x·s_w off: large at 4 bits. A separate
                # Add keeps it exact; these layers do not fuse into integer kernels anyway.
                shape = (-1,) + (1,) * (len(layer.shape) - 2) if n.op_type == "Conv" else (-1,)
                b = self.add_init(f"{layer.fqn}.bias", bias.astype(np.float32).reshape(shape))
                y, n_in[2] = n.output[0], ""
                n.output[0] = self.fresh(f"{y}_without_bias")
                after.append(self.node("Add", [n.output[0], b], [y]))
            else:
                n_in[2], extra = self.bias_input(layer, w, bias, wscale)
                out.extend(extra)
            while n_in and not n_in[-1]:
                n_in.pop()
            del n.input[:]
            n.input.extend(n_in)
        if layer.act is not None:
            self.act_of[id(n)] = layer.act
        return [*out, n, *after]

    def weight_dq(self, layer: _Layer, layout: str, w: _WeightCodes, dtype, base: str):
        """(name of the dequantized weight, nodes making it)."""
        codes = w.codes.astype(dtype)
        deq = self.fresh(f"{base}_dequantized")
        # int8 codes are symmetric here (zero point 0, the default): no zero-point initializer
        zero = dtype == np.int8 and not np.any(w.zero_point) and layer.kind == "conv"
        if w.per_tensor:
            q = self.add_init(f"{base}_quantized", _layout(codes.reshape(layer.shape), layout))
            s = self.add_init(f"{base}_scale", np.float32(w.scale[0, 0]))
            ins = (
                [q, s]
                if zero
                else [
                    q,
                    s,
                    self.add_init(f"{base}_zero_point", np.asarray(w.zero_point[0, 0], dtype)),
                ]
            )
            return deq, [self.node("DequantizeLinear", ins, [deq])]
        if w.scale.shape[1] == 1:  # per output channel
            q = self.add_init(f"{base}_quantized", _layout(codes.reshape(layer.shape), layout))
            s = self.add_init(f"{base}_scale", w.scale[:, 0].astype(np.float32))
            ins = (
                [q, s]
                if zero
                else [q, s, self.add_init(f"{base}_zero_point", w.zero_point[:, 0].astype(dtype))]
            )
            axis = 0 if layout == "rows" else 1
            return deq, [self.node("DequantizeLinear", ins, [deq], axis=axis)]
        # Groups along K: (codes − zero point) × scale on the (rows, groups, g) view in plain ops
        # (blocked DequantizeLinear needs opset 21, which the TorchScript exporter cannot write).
        # They read only initializers, so ONNX Runtime folds them into a float weight at load.
        rows, k = codes.shape
        groups = w.scale.shape[1]
        q = self.add_init(f"{base}_quantized", codes.reshape(rows, groups, k // groups))
        s = self.add_init(f"{base}_scale", w.scale.astype(np.float32)[..., None])
        z = self.add_init(f"{base}_zero_point", w.zero_point.astype(np.float32)[..., None])
        shape = self.add_init(f"{base}_shape", np.asarray(layer.shape, np.int64))
        qf, centred, scaled = (self.fresh(f"{base}_{x}") for x in ("float", "centred", "scaled"))
        nodes = [
            self.node("Cast", [q], [qf], to=1),
            self.node("Sub", [qf, z], [centred]),
            self.node("Mul", [centred, s], [scaled]),
            self.node("Reshape", [scaled, shape], [deq if layout == "rows" else qf + "_rows"]),
        ]
        if layout == "cols":
            nodes.append(self.node("Transpose", [qf + "_rows"], [deq], perm=[1, 0]))
        return deq, nodes

    def bias_input(self, layer: _Layer, w: _WeightCodes, bias: np.ndarray, weight_scale: str):
        """int32 bias at scale s_x·s_w (what QLinearConv/QGemm take) when the layer quantizes its
        input and its weight scale is per tensor or per channel; float otherwise.

        The bias scale is written as Mul(s_x, s_w) of the initializers already there (ONNX Runtime
        folds it at load) and the zero point is left out (it defaults to 0), which keeps the file
        within a few percent of Σ params × bits / 8.
        """
        base = f"{layer.fqn}.bias"
        if _full_range_8bit(layer.act) and w.scale.shape[1] == 1 and weight_scale:
            s = (np.float32(layer.act.scale) * w.scale[:, 0]).astype(np.float32)
            s = s[:1] if w.per_tensor else s
            q = np.round(bias.astype(np.float64) / s.astype(np.float64))
            if np.all(np.abs(q) < 2**31 - 1):
                qn = self.add_init(f"{base}_quantized", q.astype(np.int32))
                sx = self.add_init(f"{base}_input_scale", np.float32(layer.act.scale))
                sn, deq = self.fresh(f"{base}_scale"), self.fresh(f"{base}_dequantized")
                attrs = {} if w.per_tensor else {"axis": 0}
                return deq, [
                    self.node("Mul", [sx, weight_scale], [sn]),
                    self.node("DequantizeLinear", [qn, sn], [deq], **attrs),
                ]
        return self.add_init(base, bias.astype(np.float32)), []

    def matmul_nbits(self, n, layer: _Layer, w: _WeightCodes, bias: np.ndarray | None):
        """A MatMulNBits node (4-bit codes up to 4 bits, else 8-bit) for a weight-only Linear, or
        None if the layout does not fit (then the caller falls back to int8 QDQ).

        Weight-only layers go here even at 8 bits: left as DequantizeLinear → MatMul, ONNX Runtime
        turns them into MatMulNBits itself with ``accuracy_level`` 4, which quantizes the float
        input to int8 on the fly (measured: ~0.5 output step off squeezer). The nodes written
        here leave ``accuracy_level`` unset unless asked, so the input stays float, as squeezer
        computes it.
        """
        bits = 4 if layer.qmax - layer.qmin <= 15 else 8
        rows, k = w.codes.shape
        groups = w.scale.shape[1]
        if groups > 1:
            block = k // groups
            if block not in NBITS_BLOCKS:
                return None
            scale, zp = w.scale, w.zero_point
        else:
            fits = [b for b in NBITS_BLOCKS if k % b == 0]
            block = fits[-1] if fits else min([b for b in NBITS_BLOCKS if b >= k] or [32])
            nb = math.ceil(k / block)
            scale = np.repeat(w.scale, nb, axis=1)
            zp = np.repeat(w.zero_point, nb, axis=1)
        nb = scale.shape[1]
        symmetric = layer.qmin < 0
        offset = 2 ** (bits - 1)  # MatMulNBits' default zero point
        u = w.codes + offset if symmetric else w.codes.copy()
        pad_value = offset if symmetric else zp[:, -1:]
        if nb * block > k:
            pad = np.broadcast_to(pad_value, (rows, nb * block - k))
            u = np.concatenate([u, pad], axis=1)
        if u.min() < 0 or u.max() >= 2**bits:
            return None
        u = u.astype(np.uint8).reshape(rows, nb, block)
        base = f"{layer.fqn}.weight"
        ins = [
            n.input[0],
            self.add_init(f"{base}_q{bits}", _pack(u, bits)),
            self.add_init(f"{base}_scales", scale.astype(np.float32).reshape(-1)),
        ]
        if symmetric:
            ins.append("")
        else:
            z = _pack(zp.astype(np.uint8), bits).reshape(-1)  # packed per row
            ins.append(self.add_init(f"{base}_zero_points", z))
        if bias is not None:
            ins += ["", self.add_init(f"{layer.fqn}.bias", bias.astype(np.float32))]
        self.uses_ms = True
        layer.status, layer.block = f"matmulnbits-{bits}", int(block)
        node = self.node(
            "MatMulNBits",
            ins,
            [n.output[0]],
            K=int(k),
            N=int(rows),
            bits=bits,
            block_size=int(block),
            **({} if self.accuracy_level is None else {"accuracy_level": int(self.accuracy_level)}),
            name=n.name,
        )
        return [node]

    def gather(self, n, layer: _Layer, w: _WeightCodes):
        """Embedding lookup on the int8 codes, then dequantize only the rows looked up."""
        dtype = _code_dtype(layer.qmin, layer.qmax)
        if dtype is None or w.scale.shape[1] != 1:
            n.input[0] = self.add_init(f"{layer.fqn}.weight", w.dequantized().reshape(layer.shape))
            layer.status = "float (group-wise embedding)"
            return [n]
        base = f"{layer.fqn}.weight"
        ids, out = n.input[1], n.output[0]
        q = self.add_init(f"{base}_quantized", w.codes.astype(dtype).reshape(layer.shape))
        rows_q, rows_f = self.fresh(f"{base}_rows_q"), self.fresh(f"{base}_rows")
        nodes = [
            self.node("Gather", [q, ids], [rows_q], axis=0),
            self.node("Cast", [rows_q], [rows_f], to=1),
        ]
        if w.per_tensor:
            s = self.add_init(f"{base}_scale", np.float32(w.scale[0, 0]))
            z = self.add_init(f"{base}_zero_point", np.float32(w.zero_point[0, 0]))
            centred = self.fresh(f"{base}_centred")
            nodes += [
                self.node("Sub", [rows_f, z], [centred]),
                self.node("Mul", [centred, s], [out]),
            ]
        else:
            s = self.add_init(f"{base}_scale", w.scale.astype(np.float32))  # (rows, 1)
            z = self.add_init(f"{base}_zero_point", w.zero_point.astype(np.float32))
            sr, zr, centred = (self.fresh(f"{base}_{x}") for x in ("row_scale", "row_zp", "c"))
            nodes += [
                self.node("Gather", [s, ids], [sr], axis=0),
                self.node("Gather", [z, ids], [zr], axis=0),
                self.node("Sub", [rows_f, zr], [centred]),
                self.node("Mul", [centred, sr], [out]),
            ]
        layer.status = "int8 gather"
        return nodes

    # -- pass 2: activations ------------------------------------------------------------------

    def act_pass(self, nodes: list, calib: Mapping[str, _Act] | None = None) -> list:
        """Copies of ``nodes`` with the activation quantizers put in.

        A tensor is quantized where it is produced when every use of it (through commuting ops)
        applies the same squeezer quantizer. With ``calib`` (requantize mode) a tensor also takes
        the quantizer of a layer that reads it when its other readers are int8-capable ops, and a
        tensor read only by int8-capable ops (residual Add, pooling, Concat) takes its calibrated
        8-bit quantizer from ``calib``.
        """
        from onnx import NodeProto

        act_of: dict[int, _Act] = {}
        copies = []
        for n in nodes:
            c = NodeProto()
            c.CopyFrom(n)
            copies.append(c)
            if id(n) in self.act_of:
                act_of[id(c)] = self.act_of[id(n)]
        nodes = copies
        outputs = {o.name for o in self.g.output}

        def planner(nodes: list):
            consumers: dict[str, list[tuple[Any, int]]] = {}
            for n in nodes:
                for i, x in enumerate(n.input):
                    consumers.setdefault(x, []).append((n, i))
            memo: dict[str, tuple[_Act | None, str]] = {}

            def wanted(t: str) -> tuple[_Act | None, str]:
                """(the quantizer to apply where ``t`` is produced or None, "layer" or "calib")."""
                if t in memo:
                    return memo[t]
                memo[t] = (None, "none")  # guards cycles (there are none in a valid graph)
                hard, soft, other = set(), set(), False
                if t in outputs or t not in consumers:
                    memo[t] = (None, "none")
                    return memo[t]
                for c, i in consumers[t]:
                    if i == 0 and id(c) in act_of:
                        hard.add(act_of[id(c)])
                    elif (
                        i == 0
                        and c.op_type in COMMUTING_OPS
                        and len([o for o in c.output if o]) == 1
                    ):
                        act, kind = wanted(c.output[0])
                        if kind == "layer":
                            hard.add(act)
                        elif kind == "calib":
                            soft.add(act)
                        else:
                            other = True
                    elif calib is not None and t in calib and _int8_capable(c, self.inits):
                        soft.add(calib[t])
                    else:
                        other = True
                if other or len(hard) > 1:
                    memo[t] = (None, "none")
                elif hard:  # readers that are not layers are int8-capable ops (requantize mode)
                    memo[t] = (hard.pop(), "layer")
                elif len(soft) == 1:
                    memo[t] = (soft.pop(), "calib")
                else:
                    memo[t] = (None, "none")
                return memo[t]

            return consumers, wanted

        consumers, wanted = planner(nodes)
        # A ReLU between two copies of one quantizer whose zero point is its lowest code sees only
        # values ≥ 0: it is the identity, so drop it (ONNX Runtime would leave a requantize pair).
        drop = set()
        for n in nodes:
            if n.op_type == "Relu":
                act, _ = wanted(n.input[0])
                if act is not None and act.zero_point == act.qmin and wanted(n.output[0])[0] == act:
                    drop.add(id(n))
                    for c, i in consumers.get(n.output[0], []):
                        c.input[i] = n.input[0]
                    if calib is not None and n.output[0] in calib:
                        calib = {**calib, n.input[0]: calib[n.output[0]]}
        if drop:
            nodes = [n for n in nodes if id(n) not in drop]
            consumers, wanted = planner(nodes)

        tensors = [i.name for i in self.g.input if i.name not in self.inits]
        tensors += [o for n in nodes for o in n.output if o]
        extra = []
        fq: set[str] = set()
        for t in tensors:
            act, _ = wanted(t)
            if act is None:
                continue
            qt, made = self.quantize_act(t, act)
            extra += made
            fq.add(qt)
            for c, i in consumers.get(t, []):
                c.input[i] = qt
        private: dict[tuple[str, _Act], str] = {}
        for n in nodes:  # a layer whose input is also used unquantized gets its own pair
            act = act_of.get(id(n))
            if act is None or n.input[0] in fq:
                continue
            key = (n.input[0], act)
            if key not in private:
                private[key], made = self.quantize_act(n.input[0], act)
                extra += made
            n.input[0] = private[key]
        return _toposort(nodes + extra, self.g, self.inits)

    def int8_inputs(self, nodes: list) -> list[str]:
        """Tensors read by int8-capable ops (requantize mode calibrates their ranges)."""
        outputs = {o.name for o in self.g.output}
        names = []
        for n in nodes:
            if _int8_capable(n, self.inits):
                for x in n.input:
                    if x and x not in self.inits and x not in outputs and x not in names:
                        names.append(x)
        return names

    def quantize_act(self, t: str, act: _Act) -> tuple[str, list]:
        """Q/DQ (or exact float fake-quant for > 8 bits) of tensor ``t``; returns the new name."""
        dtype = _code_dtype(act.qmin, act.qmax)
        if act not in self._act_inits:
            i = len(self._act_inits)
            zdt = dtype if dtype is not None else np.float32
            self._act_inits[act] = (
                self.add_init(f"act{i}_scale", np.float32(act.scale)),
                self.add_init(f"act{i}_zero_point", np.asarray(act.zero_point, zdt)),
            )
        s, z = self._act_inits[act]
        src, nodes = t, []
        out = self.fresh(f"{t}_fq")
        if dtype is None:  # > 8-bit codes: the fake-quant formula in float ops, exactly
            lo = self.add_init("qmin", np.float32(act.qmin))
            hi = self.add_init("qmax", np.float32(act.qmax))
            a, b, c, d, e = (self.fresh(f"{t}_fq{k}") for k in range(5))
            nodes += [
                self.node("Div", [src, s], [a]),
                self.node("Round", [a], [b]),
                self.node("Add", [b, z], [c]),
                self.node("Clip", [c, lo, hi], [d]),
                self.node("Sub", [d, z], [e]),
                self.node("Mul", [e, s], [out]),
            ]
            return out, nodes
        info = np.iinfo(dtype)
        if (act.qmin, act.qmax) != (info.min, info.max):  # a narrower range: clip before Q
            lo = self.add_init("clip_lo", np.float32((act.qmin - act.zero_point) * act.scale))
            hi = self.add_init("clip_hi", np.float32((act.qmax - act.zero_point) * act.scale))
            clipped = self.fresh(f"{t}_clipped")
            nodes.append(self.node("Clip", [src, lo, hi], [clipped]))
            src = clipped
        q = self.fresh(f"{t}_quantized")
        nodes += [
            self.node("QuantizeLinear", [src, s, z], [q]),
            self.node("DequantizeLinear", [q, s, z], [out]),
        ]
        return out, nodes

    # -- output -------------------------------------------------------------------------------

    def build(self, nodes: list, extra_outputs: list[str] = ()):
        """A ModelProto of ``nodes`` with the initializers they use, dead nodes dropped."""
        from onnx import TensorProto, helper

        outputs = list(self.g.output) + [
            helper.make_tensor_value_info(t, TensorProto.FLOAT, None) for t in extra_outputs
        ]
        out_names = {o.name for o in outputs}
        while True:  # drop nodes nobody reads (Identity nodes of replaced weights), repeatedly
            used = {x for n in nodes for x in n.input} | out_names
            keep = [n for n in nodes if any(o in used for o in n.output)]
            if len(keep) == len(nodes):
                break
            nodes = keep
        inits, seen = [], set()
        for t in list(self.g.initializer) + self.new_inits:
            if t.name in used and t.name not in seen:
                seen.add(t.name)
                inits.append(t)
        if not extra_outputs:
            _short_names(nodes, keep={*(i.name for i in self.g.input), *out_names, *seen})
        graph = helper.make_graph(
            nodes, self.g.name or "squeezer", list(self.g.input), outputs, initializer=inits
        )
        opsets = [helper.make_opsetid("", self.opset)]
        if self.uses_ms:
            opsets.append(helper.make_opsetid(MS_DOMAIN, 1))
        model = helper.make_model(
            graph,
            opset_imports=opsets,
            producer_name="squeezer",
            ir_version=self.proto.ir_version,  # ONNX Runtime rejects the newest IR versions
        )
        return model


def _short_names(nodes: list, keep: set[str]) -> None:
    """Rename intermediate tensors t0, t1, ... in place (node names keep the module scopes): on a
    small net the exporter's scoped tensor names are a few percent of the file."""
    names: dict[str, str] = {}
    for n in nodes:
        for j, x in enumerate(n.output):
            if x and x not in keep:
                names.setdefault(x, f"t{len(names)}")
                n.output[j] = names[x]
    for n in nodes:
        for j, x in enumerate(n.input):
            if x in names:
                n.input[j] = names[x]


def _int8_capable(node, inits: Mapping[str, Any]) -> bool:
    """Ops ONNX Runtime runs on int8 tensors in a QDQ graph: a residual Add of two computed
    tensors, pooling, Concat."""
    if node.op_type == "Add":
        return all(x and x not in inits for x in node.input)
    return node.op_type in ("GlobalAveragePool", "AveragePool", "Concat")


def _observe_ranges(model, names: list[str], example: Any, threads: int) -> dict[str, _Act]:
    """Calibrated 8-bit asymmetric quantizers (min-max over ``example``) of tensors ``names``."""
    from .quant.primitives import qparams_from_range

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


@dataclass
class _WeightCodes:
    """Integer codes of one weight as rows × K, with per-(row, group) scale and zero point."""

    codes: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray
    qmin: int
    qmax: int
    per_tensor: bool

    @classmethod
    def of(cls, layer: _Layer) -> _WeightCodes:
        return cls(
            layer.codes.copy(),
            layer.scale.copy(),
            layer.zero_point.copy(),
            layer.qmin,
            layer.qmax,
            layer.per_tensor,
        )

    def scaled(self, f: np.ndarray) -> _WeightCodes:
        """The codes of ``W · diag(f)`` over rows: same codes (negated where f < 0), scale × |f|."""
        neg = f < 0
        codes, zp = self.codes.copy(), self.zero_point.copy()
        codes[neg] = (self.qmin + self.qmax) - codes[neg]
        zp[neg] = (self.qmin + self.qmax) - zp[neg]
        scale = (self.scale.astype(np.float64) * np.abs(f)[:, None]).astype(np.float32)
        return _WeightCodes(codes, scale, zp, self.qmin, self.qmax, per_tensor=False)

    def dequantized(self) -> np.ndarray:
        g = self.scale.shape[1]
        c = self.codes.reshape(self.codes.shape[0], g, -1).astype(np.float32)
        z = self.zero_point.astype(np.float32)[..., None]
        return ((c - z) * self.scale[..., None]).reshape(self.codes.shape).astype(np.float32)


def _pack(u: np.ndarray, bits: int) -> np.ndarray:
    """Codes packed low-first along the last axis: two 4-bit codes a byte, or one 8-bit code."""
    if bits == 8:
        return u.astype(np.uint8)
    if u.shape[-1] % 2:
        u = np.concatenate([u, np.zeros((*u.shape[:-1], 1), u.dtype)], axis=-1)
    return (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8)


def _layout(codes: np.ndarray, layout: str) -> np.ndarray:
    return codes if layout == "rows" else np.ascontiguousarray(codes.T)


def _full_range_8bit(act: _Act | None) -> bool:
    """True if ``act`` is a plain uint8/int8 QuantizeLinear (no clip): the case ONNX Runtime fuses
    into integer kernels, and the only one where an int32 bias (one more rounding) pays off."""
    if act is None:
        return False
    dtype = _code_dtype(act.qmin, act.qmax)
    return dtype is not None and (act.qmin, act.qmax) == (np.iinfo(dtype).min, np.iinfo(dtype).max)


def _code_dtype(qmin: int, qmax: int):
    if qmin >= -128 and qmax <= 127:
        return np.int8
    if qmin >= 0 and qmax <= 255:
        return np.uint8
    return None


def _attr(node, name: str, default: Any) -> Any:
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _single_consumer(t: str, consumers: Mapping[str, list], outputs: set[str]):
    users = consumers.get(t, [])
    return users[0] if len(users) == 1 and t not in outputs else None


def _toposort(nodes: list, graph, inits: Mapping[str, Any]) -> list:
    """Nodes in an order where every input is produced before it is read (stable otherwise)."""
    available = set(inits) | {i.name for i in graph.input} | {""}
    pending, done = list(nodes), []
    while pending:
        rest = []
        for n in pending:
            if all(x in available for x in n.input):
                done.append(n)
                available.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            raise ExportError(
                f"the rewritten graph has a cycle or a dangling input near {rest[0].op_type} "
                f"{rest[0].name!r}"
            )
        pending = rest
    return done


# --------------------------------------------------------------------------------------------------
# checking and sizes


def _compare(
    ref: list[torch.Tensor], got: list[np.ndarray]
) -> tuple[np.ndarray, float, float | None]:
    """(max |Δ| of each sample, one 8-bit output step, argmax agreement of 2-D outputs)."""
    rows, step, agree = None, 0.0, None
    for r, g in zip(ref, got, strict=True):
        r = r.detach().float().cpu().numpy()
        if r.shape != g.shape:
            raise ExportError(f"ONNX Runtime returned shape {g.shape}, squeezer {r.shape}")
        d = np.abs(r - g).reshape(r.shape[0], -1).max(1) if r.size else np.zeros(len(r))
        rows = d if rows is None else np.maximum(rows, d)
        step = max(step, float(r.max() - r.min()) / 255.0 if r.size else 0.0)
        if r.ndim == 2 and r.shape[1] > 1 and agree is None:
            agree = float(np.mean(r.argmax(1) == g.argmax(1)))
    return rows, step, agree


def _plan_bytes(fmodel: nn.Module, plan: Plan) -> float:
    from .measure import model_bytes

    return model_bytes(fmodel, plan)


def _stored_bytes(fmodel: nn.Module, layers: Mapping[str, _Layer]) -> float:
    """``model_bytes`` with each layer's codes at the width the file stores them."""
    from dataclasses import replace

    from .measure import model_bytes

    specs = {}
    for fqn, layer in layers.items():
        if layer.status.startswith("matmulnbits"):  # a scale (and zero point) per block
            bits, block = int(layer.status.rsplit("-", 1)[1]), layer.block
            fits = block and layer.codes.shape[1] % block == 0
            specs[fqn] = (
                replace(layer.spec, bits=bits, granularity="group", group_size=block)
                if fits
                else replace(layer.spec, bits=bits)
            )
        elif layer.status.startswith("float"):
            specs[fqn] = replace(layer.spec, bits=32)
        else:
            specs[fqn] = replace(layer.spec, bits=max(8, layer.spec.bits))
    return model_bytes(fmodel, Plan(specs))


def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        raise ExportError(
            f"ONNX export needs onnx and onnxruntime ({exc.name} is missing); "
            "pip install 'squeezer[onnx]'"
        ) from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


__all__ = [
    "ExportReport",
    "export_float_onnx",
    "export_onnx",
    "latency_table",
    "ort_feeds",
    "ort_session",
]
