"""The Gaussian-noise calibration source (``calib="noise"``, ``--calib noise``): standard-normal
inputs shaped like the model's, seeded, and the data-free baseline of ZeroQ's distilled data."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from squeezer.calibration import NOISE_NAME, source
from squeezer.cli import main
from squeezer.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")


def test_shape_from_data_option_or_model_and_standard_normal(digits):
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    noise = source("noise")
    c = noise(net, digits, seed=0, samples=200)
    x = torch.cat(list(c.batches))
    assert x.shape == (200, *digits.example(1).shape[1:])
    assert c.method == "kl" and c.label == NOISE_NAME and c.inputs is None
    assert c.record["calibration"]["samples"] == 200
    # N(0, 1) in the model's input space (not the data's range: digits lie in [0, 1])
    assert abs(float(x.mean())) < 0.02 and abs(float(x.std()) - 1.0) < 0.02
    assert float(x.min()) < -3.0
    assert noise(net, None, samples=4, input_shape=(3, 5, 5)).example.shape == (1, 3, 5, 5)
    net.input_shape = (2, 7)
    assert noise(net, None, samples=4).example.shape == (1, 2, 7)
    with pytest.raises(ConfigError, match="input shape"):
        noise(nn.Linear(3, 2), None, samples=4)


def test_seeded_same_seed_same_inputs_other_seed_other_inputs():
    net = nn.Linear(3, 2)
    a, b, c = (source("noise")(net, None, seed=s, samples=8, input_shape=(3,)) for s in (0, 0, 1))
    assert torch.equal(a.batches[0], b.batches[0]) and not torch.equal(a.batches[0], c.batches[0])


def test_cli_noise_run_calibrates_on_noise_and_replans(tmp_path, capsys, trained_digits_cnn):
    from squeezer.models import save_weights

    out, weights = tmp_path / "noise", tmp_path / "w.safetensors"
    save_weights(trained_digits_cnn[0], weights)
    args = ["--weights", str(weights), "--calib", "noise", "--data", "digits", "--quiet"]
    assert main(["compress", "zoo:digits_cnn", *args, "--budget", "bits=4", "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["calibration"]["source"].startswith("Gaussian noise")
    assert m["after"]["name"].startswith(NOISE_NAME) and m["after"]["avg_bits"] <= 4 + 1e-9
    assert not (out / "spectrum.json").exists()  # planned by KL on the noise, no Hessian
    assert main(["plan", str(out), "--budget", "bits=3"]) == 0, capsys.readouterr().err
    m3 = json.loads((out / "metrics.json").read_text())
    assert json.loads((out / "manifest.json").read_text())["calib"] == "noise"
    assert m3["after"]["avg_bits"] <= 3 + 1e-9 < m["after"]["avg_bits"]
