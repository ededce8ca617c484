"""The export entry points: :func:`export_onnx` (a fake-quantized model to a QDQ int8 ONNX file,
verified in ONNX Runtime, described by an :class:`ExportReport`) and :func:`export_float_onnx`
(the FP32 baseline); the TorchScript export of the float graph (:func:`_torch_export`); and
the comparison of ONNX Runtime's outputs with squeezer's and the file's theoretical and stored
sizes.
"""

from __future__ import annotations

import inspect
import io
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..atomic import write_bytes_atomic
from ..config import Plan
from ..data import forward
from ..errors import ExportError, UnsupportedModelError, first_line
from ..graph import copy_model
from .common import ATOL, OPSET, CheckedExport, _require_onnx
from .layers import _collect_layers, _float_twin, _Layer
from .rewrite import _rewrite
from .runtime import (
    ort_feeds,
    ort_session,
    resolve_weight_codes,
    saturating_layers,
    u8s8_saturates,
)


@dataclass(frozen=True)
class ExportReport(CheckedExport):
    """What :func:`export_onnx` wrote and how well ONNX Runtime agrees with squeezer: the fields
    of :class:`~squeezer.export.common.CheckedExport`, and

    Attributes:
        stored_bytes: the theoretical sum with the widths actually stored (each packed layer's
            width, 8 for QDQ codes left a byte each, 4 for MatMulNBits), the floor this format
            can reach.
        layers: {FQN: how the layer was exported} ("qdq-int8", "matmulnbits-4", "float", ...).
        weights_storage: "packed" (sub-8-bit codes stored at their width, unpacked by ONNX
            Runtime at load into the int8 graph, see :mod:`squeezer.export.packing`) or "int8"
            (a byte a code: asked for, nothing to pack, or the packed form did not fold, then
            ``storage_note`` says why).
        packed_bits: {FQN: bits stored per code} of the packed layers.
        storage_note: why the codes are not packed, when they could have been.
        opset: the default-domain opset of the graph.
        threads: ONNX Runtime's intra-op threads during the check.
        weight_codes: "int8" or "uint8", the form of the 8-bit weight codes of layers with uint8
            inputs (``export_onnx``'s ``weight_codes``, resolved).
    """

    stored_bytes: float
    layers: dict[str, str] = field(default_factory=dict)
    weights_storage: str = "int8"
    packed_bits: dict[str, int] = field(default_factory=dict)
    storage_note: str | None = None
    opset: int = OPSET
    threads: int = 1
    weight_codes: str = "int8"


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
    pack: bool = True,
    weight_codes: str = "auto",
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
        pack: store sub-8-bit weight codes at their width (bit planes that ONNX Runtime unpacks
            into the int8 codes once, at load), so that the file is about the plan's theoretical
            size and runs the very graph of the int8 file. Kept only if ONNX Runtime's optimized
            graph of the packed file equals that of the int8 file; ``pack=False`` writes a byte a
            code.
        weight_codes: how the 8-bit weight codes of layers with uint8 inputs are stored:
            ``"int8"`` (zero point 0, ONNX Runtime's usual form), ``"uint8"`` (codes + 128, zero
            point 128: the same values) or ``"auto"`` (default): int8, except on x86 CPUs
            without VNNI (:func:`~squeezer.export.runtime.u8s8_saturates`) where the int8 file
            fails the check, then uint8 (and uint8 there with ``verify=False``); int8 directly
            on every CPU where no layer can saturate (every layer with quantized inputs at
            ≤ 7-bit weights, codes within ±64: 2 · 255 · 64 fits int16, as ONNX Runtime's
            ``reduce_range``); the report's ``weight_codes`` says which
            (:func:`weight_code_forms`). On x86 without
            VNNI ONNX Runtime's uint8 × int8 kernels add pairs of products in int16 and saturate
            (a ResNet's outputs move by several output steps); its uint8 × uint8 kernels do not.
            With ``"uint8"`` activation codes that fit int8 are stored as uint8 too (same
            values): the int8 × int8 kernels there add 128 to them and saturate alike.
            The check runs on this CPU, so ``"int8"`` made on a CPU without VNNI fails it when
            the sums saturate (the file is still what a VNNI target runs exactly).

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
    threads = threads or torch.get_num_threads()
    qmodel = copy_model(qmodel).eval()
    forms = weight_code_forms(weight_codes, verify, qmodel)
    fmodel = _float_twin(qmodel, _collect_layers(qmodel))
    float_graph = _torch_export(fmodel, example)  # each form rewrites a copy of it
    ref = None
    for i, codes_form in enumerate(forms):
        layers, proto, data, packed, note = _build(
            qmodel, float_graph, example, codes_form, accuracy_level=accuracy_level,
            requantize=requantize, threads=threads, pack=pack,
        )  # fmt: skip
        checks = dict.fromkeys(CHECK_FIELDS)
        if not verify:
            break
        if ref is None:  # squeezer's outputs and FP32's, once for every form tried
            with torch.no_grad():
                ref = _outputs(forward(qmodel, example))
                fp32 = _outputs(forward(_float_twin(qmodel, layers, dequantized=False), example))
        try:
            checks = _check(ref, fp32, data, proto, example, atol, threads=threads,
                            loose=requantize or (accuracy_level or 0) > 1)  # fmt: skip
            break
        except ExportError as exc:
            if i + 1 < len(forms):  # "auto": int8 saturated on this CPU; the same values as uint8
                continue
            if codes_form == "int8" and u8s8_saturates():
                raise ExportError(
                    f"{exc}. This CPU has no VNNI: ONNX Runtime's uint8 x int8 kernels saturate "
                    "here; weight_codes='uint8' (--weight-codes uint8) stores the same values "
                    "without it"
                ) from exc
            raise
    write_bytes_atomic(path, data)
    plan = Plan({fqn: layer.spec for fqn, layer in layers.items()})
    return ExportReport(
        path=str(path),
        size_bytes=len(data),
        theoretical_bytes=_plan_bytes(fmodel, plan),
        stored_bytes=_stored_bytes(fmodel, layers, packed),
        **checks,
        layers={fqn: layer.status for fqn, layer in layers.items()},
        weights_storage="packed" if packed else "int8",
        packed_bits=packed,
        storage_note=note,
        opset=OPSET,
        threads=threads,
        weight_codes=codes_form,
    )


def weight_code_forms(
    weight_codes: str, verify: bool = True, qmodel: nn.Module | None = None
) -> list[str]:
    """The forms :func:`export_onnx` tries, in order, for its ``weight_codes``: the one asked
    for; for ``"auto"`` int8, then uint8 if the check fails, on a CPU where ONNX Runtime's
    uint8 × int8 kernels saturate (just uint8 there without a check), else int8. Given
    ``qmodel``, ``"auto"`` is int8 alone on every CPU when none of its layers can saturate
    (:func:`~squeezer.export.runtime.saturating_layers`: e.g. every layer with quantized
    inputs at ≤ 7-bit weights), with or without a check.

    Example:
        >>> weight_code_forms("uint8")
        ['uint8']
    """
    if weight_codes != "auto":
        return [resolve_weight_codes(weight_codes)]
    if not u8s8_saturates() or (qmodel is not None and not saturating_layers(qmodel)):
        return ["int8"]
    return ["int8", "uint8"] if verify else ["uint8"]


def _build(qmodel: nn.Module, float_graph, example: Any, codes_form: str, *,
           accuracy_level: int | None, requantize: bool, threads: int, pack: bool):  # fmt: skip
    """(layers, proto, file bytes, packed bits, storage note) of ``qmodel``'s QDQ graph with
    weight codes ``codes_form``, rewritten from a copy of ``float_graph`` (its float twin's
    export)."""
    import onnx

    layers = _collect_layers(qmodel)
    graph = onnx.ModelProto()
    graph.CopyFrom(float_graph)
    proto = _rewrite(
        graph,
        layers,
        accuracy_level=accuracy_level,
        requantize=requantize,
        example=example,
        threads=threads,
        weight_codes=codes_form,
    )
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
        raise ExportError(f"the rewritten ONNX graph is invalid ({first_line(exc)})") from exc
    data = proto.SerializeToString()
    packed, note = {}, None
    if pack:
        data, packed, note = _packed(proto, data, layers, threads)
    return layers, proto, data, packed, note


def _check(ref: list, fp32: list, data: bytes, proto, example: Any, atol: float | None, *,
           threads: int, loose: bool) -> dict:  # fmt: skip
    """The :data:`CHECK_FIELDS` of the file ``data`` run in ONNX Runtime against squeezer's
    outputs ``ref`` (FP32's: ``fp32``), on ``example`` and on its first sample alone
    (:func:`_verify`)."""
    got, one = _run_two_batches(ort_session(data, threads=threads), example, proto)
    checks = _verify("ONNX Runtime", ref, got, fp32, atol, loose=loose, max_slack=1.0)
    # The batch dimension is dynamic: one sample alone must give what it gave in the batch.
    first = [r[:1] for r in ref], [f[:1] for f in fp32]
    _verify("ONNX Runtime at batch 1", first[0], one, first[1], atol, loose=loose,
            max_slack=1.0, step=checks["output_step"])  # fmt: skip
    return checks


def export_float_onnx(model: nn.Module, example: Any) -> bytes:
    """The float model as ONNX bytes (the ORT FP32 baseline), with the same exporter settings.

    Example:
        >>> onnx_bytes = export_float_onnx(nn.Linear(4, 2), torch.zeros(1, 4))  # doctest: +SKIP
    """
    _require_onnx()
    return _torch_export(
        copy_model(model).eval(), example, keep_batchnorm=False
    ).SerializeToString()


# --------------------------------------------------------------------------------------------------
# the float graph


def _head(example: Any, n: int = 2) -> Any:
    """The first ``n`` samples of a tensor or a dict of tensors (tracing needs no more), the
    samples repeated if there are fewer."""
    if isinstance(example, Mapping):
        return {k: _head(v, n) for k, v in example.items()}
    if isinstance(example, torch.Tensor) and 0 < len(example) < n:
        example = example.repeat(-(-n // len(example)), *(1,) * (example.dim() - 1))
    return example[:n]


def _torch_export(model: nn.Module, example: Any, *, keep_batchnorm: bool = True):
    """The model as an ONNX ModelProto from the TorchScript exporter, batch (and sequence) dynamic.

    With ``keep_batchnorm`` BatchNorm stays a node (``TrainingMode.PRESERVE`` on an eval model), so
    weight initializers keep their values and the rewriter folds BatchNorm into the integer
    weights' scales itself; otherwise the exporter folds it into the float weights.
    """
    from .batch import BATCHES, _unfreeze_batch

    small, frozen = _trace(model, _head(example, BATCHES[0]), keep_batchnorm)
    if not frozen:
        return small
    # A Python int taken from a tensor was traced as a constant: trace at another batch size and
    # compute what differs from the input's batch size (see squeezer.export.batch).
    large, _ = _trace(model, _head(example, BATCHES[1]), keep_batchnorm)
    return _unfreeze_batch(small, large, small.graph.input[0].name)


def _trace(model: nn.Module, example: Any, keep_batchnorm: bool):
    """(the ModelProto of one TorchScript trace at ``example``'s batch size, whether the tracer
    warned that a Python value taken from a tensor may freeze part of the graph)."""
    import onnx

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
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
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
            f"torch.onnx cannot export this model ({type(exc).__name__}: {first_line(exc)})"
        ) from exc
    frozen = any(issubclass(w.category, torch.jit.TracerWarning) for w in caught)
    return onnx.load_from_string(buf.getvalue()), frozen


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
# checking and sizes


#: The fields of :class:`~squeezer.export.common.CheckedExport` that :func:`_verify` fills.
CHECK_FIELDS = ("max_abs_error", "median_sample_error", "atol", "output_step", "quant_error",
                "argmax_agreement")  # fmt: skip


def _run_two_batches(session, example: Any, proto) -> tuple[list, list]:
    """ONNX Runtime's outputs on the whole ``example`` and on its first sample alone; a graph
    it cannot run is an ExportError (a batch size frozen into the graph, an unsupported op)."""
    runs = []
    for x in (example, _head(example, 1)):
        try:
            runs.append(session.run(None, ort_feeds(x, proto)))
        except Exception as exc:  # onnxruntime raises its own Fail/RuntimeException types
            n = len(next(iter(x.values())) if isinstance(x, Mapping) else x)
            raise ExportError(
                f"ONNX Runtime cannot run the exported graph on a batch of {n} "
                f"({first_line(exc, 160)}); the model's forward may fix a size that should follow "
                "the input (take sizes from x.shape, not len(x) or int(...))"
            ) from None
    return runs[0], runs[1]


def _verify(
    runtime: str, ref, got, fp32, atol: float | None, *, loose: bool, max_slack: float,
    step: float | None = None,
):  # fmt: skip
    """The check every export runs: the runtime's outputs ``got`` against squeezer's ``ref``.
    The default tolerance is :data:`~squeezer.export.common.ATOL`'s (``loose`` when the runtime
    rounds more than squeezer does) on the typical sample, with ``max_slack`` times it (or twice
    the quantization's own effect) for the worst; ``atol`` bounds the worst sample instead. One
    sample alone (the batch-1 check) has no typical value apart from its worst, so it is held to
    the worst-sample bound it had in the batch. Returns the :data:`CHECK_FIELDS`; a disagreement
    is an ExportError saying how to proceed."""
    rows, own_step, agree = _compare(ref, got)
    step = own_step if step is None else step  # a subset is judged by the whole set's step
    max_err, median_err = float(rows.max()), float(np.median(rows))
    quant_err = max(float((r - f).abs().max()) for r, f in zip(ref, fp32, strict=True))
    if atol is None:
        steps, share = ATOL[loose]
        tol = max(steps * step, share * quant_err)
        typical = len(rows) < 2 or median_err <= tol
        ok = typical and max_err <= max(max_slack * tol, 2 * quant_err)
    else:
        tol = float(atol)
        ok = max_err <= tol
    if not ok:
        raise ExportError(
            f"{runtime} disagrees with squeezer: max |Δ| = {max_err:.3g}, median over samples "
            f"{median_err:.3g}, tolerance {tol:.3g} (one output step = {step:.3g}, max |squeezer "
            f"− FP32| = {quant_err:.3g}); raise the tolerance if that is expected (--atol on the "
            "command line, atol=... in Python; verify=False writes the file to inspect it)"
        )
    values = (max_err, median_err, tol, step, quant_err, agree)
    return dict(zip(CHECK_FIELDS, values, strict=True))


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
    from ..measure import model_bytes

    return model_bytes(fmodel, plan)


def _packed(proto, data: bytes, layers: Mapping[str, _Layer], threads: int):
    """(the packed file's bytes, {FQN: bits stored per code}, None) if packing the codes folds
    back into the int8 graph in ONNX Runtime; (``data``, {}, why not) if it does not; (``data``,
    {}, None) if there is nothing to pack."""
    from .packing import pack_onnx_codes, unfolded

    packed, widths = pack_onnx_codes(proto)
    if not widths:
        return data, {}, None
    packed_data = packed.SerializeToString()
    why = unfolded(packed_data, data, threads)
    if why is not None:
        return data, {}, f"{why}; the codes are stored a byte each"
    fqn_of = {f"{fqn}.w_q": fqn for fqn in layers}
    return packed_data, {fqn_of.get(k, k): bits for k, bits in widths.items()}, None


def _stored_bytes(
    fmodel: nn.Module, layers: Mapping[str, _Layer], packed: Mapping[str, int]
) -> float:
    """``model_bytes`` with each layer's codes at the width the file stores them."""
    from dataclasses import replace

    from ..measure import model_bytes

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
        elif fqn in packed:
            specs[fqn] = replace(layer.spec, bits=packed[fqn])
        else:
            specs[fqn] = replace(layer.spec, bits=max(8, layer.spec.bits))
    return model_bytes(fmodel, Plan(specs))
