"""The one compression chain: every calibration source and method through compress(); replan()
from a saved analysis equals planning afresh; the caller's model untouched; registries listable."""

from __future__ import annotations

import json

import pytest
import torch

from squeezer.budget import Budget
from squeezer.calibration import CALIBRATION_SOURCES, register_calibration
from squeezer.costs import Costs
from squeezer.errors import ConfigError
from squeezer.pipeline import Calibration, choose_plan, compress, replan
from squeezer.templates import TEMPLATES, template_for

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("calib", sorted(CALIBRATION_SOURCES))
@pytest.mark.parametrize("method", ["hessian", "uniform"])
def test_every_calibration_source_and_method(trained_digits_cnn, digits, calib, method):
    net, _ = trained_digits_cnn
    before = {k: v.clone() for k, v in net.state_dict().items()}
    r = compress(net, digits, "bits=4", method=method, calib=calib, hessian_samples=128,
                 samples=16)  # fmt: skip
    assert r.after.avg_bits <= 4 + 1e-9 and r.after.metric > 90
    assert r.before.metric == pytest.approx(r.variants[0].metric)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    json.dumps(r.metrics(digits))  # the metrics document is plain JSON
    if method == "uniform":
        assert r.analysis is None and r.plan.meta["method"] == "uniform"
        return
    a = r.analysis
    assert a.template_name == "default" and a.sensitivity.method == (
        "trace" if calib == "real" else "kl"
    )
    assert (a.spectrum is None) == (calib != "real")  # data-free sources plan by KL
    assert (r.calib_inputs is not None) == (calib == "zeroshot")
    assert len({s.bits for s in r.plan.layers.values()}) > 1  # really mixed at 4 bits
    # Re-planning from the saved analysis: the plan the chain makes for that budget directly.
    again = replan(net, digits, a, Budget(bits=3), calib=calib, calib_inputs=r.calib_inputs)
    assert again.plan.layers == choose_plan(a, Budget(bits=3)).layers
    assert again.after.avg_bits <= 3 + 1e-9


def test_result_is_built_once(trained_digits_cnn, digits):
    r = compress(trained_digits_cnn[0], digits, "bits=8", method="uniform")
    with pytest.raises(AttributeError):
        r.plan = None  # frozen


def test_errors(trained_digits_cnn, digits):
    net, _ = trained_digits_cnn
    with pytest.raises(ConfigError, match="whole number of bits"):
        compress(net, digits, "bits=4.5", method="uniform")
    with pytest.raises(ConfigError, match="unknown calibration"):
        compress(net, digits, "bits=4", calib="nope")
    with pytest.raises(ConfigError, match="--data is required"):
        compress(net, None, "bits=4")
    with pytest.raises(ConfigError, match="unknown layer template"):
        compress(net, digits, "bits=4", template="nope")


def test_a_registered_calibration_source_plugs_in(trained_digits_cnn, digits):
    """A new source is one handler: here, calibration on the test split's first 64 inputs."""

    @register_calibration("test_split")
    def _test_split(model, data, **_):
        return Calibration([data.x_test[:64]], "kl", data.example(1), "test-split mixed")

    try:
        r = compress(trained_digits_cnn[0], digits, "bits=4", calib="test_split")
        assert r.plan.meta["name"] == "test-split mixed (bits=4)"
        assert r.analysis.sensitivity.method == "kl"
    finally:
        del CALIBRATION_SOURCES["test_split"]


def test_templates_registry():
    assert {"default", "qbert"} <= set(TEMPLATES)
    for t in TEMPLATES.values():
        assert t.bits == tuple(sorted(t.bits)) and t.analysis.samples > 0
    assert template_for(torch.nn.Linear(2, 2)).name == "default"


def test_latency_budget_measures_once_and_trades_float_for_int8(trained_digits_cnn, digits):
    """A latency budget adds a per-layer table (here the proxy runtime: PyTorch float time x
    bits/32, so int8 is faster) and float as a choice per layer; re-planning reuses the table."""
    from squeezer.pipeline import LatencyOptions

    net, _ = trained_digits_cnn
    opts = LatencyOptions(backend="proxy", runs=5)
    first = compress(net, digits, "bits=8", hessian_samples=64)
    assert not first.analysis.costs.available("latency_ms")
    costs_of = replan(net, digits, first.analysis, Budget.parse("latency=1000ms"), latency=opts)
    a = costs_of.analysis
    assert a.costs.available("latency_ms") and 32 in a.sensitivity.bits
    assert a.costs.meta["latency"]["backend"] == "proxy"
    assert set(costs_of.plan.bits().values()) == {32}  # a loose budget keeps everything in float
    lo = a.costs.total("latency_ms", {k: 8 for k in a.sensitivity.layers})
    hi = a.costs.total("latency_ms", {k: 32 for k in a.sensitivity.layers})
    assert lo < hi
    mid = (lo + hi) / 2
    r = replan(net, digits, a, Budget(latency_ms=mid), latency=opts)
    assert r.analysis.costs is a.costs  # the cached table, not a new measurement
    ach = r.plan.meta["achieved"]["latency_ms"]
    assert ach <= mid + 1e-12 and 32 in r.plan.bits().values() and 8 in r.plan.bits().values()
    for spec in r.plan.layers.values():
        assert spec.act_bits is None if spec.bits == 32 else spec.act_bits == 8


