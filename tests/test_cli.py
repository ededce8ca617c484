"""The command line: bad input gives exit 2, one line on stderr, and no partial output."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from squeezer.cli import main
from squeezer.zoo import create


@pytest.fixture(scope="module")
def pickled_model(tmp_path_factory):
    p = tmp_path_factory.mktemp("w") / "full.pt"
    torch.save(create("digits_cnn"), p)  # a full pickle of the module object
    return p


def _bad_cases(tmp_path, pickled_model):
    corrupt_npz = tmp_path / "bad.npz"
    corrupt_npz.write_bytes(b"PK\x03\x04 this is not a zip")
    corrupt_st = tmp_path / "bad.safetensors"
    corrupt_st.write_bytes(b"\x00\x01garbage")
    return {
        "missing data": (["--data", str(tmp_path / "nope.npz")], "does not exist"),
        "corrupt data": (["--data", str(corrupt_npz)], "cannot read"),
        "unknown data": (["--data", "imagenet"], "unknown data set"),
        "bad model": (["--model", "zoo:nonexistent"], "no built-in model"),
        "bad factory": (["--model", "no_such_pkg.mod:make"], "cannot import"),
        "corrupt safetensors": (["--weights", str(corrupt_st)], "not a valid safetensors"),
        "pickle": (["--weights", str(pickled_model)], "--trust-pickle"),
        "budget key": (["--budget", "speed=3"], "unknown budget key"),
    }


def _argv(out, overrides):
    args = {"--model": "zoo:digits_cnn", "--data": "digits", "--budget": "bits=8"}
    extra = []
    it = iter(overrides)
    for k in it:
        v = next(it)
        if k in args:
            args[k] = v
        else:
            extra += [k, v]
    return [
        "compress",
        args.pop("--model"),
        *sum(([k, v] for k, v in args.items()), []),
        *extra,
        "--out",
        str(out),
    ]


@pytest.mark.parametrize(
    "case",
    [
        "missing data",
        "corrupt data",
        "unknown data",
        "bad model",
        "bad factory",
        "corrupt safetensors",
        "pickle",
        "budget key",
    ],
)
def test_bad_input_exit_2_one_line_no_output(case, tmp_path, capsys, pickled_model):
    overrides, msg = _bad_cases(tmp_path, pickled_model)[case]
    out = tmp_path / "run"
    rc = main(_argv(out, overrides))
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("squeezer: error:")
    assert msg in err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".run")]  # no staging left


def test_trust_pickle_loads_full_pickle(pickled_model):
    from squeezer.models import load_model

    m = load_model("zoo:digits_cnn", weights=pickled_model, trust_pickle=True)
    assert m.input_shape == (1, 8, 8)


def test_refuses_foreign_output_dir(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    rc = main(
        ["compress", "zoo:digits_cnn", "--data", "digits", "--budget", "bits=8", "--out", str(out)]
    )
    assert rc == 2 and "did not write" in capsys.readouterr().err
    assert (out / "thesis.tex").read_text() == "precious"


def test_train_then_compress_end_to_end(tmp_path, capsys):
    w = tmp_path / "trained"
    assert (
        main(
            [
                "train",
                "zoo:digits_cnn",
                "--data",
                "digits",
                "--epochs",
                "3",
                "--out",
                str(w),
                "--quiet",
            ]
        )
        == 0
    )
    npz = tmp_path / "digits.npz"
    from squeezer.data import load_data

    d = load_data("digits")
    np.savez(npz, x=d.x_test.numpy(), y=d.y_test.numpy())
    out = tmp_path / "run"
    rc = main(
        [
            "compress",
            "zoo:digits_cnn",
            "--weights",
            str(w / "model.safetensors"),
            "--data",
            str(npz),
            "--budget",
            "bits=8",
            "--method",
            "uniform",
            "--out",
            str(out),
        ]
    )
    assert rc == 0, capsys.readouterr().err
    for f in (
        "manifest.json",
        "plan.json",
        "metrics.json",
        "model.safetensors",
        "report.html",
        "report.md",
    ):
        assert (out / f).is_file(), f
    m = json.loads((out / "metrics.json").read_text())
    assert m["after"]["size_bytes"] < m["before"]["size_bytes"] / 3
    assert m["after"]["avg_bits"] == 8
    assert "<img" in (out / "report.html").read_text()
    # re-running into the same run folder replaces it
    assert main(["report", str(out)]) == 0


def test_python_dash_m_and_exit_codes():
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "squeezer",
            "compress",
            "zoo:digits_cnn",
            "--data",
            "digits",
            "--budget",
            "bits=8",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "--out" in r.stderr and r.stderr.count("\n") == 1
    r = subprocess.run([sys.executable, "-m", "squeezer", "zoo"], capture_output=True, text=True)
    assert r.returncode == 0 and "zoo:digits_cnn" in r.stdout


@pytest.fixture
def weights(tmp_path, trained_digits_cnn):
    """The trained digits CNN's weights saved in a file, as a user would give them."""
    from squeezer.models import save_weights

    w = tmp_path / "w.safetensors"
    save_weights(trained_digits_cnn[0], w)
    return w



