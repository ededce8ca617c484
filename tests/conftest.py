"""Shared fixtures: small trained nets are cached per session so tests stay fast; one torch thread
for a module (``one_thread``); a detector of integer-to-float steps (``float_leaks``)."""

from __future__ import annotations

import os

import pytest
import torch
from torch.overrides import TorchFunctionMode

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


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread while a module runs, whatever an earlier test set (a module opts in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``). Tiny nets and products are dominated
    by thread hand-offs: on the shared 2-core machine a second thread made them ~50x slower, and
    one epoch of digits_resnet took 13.3 s instead of 0.66 s."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class _FloatLeakDetector(TorchFunctionMode):
    """Records every torch call that turns an integer tensor into a floating one (``leaks``), and
    the dtypes of all tensors the calls return (``dtypes``)."""

    def __init__(self):
        super().__init__()
        self.leaks: list[str] = []
        self.dtypes: set[torch.dtype] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        leaves = list(args) + list((kwargs or {}).values())
        ints_in = any(
            isinstance(a, torch.Tensor) and not a.is_floating_point() and a.dtype != torch.bool
            for a in leaves
        )
        outs = out if isinstance(out, tuple | list) else (out,)
        for o in outs:
            if isinstance(o, torch.Tensor):
                self.dtypes.add(o.dtype)
        if ints_in and any(isinstance(o, torch.Tensor) and o.is_floating_point() for o in outs):
            self.leaks.append(getattr(func, "__name__", str(func)))
        return out


@pytest.fixture
def float_leaks():
    """``with float_leaks() as mode:`` records in ``mode.leaks`` the torch calls inside that turn
    an integer tensor into a floating one."""
    return _FloatLeakDetector


@pytest.fixture(scope="module")
def cases():
    """{kind: (net, data, dense Hessian, operator)} for the MLP and the Conv-BN net.

    ``data`` is three uneven batches; the operator uses the same samples as one batch (the same
    Hessian, as test_hvp checks) because one graph per product is faster.
    """
    from test_hvp import CE, dense_hessian, split, trained

    from squeezer.hvp import HessianOperator

    out = {}
    for kind in ("mlp", "conv"):
        net, x, y = trained(kind)
        out[kind] = (net, split(x, y), dense_hessian(net, x, y), HessianOperator(net, CE, (x, y)))
    return out
