"""The ``export`` and ``bench`` commands on a run folder: the ONNX file next to the run, its
metric on the test split beside the simulation's, latency rows for PyTorch, ONNX Runtime FP32 and
squeezer's export, and the report's Deployment section.
"""

from __future__ import annotations

import json

import pytest

from squeezer.cli import main

pytest.importorskip("onnxruntime")

pytestmark = pytest.mark.usefixtures("one_thread")


def test_cli_export_and_bench(tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["compress", "zoo:digits_cnn", "--data", "digits", "--budget", "bits=8"]
    assert main([*argv, "--method", "uniform", "--out", str(run), "--quiet"]) == 0
    assert main(["export", str(run), "--format", "onnx"]) == 0, capsys.readouterr().err
    assert (run / "model.onnx").is_file()
    m = json.loads((run / "metrics.json").read_text())
    assert m["export"]["path"] == "model.onnx"
    assert m["export"]["max_abs_error"] <= m["export"]["atol"]
    # the deployed model is measured on the whole test split, next to the simulation
    assert abs(m["export"]["test_metric"] - m["after"]["metric"]) <= 0.5
    assert "of the ONNX model on the test split" in capsys.readouterr().out
    assert main(["export", str(run), "--exact"]) == 0, capsys.readouterr().err
    exact = json.loads((run / "metrics.json").read_text())["export"]
    assert exact["test_metric"] == pytest.approx(m["after"]["metric"], abs=0.5)
    assert main(["bench", str(run), "--runs", "3", "--warmup", "1", "--threads", "1"]) == 0
    m = json.loads((run / "metrics.json").read_text())
    lat = m["latency"]
    assert lat["threads"] == 1
    for b in ("batch_1", "batch_32"):
        assert set(lat[b]) == {"PyTorch FP32", "ORT FP32", "ONNX (squeezer)"}
        assert all(v["median_ms"] > 0 and v["runs"] == 3 for v in lat[b].values())
    assert m["after"]["latency_ms"] == lat["batch_1"]["ONNX (squeezer)"]["median_ms"]
    report = (run / "report.md").read_text()
    assert "## Deployment" in report and "ONNX (squeezer)" in report


def test_cli_export_needs_a_compressed_run(tmp_path, capsys):
    assert main(["export", str(tmp_path / "nothing"), "--format", "onnx"]) == 2
    assert "not a squeezer run folder" in capsys.readouterr().err
    w = tmp_path / "trained"  # a run folder without a compressed model (as `train` writes)
    w.mkdir()
    (w / "manifest.json").write_text(json.dumps({"tool": "squeezer", "command": "train"}))
    assert main(["bench", str(w)]) == 2
    assert "no compressed model" in capsys.readouterr().err


def test_cli_export_packs_sub_8_bit_codes_unless_asked_not_to(tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["compress", "zoo:digits_cnn", "--data", "digits", "--budget", "bits=4"]
    assert main([*argv, "--method", "uniform", "--out", str(run), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["export", str(run)]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    packed = json.loads((run / "metrics.json").read_text())["export"]
    assert packed["weights_storage"] == "packed" and "x theoretical" in out and "packed" in out
    assert packed["size_bytes"] <= 1.1 * packed["theoretical_bytes"]
    assert (run / "model.onnx").stat().st_size == packed["size_bytes"]
    assert main(["export", str(run), "--no-pack"]) == 0, capsys.readouterr().err
    plain = json.loads((run / "metrics.json").read_text())["export"]
    assert plain["weights_storage"] == "int8" and plain["packed_bits"] == {}
    assert plain["size_bytes"] >= 1.5 * packed["size_bytes"]
    assert plain["test_metric"] == packed["test_metric"]