def test_hessian_compress_then_replan(tmp_path, capsys, weights):
    w = weights
    out = tmp_path / "run"
    rc = main(
        ["compress", "zoo:digits_cnn", "--weights", str(w), "--data", "digits", "--budget",
         "bits=3", "--hessian-samples", "128", "--out", str(out), "--quiet"]
    )  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    for f in ("spectrum.json", "sensitivity.json", "costs.json", "pareto.json"):
        assert (out / f).is_file(), f
    plan = json.loads((out / "plan.json").read_text())
    assert plan["meta"]["achieved"]["bits"] <= 3 + 1e-9
    assert len({v["bits"] for v in plan["layers"].values()}) > 1  # really mixed
    loss = json.loads((out / "metrics.json").read_text())["loss"]
    assert loss["train_increase"] == pytest.approx(loss["train_after"] - loss["train_fp32"])
    assert loss["predicted_increase"] == plan["meta"]["predicted_omega"] > 0
    assert "training samples the Hessian saw" in (out / "report.md").read_text()
    spectrum_before = (out / "spectrum.json").read_bytes()
    # re-plan for a bigger budget from the stored analysis: no Hessian work, a new plan applied
    assert main(["plan", str(out), "--budget", "bits=5"]) == 0
    assert (out / "spectrum.json").read_bytes() == spectrum_before
    m = json.loads((out / "metrics.json").read_text())
    assert 4 < m["after"]["avg_bits"] <= 5 + 1e-9
    # an infeasible budget: exit 2 with the smallest feasible value, the run folder untouched
    before = (out / "plan.json").read_bytes()
    assert main(["plan", str(out), "--budget", "bits=1.5"]) == 2
    err = capsys.readouterr().err
    assert "smallest feasible" in err and err.count("\n") == 1
    assert (out / "plan.json").read_bytes() == before


def test_zeroshot_compress_needs_no_data(tmp_path, capsys, trained_digits_cnn, weights):
    net, info = trained_digits_cnn
    w = weights
    out = tmp_path / "zs"
    rc = main(
        ["compress", "zoo:digits_cnn", "--weights", str(w), "--calib", "zeroshot", "--budget",
         "bits=4", "--eval-data", "digits", "--out", str(out), "--quiet"]
    )  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    m = json.loads((out / "metrics.json").read_text())
    assert m["calibration"]["source"].startswith("distilled")
    assert m["calibration"]["match"] == "batch"  # ZeroQ's loss at 8-bit activations
    assert m["after"]["avg_bits"] <= 4 + 1e-9
    assert m["after"]["metric"] >= info["top1"] - 3.0
    # re-planning reuses the saved distilled inputs and the KL sensitivity: no data, no distilling
    distilled = (out / "distilled.safetensors").read_bytes()
    assert main(["plan", str(out), "--budget", "bits=3"]) == 0, capsys.readouterr().err
    m3 = json.loads((out / "metrics.json").read_text())
    man = json.loads((out / "manifest.json").read_text())
    assert man["calib"] == "zeroshot" and man["replanned"] is True
    assert m3["after"]["avg_bits"] <= 3 + 1e-9 < m["after"]["avg_bits"]
    assert m3["after"]["name"].startswith("zero-shot mixed")
    assert m3["after"]["metric"] >= info["top1"] - 5.0
    assert (out / "distilled.safetensors").read_bytes() == distilled
    # a model without BatchNorm cannot be distilled from: exit 2, advice, nothing written
    out2 = tmp_path / "zs2"
    rc = main(
        [
            "compress",
            "torch.nn:Identity",
            "--calib",
            "zeroshot",
            "--budget",
            "bits=4",
            "--out",
            str(out2),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and not out2.exists()
    assert "BatchNorm" in err and "--calib real" in err


def test_zeroshot_run_without_data_replans_and_exports(tmp_path, capsys, weights):
    """No data at any step: compress, re-plan and export all use the run's distilled inputs."""
    pytest.importorskip("onnxruntime")
    w = weights
    out = tmp_path / "zs"
    args = ["--weights", str(w), "--calib", "zeroshot", "--budget", "bits=4", "--quiet"]
    assert main(["compress", "zoo:digits_cnn", *args, "--out", str(out)]) == 0
    assert main(["plan", str(out), "--budget", "bits=5"]) == 0, capsys.readouterr().err
    assert json.loads((out / "metrics.json").read_text())["after"]["metric"] is None
    assert main(["export", str(out)]) == 0, capsys.readouterr().err
    exported = json.loads((out / "metrics.json").read_text())["export"]
    assert (out / "model.onnx").is_file() and exported["argmax_agreement"] >= 0.95


USER_MODEL = """
import torch
from torch import nn


class TokenGRU(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.gru = nn.GRU(16, 16, batch_first=True)
        self.out = nn.Linear(16, 4)

    def forward(self, ids):
        h, _ = self.gru(self.emb(ids))
        return self.out(h[:, -1])


def make():
    torch.manual_seed(0)
    return TokenGRU()
"""


def test_users_own_model_on_token_ids(tmp_path, capsys, monkeypatch):
    """A module:factory model fed integer token ids from an .npz: train, then compress. The ids stay
    integers, and the GRU squeezer does not quantize is named as kept in float."""
    (tmp_path / "user_token_gru.py").write_text(USER_MODEL)
    monkeypatch.syspath_prepend(str(tmp_path))
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 50, size=(200, 6))
    np.savez(tmp_path / "ids.npz", x=ids, y=ids[:, -1] % 4)  # learnable: the last token's class
    model, data = "user_token_gru:make", str(tmp_path / "ids.npz")
    assert (
        main(["train", model, "--data", data, "--epochs", "2", "--out", str(tmp_path / "t")]) == 0
    )
    capsys.readouterr()
    w = str(tmp_path / "t" / "model.safetensors")
    args = ["--weights", w, "--data", data, "--budget", "bits=4", "--hessian-samples", "64"]
    assert main(["compress", model, *args, "--out", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert "stay in float" in out and "gru (GRU, 1,536)" in out
    m = json.loads((tmp_path / "c" / "metrics.json").read_text())
    assert m["float_layers"] == {"gru": {"type": "GRU", "weights": 1536}}
    assert {row["fqn"] for row in m["layers"]} == {"emb", "out"}
    assert "Kept in float" in (tmp_path / "c" / "report.md").read_text()
