"""Pruning as a stage of ``squeezer compress``: the run folder records the pruned architecture,
reloads the smaller model, re-plans and exports it; bad pruning flags exit 2 with one line."""

from __future__ import annotations

import json

import pytest
import torch

from squeezer.cli import main
from squeezer.data import evaluate
from squeezer.runfolder import load_compressed


def _compress(out, weights, *extra):
    return main(["compress", "zoo:digits_cnn", "--weights", str(weights), "--data", "digits",
                 "--out", str(out), "--quiet", *extra])  # fmt: skip


def test_structured_prune_run_reloads_and_replans(tmp_path, capsys, weights, trained_digits_cnn):
    out = tmp_path / "run"
    rc = _compress(out, weights, "--budget", "bits=8", "--hessian-samples", "128",
                   "--prune", "structured", "--prune-ratio", "0.5", "--prune-finetune", "2")  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    rec = json.loads((out / "prune.json").read_text())
    assert rec["stats"]["macs_after"] <= 0.5 * rec["stats"]["macs_before"]
    assert rec["architecture"] and rec["finetune"]["epochs"] == 2
    m = json.loads((out / "metrics.json").read_text())
    assert m["prune"]["architecture"] == rec["architecture"]
    dense, q, _, data = load_compressed(out)
    conv1 = rec["architecture"]["conv1"]["out_channels"]
    assert q.conv1.weight.shape[0] == conv1 < dense.conv1.weight.shape[0]
    assert evaluate(q, data.test_batches(), data.task) == pytest.approx(m["after"]["metric"])
    assert m["after"]["metric"] >= trained_digits_cnn[1]["top1"] - 6  # a 2-epoch recovery
    # re-planning works on the pruned float model
    assert main(["plan", str(out), "--budget", "bits=4"]) == 0, capsys.readouterr().err
    _, q4, _, _ = load_compressed(out)
    assert q4.conv1.weight.shape[0] == conv1
    assert json.loads((out / "metrics.json").read_text())["prune"]["architecture"]
    # the pruned, quantized model exports, runs in ONNX Runtime, is timed and reported
    assert main(["export", str(out), "--threads", "1"]) == 0, capsys.readouterr().err
    rc = main(["bench", str(out), "--batch", "1", "32", "--runs", "5", "--threads", "1"])
    assert rc == 0, capsys.readouterr().err
    m = json.loads((out / "metrics.json").read_text())
    assert m["export"]["test_metric"] == pytest.approx(m["after"]["metric"], abs=2)
    assert main(["report", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "## Pruning" in md and "conv1" in md and "latency, batch 32" in md


def test_unstructured_prune_run(tmp_path, capsys, weights):
    out = tmp_path / "run"
    rc = _compress(out, weights, "--budget", "bits=8", "--method", "uniform",
                   "--prune", "unstructured", "--prune-ratio", "0.6")  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    rec = json.loads((out / "prune.json").read_text())
    assert rec["architecture"] == {} and rec["stats"]["sparsity"] == pytest.approx(0.6, abs=1e-3)
    _, q, _, _ = load_compressed(out)
    zeros = float((q.fc1.weight == 0).float().mean())
    assert zeros > 0.3  # the zeros survive quantization (0 quantizes to 0)


@pytest.mark.parametrize(
    "flags",
    [
        ["--prune", "nothing"],
        ["--prune", "structured", "--prune-ratio", "1.5"],
        ["--prune-finetune", "3"],
        ["--prune", "nm", "--prune-nm", "two:four"],
        ["--prune", "unstructured", "--prune-target", "macs"],
    ],
)
def test_bad_prune_flags(tmp_path, capsys, weights, flags):
    rc = _compress(tmp_path / "r", weights, "--budget", "bits=8", "--method", "uniform", *flags)
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert not (tmp_path / "r" / "prune.json").exists()
    torch.manual_seed(0)
