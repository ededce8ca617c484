"""Fixtures of the pruning run tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def weights(tmp_path, trained_digits_cnn):
    """The trained digits CNN's weights as a file, for ``squeezer compress --weights``."""
    from squeezer.models import save_weights

    w = tmp_path / "w.safetensors"
    save_weights(trained_digits_cnn[0], w)
    return w
