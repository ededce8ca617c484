"""``squeezer compress --prune structured --prune-ratio auto``: one plan for bits and structured
sparsity from the command line; the model really shrinks, the budget holds, the run folder and the
report record each layer's (ratio, bits); bad combinations exit 2 with one line."""

from __future__ import annotations

import json

import pytest
import torch

from squeezer.cli import main
from squeezer.runfolder import load_compressed


def _compress(out, weights, *extra):
    return main(["compress", "zoo:digits_cnn", "--weights", str(weights), "--data", "digits",
                 "--out", str(out), "--quiet", "--hessian-samples", "128", "--threads", "1",
                 "--prune", "structured", *extra])  # fmt: skip


def test_auto_ratio_plans_bits_and_channels_under_size_and_latency(tmp_path, capsys, weights):
    out = tmp_path / "run"
    rc = _compress(out, weights, "--prune-ratio", "auto", "--budget", "size=16kB,latency=50ms")
    assert rc == 0, capsys.readouterr().err
    rec = json.loads((out / "prune.json").read_text())
    joint = rec["joint"]
    assert rec["architecture"]  # channels really removed: all 2-bit is 21 kB
    assert joint["achieved"]["size_bytes"] <= 16e3 and joint["achieved"]["latency_ms"] <= 50
    assert joint["table"]["latency_batch"] == 32 and joint["table"]["omega"] == "hessian"
    plan = json.loads((out / "plan.json").read_text())
    dense, q, _, _ = load_compressed(out)
    for fqn, changed in rec["architecture"].items():  # the stored model has the pruned shapes
        if "out_channels" in changed:
            assert q.get_submodule(fqn).weight.shape[0] == changed["out_channels"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["after"]["size_bytes"] <= 16e3  # the budget holds on the model as stored
    assert metrics["after"]["size_bytes"] == pytest.approx(joint["achieved"]["size_bytes"])
    assert sum(p.numel() for p in q.parameters()) < sum(p.numel() for p in dense.parameters())
    for fqn, c in joint["layers"].items():  # per layer (ratio, bits), and the plan applies them
        assert plan["layers"][fqn]["bits"] == c["bits"]
        assert 1 - (1 - c["out_ratio"]) * (1 - c["in_ratio"]) == pytest.approx(rec["ratios"][fqn])
    assert main(["report", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "## Pruning" in md and "joint plan" in md and "| conv2 |" in md


def test_auto_ratio_with_measured_omega(tmp_path, capsys, weights):
    flags = ("--prune-ratio", "auto", "--prune-omega", "measured", "--budget", "size=16kB")
    assert _compress(tmp_path / "m", weights, *flags) == 0, capsys.readouterr().err
    rec = json.loads((tmp_path / "m" / "prune.json").read_text())
    assert rec["joint"]["table"]["omega"] == "measured" and rec["architecture"]
    assert json.loads((tmp_path / "m" / "metrics.json").read_text())["after"]["size_bytes"] <= 16e3


@pytest.mark.parametrize(
    "flags",
    [
        ["--prune-ratio", "auto", "--budget", "bits=4"],
        ["--prune-ratio", "auto", "--budget", "size=0.5r"],
        ["--prune-ratio", "auto", "--budget", "size=40kB", "--method", "uniform"],
        ["--prune-ratio", "auto", "--budget", "size=40kB", "--prune-ratios", "0.25,0.5"],
        ["--prune-ratio", "half", "--budget", "bits=8"],
        ["--prune-ratio", "auto", "--budget", "size=1kB"],
    ],
)
def test_bad_auto_combinations_exit_2(tmp_path, capsys, weights, flags):
    rc = _compress(tmp_path / "r", weights, *flags)
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert not (tmp_path / "r" / "prune.json").exists()


def test_auto_ratio_needs_structured(tmp_path, capsys, weights):
    rc = main(["compress", "zoo:digits_cnn", "--weights", str(weights), "--data", "digits",
               "--out", str(tmp_path / "r"), "--quiet", "--prune", "unstructured",
               "--prune-ratio", "auto", "--budget", "size=40kB"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "structured" in err and err.count("\n") == 1, err
    torch.manual_seed(0)
