"""Hessian-vector products against the dense Hessian of tiny networks (torch.autograd.functional).

The tiny networks and the dense oracle defined here are reused by test_spectrum.py and
test_distributed.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call

from squeezer.errors import ConfigError, DataError
from squeezer.graph import quantizable_layers
from squeezer.hvp import HessianOperator, hvp

pytestmark = pytest.mark.usefixtures("one_thread")

# ----------------------------------------------------------------------------- shared fixtures


class ConvBN(nn.Module):
    """Two conv + BatchNorm blocks and a linear head: 207 parameters on 1×6×6 inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 3, 3)
        self.bn1 = nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 4, 3)
        self.bn2 = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(self.drop(x.flatten(1)))


class ConvDeconv(nn.Module):
    """A strided conv, a transposed conv back up and a linear head: 137 parameters on 1×6×6."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, stride=2)  # 6×6 → 2×2
        self.deconv = nn.ConvTranspose2d(2, 2, 2, stride=2)  # 2×2 → 4×4
        self.fc = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.deconv(torch.tanh(self.conv(x))))
        return self.fc(x.flatten(1))


def make_mlp() -> nn.Module:
    """6-12-8-3 tanh MLP: 215 parameters."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 3)
    ).double()


def make_convbn() -> nn.Module:
    torch.manual_seed(0)
    return ConvBN().double()


def make_deconv() -> nn.Module:
    torch.manual_seed(0)
    return ConvDeconv().double()


