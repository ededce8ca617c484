"""Every registered model builds from its registry entry, runs a seeded batch and has layers to
quantize; ``create`` draws weights from its own seed and honours a factory's own input shape."""

import pytest
import torch

from squeezer.graph import quantizable_layers
from squeezer.zoo import MODELS, create, list_models

pytestmark = pytest.mark.usefixtures("one_thread")


def _batch(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    # 224 x 224 nets get one sample (the default suite stays quick), small nets two
    n = 1 if shape[-1] >= 224 else 2
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list_models())
def test_every_zoo_model_runs_and_has_quantizable_layers(name):
    m = create(name)
    assert m.input_shape == MODELS[name].input_shape
    x = _batch(m.input_shape)
    out = m.eval()(x)
    assert out.shape[0] == x.shape[0] and torch.isfinite(out).all()
    assert len(quantizable_layers(m)) >= 2


@pytest.mark.parametrize("name", list_models())
def test_create_is_seeded_and_leaves_the_global_generator_alone(name):
    if MODELS[name].input_shape[-1] >= 224 and name != "sqnxt23":
        pytest.skip("one large net is enough to check seeding")
    state = torch.random.get_rng_state()
    a, b, c = create(name, seed=3), create(name, seed=3), create(name, seed=4)
    assert torch.equal(torch.random.get_rng_state(), state)
    wa, wb, wc = (list(quantizable_layers(m).values())[0].weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


@pytest.mark.parametrize(
    "name", [n for n in list_models() if MODELS[n].reference is not None or n == "diracdeltanet"]
)
def test_classes_kwarg_sets_the_output_width(name):
    m = create(name, classes=7).eval()
    assert m(_batch(m.input_shape)).shape[1] == 7


def test_a_factory_may_set_its_own_input_shape():
    det = create("squeezedet", image_size=96)
    assert det.input_shape == (3, 96, 96)
    assert det.eval()(torch.zeros(1, 3, 96, 96)).shape[1] == det.anchors_per_cell * (3 + 5)
