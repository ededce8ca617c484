"""The main job as an API: measure the float model, choose a plan, quantize, evaluate, and collect
everything the run folder and report need. The CLI is a thin layer over these functions.

Each entry point first splits the model's ``nn.MultiheadAttention`` into Linear layers
(:func:`squeezer.graph.split_attention`; a copy, and only if there is any), so every stage sees
the layers :func:`squeezer.quantize` quantizes, and ``Result.model`` is that split float model."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from .config import Budget, LayerQuant, Plan, QuantConfig
from .data import Batches, Dataset, evaluate, forward, mean_loss
from .errors import ConfigError
from .graph import float_weights, quantizable_layers, split_attention
from .measure import average_bits, bops, latency, model_bytes, profile_layers
from .quant.apply import quantize
from .quant.modules import QuantMixin

#: Samples of the training split used to calibrate activation ranges.
CALIB_SAMPLES = 512
#: Training samples the Hessian analysis of a tensor-input model averages over (and the loss
#: increase next to ΣΩ is measured on).
HESSIAN_SAMPLES = 512


@dataclass
class Evaluation:
    """One evaluated model variant (a row of the report's variants table)."""

    name: str
    metric: float | None
    size_bytes: float
    avg_bits: float
    bops: float
    plan: Plan | None = None
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


@dataclass
class Result:
    """What one compression run produced."""

    model: nn.Module
    qmodel: nn.Module
    plan: Plan
    before: Evaluation
    after: Evaluation
    variants: list[Evaluation] = field(default_factory=list)
    layers: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)
    analysis: Any = None
    calib_inputs: list[torch.Tensor] | None = None  # distilled inputs of a zero-shot run

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


def calibration_batches(data: Dataset, samples: int = CALIB_SAMPLES, batch: int = 128) -> Any:
    """A fixed, seeded subset of the training split for activation calibration. Token inputs are
    cut to each batch's longest sentence: padding positions would otherwise widen the ranges."""
    if is_token_data(data):
        from .qbert import token_batches

        g = torch.Generator().manual_seed(1234)
        n = batch_size_of_split(data)
        idx = torch.randperm(n, generator=g)[: min(samples, n)]
        return token_batches({k: v[idx] for k, v in data.x_train.items()}, data.y_train[idx], 32)
    return Batches(data.x_train, data.y_train, batch, shuffle=True, seed=1234, limit=samples)


def is_token_data(data: Dataset) -> bool:
    """True for tokenized text (dict inputs with an attention mask)."""
    return isinstance(data.x_train, dict) and "attention_mask" in data.x_train


def hessian_batches(data: Dataset, samples: int = HESSIAN_SAMPLES, seed: int = 0) -> Any:
    """The training samples the Hessian analysis averages over: a seeded subset of ``samples``
    for tensor data (as :func:`analyze_for_plan` draws them), the first
    :data:`squeezer.qbert.HESSIAN_SAMPLES` sentences for token data (as
    :func:`squeezer.qbert.encoder_plan` takes them). The loss increase measured here is what the
    predicted ΣΩ estimates."""
    if is_token_data(data):
        from .qbert import HESSIAN_SAMPLES as n_sentences
        from .qbert import token_batches

        n = min(n_sentences, batch_size_of_split(data))
        return token_batches({k: v[:n] for k, v in data.x_train.items()}, data.y_train[:n], 32)
    n = min(samples, batch_size_of_split(data))
    return Batches(data.x_train, data.y_train, 128, shuffle=True, seed=seed, limit=n)


def test_batches(data: Dataset) -> Any:
    """Evaluation batches: the test split, with token inputs cut to each batch's longest sentence
    (the outputs are the same; the compute is a fraction)."""
    if is_token_data(data):
        from .qbert import token_batches

        return token_batches(data.x_test, data.y_test, 64)
    return data.test_batches()


def example_input(data: Dataset, n: int = 1) -> Any:
    x = data.x_test
    if isinstance(x, dict):
        return {k: v[:n] for k, v in x.items()}
    return x[:n]


