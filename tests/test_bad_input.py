"""Bad input, as a new user gives it: every case is found before any analysis and ends in exit 2,
one line on stderr, no traceback, no output folder, no staging folder, the user's files unchanged
and no pickle executed. Also: SIGTERM during a run leaves no staging folder, and the HiGHS banner
never reaches stdout."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import squeezer.runs
from squeezer.cli import main
from squeezer.zoo import create

pytestmark = pytest.mark.usefixtures("one_thread")

MODULE = "sq_user_code_bad"  # the user's own module, written into the fixture folder


class _Marker:
    """Unpickling this creates the file ``path``: proof that a pickle was executed."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


USER_CODE = """
import torch
from torch import nn


class Fails(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        raise RuntimeError("my forward is broken")


class NaNOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(x.flatten(1)) * float("nan")


class NaNSamples(torch.utils.data.Dataset):
    def __len__(self):
        return 40

    def __getitem__(self, i):
        x = torch.zeros(1, 8, 8)
        x[0, 0, 0] = float("nan") if i == 7 else 0.0
        return x, i % 10


def fails():
    return Fails()


def nan_out():
    return NaNOut()


def bn_net():
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(144, 10))


def not_a_module():
    return 42


def raises():
    raise ValueError("cannot build")


def nan_data():
    return NaNSamples()


def int_data():
    return 3


def triples():
    return [(torch.zeros(4, 1, 8, 8), torch.zeros(4, dtype=torch.long), 0)] * 4
"""


def _npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """The user's files: data, weights, code and Hugging Face folders, all bad in one way."""
    d = tmp_path_factory.mktemp("user")
    g = np.random.default_rng(0)
    x = g.random((40, 1, 8, 8), dtype=np.float32)
    y = np.arange(40) % 10
    f = {}
    f["nan_x"] = _npz(
        d / "nan_x.npz", x=np.where(np.arange(40)[:, None, None, None] == 3, np.nan, x), y=y
    )
    f["inf_x"] = _npz(d / "inf_x.npz", x=np.where(x > 0.99, np.inf, x), y=y)
    f["nan_test"] = _npz(d / "nan_test.npz", x=x, y=y, x_test=np.full((4, 1, 8, 8), np.nan, np.float32),
                         y_test=y[:4])  # fmt: skip
    f["label_high"] = _npz(d / "label_high.npz", x=x, y=np.where(y == 9, 10, y))
    f["label_neg"] = _npz(d / "label_neg.npz", x=x, y=np.where(y == 0, -1, y))
    f["one_class"] = _npz(d / "one_class.npz", x=x, y=np.zeros(40, np.int64))
    f["empty"] = _npz(d / "empty.npz", x=x[:0], y=y[:0])
    f["empty_test"] = _npz(d / "empty_test.npz", x=x, y=y, x_test=x[:0], y_test=y[:0])
    f["rows"] = _npz(d / "rows.npz", x=x, y=y[:30])
    f["float_y"] = _npz(d / "float_y.npz", x=x, y=y.astype(np.float32))
    f["onehot"] = _npz(d / "onehot.npz", x=x, y=np.eye(10, dtype=np.int64)[y])
    f["no_y"] = _npz(d / "no_y.npz", x=x)
    f["half_test"] = _npz(d / "half_test.npz", x=x, y=y, x_test=x[:4])
    f["shape"] = _npz(d / "shape.npz", x=g.random((40, 3, 5, 5), dtype=np.float32), y=y)
    (d / "corrupt.npz").write_bytes(b"PK\x03\x04 not a zip at all")
    f["corrupt_npz"] = d / "corrupt.npz"
    (d / "folder.npz").mkdir()
    f["dir_npz"] = d / "folder.npz"
    one = d / "images_one_class" / "cat"
    one.mkdir(parents=True)
    from PIL import Image

    for i in range(3):
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(one / f"{i}.png")
    f["one_class_images"] = d / "images_one_class"
    broken = d / "images_broken"
    for c in ("a", "b"):
        (broken / c).mkdir(parents=True)
        for i in range(2):
            (broken / c / f"{i}.png").write_bytes(b"\x89PNG but not really")
    f["broken_images"] = broken

    # weights
    sd = create("digits_cnn").state_dict()
    nan_sd = {k: v.clone() for k, v in sd.items()}
    first = next(k for k, v in nan_sd.items() if v.is_floating_point())
    nan_sd[first].view(-1)[0] = float("nan")
    save_file(nan_sd, d / "nan.safetensors")
    inf_sd = {k: v.clone() for k, v in sd.items()}
    inf_sd[first].view(-1)[1] = float("inf")
    save_file(inf_sd, d / "inf.safetensors")
    wrong = {k: (torch.zeros(*v.shape[:-1], v.shape[-1] + 1) if v.ndim == 2 else v)
             for k, v in sd.items()}  # fmt: skip
    save_file({k: v.contiguous() for k, v in wrong.items()}, d / "shapes.safetensors")
    save_file(create("digits_resnet").state_dict(), d / "other.safetensors")
    (d / "corrupt.safetensors").write_bytes(b"\x00\x01 garbage")
    torch.save({"w": _Marker(str(d / "EXECUTED_weights"))}, d / "evil.pt")
    torch.save({"a": 1}, d / "not_tensors.pt")
    (d / "weights_dir.safetensors").mkdir()
    f.update({k: d / f"{k}.safetensors" for k in ("nan", "inf", "shapes", "other", "corrupt")})
    f.update(
        evil=d / "evil.pt",
        not_tensors=d / "not_tensors.pt",
        weights_dir=d / "weights_dir.safetensors",
    )

    # the user's own code
    (d / f"{MODULE}.py").write_text(textwrap.dedent(USER_CODE))

    # Hugging Face folders
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=16)  # fmt: skip
    pickled = d / "hf_pickle"
    cfg.save_pretrained(pickled)
    torch.save({"w": _Marker(str(d / "EXECUTED_hf"))}, pickled / "pytorch_model.bin")
    noconf = d / "hf_noconfig"
    noconf.mkdir()
    (noconf / "model.safetensors").write_bytes(b"")
    badconf = d / "hf_badconfig"
    badconf.mkdir()
    (badconf / "config.json").write_text("{ not json")
    gpt = d / "hf_gpt2"
    transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(gpt)
    f.update(hf_pickle=pickled, hf_noconfig=noconf, hf_badconfig=badconf, hf_gpt2=gpt)

    (d / "a_file").write_text("not a folder")
    f["a_file"] = d / "a_file"
    f["root"] = d
    return f


