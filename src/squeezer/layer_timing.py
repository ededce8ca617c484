"""Per-layer latency tables for latency budgets, timed on this machine (HAWQ-V3's per-layer lookup
table: measured, not estimated from MACs).

Two ways to measure. :func:`context_latency_costs` (what ``compress``/``plan`` use on ONNX Runtime)
times the exported model itself: all layers int8, and once more with each layer in float, so a
layer's cost includes the quantize/dequantize boundaries and fusions its choice brings to the
deployed graph. :func:`layer_latency_table` times each layer alone on the input it sees (no
calibration needed; cheaper, blind to the boundaries). Every timing goes through
:func:`squeezer.measure.time_calls`, the one timing function of the package.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from . import measure
from .data import forward
from .errors import ConfigError
from .graph import copy_model, quantizable_layers, set_module, split_attention
from .progress import progress as progress_bar


def layer_latency_table(
    model: nn.Module,
    example: Any,
    bits: Sequence[int],
    *,
    backend: str = "onnxruntime",
    layers: Sequence[str] | None = None,
    runs: int = 50,
    threads: int = 1,
) -> dict[str, dict[int, float]]:
    """A per-layer, per-bit latency table in ms for latency budgets, timed on this CPU.

    Each layer runs alone on the input it sees when ``model`` runs ``example``.

    ``backend="onnxruntime"`` (measured): the layer is exported to ONNX and timed in ONNX Runtime
    in float32, and again after static QDQ quantization (u8 activations, s8 per-channel weights),
    which ORT runs with integer kernels. Widths ≥ 16 get the float time; widths ≤ 8 all get the
    int8 time, because ORT has no sub-byte kernels on CPU: on this hardware 2–8 bits cost the same.

    ``backend="proxy"`` (a model, not a measurement of low-bit kernels): the layer's float time in
    PyTorch, scaled by bits / 32, i.e. latency proportional to MACs × bits as on bit-serial
    hardware.

    Example:
        >>> net = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> t = layer_latency_table(net, torch.zeros(4, 16), (4, 8, 32), backend="proxy", runs=3)
        >>> t["0"][4] < t["0"][8] < t["0"][32]
        True
    """
    if backend not in ("onnxruntime", "proxy"):
        raise ConfigError(f"unknown latency backend {backend!r}; use 'onnxruntime' or 'proxy'")
    model = split_attention(model)  # the layers quantize() sees
    all_layers = quantizable_layers(model)
    names = list(all_layers) if layers is None else list(layers)
    inputs = {
        k: x
        for k, (_, x) in _first_calls(model, example, {k: all_layers[k] for k in names}).items()
    }
    out: dict[str, dict[int, float]] = {}
    for fqn in names:
        if fqn not in inputs:
            out[fqn] = {int(b): 0.0 for b in bits}  # not reached by the example
            continue
        layer, x = all_layers[fqn], inputs[fqn]
        if backend == "proxy":
            with torch.no_grad():
                t32 = measure.time_calls({"f32": lambda m=layer, x=x: m(x)}, runs=runs)[
                    "f32"
                ].median_ms
            out[fqn] = {int(b): t32 * min(int(b), 32) / 32 for b in bits}
        else:
            t32, t8 = _ort_layer_times(layer, x, runs=runs, threads=threads)
            out[fqn] = {int(b): (t32 if b >= 16 else t8) for b in bits}
    return out


def _ort_layer_times(
    layer: nn.Module, x: torch.Tensor, *, runs: int, threads: int
) -> tuple[float, float]:
    """Median ms of one layer in ONNX Runtime, float32 and static-QDQ int8."""
    import logging
    import tempfile
    from pathlib import Path

    import onnxruntime as ort
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class _One(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([{"x": x.numpy()}])

        def get_next(self) -> dict | None:
            return next(self.items, None)

    with tempfile.TemporaryDirectory() as tmp:
        f32, i8 = Path(tmp) / "f32.onnx", Path(tmp) / "i8.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # The TorchScript exporter takes ~0.3 s per layer here, the dynamo one ~6 s.
            torch.onnx.export(
                copy.deepcopy(layer).eval(), (x,), str(f32), dynamo=False,
                input_names=["x"], output_names=["y"],
            )  # fmt: skip
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)  # quantize_static logs a pre-processing hint per call
        try:
            quantize_static(
                str(f32), str(i8), _One(), quant_format=QuantFormat.QDQ, per_channel=True,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            )  # fmt: skip
        finally:
            root.setLevel(level)
        calls = {}
        for name, path in (("f32", f32), ("i8", i8)):
            so = ort.SessionOptions()
            so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
            sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
            feed = {"x": x.numpy()}
            calls[name] = lambda s=sess, f=feed: s.run(None, f)
        times = measure.time_calls(calls, runs=runs)
    return times["f32"].median_ms, times["i8"].median_ms


def latency_costs(
    model: nn.Module,
    example: Any,
    bits: Sequence[int],
    *,
    backend: str = "onnxruntime",
    threads: int = 1,
    runs: int = 50,
) -> tuple[dict[str, dict[int, float]], float, float]:
    """What a latency budget needs: the per-layer table (:func:`layer_latency_table`), the
    latency of everything outside it, and the whole float model's latency, in ms on ``example``.

    The part outside the table is the whole float model's measured latency less the sum of its
    layers' float times (never below 0), so a plan that keeps every layer in float is predicted
    at exactly the float model's measured latency, and a quantized plan at that minus what its
    layers save. The whole model runs in ONNX Runtime for ``backend="onnxruntime"`` and in
    PyTorch for ``"proxy"``.

    Returns:
        ``(table, fixed_ms, whole_fp32_ms)``.

    Example:
        >>> net = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> table, fixed, whole = latency_costs(net, torch.zeros(4, 16), (8, 32), backend="proxy",
        ...                                     runs=3)
        >>> fixed >= 0 and whole > 0
        True
    """
    table = layer_latency_table(model, example, bits, backend=backend, runs=runs, threads=threads)
    model = split_attention(model).eval()
    if backend == "onnxruntime":
        from .export import export_float_onnx, ort_feeds, ort_session

        sess = ort_session(export_float_onnx(model, example), threads=threads)
        feeds = ort_feeds(example, sess)
        call = {"fp32": lambda: sess.run(None, feeds)}
    else:

        def fp32() -> None:
            with torch.no_grad():
                forward(model, example)

        call = {"fp32": fp32}
    whole = measure.time_calls(call, runs=runs)["fp32"].median_ms
    return table, max(0.0, whole - float_sum(table)), whole


def float_sum(table: dict[str, dict[int, float]]) -> float:
    """The summed latency of every layer of a table at its float (largest) width."""
    return sum(row[max(row)] for row in table.values())


def context_latency_costs(
    model: nn.Module,
    qmodel: nn.Module,
    example: Any,
    bits: Sequence[int],
    layers: Sequence[str],
    *,
    groups: Sequence[Sequence[str]] = (),
    threads: int = 1,
    runs: int = 50,
    requantize: bool = True,
    progress: bool = False,
    unit: str = "auto",
) -> tuple[dict[str, dict[int, float]], float, tuple[tuple[str, str, float], ...], dict[str, Any]]:
    """A latency table measured on the exported model in ONNX Runtime: what each layer adds when
    it runs in float instead of int8, and what the boundary between a float and an int8 neighbour
    costs, in the graph the user deploys.

    ``qmodel`` is ``model`` quantized with every one of ``layers`` at ≤ 8 bits (the int8 graph).
    It is exported (as ``squeezer export`` does, with ``requantize``) and timed; so is a copy with
    each unit in float (a unit: a layer, or a group of tied layers, which a plan moves together),
    and one with each pair of units that run one after the other in float, all sessions in the
    same interleaved rounds. ``unit="block"`` times blocks instead (:func:`block_units`: one
    unit per item of a ``ModuleList``/``Sequential`` holding several of ``layers``, e.g. one
    per encoder layer: 12 exports for MiniLM's 36 Linears instead of 72); a block's cost is
    shared among its layers by weight size (a plan may still split a block; the check of
    :func:`fit_to_latency` measures what it chose). The model behind the table: latency = int8
    graph + Σ c_u over the units in float + Σ b_e over neighbouring pairs with exactly one in
    float. ``unit="auto"`` (the default, what ``compress``/``plan`` use) takes blocks only
    where layers would need more than :data:`MAX_LAYER_EXPORTS` exports.
    With Δ_u a single
    variant's extra time and P_uv a pair's, b_uv = (Δ_u + Δ_v − P_uv) / 2 (never below 0) and
    c_u = Δ_u − Σ b over u's pairs (negative where float is faster: a first conv whose input
    quantize costs more than its int8 kernel saves). So the all-int8 plan, every single and every
    neighbouring pair are predicted at exactly what was measured.

    Returns:
        ``(table, fixed_ms, edges, record)``: ``table[layer][bits]`` (0 at ≤ 8 bits), the int8
        graph's latency, the ``(layer, layer, ms)`` boundaries (:attr:`Costs.latency_edges`), and
        every measurement with the whole float model's (``whole_fp32_ms``) for the report.
    """
    import tempfile
    from pathlib import Path

    from .export import export_float_onnx, ort_feeds, ort_session

    model = split_attention(model).eval()
    floats = quantizable_layers(model)
    missing = [k for k in layers if k not in floats]
    if missing:
        raise ConfigError(f"the model has no layers {missing[:3]} to time")
    if unit not in ("auto", "layer", "block"):
        raise ConfigError(f"unknown latency-table unit {unit!r}; use 'auto', 'layer' or 'block'")
    units = [u for u in ([k for k in g if k in layers] for g in groups) if u]
    tied = {k for g in units for k in g}
    units += [[k] for k in layers if k not in tied]
    if unit == "auto":
        unit = "block" if 2 * len(units) > MAX_LAYER_EXPORTS else "layer"
    if unit == "block":
        units = _merged(units + block_units(model, layers))
    order = {k: pos for k, (pos, _) in _first_calls(model, example, floats).items()}
    units.sort(key=lambda u: min(order.get(k, len(order)) for k in u))
    pairs = list(zip(units, units[1:], strict=False))
    todo = [("int8", [])] + [(",".join(u), u) for u in units]
    todo += [(",".join(u) + "+" + ",".join(v), u + v) for u, v in pairs]
    sessions: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        with progress_bar(len(todo) + 1, "latency table (exports)", enabled=progress) as bar:
            for name, members in todo:
                variant = copy_model(qmodel)
                for k in members:
                    set_module(variant, k, copy.deepcopy(floats[k]))
                path = Path(tmp) / f"v{len(sessions)}.onnx"
                sessions[name] = _exported_session(variant, path, example, requantize, threads)
                bar.update(1)
            sessions["fp32"] = ort_session(export_float_onnx(model, example), threads=threads)
            bar.update(1)
        feeds = ort_feeds(example, sessions["fp32"])
        calls = {n: (lambda s=s: s.run(None, feeds)) for n, s in sessions.items()}
        times = {n: v.median_ms for n, v in measure.time_calls(calls, runs=runs).items()}
    base = times["int8"]
    single = {",".join(u): times[",".join(u)] - base for u in units}
    edges, unit_edges = [], {",".join(u): 0.0 for u in units}
    for u, v in pairs:
        nu, nv = ",".join(u), ",".join(v)
        b = max(0.0, (single[nu] + single[nv] - (times[nu + "+" + nv] - base)) / 2)
        edges.append((u[0], v[0], b))
        unit_edges[nu] += b
        unit_edges[nv] += b
    table: dict[str, dict[int, float]] = {}
    for u in units:
        c = single[",".join(u)] - unit_edges[",".join(u)]
        sizes = {k: floats[k].weight.numel() for k in u}
        for k in u:
            share = c * sizes[k] / sum(sizes.values())
            table[k] = {int(b): (share if b >= 16 else 0.0) for b in bits}
    record = {"method": "in-context", "unit": unit, "units": len(units), "exports": len(todo),
              "int8_ms": base, "whole_fp32_ms": times["fp32"],
              "variants_ms": {n: v for n, v in times.items() if n not in ("int8", "fp32")}}  # fmt: skip
    return table, base, tuple(edges), record


#: ``unit="auto"``: the most exports a per-layer table may take (int8 graph, one variant per
#: unit, one per neighbouring pair) before blocks are timed instead. A ResNet-20's 16 units take
#: 32; MiniLM's 36 Linears would take 72 exports of a 90 MB model.
MAX_LAYER_EXPORTS = 40


def block_units(model: nn.Module, layers: Sequence[str]) -> list[list[str]]:
    """``layers`` grouped by block: the item of the innermost ``nn.ModuleList`` or
    ``nn.Sequential`` that holds more than one of them (an encoder layer's Linears, a ResNet
    block's convs). A layer in no such item is a unit of its own.

    Example:
        >>> net = nn.Sequential(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), nn.Linear(4, 2))
        >>> block_units(net, ["0.0", "0.1", "1"])
        [['0.0', '0.1'], ['1']]
    """
    containers = [
        fqn for fqn, m in model.named_modules() if isinstance(m, nn.ModuleList | nn.Sequential)
    ]
    blocks: dict[str, list[str]] = {}
    for k in layers:
        best = k
        for c in containers:
            prefix = f"{c}." if c else ""
            if not k.startswith(prefix):
                continue
            item = prefix + k[len(prefix) :].split(".")[0]
            inside = [x for x in layers if x == item or x.startswith(item + ".")]
            if len(inside) > 1 and len(item) > (0 if best == k else len(best)):
                best = item
        blocks.setdefault(best, []).append(k)
    return list(blocks.values())


def _merged(groups: list[list[str]]) -> list[list[str]]:
    """Groups that share a layer joined into one (order of first appearance kept)."""
    out: list[list[str]] = []
    for g in groups:
        hit = [u for u in out if set(u) & set(g)]
        joined = [k for u in hit for k in u] + [k for k in g if not any(k in u for u in hit)]
        out = [u for u in out if u not in hit] + [joined]
    return out


def _first_calls(
    model: nn.Module, example: Any, layers: dict[str, nn.Module]
) -> dict[str, tuple[int, torch.Tensor]]:
    """{layer: (the position of its first call, its first input)} when ``model`` runs
    ``example`` in eval mode (restored afterwards)."""
    seen: dict[str, tuple[int, torch.Tensor]] = {}

    def grab(fqn: str) -> Any:
        def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:  # None: the input passes unchanged
            seen.setdefault(fqn, (len(seen), args[0].detach().clone()))

        return hook

    handles = [m.register_forward_pre_hook(grab(k)) for k, m in layers.items()]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            forward(model, example)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return seen


def _exported_session(qmodel: nn.Module, path: Any, example: Any, requantize: bool, threads: int):
    """An ONNX Runtime session of ``qmodel`` exported to ``path`` as ``squeezer export`` does,
    with its weight codes chosen as ``squeezer export`` chooses them: where the choice depends on
    the check (x86 without VNNI, :func:`~squeezer.export.onnx.weight_code_forms`) the file is
    checked on ``example``, and one that fails in both forms is timed in the last (uint8)."""
    from .errors import ExportError
    from .export import export_float_onnx, export_onnx, ort_session
    from .export.onnx import weight_code_forms
    from .quant.modules import QuantMixin

    if not any(isinstance(m, QuantMixin) for m in qmodel.modules()):  # a plan all in float
        return ort_session(export_float_onnx(qmodel, example), threads=threads)
    forms = weight_code_forms("auto", qmodel=qmodel)  # int8 unchecked if nothing can saturate
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            export_onnx(copy_model(qmodel).eval(), path, example, verify=len(forms) > 1,
                        requantize=requantize, threads=threads)  # fmt: skip
        except ExportError:  # no form agrees on this example: time the saturation-free one
            export_onnx(copy_model(qmodel).eval(), path, example, verify=False,
                        requantize=requantize, threads=threads, weight_codes=forms[-1])  # fmt: skip
    return ort_session(path, threads=threads)


def exported_latency(
    qmodel: nn.Module, example: Any, *, threads: int = 1, runs: int = 50, requantize: bool = True
) -> float:
    """Median ms of ``qmodel`` exported to ONNX (as ``squeezer export`` does) in ONNX Runtime on
    ``example``: what a latency budget is checked against."""
    import tempfile
    from pathlib import Path

    from .export import ort_feeds

    with tempfile.TemporaryDirectory() as tmp:
        sess = _exported_session(qmodel, Path(tmp) / "plan.onnx", example, requantize, threads)
        feeds = ort_feeds(example, sess)
        return measure.time_calls({"q": lambda: sess.run(None, feeds)}, runs=runs)["q"].median_ms


def fit_to_latency(
    chosen: Any,
    target_ms: float,
    solve: Any,
    build: Any,
    example: Any,
    *,
    threads: int = 1,
    runs: int = 50,
    tries: int = 3,
    floor_ms: float | None = None,
) -> Any:
    """A plan checked on the runtime: ``chosen`` (a :class:`~squeezer.config.Plan` the table
    predicts within ``target_ms``) is built (``build(plan)`` → quantized model), exported and
    timed (:func:`exported_latency`); while it runs over the target, or more than 10% under it,
    the latency cap is scaled by target / measured and ``solve(cap)`` plans again, at most
    ``tries`` exports in all. ``floor_ms``, the table's fastest plan, bounds the cap from below:
    a table that under-counts by more than the budget's headroom would otherwise scale the cap
    below every plan and stop, where the fastest plan is still worth a check. Returned: the
    slowest plan that met the target (the least loss for its time), else the fastest one tried,
    with ``meta["measured_latency_ms"]`` and every check in ``meta["latency_checks"]``."""
    from .config import Plan
    from .errors import InfeasibleBudgetError

    cap, checks, tried = target_ms, [], []
    for _ in range(tries):
        ms = exported_latency(build(chosen), example, threads=threads, runs=runs)
        checks.append({"cap_ms": cap, "predicted_ms": chosen.meta["achieved"]["latency_ms"],
                       "measured_ms": ms})  # fmt: skip
        tried.append((ms, chosen))
        if 0.9 * target_ms <= ms <= target_ms:
            break
        new = cap * target_ms / ms
        if floor_ms is not None:
            new = max(new, floor_ms * (1 + 1e-9))
        if new == cap:  # already at the floor: nothing faster to try
            break
        cap = new
        try:
            chosen = solve(cap)
        except InfeasibleBudgetError:
            break
    met = [mp for mp in tried if mp[0] <= target_ms]
    ms, best = max(met, key=lambda mp: mp[0]) if met else min(tried, key=lambda mp: mp[0])
    return Plan(best.layers, meta={**best.meta, "measured_latency_ms": ms, "latency_checks": checks})
