"""Real photographs that installed packages ship, as an offline stand-in for ImageNet.

No labelled natural-image data set ships offline, so a pretrained ImageNet classifier is evaluated
by its fidelity to itself: the ``photos`` data set holds seeded crops of real photographs, and its
labels are the FP32 model's own top-1 predictions, so the pipeline's metric (``top1_agreement``) is
the percentage of crops on which a compressed model picks the class the FP32 model picks.
:func:`fidelity` adds top-5 agreement and the KL divergence of the predicted distributions.

The photographs (:data:`PHOTOS`), split once and for all so calibration never sees an evaluation
photo:

* evaluation (7): scikit-learn's two sample images (``flower.jpg``, a daisy; ``china.jpg``, a
  Chinese temple), scikit-image's ``chelsea`` (a tabby cat), ``astronaut`` (Eileen Collins),
  ``rocket`` (a Falcon 9 launch), ``immunohistochemistry`` (stained tissue under a microscope),
  and matplotlib's ``grace_hopper.jpg`` (a portrait in uniform);
* calibration (9): scikit-image's ``coffee`` (a cup of coffee), ``stereo_motorcycle`` (both views
  of one motorcycle), ``hubble_deep_field`` (galaxies), ``retina`` (a fundus photograph), and the
  grey-scale photographs ``camera`` (a cameraman), ``coins``, ``moon`` and ``gravel`` (copied to
  three channels).

Each photo gives one centre crop (shorter side resized to ``size / 0.875``, the usual ImageNet
evaluation crop) and then random crops: an area of 20–100 % of the photo at an aspect ratio of
3/4–4/3 (Inception-style), resized to ``size`` × ``size`` (bilinear, antialiased), flipped
left-right with probability 1/2, from a fixed seed (the same crops in every run). Pixels are RGB in
[0, 1], then normalised with the model's mean and std.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data import Classification, Dataset, register_dataset
from .errors import DataError

#: The crops' seed: fixed, so every run (and every model) sees the same crops.
CROP_SEED = 20260
EVAL_CROPS, CALIB_CROPS = 64, 32  # per photo


@dataclass(frozen=True)
class Photo:
    """A photograph a package ships: ``name``, where it comes from and what it shows."""

    name: str
    source: str
    what: str
    load: Callable[[], np.ndarray]


def _sklearn(file: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from sklearn.datasets import load_sample_image

        return load_sample_image(file)

    return load


def _skimage(fn: str, index: int | None = None) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        try:
            import skimage.data
        except ImportError:
            raise DataError(
                "the photos data set needs scikit-image: pip install 'squeezer[efficientnet]'"
            ) from None
        out = getattr(skimage.data, fn)()
        return out[index] if index is not None else out

    return load


def _matplotlib(file: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from PIL import Image

        spec = importlib.util.find_spec("matplotlib")
        if spec is None or spec.origin is None:
            raise DataError(
                "the photos data set needs matplotlib: pip install 'squeezer[efficientnet]'"
            )
        with Image.open(Path(spec.origin).parent / "mpl-data" / "sample_data" / file) as im:
            return np.asarray(im.convert("RGB"))

    return load


SK, SKI, MPL = (
    "scikit-learn load_sample_image",
    "scikit-image skimage.data",
    "matplotlib sample_data",
)
#: name -> (photo, split): "eval" or "calib".
PHOTOS: dict[str, tuple[Photo, str]] = {
    p.name: (p, split)
    for p, split in [
        (Photo("flower", SK, "a daisy (flower.jpg)", _sklearn("flower.jpg")), "eval"),
        (Photo("china", SK, "a Chinese temple (china.jpg)", _sklearn("china.jpg")), "eval"),
        (Photo("chelsea", SKI, "a tabby cat", _skimage("chelsea")), "eval"),
        (Photo("astronaut", SKI, "astronaut Eileen Collins", _skimage("astronaut")), "eval"),
        (Photo("rocket", SKI, "a Falcon 9 launch", _skimage("rocket")), "eval"),
        (Photo("immunohistochemistry", SKI, "stained tissue (microscope)",
               _skimage("immunohistochemistry")), "eval"),
        (Photo("grace_hopper", MPL, "a portrait of Grace Hopper in uniform",
               _matplotlib("grace_hopper.jpg")), "eval"),
        (Photo("coffee", SKI, "a cup of coffee", _skimage("coffee")), "calib"),
        (Photo("motorcycle_left", SKI, "a motorcycle (left view)",
               _skimage("stereo_motorcycle", 0)), "calib"),
        (Photo("motorcycle_right", SKI, "the same motorcycle (right view)",
               _skimage("stereo_motorcycle", 1)), "calib"),
        (Photo("hubble_deep_field", SKI, "galaxies (Hubble)", _skimage("hubble_deep_field")),
         "calib"),
        (Photo("retina", SKI, "a fundus photograph of a retina", _skimage("retina")), "calib"),
        (Photo("camera", SKI, "a cameraman (grey-scale)", _skimage("camera")), "calib"),
        (Photo("coins", SKI, "coins (grey-scale)", _skimage("coins")), "calib"),
        (Photo("moon", SKI, "the moon's surface (grey-scale)", _skimage("moon")), "calib"),
        (Photo("gravel", SKI, "gravel (grey-scale)", _skimage("gravel")), "calib"),
    ]
}  # fmt: skip


def photo_names(split: str) -> list[str]:
    """The photos of ``split`` ("eval" or "calib"), in :data:`PHOTOS` order."""
    return [n for n, (_, s) in PHOTOS.items() if s == split]


def load_photo(name: str) -> torch.Tensor:
    """Photo ``name`` as a float (3, H, W) RGB tensor in [0, 1] (grey-scale copied to 3 channels).

    Example:
        >>> load_photo("flower").shape
        torch.Size([3, 427, 640])
    """
    if name not in PHOTOS:
        raise DataError(f"no photo {name!r}; choose one of {', '.join(PHOTOS)}")
    a = np.asarray(PHOTOS[name][0].load())
    if a.ndim == 2:
        a = np.stack([a] * 3, axis=-1)
    x = torch.from_numpy(np.array(a[..., :3])).permute(2, 0, 1)  # a writable copy
    return x.float() / (255.0 if a.dtype == np.uint8 else 1.0)


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(x[None], size=(size, size), mode="bilinear", antialias=True,
                         align_corners=False)[0]  # fmt: skip


def center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """The usual evaluation crop: the shorter side resized to ``size / 0.875``, the centre cut."""
    h, w = x.shape[1:]
    side = min(h, w) * 0.875  # the centre square of this side, resized to ``size``
    top, left = int(round((h - side) / 2)), int(round((w - side) / 2))
    s = int(round(side))
    return _resize(x[:, top : top + s, left : left + s], size)


def random_crops(x: torch.Tensor, n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` Inception-style crops of ``x``: 20–100 % of its area, aspect ratio 3/4–4/3, resized to
    ``size`` × ``size``, each flipped left-right with probability 1/2.

    Example:
        >>> x = torch.rand(3, 50, 80)
        >>> random_crops(x, 4, 16, torch.Generator().manual_seed(0)).shape
        torch.Size([4, 3, 16, 16])
    """
    h, w = x.shape[1:]
    out = []
    for _ in range(n):
        u = torch.rand(4, generator=generator, dtype=torch.float64).tolist()
        area = h * w * (0.2 + 0.8 * u[0])
        ratio = math.exp(math.log(3 / 4) + u[1] * (math.log(4 / 3) - math.log(3 / 4)))
        ch = min(h, int(round(math.sqrt(area / ratio))))
        cw = min(w, int(round(math.sqrt(area * ratio))))
        top = int(u[2] * (h - ch + 1))
        left = int(u[3] * (w - cw + 1))
        crop = _resize(x[:, top : top + ch, left : left + cw], size)
        if bool(torch.rand((), generator=generator) < 0.5):
            crop = crop.flip(-1)
        out.append(crop)
    return torch.stack(out)


