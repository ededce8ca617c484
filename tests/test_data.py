"""Data sets and batches: every registered data set loads with a fixed split and batches itself for
calibration, analysis and evaluation; .npz files and image folders; check_fits; Batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from squeezer.data import (
    DATASETS,
    LABELLED_BY_MODEL,
    Batches,
    batch_size,
    check_fits,
    load_data,
)
from squeezer.errors import DataError

#: Data sets that need an hf: encoder and its tokenizer (tested in test_hf.py and test_text.py),
#: or the model whose predictions label them (photos: tests/zoo/test_efficientnet.py).
NEEDS_ENCODER = {"sentences", "text"} | LABELLED_BY_MODEL


@pytest.mark.parametrize("name", sorted(set(DATASETS) - NEEDS_ENCODER))
def test_every_builtin_data_set(name):
    d = load_data(name)
    again = load_data(name)
    assert torch.equal(d.x_test, again.x_test) and torch.equal(d.y_train, again.y_train)
    assert d.n_train == len(d.y_train) > 0 and len(d.y_test) > 0
    assert d.input_shape == tuple(d.x_train.shape[1:])
    cal = list(d.calibration_batches(100))
    assert sum(batch_size(x) for x, _ in cal) == 100
    assert torch.equal(torch.cat([x for x, _ in cal]),
                       torch.cat([x for x, _ in d.calibration_batches(100)]))  # fmt: skip
    seen = torch.cat([x for x, _ in d.analysis_batches(64, batch_size=16)])
    assert seen.shape[0] == 64
    assert sum(batch_size(x) for x, _ in d.test_batches()) == len(d.y_test)
    assert torch.equal(d.example(2), d.x_test[:2])


def test_npz_and_image_folder(tmp_path):
    from PIL import Image

    g = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=g.normal(size=(40, 3)).astype(np.float32),
             y=g.integers(0, 2, 40))  # fmt: skip
    d = load_data(str(tmp_path / "d.npz"), seed=1)
    assert d.name == "d" and len(d.y_train) + len(d.y_test) == 40 and d.meta["classes"] == 2
    assert not torch.equal(d.x_test, load_data(str(tmp_path / "d.npz"), seed=2).x_test)
    for c in ("cat", "dog"):
        (tmp_path / "img" / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(g.integers(0, 255, (6, 5, 3), dtype=np.uint8)).save(
                tmp_path / "img" / c / f"{i}.png"
            )
    im = load_data(str(tmp_path / "img"))
    assert im.input_shape == (3, 6, 5) and im.meta["class_names"] == ["cat", "dog"]
    assert float(im.x_train.max()) <= 1.0


def test_errors_are_one_line_data_errors(tmp_path):
    with pytest.raises(DataError, match="unknown data set"):
        load_data("nope")
    with pytest.raises(DataError, match="does not exist"):
        load_data(str(tmp_path / "missing.npz"))
    np.savez(tmp_path / "bad.npz", x=np.zeros((4, 2)), y=np.zeros(3, dtype=np.int64))
    with pytest.raises(DataError, match="must match"):
        load_data(str(tmp_path / "bad.npz"))
    d = load_data("digits")
    with pytest.raises(DataError, match="does not fit the model"):
        check_fits(nn.Linear(3, 2), d)
    check_fits(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), d)


def test_batches_cover_the_split_and_reshuffle_each_pass():
    x, y = torch.arange(10.0)[:, None], torch.arange(10)
    b = Batches(x, y, 4)
    assert [batch_size(xb) for xb, _ in b] == [4, 4, 2] and len(b) == 3
    s = Batches(x, y, 4, shuffle=True, seed=3, limit=6)
    first, second = (torch.cat([yb for _, yb in s]) for _ in range(2))
    assert first.shape[0] == 6 and not torch.equal(first, second)  # a new draw each pass
    assert torch.equal(first, torch.cat([yb for _, yb in Batches(x, y, 4, shuffle=True, seed=3,
                                                                  limit=6)]))  # fmt: skip
