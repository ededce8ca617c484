"""Token data sets batch themselves: length-sorted batches cut to their longest sentence, seeded
calibration subsets, the first sentences for analysis; the embedding task's targets are the
model's own outputs. No transformers needed: token ids are synthetic."""

from __future__ import annotations

import pytest
import torch

from squeezer.errors import ConfigError, DataError
from squeezer.text import EmbeddingTask, TokenDataset, restore_order, token_batches


def tokens(n: int, t: int = 12, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, t + 1, (n,), generator=g)
    mask = (torch.arange(t)[None] < lens[:, None]).long()
    return {"input_ids": torch.randint(1, 100, (n, t), generator=g) * mask, "attention_mask": mask}


@pytest.fixture
def ds():
    x, y = tokens(40), torch.randn(40, 4, generator=torch.Generator().manual_seed(1))
    xt, yt = tokens(10, seed=2), torch.randn(10, 4, generator=torch.Generator().manual_seed(3))
    return TokenDataset("toy", x, y, xt, yt, EmbeddingTask())


def test_batches_are_cut_to_their_longest_sentence(ds):
    for x, _ in ds.test_batches(4):
        assert x["input_ids"].shape[1] == int(x["attention_mask"].sum(1).max())
        assert int(x["attention_mask"][:, -1].sum()) > 0
    pairs = ds.test_batches(4)
    torch.testing.assert_close(restore_order([y for _, y in pairs], ds.x_test), ds.y_test)


def test_calibration_and_analysis_subsets(ds):
    cal = ds.calibration_batches(16)
    again = ds.calibration_batches(16)
    assert sum(y.shape[0] for _, y in cal) == 16
    assert all(torch.equal(a[1], b[1]) for a, b in zip(cal, again, strict=True))
    seen = torch.cat([y for _, y in ds.analysis_batches(8, batch_size=4)])
    assert sorted(seen[:, 0].tolist()) == sorted(ds.y_train[:8, 0].tolist())  # the first 8
    with pytest.raises(DataError, match="no sentences"):
        ds.analysis_batches(0)


def test_token_batch_errors_and_the_task():
    with pytest.raises(DataError, match="attention_mask"):
        token_batches({"input_ids": torch.zeros(2, 3, dtype=torch.long)})
    with pytest.raises(ConfigError, match="batch_size"):
        token_batches(tokens(2), batch_size=0)
    e = torch.randn(3, 4)
    assert EmbeddingTask.targets_from_model and float(EmbeddingTask().loss(e, e)) == 0.0