def photo_crops(names: list[str], per_photo: int, size: int, *, seed: int = CROP_SEED):
    """The centre crop and ``per_photo - 1`` random crops of each photo, RGB in [0, 1], and the
    index of the photo each crop came from."""
    g = torch.Generator().manual_seed(seed)
    xs, src = [], []
    for i, name in enumerate(names):
        x = load_photo(name)
        xs += [center_crop(x, size)[None], random_crops(x, per_photo - 1, size, g)]
        src += [i] * per_photo
    return torch.cat(xs), torch.tensor(src)


class PhotoDataset(Dataset):
    """The photo crops: 224 × 224 and larger, so batches of 32 (a batch of 256 would hold
    gigabytes of feature maps in an EfficientNet's expanded layers)."""

    def test_batches(self, batch_size: int = 32):
        return super().test_batches(batch_size)

    def calibration_batches(self, samples: int = 512, *, seed: int = 1234, batch_size: int = 32):
        return super().calibration_batches(samples, seed=seed, batch_size=batch_size)


class Agreement(Classification):
    """Classification whose labels are a reference model's own top-1 predictions: the metric is
    the top-1 agreement with that model, in percent."""

    name = "agreement"
    metric_name = "top1_agreement"


@torch.no_grad()
def predictions(model: nn.Module, x: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """``model``'s logits on ``x`` in eval mode (its mode restored afterwards)."""
    was = model.training
    model.eval()
    try:
        return torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])
    finally:
        model.train(was)