def make_data(kind: str, n: int = 48, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Three Gaussian blobs, as 6-vectors ("mlp") or 1×6×6 images ("conv", "deconv")."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    shape = (6,) if kind == "mlp" else (1, 6, 6)
    centers = torch.randn(3, *shape, generator=g, dtype=torch.float64)
    x = centers[y] + 0.8 * torch.randn(n, *shape, generator=g, dtype=torch.float64)
    return x, y


def trained(kind: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A tiny net after 200 steps of gradient descent (so its Hessian looks like a trained net's).

    Plain updates, not torch.optim: an optimizer's first use imports torch._dynamo (seconds).
    """
    net = {"mlp": make_mlp, "conv": make_convbn, "deconv": make_deconv}[kind]()
    x, y = make_data(kind)
    net.train()
    for _ in range(200):
        grads = torch.autograd.grad(nn.functional.cross_entropy(net(x), y), list(net.parameters()))
        with torch.no_grad():
            for p, g in zip(net.parameters(), grads, strict=True):
                p -= 0.3 * g
    return net, x, y


def split(x: torch.Tensor, y: torch.Tensor, sizes=(20, 17, 11)) -> list:
    """Uneven batches, so the batch-size weighting is exercised."""
    return list(zip(torch.split(x, list(sizes)), torch.split(y, list(sizes)), strict=True))


def dense_hessian(net: nn.Module, x, y, names=None) -> torch.Tensor:
    """The oracle: Hessian of the mean loss over (x, y) in eval mode, in named_parameters order."""
    net = copy.deepcopy(net).eval()
    named = dict(net.named_parameters())
    names = list(named) if names is None else names
    shapes = [named[n].shape for n in names]
    sizes = [named[n].numel() for n in names]
    flat = torch.cat([named[n].detach().reshape(-1) for n in names])

    def loss(v: torch.Tensor) -> torch.Tensor:
        parts = torch.split(v, sizes)
        p = {n: t.reshape(s) for n, t, s in zip(names, parts, shapes, strict=True)}
        return nn.functional.cross_entropy(functional_call(net, p, (x,)), y)

    return torch.autograd.functional.hessian(loss, flat)


@pytest.fixture(scope="module")
def nets():
    return {kind: trained(kind) for kind in ("mlp", "conv", "deconv")}


# ------------------------------------------------------------------------------------ tests

CE = nn.functional.cross_entropy


@pytest.mark.parametrize("kind", ["mlp", "conv", "deconv"])
@pytest.mark.parametrize("backend", ["double_backprop", "func"])
@pytest.mark.parametrize("cache_samples", [0, 30, 4096])
def test_matvec_equals_dense_hessian(nets, kind, backend, cache_samples):
    net, x, y = nets[kind]
    H = dense_hessian(net, x, y)
    op = HessianOperator(net, CE, split(x, y), backend=backend, cache_samples=cache_samples)
    assert op.dim == H.shape[0] and op.samples == 48
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        v = torch.randn(op.dim, generator=g, dtype=torch.float64)
        hv = op.matvec(v)
        assert torch.allclose(hv, H @ v, rtol=1e-9, atol=1e-12)
    assert op.hvp_count == 3
    # Several probes in one (vmapped) backward pass give the same products.
    V = torch.randn(op.dim, 5, generator=g, dtype=torch.float64)
    assert torch.allclose(op.matmat(V), H @ V, rtol=1e-9, atol=1e-12)
    assert op.hvp_count == 8


def test_pure_hvp_one_batch_matches_dense(nets):
    net, x, y = nets["mlp"]
    H = dense_hessian(net, x, y)
    params = {n: p.detach() for n, p in net.named_parameters()}
    v = {n: torch.ones_like(p) for n, p in params.items()}
    out = hvp(copy.deepcopy(net).eval(), CE, params, (x, y), v)
    flat = torch.cat([out[n].reshape(-1) for n in params])
    assert torch.allclose(flat, H @ torch.ones(H.shape[0], dtype=torch.float64), atol=1e-12)
    assert all(p.grad is None for p in net.parameters())


def test_model_untouched_and_eval_mode_used(nets):
    net, x, y = nets["conv"]
    net = copy.deepcopy(net).train()  # BatchNorm in train mode, dropout on
    before = {k: v.clone() for k, v in net.state_dict().items()}
    op = HessianOperator(net, CE, split(x, y))
    v = torch.ones(op.dim, dtype=torch.float64)
    hv1, hv2 = op.matvec(v), op.matvec(v)
    # Eval mode: no dropout noise, running statistics; equal to the eval-mode oracle.
    assert torch.equal(hv1, hv2)
    assert torch.allclose(hv1, dense_hessian(net, x, y) @ v, atol=1e-12)
    assert net.training and all(m.training for m in net.modules())
    assert all(p.grad is None and p.requires_grad for p in net.parameters())
    for k, t in net.state_dict().items():
        assert torch.equal(t, before[k]), k


def test_layout_blocks_are_layer_weights(nets):
    net, x, y = nets["conv"]
    op = HessianOperator(net, CE, (x, y))
    assert list(op.layout.blocks) == list(quantizable_layers(net)) == ["conv1", "conv2", "fc"]
    named = dict(net.named_parameters())
    for fqn, sl in op.layout.block_slices().items():
        assert op.layout.blocks[fqn] == f"{fqn}.weight"
        assert sl.stop - sl.start == named[f"{fqn}.weight"].numel()
    # Biases and BatchNorm parameters are analysed too, outside every block ("the rest").
    in_blocks = sum(sl.stop - sl.start for sl in op.layout.block_slices().values())
    assert op.dim == sum(p.numel() for p in net.parameters()) > in_blocks
    # A transposed convolution's weight is a block like any other layer's.
    net, x, y = nets["deconv"]
    assert list(HessianOperator(net, CE, (x, y)).layout.blocks) == ["conv", "deconv", "fc"]


def test_restricted_operator_is_the_diagonal_block(nets):
    net, x, y = nets["mlp"]
    H = dense_hessian(net, x, y)
    op = HessianOperator(net, CE, split(x, y))
    sl = op.layout.block_slices()["2"]
    sub = op.restricted(["2.weight"])
    assert sub.dim == sl.stop - sl.start and list(sub.layout.blocks) == ["2"]
    v = torch.randn(sub.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.allclose(sub.matvec(v), H[sl, sl] @ v, atol=1e-12)
    sub.release()  # dropping the cached graphs keeps the same answer
    assert torch.allclose(sub.matvec(v), H[sl, sl] @ v, atol=1e-12)


def test_frozen_parameters_are_skipped_and_params_selects(nets):
    net, x, y = nets["mlp"]
    net = copy.deepcopy(net)
    net[0].weight.requires_grad_(False)
    op = HessianOperator(net, CE, (x, y))
    assert "0.weight" not in op.layout.names and "0" not in op.layout.blocks
    names = ["0.weight", "4.weight"]
    op2 = HessianOperator(net, CE, (x, y), params=names)
    H = dense_hessian(net, x, y, names=names)
    v = torch.ones(op2.dim, dtype=torch.float64)
    assert torch.allclose(op2.matvec(v), H @ v, atol=1e-12)


class DictNet(nn.Module):
    """Takes keyword inputs, like a Hugging Face model."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.emb(input_ids) * attention_mask[..., None]
        return self.head(h.sum(1) / attention_mask.sum(1, keepdim=True))


def test_dict_inputs_and_one_shot_iterators():
    torch.manual_seed(0)
    net = DictNet().double()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 7, (10, 5), generator=g)
    mask = (torch.rand(10, 5, generator=g) > 0.3).double()
    mask[:, 0] = 1
    y = torch.randint(0, 2, (10,), generator=g)
    batches = [
        ({"input_ids": ids[:6], "attention_mask": mask[:6]}, y[:6]),
        ({"input_ids": ids[6:], "attention_mask": mask[6:]}, y[6:]),
    ]
    op = HessianOperator(net, CE, iter(batches), cache_samples=0)  # a one-shot iterator
    assert list(op.layout.blocks) == ["emb", "head"]

    names = [n for n, _ in net.named_parameters()]
    shapes = [p.shape for p in net.parameters()]
    sizes = [p.numel() for p in net.parameters()]

    def loss(v):
        p = {n: t.reshape(s) for n, t, s in zip(names, torch.split(v, sizes), shapes, strict=True)}
        out = functional_call(net, p, (), {"input_ids": ids, "attention_mask": mask})
        return CE(out, y)

    flat = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    H = torch.autograd.functional.hessian(loss, flat)
    v = torch.randn(op.dim, generator=g, dtype=torch.float64)
    for _ in range(2):  # the iterator was materialised, so a second product sees all the data
        assert torch.allclose(op.matvec(v), H @ v, atol=1e-12)


def test_bad_inputs_raise_typed_errors(nets):
    net, x, y = nets["mlp"]
    with pytest.raises(DataError, match="pair"):
        HessianOperator(net, CE, [(x, y, y)])
    with pytest.raises(DataError, match="no samples"):
        HessianOperator(net, CE, [])
    with pytest.raises(DataError, match="iterable"):
        HessianOperator(net, CE, 3)
    with pytest.raises(ConfigError, match="no parameter"):
        HessianOperator(net, CE, (x, y), params=["nope.weight"])
    with pytest.raises(ConfigError, match="scalar"):
        HessianOperator(net, lambda o, t: CE(o, t, reduction="none"), (x, y))
    with pytest.raises(ConfigError, match="backend"):
        HessianOperator(net, CE, (x, y), backend="magic")