def uniform_plan(
    model: nn.Module,
    bits: int,
    *,
    act_bits: int | None = 8,
    granularity: str = "channel",
    group_size: int | None = None,
) -> Plan:
    """Every quantizable layer at ``bits`` (per-channel by default) with ``act_bits`` activations.

    Embeddings get no activation quantizer (their inputs are indices)."""
    model = split_attention(model)
    layers = quantizable_layers(model)
    base = LayerQuant(bits=bits, granularity=granularity, group_size=group_size, act_bits=act_bits)
    plan = QuantConfig(base).to_plan(model)
    specs = {
        k: (replace(v, act_bits=None) if isinstance(layers[k], nn.Embedding) else v)
        for k, v in plan.layers.items()
    }
    name = f"W{bits}A{act_bits}" if act_bits else f"W{bits}"
    return Plan(specs, meta={"method": "uniform", "bits": bits, "act_bits": act_bits, "name": name})


def evaluate_variant(
    name: str, model: nn.Module, qmodel: nn.Module, plan: Plan | None, data: Dataset, profiles: dict
) -> Evaluation:
    """Metric, size, average bits and BOPs of one (quantized) model."""
    return Evaluation(
        name=name,
        metric=evaluate(qmodel, test_batches(data), data.task),
        size_bytes=model_bytes(model, plan),
        avg_bits=average_bits(model, plan) if plan else 32.0,
        bops=sum(bops(profiles, plan).values()),
        plan=plan,
        extra=whole_set_metrics(qmodel, data),
    )


@torch.no_grad()
def whole_set_metrics(model: nn.Module, data: Dataset) -> dict[str, float]:
    """Metrics that need every test output at once, for tasks that define ``metrics``."""
    task_metrics = getattr(data.task, "metrics", None)
    if task_metrics is None:
        return {}
    was_training = model.training
    model.eval()
    try:
        pairs = [(forward(model, x), y) for x, y in test_batches(data)]
    finally:
        model.train(was_training)
    outs = torch.cat([o for o, _ in pairs])
    targets = torch.cat([y for _, y in pairs])
    return {k: float(v) for k, v in task_metrics(outs, targets).items()}


@torch.no_grad()
def layer_table(model: nn.Module, qmodel: nn.Module, plan: Plan, profiles: dict) -> list[dict]:
    """Per-layer rows: FQN, type, params, MACs, bits, activation bits, ‖Q(W) − W‖/‖W‖."""
    qlayers = dict(qmodel.named_modules())
    rows = []
    for fqn, prof in profiles.items():
        spec = plan.layers.get(fqn)
        q = qlayers.get(fqn)
        rel = None
        if isinstance(q, QuantMixin):
            w = q.weight
            rel = float((q.qweight() - w).norm() / w.norm().clamp_min(1e-30))
        rows.append(
            {
                "fqn": fqn,
                "type": prof.type,
                "params": prof.params,
                "macs": prof.macs,
                "bits": spec.bits if spec else 32,
                "act_bits": spec.act_bits if spec else None,
                "rel_error": rel,
            }
        )
    return rows


@dataclass
class Analysis:
    """The Hessian side of a run: spectrum, sensitivity, costs and the frontier (all JSON-able)."""

    spectrum: Any
    sensitivity: Any
    costs: Any
    frontier: list[Any]
    ties: tuple[tuple[str, ...], ...] = ()


#: Candidate weight bit-widths of the planner.
PLAN_BITS = (2, 3, 4, 8)


def template_for(act_bits: int | None) -> LayerQuant:
    """The per-layer settings every planned layer shares (only ``bits`` varies)."""
    return LayerQuant(bits=8, granularity="channel", act_bits=act_bits)


