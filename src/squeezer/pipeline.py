"""The one compression chain: analyse → sensitivity → plan → quantize → evaluate.

Each stage is a function from typed inputs to a typed result that round-trips through JSON
(:class:`~squeezer.spectrum.Spectrum`, :class:`~squeezer.sensitivity.Sensitivity`,
:class:`~squeezer.costs.Costs`, :class:`~squeezer.config.Plan`, :class:`Evaluation`). What differs
between runs is a registered handler, never a second chain:

- the **layer template** of the model family (:mod:`squeezer.templates`: per-channel CNNs and any
  other model, Q-BERT's groups for BERT-family encoders) says how each layer is quantized, which
  widths the planner may choose and how the Hessian analysis runs;
- the **calibration source** (:data:`CALIBRATION_SOURCES`: ``"real"`` data, or ``"zeroshot"``
  ZeroQ distilled inputs) gives the activation calibration batches and the sensitivity method
  (Hessian trace, or KL divergence on the distilled inputs);
- the **data set** (:class:`~squeezer.data.Dataset`, :class:`~squeezer.text.TokenDataset`) knows
  how to batch itself for calibration, analysis and evaluation.

Re-planning (:func:`replan`) re-runs the stages after ``sensitivity`` from a saved
:class:`Analysis`, for every kind of run. Every entry point first splits the model's
``nn.MultiheadAttention`` into Linear layers (:func:`squeezer.graph.split_attention`; a copy), so
every stage sees the layers :func:`squeezer.quantize` quantizes; ``Result.model`` is that split
float model. The caller's model is never modified.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from .budget import Budget
from .calibration import CALIBRATION_SOURCES, Calibration, register_calibration, source
from .config import Plan
from .costs import Costs, plan_costs
from .data import Dataset, forward, mean_loss
from .errors import ConfigError
from .evaluation import layer_table as layer_table
from .evaluation import test_metrics as test_metrics
from .graph import float_weights, quantizable_layers, split_attention
from .measure import average_bits, bops, latency, model_bytes, profile_layers
from .plan import FrontierPoint, pareto_frontier, plan
from .quant.apply import quantize
from .quant.bias_correction import default_bias_correction as default_bias_correction
from .sensitivity import Sensitivity, sensitivity
from .spectrum import Spectrum, analyze
from .templates import LayerTemplate, template_for, uniform_plan, with_bits

__all__ = [
    "CALIBRATION_SOURCES", "Analysis", "Calibration", "Evaluation", "Result", "analyse",
    "analysis_for", "apply", "apply_plan", "choose_plan", "compress", "register_calibration", "replan",
    "uniform_plan", "LatencyOptions", "with_latency", "default_bias_correction",
]  # fmt: skip

# --------------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class Evaluation:
    """One evaluated model variant (a row of the report's variants table)."""

    name: str
    metric: float | None
    size_bytes: float
    avg_bits: float
    bops: float
    latency_ms: float | None = None
    #: whole-set metrics of tasks that have them (e.g. Spearman and top-10 for embeddings)
    extra: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = {
            "name": self.name,
            "metric": self.metric,
            "size_bytes": self.size_bytes,
            "avg_bits": self.avg_bits,
            "bops": self.bops,
            **self.extra,
        }
        if self.latency_ms is not None:
            d["latency_ms"] = self.latency_ms
        return d


@dataclass(frozen=True)
class Analysis:
    """What re-planning needs, all plain data: the spectrum (None for zero-shot runs), the
    sensitivity, the cost tables, the Pareto frontier, the ties, the per-layer template and the
    name of the template it came from."""

    spectrum: Spectrum | None
    sensitivity: Sensitivity
    costs: Costs
    frontier: list[FrontierPoint]
    ties: tuple[tuple[str, ...], ...] = ()
    template: Plan | None = None
    template_name: str = "default"


@dataclass(frozen=True)
class Result:
    """What one compression run produced (built once, by :func:`compress` or :func:`replan`)."""

    model: nn.Module
    qmodel: nn.Module
    plan: Plan
    before: Evaluation
    after: Evaluation
    variants: list[Evaluation]
    layers: list[dict[str, Any]]
    timings: dict[str, float]
    extras: dict[str, Any] = field(default_factory=dict)
    analysis: Analysis | None = None
    calib_inputs: list[torch.Tensor] | None = None  # the distilled inputs of a zero-shot run

    def metrics(self, data: Dataset | None) -> dict[str, Any]:
        """The ``metrics.json`` document."""
        return {
            "metric_name": data.task.metric_name if data is not None else None,
            "higher_is_better": data.task.higher_is_better if data is not None else None,
            "data": data.name if data is not None else None,
            "before": self.before.to_dict(),
            "after": self.after.to_dict(),
            "variants": [v.to_dict() for v in self.variants],
            "layers": self.layers,
            "float_layers": self.float_layers(),
            **self.extras,
        }

    def float_layers(self) -> dict[str, dict[str, Any]]:
        """Layers whose weights stay in float (types squeezer does not quantize), largest first."""
        fw = sorted(float_weights(self.model).items(), key=lambda kv: -kv[1][1])
        return {k: {"type": t, "weights": n} for k, (t, n) in fw}


# --------------------------------------------------------------------------------------------------
# Stages


def with_analysis(
    template: LayerTemplate, batch_size: int | None = None, probes: int | None = None
) -> LayerTemplate:
    """``template`` with its analysis run in batches of ``batch_size`` samples and at most
    ``probes`` Hutchinson probes (None keeps the template's)."""
    s = template.analysis
    if batch_size is not None:
        s = replace(s, batch_size=int(batch_size))
    if probes is not None:
        s = replace(s, max_probes=int(probes), min_probes=min(s.min_probes, int(probes)))
    return template if s is template.analysis else replace(template, analysis=s)


def analyse(
    model: nn.Module,
    data: Dataset,
    template: LayerTemplate,
    *,
    samples: int | None = None,
    seed: int = 0,
    progress: bool = False,
) -> Spectrum:
    """The Hessian analysis the planner needs: per-layer traces (Hutchinson) of the task loss on
    ``samples`` training samples (default: the template's), run as ``template.analysis`` says.
    For a labels-free task (targets are the model's own outputs) the targets are recomputed on
    the very batches analysed, so the loss and its gradient are zero at the float model."""
    s = template.analysis
    batches = data.analysis_batches(samples or s.samples, batch_size=s.batch_size, seed=seed)
    if data.task.targets_from_model:
        batches = _own_outputs(model, batches)
    params = None
    if s.weights_only:
        weights = {id(m.weight) for m in quantizable_layers(model).values()}
        params = [n for n, p in model.named_parameters() if id(p) in weights]
    return analyze(
        model,
        data.task.loss,
        batches,
        params=params,
        top_k=s.top_k,
        per_layer_eig=False,
        max_probes=s.max_probes,
        min_probes=s.min_probes,
        rel_stderr=s.rel_stderr,
        probe_batch=s.probe_batch,
        seed=seed,
        progress=progress,
    )


@torch.no_grad()
def _own_outputs(model: nn.Module, batches: Any) -> list[tuple[Any, torch.Tensor]]:
    was = model.training
    model.eval()
    try:
        return [(x, forward(model, x).float()) for x, _ in batches]
    finally:
        model.train(was)


def analysis_for(
    model: nn.Module,
    data: Dataset | None,
    calibration: Calibration,
    template: LayerTemplate,
    *,
    act_bits: int | None = 8,
    samples: int | None = None,
    seed: int = 0,
    progress: bool = False,
) -> Analysis:
    """Spectrum (if the sensitivity method needs one) → sensitivity Ω_i(b) with each layer's own
    quantizer → cost tables → ties → Pareto frontier."""
    model = split_attention(model)
    tpl = template.mixed(model, act_bits)
    spectrum = None
    if calibration.method in ("trace", "eigen"):
        if data is None:
            raise ConfigError(f"the {calibration.method!r} sensitivity needs data to analyse")
        spectrum = analyse(model, data, template, samples=samples, seed=seed, progress=progress)
    sens = sensitivity(
        model,
        spectrum,
        bits=template.bits,
        method=calibration.method,
        template=tpl,
        data=None if spectrum is not None else calibration.batches,
    )
    costs = plan_costs(model, template.bits, example=calibration.example, template=tpl)
    ties = template.ties(model)
    frontier = pareto_frontier(sens, costs, ties=ties)
    return Analysis(spectrum, sens, costs, frontier, ties, tpl, template.name)


@dataclass(frozen=True)
class LatencyOptions:
    """Where latency budgets are measured: ``backend`` ("onnxruntime", or "proxy": PyTorch float
    time × bits / 32), ``threads`` and timed ``runs`` per measurement."""

    backend: str = "onnxruntime"
    threads: int = 1
    runs: int = 50


def with_latency(
    model: nn.Module, analysis: Analysis, calibration: Calibration, options: LatencyOptions
) -> Analysis:
    """The analysis with a measured latency table in its costs (HAWQ-V3's per-layer lookup table)
    and float (32 bits, Ω = 0) as one more choice for every layer: on runtimes without sub-byte
    kernels every width ≤ 8 costs the same, so what a latency budget trades is which layers run in
    int8 and which stay in float. On ONNX Runtime the table is measured on the exported int8 model
    and its one-layer-in-float variants (:func:`~squeezer.layer_timing.context_latency_costs`);
    the proxy backend times layers alone in PyTorch. Measured once; the run folder keeps it."""
    from .layer_timing import context_latency_costs, float_sum, latency_costs

    model = split_attention(model)
    sens = analysis.sensitivity.with_float_width(32)
    example = calibration.example
    if options.backend == "onnxruntime":
        top = max(b for b in sens.bits if b <= 8)  # the integer graph: the widest integer width
        int8 = plan(sens, Budget(bits=8), costs=analysis.costs, ties=analysis.ties,
                    template=analysis.template, pin=dict.fromkeys(sens.layers, top))  # fmt: skip
        qmodel = quantize(model, int8, calib=calibration.batches)
        table, fixed, edges, record = context_latency_costs(
            model, qmodel, example, sens.bits, sens.layers, groups=analysis.ties,
            threads=options.threads, runs=options.runs,
        )  # fmt: skip
    else:
        table, fixed, whole = latency_costs(model, example, sens.bits, backend=options.backend,
                                            threads=options.threads, runs=options.runs)  # fmt: skip
        record = {"method": "isolated", "whole_fp32_ms": whole, "layers_fp32_ms": float_sum(table)}
        edges = ()
    tpl = analysis.template if analysis.template is not None else analysis.costs.template
    costs = plan_costs(model, sens.bits, example=example, template=tpl, latency=table,
                       fixed_latency_ms=fixed)  # fmt: skip
    record = {"backend": options.backend, "threads": options.threads, "runs": options.runs,
              **record}  # fmt: skip
    costs = replace(costs, latency_edges=edges, meta={**costs.meta, "latency": record})
    frontier = pareto_frontier(sens, costs, ties=analysis.ties)
    return replace(analysis, sensitivity=sens, costs=costs, frontier=frontier)


def _needs_latency(analysis: Analysis, budget: Budget, options: LatencyOptions) -> bool:
    """A latency budget on an analysis without a table measured the way ``options`` say."""
    if "latency_ms" not in budget.limits():
        return False
    rec = analysis.costs.meta.get("latency") or {}
    return not analysis.costs.available("latency_ms") or (
        rec.get("backend"), rec.get("threads")) != (options.backend, options.threads)  # fmt: skip


def choose_plan(analysis: Analysis, budget: Budget, *, label: str = "Hessian mixed") -> Plan:
    """The ILP's plan for ``budget`` from an :class:`Analysis` (no model needed: milliseconds)."""
    p = plan(
        analysis.sensitivity,
        budget,
        costs=analysis.costs,
        ties=analysis.ties,
        template=analysis.template,
    )
    meta = {**p.meta, "template": analysis.template_name, "name": f"{label} ({budget})"}
    return Plan(p.layers, meta=meta)


def fit_latency(
    model: nn.Module,
    analysis: Analysis,
    calibration: Calibration,
    budget: Budget,
    chosen: Plan,
    options: LatencyOptions,
    *,
    label: str,
) -> Plan:
    """``chosen``, checked on ONNX Runtime when ``budget`` holds an absolute latency
    (:func:`~squeezer.layer_timing.fit_to_latency`)."""
    from .layer_timing import fit_to_latency

    target = budget.limits().get("latency_ms")
    if target is None or "latency_ms" in budget.relative or options.backend != "onnxruntime":
        return chosen
    costs = analysis.costs
    floor = costs.fixed("latency_ms") + sum(min(t.values()) for t in costs.latency_ms.values())
    best = fit_to_latency(
        chosen, target, lambda cap: choose_plan(analysis, replace(budget, latency_ms=cap)),
        lambda p: quantize(model, p, calib=calibration.batches), calibration.example,
        threads=options.threads, runs=options.runs, floor_ms=floor,
    )  # fmt: skip
    return Plan(
        best.layers, meta={**best.meta, "name": f"{label} ({budget})", "budget": str(budget)}
    )


def uniform_for(model: nn.Module, template: LayerTemplate, budget: Budget, act_bits: int | None):
    """The template's uniform plan for a whole ``bits=N`` budget (and nothing else)."""
    b = budget.whole_bits
    if b is None:
        raise ConfigError(
            f"--method uniform takes a whole number of bits (e.g. --budget bits=4), got {budget}; "
            "use the default --method hessian for size, BOPs or latency budgets"
        )
    p = template.uniform(model, b, act_bits)
    return Plan(p.layers, meta={**p.meta, "budget": str(budget), "template": template.name})


def apply(
    model: nn.Module,
    data: Dataset | None,
    plan: Plan,
    calibration: Calibration,
    *,
    extra_variants: tuple[Plan, ...] = (),
    loss_samples: int = 512,
    seed: int = 0,
    bias_correction: bool | None = None,
) -> Result:
    """Quantize ``model`` by ``plan`` (activation ranges from ``calibration``) and evaluate it,
    the float model and any extra variants on ``data``'s test split (sizes and BOPs only when
    there is no data). ``bias_correction`` (None: :func:`default_bias_correction`) then corrects
    each layer's bias on the calibration batches (:mod:`squeezer.quant.bias_correction`).

    The loss increase is measured twice: on the test split, and on the ``loss_samples`` training
    samples a Hessian analysis averages over, which is the increase the plan's ΣΩ predicts."""
    model = split_attention(model)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    example = data.example(1) if data is not None else calibration.example
    profiles = profile_layers(model, example)
    before = _evaluate("FP32", model, model, None, data, profiles)
    if data is not None:
        before = replace(before, latency_ms=latency(model, example, warmup=3, runs=20).median_ms)
    timings["measure_fp32"] = time.perf_counter() - t

    t = time.perf_counter()
    qmodel = quantize(model, plan, calib=calibration.batches)
    timings["quantize"] = time.perf_counter() - t
    if bias_correction is None:
        bias_correction = default_bias_correction(model)
    corrected: dict[str, Any] = {"enabled": bool(bias_correction)}
    if bias_correction:
        from .quant.bias_correction import correct_bias

        t = time.perf_counter()
        corrected["layers"] = len(correct_bias(qmodel, calibration.batches))
        timings["bias_correction"] = time.perf_counter() - t

    t = time.perf_counter()
    after = _evaluate(plan.meta.get("name", "compressed"), model, qmodel, plan, data, profiles)
    variants = [before, after]
    for p in extra_variants:
        qm = quantize(model, p, calib=calibration.batches, bias_correction=bias_correction)
        variants.append(_evaluate(p.meta.get("name", "variant"), model, qm, p, data, profiles))
    extras = {**calibration.record, "bias_correction": corrected}
    if data is not None:
        extras["loss"] = _loss_increase(model, qmodel, data, loss_samples, seed, plan)
    timings["evaluate"] = time.perf_counter() - t
    return Result(
        model=model,
        qmodel=qmodel,
        plan=plan,
        before=before,
        after=after,
        variants=variants,
        layers=layer_table(model, qmodel, plan, profiles),
        timings=timings,
        extras=extras,
        calib_inputs=calibration.inputs,
    )


def _loss_increase(model, qmodel, data: Dataset, samples: int, seed: int, plan: Plan) -> dict:
    test = data.test_batches()
    seen = data.analysis_batches(samples, seed=seed)
    out = {"fp32": mean_loss(model, test, data.task), "after": mean_loss(qmodel, test, data.task)}
    out["increase"] = out["after"] - out["fp32"]
    out["train_fp32"] = mean_loss(model, seen, data.task)
    out["train_after"] = mean_loss(qmodel, seen, data.task)
    out["train_increase"] = out["train_after"] - out["train_fp32"]
    if "predicted_omega" in plan.meta:
        out["predicted_increase"] = plan.meta["predicted_omega"]
    return out


# --------------------------------------------------------------------------------------------------
# The chain


def compress(
    model: nn.Module,
    data: Dataset | None,
    budget: Budget | str,
    *,
    method: str = "hessian",
    calib: str = "real",
    act_bits: int | None = 8,
    hessian_samples: int | None = None,
    hessian_batch_size: int | None = None,
    hessian_probes: int | None = None,
    extra_variants: tuple[Plan, ...] = (),
    template: str | None = None,
    bits: tuple[int, ...] | None = None,
    latency: LatencyOptions | None = None,
    bias_correction: bool | None = None,
    seed: int = 0,
    progress: bool = False,
    **calib_options: Any,
) -> Result:
    """Quantize ``model`` to meet ``budget`` and evaluate the result.

    Args:
        model: the float model (not modified).
        data: a :class:`~squeezer.data.Dataset`: calibration and analysis on its training split,
            evaluation on its test split. With ``calib="zeroshot"`` it is used for evaluation only
            and may be None.
        budget: a :class:`~squeezer.budget.Budget` or its text (``"bits=4.5"``, ``"size=40kB"``).
        method: ``"hessian"`` (default): per-layer widths from the sensitivity and the exact
            integer program; ``"uniform"``: every layer at a whole ``bits=N`` budget.
        calib: a key of :data:`CALIBRATION_SOURCES`: ``"real"`` (default) or ``"zeroshot"``.
        act_bits: activation bits (None: float activations).
        hessian_samples: training samples the Hessian averages over (default: the template's).
        hessian_batch_size: samples per Hessian-vector product batch (default: the template's;
            lower it when a large model's analysis runs out of memory).
        hessian_probes: most Hutchinson probes per trace (default: the template's).
        extra_variants: more plans to quantize and evaluate beside the chosen one.
        template: a layer template name (default: the one matching the model); it must match
            the model. The run records it, so a re-plan quantizes the same way.
        bits: the planner's candidate integer widths, each 2..8 (default: the template's); the
            saved sensitivity keeps them, so a re-plan chooses among the same.
        latency: how a latency budget's per-layer table is measured (default: ONNX Runtime, one
            thread); measured only when ``budget`` limits latency.
        bias_correction: correct each quantized layer's bias for its mean output error on the
            calibration batches (Nagel et al. 2019); None: on for conv nets
            (:func:`default_bias_correction`).
        seed: seeds the analysis probes and the distillation.
        progress: progress bars on stderr.
        **calib_options: for the calibration source (``samples``, ``input_shape`` for zeroshot).

    Example:
        >>> from squeezer.data import load_data
        >>> from squeezer.zoo import create
        >>> r = compress(create("digits_cnn"), load_data("digits"), "bits=4")  # doctest: +SKIP
    """
    budget = Budget.parse(budget) if isinstance(budget, str) else budget
    if method not in ("hessian", "uniform"):
        raise ConfigError(f"unknown method {method!r}; use 'hessian' or 'uniform'")
    model = split_attention(model)
    tpl = with_analysis(template_for(model, template), hessian_batch_size, hessian_probes)
    tpl = with_bits(tpl, bits)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    calibration = source(calib)(
        model, data, act_bits=act_bits, seed=seed, progress=progress, **calib_options
    )
    timings["calibrate_inputs"] = time.perf_counter() - t
    analysis = None
    t = time.perf_counter()
    if method == "uniform":
        chosen = uniform_for(model, tpl, budget, act_bits)
    else:
        analysis = analysis_for(
            model, data, calibration, tpl, act_bits=act_bits, samples=hessian_samples,
            seed=seed, progress=progress,
        )  # fmt: skip
        if _needs_latency(analysis, budget, latency or LatencyOptions()):
            analysis = with_latency(model, analysis, calibration, latency or LatencyOptions())
        timings["analyze"] = time.perf_counter() - t
        t = time.perf_counter()
        chosen = choose_plan(analysis, budget, label=calibration.label or tpl.label)
        chosen = fit_latency(model, analysis, calibration, budget, chosen,
                             latency or LatencyOptions(), label=calibration.label or tpl.label)  # fmt: skip
    timings["plan"] = time.perf_counter() - t
    res = apply(
        model, data, chosen, calibration, extra_variants=extra_variants,
        loss_samples=hessian_samples or tpl.analysis.samples, seed=seed,
        bias_correction=bias_correction,
    )  # fmt: skip
    return replace(res, timings={**timings, **res.timings}, analysis=analysis)


def replan(
    model: nn.Module,
    data: Dataset | None,
    analysis: Analysis,
    budget: Budget | str,
    *,
    calib: str = "real",
    calib_inputs: list[torch.Tensor] | None = None,
    act_bits: int | None = 8,
    latency: LatencyOptions | None = None,
    bias_correction: bool | None = None,
    seed: int = 0,
) -> Result:
    """The stages after ``sensitivity`` again, for a new ``budget``, from a saved
    :class:`Analysis` (no Hessian work). A zero-shot run passes its saved distilled inputs as
    ``calib_inputs``, so it calibrates on exactly the same data. A latency budget on a run
    without a latency table (or one measured otherwise) measures it first, once."""
    budget = Budget.parse(budget) if isinstance(budget, str) else budget
    model = split_attention(model)
    t = time.perf_counter()
    calibration = source(calib)(model, data, act_bits=act_bits, seed=seed, saved=calib_inputs)
    if _needs_latency(analysis, budget, latency or LatencyOptions()):
        analysis = with_latency(model, analysis, calibration, latency or LatencyOptions())
    tpl = template_for(model, analysis.template_name)
    chosen = choose_plan(analysis, budget, label=calibration.label or tpl.label)
    chosen = fit_latency(model, analysis, calibration, budget, chosen, latency or LatencyOptions(),
                         label=calibration.label or tpl.label)  # fmt: skip
    t_plan = time.perf_counter() - t
    res = apply(model, data, chosen, calibration, loss_samples=tpl.analysis.samples, seed=seed,
                bias_correction=bias_correction)  # fmt: skip
    return replace(res, timings={"plan": t_plan, **res.timings}, analysis=analysis)


def apply_plan(
    model: nn.Module,
    data: Dataset | None,
    chosen: Plan,
    *,
    calib: str = "real",
    calib_inputs: list[torch.Tensor] | None = None,
    act_bits: int | None = 8,
    seed: int = 0,
    template: str | None = None,
    bias_correction: bool | None = None,
) -> Result:
    """Quantize by a given plan (e.g. an edited plan.json) and evaluate, calibrating as ``calib``
    says (a zero-shot run on its saved ``calib_inputs``)."""
    model = split_attention(model)
    calibration = source(calib)(model, data, act_bits=act_bits, seed=seed, saved=calib_inputs)
    samples = template_for(model, template).analysis.samples
    return apply(model, data, chosen, calibration, loss_samples=samples, seed=seed,
                 bias_correction=bias_correction)  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Evaluation


def _evaluate(
    name: str,
    model: nn.Module,
    qmodel: nn.Module,
    plan: Plan | None,
    data: Dataset | None,
    profiles: dict,
) -> Evaluation:
    """Metric (None without data), size, average bits and BOPs of one (quantized) model."""
    metric, extra = (None, {}) if data is None else test_metrics(qmodel, data)
    return Evaluation(
        name=name,
        metric=metric,
        size_bytes=model_bytes(model, plan),
        avg_bits=average_bits(model, plan) if plan else 32.0,
        bops=sum(bops(profiles, plan).values()),
        extra=extra,
    )
