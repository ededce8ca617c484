import pytest
import torch

from squeezer.graph import quantizable_layers
from squeezer.zoo import MODELS, create, list_models


@pytest.mark.parametrize("name", list_models())
def test_every_zoo_model_runs_and_has_quantizable_layers(name):
    m = create(name)
    x = torch.randn(2, *MODELS[name].input_shape)
    out = m.eval()(x)
    assert out.shape[0] == 2 and torch.isfinite(out).all()
    assert len(quantizable_layers(m)) >= 2
