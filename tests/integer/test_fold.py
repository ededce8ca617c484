"""BatchNorm folding (``squeezer.integer.fold_batchnorm``, HAWQ-V3 arXiv:2011.10680) against the
eval model it came from: equal to float round-off (1e-5 of the output range), the input untouched.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from squeezer.integer import fold_batchnorm
from squeezer.zoo import create

from .batchnorm import bn_stats, randomize_bn


@pytest.mark.parametrize("name", ["digits_cnn", "mnist1d_cnn", "digits_resnet"])
def test_fold_batchnorm_preserves_the_eval_model(name):
    torch.manual_seed(0)
    net = create(name)
    x = torch.randn(64, *net.input_shape, generator=torch.Generator().manual_seed(2))
    net = bn_stats(randomize_bn(net, 3), x)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    folded = fold_batchnorm(net)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert not any(isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d) for m in folded.modules())
    with torch.no_grad():
        y, yf = net(x), folded(x)
    assert float((y - yf).abs().max()) <= 1e-5 * float(y.abs().max())