def analyze_for_plan(
    model: nn.Module,
    data: Dataset,
    *,
    act_bits: int | None = 8,
    bits: tuple[int, ...] = PLAN_BITS,
    samples: int = HESSIAN_SAMPLES,
    seed: int = 0,
    progress: bool = False,
) -> Analysis:
    """Hessian traces per layer → HAWQ-V2 sensitivity Ω_i(b) → costs per (layer, bits) → frontier."""
    from .plan import pareto_frontier, plan_costs, residual_ties
    from .sensitivity import sensitivity
    from .spectrum import analyze

    model = split_attention(model)
    template = template_for(act_bits)
    spectrum = analyze(
        model,
        data.task.loss,
        hessian_batches(data, samples, seed),
        top_k=1,
        per_layer_eig=False,
        max_probes=100,
        rel_stderr=0.05,
        seed=seed,
        progress=progress,
    )
    sens = sensitivity(
        model,
        spectrum,
        bits=bits,
        method="trace",
        granularity=template.granularity,
        group_size=template.group_size,
    )
    costs = plan_costs(model, bits, example=example_input(data, 1), template=template)
    ties = () if isinstance(data.x_train, dict) else _quiet_ties(model, residual_ties)
    frontier = pareto_frontier(sens, costs, ties=ties)
    return Analysis(spectrum, sens, costs, frontier, ties)


def _quiet_ties(model: nn.Module, finder) -> tuple[tuple[str, ...], ...]:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tuple(tuple(t) for t in finder(model))


def batch_size_of_split(data: Dataset) -> int:
    from .data import batch_size

    return batch_size(data.x_train)


def hessian_plan(
    analysis: Analysis, budget: Budget, act_bits: int | None, *, name: str = "Hessian mixed"
) -> Plan:
    """The ILP's plan for ``budget`` from an :class:`Analysis` (no Hessian work: milliseconds)."""
    from .plan import plan

    p = plan(
        analysis.sensitivity,
        budget,
        costs=analysis.costs,
        ties=analysis.ties,
        template=template_for(act_bits),
    )
    return Plan(p.layers, meta={**p.meta, "name": f"{name} ({budget})"})


def compress(
    model: nn.Module,
    data: Dataset,
    budget: Budget,
    *,
    act_bits: int | None = 8,
    method: str = "hessian",
    analysis: Analysis | None = None,
    extra_variants: tuple[Plan, ...] = (),
    hessian_samples: int = HESSIAN_SAMPLES,
    seed: int = 0,
    progress: bool = False,
) -> Result:
    """Quantize ``model`` to meet ``budget`` and evaluate the result.

    ``method="hessian"`` (default) runs the Hessian analysis, HAWQ-V2 sensitivity and the exact
    integer program over per-layer bit-widths; ``method="uniform"`` quantizes every layer at a whole
    ``bits=N`` budget.

    Example:
        >>> from squeezer.data import load_data
        >>> from squeezer.zoo import create
        >>> r = compress(create("digits_cnn"), load_data("digits"), Budget(bits=4))  # doctest: +SKIP
    """
    model = split_attention(model)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    if method == "uniform":
        plan = uniform_only_plan(model, budget, act_bits=act_bits, data=data)
    elif method == "hessian" and is_token_data(data) and analysis is None:
        from .qbert import encoder_plan

        enc = encoder_plan(model, data, budget, act_bits=act_bits, seed=seed, progress=progress)
        analysis = Analysis(enc.spectrum, enc.sensitivity, None, [])
        plan = Plan(enc.plan.layers, meta={**enc.plan.meta, "name": f"Q-BERT mixed ({budget})"})
    elif method == "hessian":
        if analysis is None:
            analysis = analyze_for_plan(
                model,
                data,
                act_bits=act_bits,
                samples=hessian_samples,
                seed=seed,
                progress=progress,
            )
            timings["analyze"] = time.perf_counter() - t
            t = time.perf_counter()
        plan = hessian_plan(analysis, budget, act_bits)
    else:
        raise ConfigError(f"unknown method {method!r}; use 'hessian' or 'uniform'")
    timings["plan"] = time.perf_counter() - t
    res = apply_plan(
        model,
        data,
        plan,
        extra_variants=extra_variants,
        loss_data=hessian_batches(data, hessian_samples, seed),
    )
    res.timings = {**timings, **res.timings}
    res.analysis = analysis
    return res