def _cases(f):
    """name -> (argv after 'squeezer', a phrase the message must hold); ``--out`` is added."""
    c = ["compress", "zoo:digits_cnn", "--budget", "bits=8"]

    def data(spec):
        return [*c, "--data", str(spec)]

    def model(spec, *more):
        return ["compress", spec, "--budget", "bits=8", "--data", "digits", *more]

    def weights(key):
        return model("zoo:digits_cnn", "--weights", str(f[key]))

    def hf(key):
        return ["compress", f"hf:{f[key]}", "--budget", "bits=8", "--data", "sentences"]

    def budget(b):
        return ["compress", "zoo:digits_cnn", "--budget", b, "--data", "digits"]

    mod = MODULE
    return {
        # data
        "NaN inputs": (data(f["nan_x"]), "NaN or infinite"),
        "Inf inputs": (data(f["inf_x"]), "NaN or infinite"),
        "NaN in the user's test split": (data(f["nan_test"]), "test inputs"),
        "label beyond the outputs": (data(f["label_high"]), "labels up to 10"),
        "negative label": (data(f["label_neg"]), "include -1"),
        "one class": (data(f["one_class"]), "one class only"),
        "empty data": (data(f["empty"]), "at least 2"),
        "empty test split": (data(f["empty_test"]), "test split"),
        "x and y rows differ": (data(f["rows"]), "must match"),
        "float labels": (data(f["float_y"]), "integer class labels"),
        "one-hot labels": (data(f["onehot"]), "one class index per input"),
        "no y array": (data(f["no_y"]), "'x' and 'y'"),
        "x_test without y_test": (data(f["half_test"]), "x_test"),
        "inputs of another shape": (data(f["shape"]), "does not fit the model"),
        "corrupt npz": (data(f["corrupt_npz"]), "as .npz"),
        "npz that is a folder": (data(f["dir_npz"]), "cannot read"),
        "missing data file": (data(f["root"] / "nope.npz"), "does not exist"),
        "unknown data name": (data("imagenet"), "unknown data set"),
        "image folder of one class": (data(f["one_class_images"]), "two class"),
        "unreadable images": (data(f["broken_images"]), "cannot read image"),
        "data factory raises": (data(f"{mod}:raises"), "calling"),
        "data factory returns an int": (data(f"{mod}:int_data"), "object of type int"),
        "data batches are not pairs": (data(f"{mod}:triples"), "not an (inputs, targets)"),
        "NaN in a streamed data set": (data(f"{mod}:nan_data"), "NaN or infinite"),
        "data module missing": (data("no_such_mod_xyz:make"), "cannot import"),
        "text data for a zoo model": (data("sentences"), "give MODEL as hf:DIR"),
        "train on NaN data": (["train", "zoo:digits_cnn", "--data", str(f["nan_x"])], "NaN"),
        "analyze one class": (
            ["analyze", "zoo:digits_cnn", "--data", str(f["one_class"])],
            "one class",
        ),  # fmt: skip
        # models
        "forward fails": (model(f"{mod}:fails"), "my forward is broken"),
        "outputs NaN": (model(f"{mod}:nan_out"), "NaN or infinite"),
        "unknown zoo model": (model("zoo:nope"), "no built-in model"),
        "model spec without a kind": (model("digits_cnn"), "cannot resolve model"),
        "model module missing": (model("no_such_mod_xyz:make"), "cannot import"),
        "model attribute missing": (model(f"{mod}:nope"), "no attribute"),
        "factory returns no module": (model(f"{mod}:not_a_module"), "not a torch.nn.Module"),
        "model factory raises": (model(f"{mod}:raises"), "cannot build"),
        "zero-shot without a shape": (
            ["compress", f"{mod}:bn_net", "--budget", "bits=8", "--calib", "zeroshot"],
            "--input-shape",
        ),  # fmt: skip
        "zero-shot shape that does not fit": (
            [*c, "--calib", "zeroshot", "--input-shape", "3,5,5"],
            "--input-shape",
        ),  # fmt: skip
        # weights
        "NaN weights": (weights("nan"), "NaN or infinity"),
        "Inf weights": (weights("inf"), "NaN or infinity"),
        "weights of other shapes": (weights("shapes"), "other shapes"),
        "weights of another net": (weights("other"), "does not fit"),
        "missing weights": (
            model("zoo:digits_cnn", "--weights", str(f["root"] / "no.pt")),
            "does not exist",
        ),  # fmt: skip
        "corrupt safetensors": (weights("corrupt"), "not a valid"),
        "full pickle": (weights("evil"), "--trust-pickle"),
        "weights not tensors": (weights("not_tensors"), "state dict"),
        "weights path is a folder": (weights("weights_dir"), "not a file"),
        # Hugging Face folders
        "hf folder missing": (
            ["compress", f"hf:{f['root'] / 'nohf'}", "--budget", "bits=8", "--data", "sentences"],
            "no such folder",
        ),  # fmt: skip
        "hf without config": (hf("hf_noconfig"), "no config.json"),
        "hf config garbage": (hf("hf_badconfig"), "not a Hugging Face model config"),
        "hf decoder model": (hf("hf_gpt2"), "without token embeddings and a list of attention"),
        "hf weights only a pickle": (hf("hf_pickle"), "pass --trust-pickle"),
        # budgets
        "budget key": (budget("speed=3"), "unknown budget key"),
        "zero bits": (budget("bits=0"), "must be positive"),
        "bits not a number": (budget("bits=abc"), "number"),
        "negative size": (budget("size=-1MB"), "must be positive"),
        "empty budget": (budget(""), "empty budget"),
        "relative budget above 1": (budget("size=2r"), "fraction"),
        "a key twice": (budget("bits=4,bits=3"), "twice"),
        # numbers
        "no Hessian samples": (
            model("zoo:digits_cnn", "--hessian-samples", "0"),
            "--hessian-samples",
        ),  # fmt: skip
        "no Hessian batch": (
            model("zoo:digits_cnn", "--hessian-batch-size", "0"), "--hessian-batch-size",
        ),
        "no Hessian probes": (model("zoo:digits_cnn", "--hessian-probes", "0"), "--hessian-probes"),
        "one activation bit": (model("zoo:digits_cnn", "--act-bits", "1"), "--act-bits"),
        "max-len 1": (model("zoo:digits_cnn", "--max-len", "1"), "--max-len"),
        "input shape text": ([*c, "--calib", "zeroshot", "--input-shape", "a,b"], "--input-shape"),
        "threads text": (model("zoo:digits_cnn", "--threads", "abc"), "threads"),
        "no data": (c, "--data is required"),
    }