def fidelity(reference: torch.Tensor, logits: torch.Tensor) -> dict[str, float]:
    """How closely ``logits`` follow the ``reference`` logits on the same inputs: top-1 agreement
    (%, same argmax), top-5 agreement (%, the reference's top-1 class among the top 5) and the
    mean KL divergence KL(p_ref ‖ p) of the softmax distributions, in nats.

    Example:
        >>> r = torch.tensor([[2.0, 0.0, 1.0]])
        >>> fidelity(r, r)
        {'top1': 100.0, 'top5': 100.0, 'kl': 0.0}
    """
    ref = reference.argmax(-1)
    k = min(5, logits.shape[-1])
    top5 = (logits.topk(k, -1).indices == ref[:, None]).any(-1)
    lp, lq = F.log_softmax(reference.double(), -1), F.log_softmax(logits.double(), -1)
    kl = (lp.exp() * (lp - lq)).sum(-1).mean()
    return {
        "top1": float((logits.argmax(-1) == ref).double().mean()) * 100.0,
        "top5": float(top5.double().mean()) * 100.0,
        "kl": max(0.0, float(kl)),
    }


def photo_dataset(
    model: nn.Module | None,
    *,
    size: int = 224,
    mean: float = 0.498,
    std: float = 0.502,
    eval_crops: int = EVAL_CROPS,
    calib_crops: int = CALIB_CROPS,
    name: str = "photos",
) -> Dataset:
    """The photo crops as a data set: training split = crops of the calibration photos, test
    split = crops of the evaluation photos, labels = ``model``'s FP32 top-1 predictions.

    Example:
        >>> ds = photo_dataset(net, size=224)       # doctest: +SKIP
        >>> ds.task.metric_name
        'top1_agreement'
    """
    if model is None:
        raise DataError(
            f"the labels of {name!r} are the FP32 model's own predictions (fidelity, not "
            "accuracy): give the model (from Python: load_data(spec, model=net))"
        )
    x_tr, src_tr = photo_crops(photo_names("calib"), calib_crops, size)
    x_te, src_te = photo_crops(photo_names("eval"), eval_crops, size, seed=CROP_SEED + 1)
    x_tr, x_te = (x_tr - mean) / std, (x_te - mean) / std
    y_tr, y_te = predictions(model, x_tr).argmax(-1), predictions(model, x_te).argmax(-1)
    meta: dict[str, Any] = {
        "labels": "the FP32 model's top-1 predictions (metric = top-1 agreement with FP32)",
        "preprocessing": {"size": size, "mean": mean, "std": std, "crop_seed": CROP_SEED,
                          "crops": "centre + Inception-style random (area 0.2-1, ratio 3/4-4/3, "
                                   "flip 1/2)"},
        "calibration_photos": photo_names("calib"),
        "evaluation_photos": photo_names("eval"),
        "photo_of_train": src_tr,
        "photo_of_test": src_te,
    }  # fmt: skip
    return PhotoDataset(name, x_tr, y_tr, x_te, y_te, Agreement(), meta)


def _register(size: int) -> None:
    name = "photos" if size == 224 else f"photos{size}"

    def load(seed: int = 0, *, model: nn.Module | None = None, **kwargs: Any) -> Dataset:
        # the crops are fixed (seed-independent), as digits' split is: results stay comparable
        return photo_dataset(model, size=size, name=name, **kwargs)

    load.__doc__ = f"Real photographs, {size} x {size} crops, labelled by the FP32 model."
    register_dataset(name, labels_from_model=True)(load)


for _size in (224, 240, 260):  # EfficientNet-Lite0, Lite1, Lite2
    _register(_size)