def apply_plan(
    model: nn.Module,
    data: Dataset,
    plan: Plan,
    *,
    calib: Any = None,
    extra_variants: tuple[Plan, ...] = (),
    loss_data: Any = None,
) -> Result:
    """Measure the float model, quantize it by ``plan`` (calibrating on ``calib``, by default a
    seeded subset of the training split), and evaluate the result and any extra variants.

    The loss increase is measured twice: on the test split, and on ``loss_data`` (by default
    :func:`hessian_batches`, the training samples the Hessian analysis saw), which is the increase
    the plan's predicted ΣΩ estimates."""
    model = split_attention(model)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    example = example_input(data, 1)
    profiles = profile_layers(model, example)
    before = evaluate_variant("FP32", model, model, None, data, profiles)
    before.latency_ms = latency(model, example, warmup=3, runs=20).median_ms
    timings["measure_fp32"] = time.perf_counter() - t

    t = time.perf_counter()
    calib = calibration_batches(data) if calib is None else calib
    qmodel = quantize(model, plan, calib=calib)
    timings["quantize"] = time.perf_counter() - t

    t = time.perf_counter()
    after = evaluate_variant(
        plan.meta.get("name", "compressed"), model, qmodel, plan, data, profiles
    )
    variants = [before, after]
    for p in extra_variants:
        qm = quantize(model, p, calib=calib)
        variants.append(
            evaluate_variant(p.meta.get("name", "variant"), model, qm, p, data, profiles)
        )
    loss_fp32 = mean_loss(model, test_batches(data), data.task)
    loss_q = mean_loss(qmodel, test_batches(data), data.task)
    seen = hessian_batches(data) if loss_data is None else loss_data
    seen_fp32, seen_q = mean_loss(model, seen, data.task), mean_loss(qmodel, seen, data.task)
    timings["evaluate"] = time.perf_counter() - t
    res = Result(
        model,
        qmodel,
        plan,
        before,
        after,
        variants,
        layer_table(model, qmodel, plan, profiles),
        timings,
    )
    res.extras["loss"] = {
        "fp32": loss_fp32,
        "after": loss_q,
        "increase": loss_q - loss_fp32,
        "train_fp32": seen_fp32,
        "train_after": seen_q,
        "train_increase": seen_q - seen_fp32,
    }
    if "predicted_omega" in plan.meta:
        res.extras["loss"]["predicted_increase"] = plan.meta["predicted_omega"]
    return res


ZEROSHOT_NAME = "zero-shot mixed"


