"""The user's own data: an .npz with its own test split, ``--data pkg.module:factory`` (a torch
Dataset, a DataLoader, a generator of batches, a (train, test) pair), streamed through the
pipeline, and image folders read lazily."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from squeezer.cli import main
from squeezer.data import Classification, check_fits, evaluate, load_data
from squeezer.stream import Indexed, StreamDataset, stream_data
from squeezer.zoo import create

pytestmark = pytest.mark.usefixtures("one_thread")

MODULE = "sq_user_data_own"

USER_DATA = """
import torch
from torch.utils.data import DataLoader, TensorDataset

from squeezer.data import load_data

_d = load_data("digits")
X = torch.cat([_d.x_train, _d.x_test])
Y = torch.cat([_d.y_train, _d.y_test])
CALLS = []


def dataset():
    return TensorDataset(X, Y)


def loader():
    return DataLoader(TensorDataset(X, Y), batch_size=50)


def generator():
    CALLS.append(1)
    return ((X[i : i + 64], Y[i : i + 64]) for i in range(0, len(X), 64))


def batch_list():
    return [(X[i : i + 100], Y[i : i + 100]) for i in range(0, len(X), 100)]


def pair():
    return TensorDataset(_d.x_train, _d.y_train), TensorDataset(_d.x_test, _d.y_test)


def splits():
    return {"train": TensorDataset(_d.x_train, _d.y_train), "test": DataLoader(
        TensorDataset(_d.x_test, _d.y_test), batch_size=100)}
"""


@pytest.fixture(scope="module")
def user_module(tmp_path_factory):
    d = tmp_path_factory.mktemp("user_data")
    (d / f"{MODULE}.py").write_text(textwrap.dedent(USER_DATA))
    return d


@pytest.fixture
def on_path(user_module, monkeypatch):
    monkeypatch.syspath_prepend(str(user_module))
    return user_module


def test_npz_keeps_the_users_test_split(tmp_path):
    g = np.random.default_rng(0)
    x, xt = g.random((30, 4), dtype=np.float32), g.random((7, 4), dtype=np.float32)
    np.savez(tmp_path / "mine.npz", x=x, y=np.arange(30) % 3, x_test=xt, y_test=np.arange(7) % 3)
    ds = load_data(str(tmp_path / "mine.npz"))
    assert torch.equal(ds.x_train, torch.tensor(x)) and torch.equal(ds.x_test, torch.tensor(xt))
    assert ds.meta["split"] == "file" and ds.n_train == 30
    np.savez(tmp_path / "whole.npz", x=x, y=np.arange(30) % 3)  # no test split: 75/25 as before
    whole = load_data(str(tmp_path / "whole.npz"))
    assert whole.n_train == 22 and len(whole.x_test) == 8


@pytest.mark.parametrize(
    "factory", ["dataset", "loader", "generator", "batch_list", "pair", "splits"]
)
def test_factory_data_streams_like_the_built_in_set(factory, on_path, digits):
    ds = load_data(f"{MODULE}:{factory}")
    assert isinstance(ds, StreamDataset) and ds.input_shape == (1, 8, 8)
    stats = check_fits(create("digits_cnn"), ds)
    assert stats["training"] + stats["test"] == 1797 and stats["max_label"] == 9
    assert ds.n_train == stats["training"]
    calib = ds.calibration_batches(100, batch_size=32)
    first, again = [y for _, y in calib], [y for _, y in calib]
    assert sum(len(y) for y in first) == 100 and all(map(torch.equal, first, again))
    analysis = ds.analysis_batches(64, batch_size=64)
    assert sum(len(y) for _, y in analysis) == 64
    if factory in ("pair", "splits"):  # the user's split, as given
        assert stats["test"] == len(digits.x_test)
        assert torch.equal(ds.example(5), digits.x_test[:5])


def test_a_one_shot_generator_is_made_again_for_each_pass(on_path):
    import sq_user_data_own as user

    ds = load_data(f"{MODULE}:generator")
    n = user.CALLS.__len__()
    passes = [sum(len(y) for _, y in ds.test_batches()) for _ in range(3)]
    assert passes[0] == passes[1] == passes[2] > 0
    assert len(user.CALLS) == n + 3


def test_seeded_subsets_of_an_indexable_source():
    src = TensorDataset(torch.arange(40.0)[:, None], torch.arange(40) % 2)
    ds = stream_data("toy", src, Classification(), seed=3)
    assert ds.n_train == 30 and isinstance(ds.train, Indexed)
    again = stream_data("toy", src, Classification(), seed=3)
    assert torch.equal(ds.test.indices, again.test.indices)
    assert not set(ds.test.indices.tolist()) & set(ds.train.indices.tolist())
    a = ds.analysis_batches(8, batch_size=8)
    one, two = (torch.cat([x for x, _ in a]) for _ in range(2))
    assert not torch.equal(one, two)  # a new seeded subset on each pass, as Batches draws
    c = ds.calibration_batches(8, batch_size=4)
    assert torch.equal(torch.cat([x for x, _ in c]), torch.cat([x for x, _ in c]))


def test_a_dataloader_keeps_its_collate_fn():
    seen = []

    def collate(items):
        seen.append(len(items))
        return torch.stack([x for x, _ in items]) * 0 + 1, torch.tensor([y for _, y in items])

    loader = DataLoader(TensorDataset(torch.zeros(12, 2), torch.arange(12) % 2), collate_fn=collate)
    ds = stream_data("c", loader, Classification())
    assert torch.equal(ds.example(2), torch.ones(2, 2)) and seen


def test_image_folder_is_read_lazily(tmp_path, monkeypatch):
    from PIL import Image

    for c in ("cat", "dog"):
        (tmp_path / "img" / c).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(np.full((6, 6, 3), 20 * i, np.uint8)).save(
                tmp_path / "img" / c / f"{i}.png"
            )
    opened = []
    real = Image.open
    monkeypatch.setattr(Image, "open", lambda *a, **k: opened.append(a[0]) or real(*a, **k))
    ds = load_data(str(tmp_path / "img"))
    assert len(opened) == 1  # the first image, for the size and mode
    assert ds.input_shape == (3, 6, 6) and ds.meta["class_names"] == ["cat", "dog"]
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(108, 2))
    assert 0 <= evaluate(net, ds.test_batches(), ds.task) <= 100


def test_compress_and_export_on_a_streamed_factory(on_path, tmp_path, capsys, trained_digits_cnn):
    from squeezer.models import save_weights

    save_weights(trained_digits_cnn[0], tmp_path / "w.safetensors")
    out = tmp_path / "run"
    rc = main(["compress", "zoo:digits_cnn", "--weights", str(tmp_path / "w.safetensors"),
               "--data", f"{MODULE}:pair", "--budget", "bits=4", "--hessian-samples", "128",
               "--out", str(out), "--quiet"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    m = json.loads((out / "metrics.json").read_text())
    assert m["data"] == "pair" and m["before"]["metric"] > 90 and m["after"]["metric"] > 80
    assert main(["export", str(out)]) == 0
    capsys.readouterr()
    assert "test_metric" in json.loads((out / "metrics.json").read_text())["export"]
