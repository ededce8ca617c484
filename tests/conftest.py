"""Shared fixtures: small trained nets are cached per session so tests stay fast."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("SQUEEZER_NO_PROGRESS", "1")
# One thread: the nets under test are tiny, and several threads on a busy 2-core machine are
# many times slower than one (oversubscription).
torch.set_num_threads(1)
os.environ.setdefault("SQUEEZER_THREADS", "1")  # what the CLI would otherwise choose by load


@pytest.fixture(scope="session")
def digits():
    from squeezer.data import load_data

    return load_data("digits")


@pytest.fixture(scope="session")
def trained_digits_cnn(digits):
    """The digits CNN trained for a few epochs (a real trained model, ~98% accurate)."""
    from squeezer.train import fit
    from squeezer.zoo import create

    net, info = fit(create("digits_cnn"), digits, epochs=6, seed=0)
    return net, info