def test_latency_table_on_the_exported_model(trained_digits_cnn, digits):
    """The ONNX Runtime table is measured on the exported int8 model and its one-layer-in-float
    variants: every planned layer has a row, ≤ 8 bits cost nothing beyond the int8 graph (the
    fixed part), and a plan with one layer in float is predicted at that variant's measurement."""
    from squeezer.pipeline import LatencyOptions

    net, _ = trained_digits_cnn
    before = {k: v.clone() for k, v in net.state_dict().items()}
    first = compress(net, digits, "bits=8", hessian_samples=64)
    r = replan(net, digits, first.analysis, Budget.parse("latency=1000ms"),
               latency=LatencyOptions(runs=3))  # fmt: skip
    costs = r.analysis.costs
    rec = costs.meta["latency"]
    assert rec["method"] == "in-context" and rec["backend"] == "onnxruntime"
    layers = list(r.analysis.sensitivity.layers)
    assert set(costs.latency_ms) == set(layers) and set(layers) <= set(rec["variants_ms"])
    assert costs.fixed("latency_ms") == rec["int8_ms"] > 0 and rec["whole_fp32_ms"] > 0
    assert costs.total("latency_ms", dict.fromkeys(layers, 8)) == rec["int8_ms"]
    for k in layers:  # one layer in float: predicted at exactly its measured variant
        one = {**dict.fromkeys(layers, 4), k: 32}
        assert abs(costs.total("latency_ms", one) - rec["variants_ms"][k]) < 1e-9
    # neighbours in float together: their boundary is not paid (or it measured as nothing)
    assert len(costs.latency_edges) == len(layers) - 1
    for a, b, ms in costs.latency_edges:
        two = {**dict.fromkeys(layers, 8), a: 32, b: 32}
        measured = rec["variants_ms"][f"{a}+{b}"]
        assert ms >= 0 and (costs.total("latency_ms", two) == pytest.approx(measured) or ms == 0)
    assert Costs.from_json(costs.to_json()).latency_edges == costs.latency_edges
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the user's model untouched


def test_latency_table_takes_the_widest_integer_width_of_the_template(
    trained_digits_cnn, digits, monkeypatch
):
    """With a template whose widths stop at 7 bits (7-bit weight codes cannot saturate ONNX
    Runtime's uint8 x int8 kernels), the table's integer graph is the 7-bit model, not an 8-bit
    one the planner could never choose."""
    from dataclasses import replace

    import squeezer.layer_timing as layer_timing
    from squeezer.pipeline import LatencyOptions
    from squeezer.quant.modules import QuantMixin

    net, _ = trained_digits_cnn
    monkeypatch.setitem(TEMPLATES, "w7", replace(TEMPLATES["default"], name="w7", bits=(4, 7)))
    seen, real = [], layer_timing.context_latency_costs

    def spy(model, qmodel, *args, **kwargs):
        seen.append({m.spec.bits for m in qmodel.modules() if isinstance(m, QuantMixin)})
        return real(model, qmodel, *args, **kwargs)

    monkeypatch.setattr(layer_timing, "context_latency_costs", spy)
    first = compress(net, digits, "bits=7", hessian_samples=64, template="w7")
    assert first.analysis.sensitivity.bits == (4, 7)
    r = replan(net, digits, first.analysis, Budget.parse("latency=1000ms"),
               latency=LatencyOptions(runs=3))  # fmt: skip
    assert seen == [{7}]
    assert r.analysis.sensitivity.bits == (4, 7, 32)
    assert set(r.plan.bits().values()) <= {4, 7, 32}


def test_hessian_batch_size_and_probes_reach_the_analysis(digits, monkeypatch):
    # --hessian-batch-size / --hessian-probes replace the template's analysis settings, and
    # only those (the samples, stopping rule and top_k stay the template's)
    import squeezer.pipeline as pipeline
    from squeezer.zoo import create

    seen = {}
    real = pipeline.analyze

    def spy(model, loss, batches, **kw):
        seen["batch"] = max(len(y) for _, y in batches)
        seen.update(kw)
        return real(model, loss, batches, **kw)

    monkeypatch.setattr(pipeline, "analyze", spy)
    compress(create("digits_cnn"), digits, "bits=4", hessian_samples=64, hessian_batch_size=16,
             hessian_probes=5)  # fmt: skip
    assert seen["batch"] == 16 and seen["max_probes"] == 5 and seen["min_probes"] <= 5