def compress_zeroshot(
    model: nn.Module,
    budget: Budget,
    *,
    eval_data: Dataset | None = None,
    act_bits: int | None = 8,
    method: str = "kl",
    samples: int = 64,
    input_shape: tuple[int, ...] | None = None,
    seed: int = 0,
    progress: bool = False,
) -> Result:
    """Data-free compression (ZeroQ): distil inputs that match the model's BatchNorm statistics,
    rank layers by the KL divergence their quantization causes on those inputs, plan with the same
    integer program, and calibrate activations on the distilled inputs. ``eval_data``, if given,
    is used only to report the metric. With activations of 4 bits or fewer the inputs match each
    input's own statistics (``match="sample"``), otherwise the batch's (ZeroQ's loss).

    Example:
        >>> from squeezer.zoo import create
        >>> r = compress_zeroshot(create("digits_cnn"), Budget(bits=4))  # doctest: +SKIP
    """
    from .plan import pareto_frontier, plan_costs
    from .sensitivity import sensitivity
    from .zeroshot import zeroshot_batches

    model = split_attention(model)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    # Per-sample statistics give narrower activation ranges: better at 4-bit activations, worse
    # at 8 (docs/benchmarks.md, "Data-free quantization").
    match = "sample" if act_bits is not None and act_bits <= 4 else "batch"
    distilled = zeroshot_batches(
        model, samples, seed=seed, input_shape=input_shape, match=match, progress=progress
    )
    timings["distill"] = time.perf_counter() - t
    t = time.perf_counter()
    analysis = None
    if method == "uniform":
        chosen = uniform_only_plan(model, budget, act_bits=act_bits)
    elif method in ("kl", "hessian"):
        template = template_for(act_bits)
        sens = sensitivity(
            model,
            method="kl",
            data=distilled,
            bits=PLAN_BITS,
            granularity=template.granularity,
            group_size=template.group_size,
        )
        costs = plan_costs(model, PLAN_BITS, example=distilled[0][:1], template=template)
        ties = _quiet_ties(model, _residual_ties())
        analysis = Analysis(None, sens, costs, pareto_frontier(sens, costs, ties=ties), ties)
        chosen = hessian_plan(analysis, budget, act_bits, name=ZEROSHOT_NAME)
    else:
        raise ConfigError(f"unknown method {method!r} for --calib zeroshot; use 'kl' or 'uniform'")
    timings["plan"] = time.perf_counter() - t
    res = apply_plan_zeroshot(model, chosen, distilled, eval_data)
    res.timings = {**timings, **res.timings}
    res.analysis = analysis
    res.extras["calibration"] = {
        "source": "distilled (ZeroQ)",
        "samples": samples,
        "match": match,
        "seconds": timings["distill"],
    }
    res.calib_inputs = distilled
    return res


def apply_plan_zeroshot(
    model: nn.Module,
    chosen: Plan,
    distilled: list[torch.Tensor],
    eval_data: Dataset | None = None,
) -> Result:
    """Quantize ``model`` by ``chosen`` with activation ranges from the ``distilled`` batches, and
    evaluate on ``eval_data`` if given (otherwise sizes and BOPs only)."""
    if eval_data is not None:
        return apply_plan(model, eval_data, chosen, calib=distilled)
    model = split_attention(model)
    t = time.perf_counter()
    qmodel = quantize(model, chosen, calib=distilled)
    profiles = profile_layers(model, distilled[0][:1])
    before = Evaluation("FP32", None, model_bytes(model), 32.0, sum(bops(profiles, None).values()))
    after = Evaluation(
        chosen.meta.get("name", "compressed"),
        None,
        model_bytes(model, chosen),
        average_bits(model, chosen),
        sum(bops(profiles, chosen).values()),
        plan=chosen,
    )
    return Result(
        model,
        qmodel,
        chosen,
        before,
        after,
        [before, after],
        layer_table(model, qmodel, chosen, profiles),
        {"quantize": time.perf_counter() - t},
    )


def _residual_ties():
    from .plan import residual_ties

    return residual_ties


def uniform_only_plan(
    model: nn.Module, budget: Budget, *, act_bits: int | None, data: Dataset | None = None
) -> Plan:
    """Uniform quantization for a whole ``bits=N`` budget (and nothing else). Sentence encoders get
    the Q-BERT template: per-channel at 8 bits, groups of 128 below."""
    only_bits = (
        budget.bits is not None
        and budget.size_bytes is None
        and budget.bops is None
        and budget.latency_ms is None
        and not budget.relative
    )
    if only_bits and float(budget.bits).is_integer():
        if data is not None and is_token_data(data):
            from .qbert import qbert_plan

            b = int(budget.bits)
            plan = qbert_plan(model, b, group_size=None if b >= 8 else 128, act_bits=act_bits)
            return Plan(plan.layers, meta={**plan.meta, "budget": str(budget)})
        plan = uniform_plan(model, int(budget.bits), act_bits=act_bits)
        return Plan(plan.layers, meta={**plan.meta, "budget": str(budget)})
    raise ConfigError(
        f"--method uniform takes a whole number of bits (e.g. --budget bits=4), got {budget}; "
        "use the default --method hessian for size, BOPs or latency budgets"
    )
