"""Shared fixtures: small trained nets are cached per session so tests stay fast."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("SQUEEZER_NO_PROGRESS", "1")
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


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
