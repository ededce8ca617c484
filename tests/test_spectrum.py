"""squeezer.spectrum.analyze against the dense Hessian of tiny networks (≤ 300 parameters): the
same numbers as the estimators on the dense operator, repeatable, the caller's model untouched;
its stopping rule, its JSON round trip and the CLI's analyze command. The estimators themselves
are tested in test_estimators.py."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from test_hvp import CE

from squeezer.errors import ConfigError
from squeezer.hvp import HessianOperator
from squeezer.spectrum import Spectrum, analyze, summary

pytestmark = pytest.mark.usefixtures("one_thread")


def test_analyze_matches_oracle_repeats_and_leaves_model_alone(cases):
    net, data, H, _ = cases["conv"]
    net = copy.deepcopy(net).train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    kw = dict(max_probes=300, rel_stderr=None, density=True, density_probes=4, density_steps=10)
    kw.update(eig_rtol=1e-6)
    spec = analyze(net, CE, data, seed=3, **kw)

    exact = torch.linalg.eigvalsh(H).flip(0)[:3]
    assert torch.allclose(torch.tensor(spec.top_eigenvalues, dtype=torch.float64), exact, rtol=1e-4)
    names = {"conv1": "conv1.weight", "conv2": "conv2.weight", "fc": "fc.weight"}
    op = HessianOperator(net, CE, data)
    for fqn, sl in op.layout.block_slices().items():
        block = H[sl, sl]
        assert spec.layer_params[fqn] == dict(net.named_parameters())[names[fqn]].numel()
        top = float(torch.linalg.eigvalsh(block)[-1])
        assert abs(spec.layer_top_eigenvalue[fqn] - top) <= 1e-4 * abs(top)
        assert abs(spec.layer_trace[fqn] - float(block.trace())) <= 5 * spec.layer_trace_stderr[fqn]
    assert spec.params == H.shape[0] and spec.samples == 48 and spec.probes == 300
    assert spec.density is not None and abs(sum(spec.density.weights) - 1) < 1e-10
    assert spec.hvp_count > 300 and spec.seconds > 0

    # Same seed, same numbers (bit for bit); another seed, other probes.
    again = analyze(net, CE, data, seed=3, **kw)
    a, b = spec.to_dict(), again.to_dict()
    a.pop("seconds"), b.pop("seconds")
    assert a == b
    other = analyze(net, CE, data, seed=4, top_k=0, per_layer_eig=False, max_probes=20)
    assert other.trace != spec.trace

    assert net.training and all(p.grad is None for p in net.parameters())
    for k, t in net.state_dict().items():
        assert torch.equal(t, before[k]), k


def test_analyze_stops_on_relative_stderr(cases):
    net, data, _, _ = cases["mlp"]
    spec = analyze(net, CE, data, top_k=1, per_layer_eig=False, max_probes=400, rel_stderr=0.05)
    assert spec.probes < 400 and spec.trace_stderr <= 0.05 * abs(spec.trace)
    assert spec.layer_top_eigenvalue == {} and len(spec.top_eigenvalues) == 1
    pp = analyze(
        net,
        CE,
        data,
        top_k=1,
        per_layer_eig=False,
        max_probes=400,
        rel_stderr=0.05,
        trace_method="hutch++",
        sketch=10,
    )
    assert pp.trace_method == "hutch++" and pp.trace_stderr <= 0.05 * abs(pp.trace)
    assert pp.probes < spec.probes  # variance reduction needs fewer probes
    with pytest.raises(ConfigError):
        analyze(net, CE, data, seed=-1)
    with pytest.raises(ConfigError):
        analyze(net, CE, data, trace_method="magic")


def test_spectrum_json_round_trip(tmp_path, cases):
    net, data, _, _ = cases["mlp"]
    spec = analyze(net, CE, data, max_probes=20, density=True, density_probes=2, density_steps=8)
    path = tmp_path / "run" / "spectrum.json"
    spec.save(path)
    assert Spectrum.load(path) == spec
    raw = json.loads(path.read_text())
    for key in (
        "top_eigenvalues",
        "trace",
        "trace_stderr",
        "layer_trace",
        "layer_trace_stderr",
        "layer_params",
        "layer_top_eigenvalue",
        "density",
        "hvp_count",
        "seconds",
        "seed",
        "layer_mean_trace",
    ):
        assert key in raw, key
    assert raw["layer_mean_trace"]["0"] == pytest.approx(spec.layer_trace["0"] / 72)
    assert list(tmp_path.joinpath("run").iterdir()) == [path]  # no temporary file left behind
    with pytest.raises(ConfigError, match="unknown"):
        Spectrum.from_dict({**raw, "bogus": 1})
    with pytest.raises(ConfigError, match="cannot read"):
        Spectrum.load(tmp_path / "missing.json")
    assert "layer" in summary(spec)


def tiny_digits_net() -> torch.nn.Module:
    """A 750-parameter net for 1×8×8 digits, for the CLI test (``test_spectrum:tiny_digits_net``)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(72, 10)
    )


def test_cli_analyze_writes_spectrum_and_report(tmp_path):
    from squeezer.cli import main

    out = tmp_path / "run"
    argv = ["analyze", "test_spectrum:tiny_digits_net", "--data", "digits", "--out", str(out)]
    argv += ["--samples", "64", "--max-probes", "12", "--top-k", "2", "--density", "--quiet"]
    assert main(argv) == 0
    spec = Spectrum.load(out / "spectrum.json")
    assert list(spec.layer_trace) == ["0", "3"] and spec.samples == 64
    assert len(spec.top_eigenvalues) == 2 and spec.density is not None
    assert spec.layer_params == {"0": 18, "3": 720}
    report = (out / "report.md").read_text()
    assert "Hessian spectrum" in report and "trace ± stderr" in report
    # Bad input: exit code 2, nothing written.
    assert (
        main(
            [
                "analyze",
                "test_spectrum:tiny_digits_net",
                "--data",
                "nope",
                "--out",
                str(tmp_path / "bad"),
            ]
        )
        == 2
    )
    assert not (tmp_path / "bad").exists()
