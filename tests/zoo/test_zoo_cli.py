"""Every efficient architecture of the zoo through the command line, as a user would run it:
``squeezer train zoo:NAME,classes=10`` on their own .npz, then ``compress``, ``export`` and
``bench`` of that run. Inputs are 3 x 32 x 32 (scikit-learn's digits upscaled; the 224 x 224
designs pool globally, so they run at 32 x 32); one net of each family by default, the rest slow."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from squeezer.cli import main
from squeezer.zoo import MODELS, create

from .test_zoo_pipeline import EFFICIENT, quick_first

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore")]


@pytest.fixture(scope="module")
def digits_npz(tmp_path_factory, digits):
    """160 training and 64 test digits at 3 x 32 x 32 in one .npz (squeezer splits it)."""

    def up(x):
        return F.interpolate(x, size=32, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)

    x = torch.cat([up(digits.x_train[:160]), up(digits.x_test[:64])])
    y = torch.cat([digits.y_train[:160], digits.y_test[:64]])
    path = tmp_path_factory.mktemp("data") / "digits32.npz"
    np.savez(path, x=x.numpy(), y=y.numpy())
    return path


def spec_of(name: str) -> str:
    return f"zoo:{name}" if name == "squeezedet" else f"zoo:{name},classes=10"


@pytest.mark.parametrize("name", quick_first([n for n in EFFICIENT if n != "squeezedet"]))
def test_train_compress_export_bench_from_the_command_line(name, digits_npz, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    trained, run = tmp_path / "trained", tmp_path / "run"
    spec = spec_of(name)
    assert main(["train", spec, "--data", str(digits_npz), "--epochs", "1", "--batch-size", "32",
                 "--lr", "1e-3", "--out", str(trained), "--quiet"]) == 0  # fmt: skip
    assert main(["compress", spec, "--weights", str(trained / "model.safetensors"), "--data",
                 str(digits_npz), "--budget", "bits=8", "--method", "uniform", "--out", str(run),
                 "--quiet"]) == 0  # fmt: skip
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["model"] == spec  # the options ride in the spec the folder records
    assert main(["export", str(run)]) == 0
    assert (run / "model.onnx").stat().st_size > 0
    capsys.readouterr()
    assert main(["bench", str(run), "--batch", "1", "--runs", "3", "--warmup", "1"]) == 0
    table = json.loads((run / "metrics.json").read_text())["latency"]
    assert all(row["median_ms"] > 0 for row in table["batch_1"].values())
    # the trained classifier has the 10 classes asked for, not the ImageNet 1000
    assert create(spec[4:]).eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 10)
    assert MODELS[name].input_shape[0] == 3


def test_zoo_options_are_checked_and_listed(capsys):
    assert main(["compress", "zoo:sqnxt23,clases=10", "--data", "digits", "--budget", "bits=8",
                 "--out", "unused-run"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "no option 'clases'" in err and "classes=1000" in err
    assert main(["zoo"]) == 0
    assert "width=1.0" in capsys.readouterr().out