def _hashes(root: Path) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and "__pycache__" not in p.parts:
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
        elif p.is_dir():
            out[str(p.relative_to(root)) + "/"] = "dir"
    return out


def _names() -> list[str]:
    return list(_cases(_Names()).keys())


class _Names(dict):
    """Stands in for the fixture's files when only the case names are needed."""

    def __missing__(self, key):
        return Path(f"{key}.npz")


@pytest.fixture
def no_analysis(monkeypatch):
    """Any call to the compression chain fails the test: checks must come before any work."""

    def refuse(*a, **k):
        raise AssertionError("the pipeline started although the input is bad")

    monkeypatch.setattr(squeezer.runs, "compress", refuse)
    monkeypatch.setattr(squeezer.runs, "fit", refuse, raising=False)


@pytest.mark.parametrize("case", _names())
def test_bad_input(case, inputs, tmp_path, capsys, monkeypatch, no_analysis):
    monkeypatch.syspath_prepend(str(inputs["root"]))
    argv, phrase = _cases(inputs)[case]
    out = tmp_path / "run"
    before = _hashes(inputs["root"])
    rc = main([*argv, "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.count("\n") == 1 and err.startswith("squeezer: error:"), err
    assert "Traceback" not in err
    assert phrase in err, err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if ".staging" in p.name]
    assert _hashes(inputs["root"]) == before  # nothing the user owns changed, no pickle ran
    assert not list(inputs["root"].glob("EXECUTED*"))


@pytest.mark.parametrize("where", ["a file", "foreign files", "below a file"])
def test_bad_output_folder(where, inputs, tmp_path, capsys, no_analysis):
    out = {"a file": tmp_path / "taken", "foreign files": tmp_path / "mine",
           "below a file": tmp_path / "taken" / "run"}[where]  # fmt: skip
    (tmp_path / "taken").write_text("my notes")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    before = _hashes(tmp_path)
    rc = main(["compress", "zoo:digits_cnn", "--data", "digits", "--budget", "bits=8", "--out",
               str(out)])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "--out" in err and "Traceback" not in err
    assert _hashes(tmp_path) == before


def test_the_battery_is_large_enough():
    assert len(_names()) + 3 >= 30


def test_trust_pickle_lets_a_pickle_only_hf_folder_through_to_transformers(inputs):
    """With --trust-pickle the folder is handed to transformers, which reads .bin files with
    ``weights_only`` itself: the marker pickle is refused there too, as a one-line error."""
    from squeezer.errors import UnsupportedModelError
    from squeezer.hf import check_weight_files

    assert check_weight_files(inputs["hf_pickle"], "hf:x", trust_pickle=True) is False
    with pytest.raises(UnsupportedModelError, match="--trust-pickle"):
        check_weight_files(inputs["hf_pickle"], "hf:x")


# --------------------------------------------------------------------------------------------------
# Interruption and the solver's banner, in real processes.


def _env() -> dict[str, str]:
    src = str(Path(squeezer.runs.__file__).parents[1])
    return {**os.environ, "PYTHONPATH": src, "SQUEEZER_THREADS": "1", "SQUEEZER_NO_PROGRESS": "1"}


def test_sigterm_leaves_no_staging_folder(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "squeezer", "compress", "zoo:digits_resnet_deep", "--data",
         "digits", "--budget", "bits=4", "--out", str(out)],
        env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    deadline = time.time() + 60
    while time.time() < deadline and not list(tmp_path.glob(".run.*.staging")):
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.02)
    assert list(tmp_path.glob(".run.*.staging")), "the run never staged"
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=60)
    assert rc == 128 + signal.SIGTERM
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_highs_banner_stays_off_stdout():
    code = ("from squeezer.milp import Program\n"
            "p = Program(cost=[1.0, 2.0], integer=[True, True], upper=[1.0, 1.0])\n"
            "p.add_row([0, 1], [1.0, 1.0], lower=1.0)\n"
            "print('x =', p.solve().x.tolist()); print('again', p.solve().x.tolist())\n")  # fmt: skip
    r = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True,
                       timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "HiGHS" not in r.stdout and "Copyright" not in r.stdout
    assert [line.split()[0] for line in r.stdout.splitlines()] == ["x", "again"]
