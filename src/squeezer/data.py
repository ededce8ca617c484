"""Data: batches of (inputs, targets), the built-in data sets, and tasks (loss + metric).

A batch is a pair ``(inputs, targets)``; ``inputs`` is a tensor or a dict of tensors (a Hugging Face
model's ``input_ids``/``attention_mask``), and :func:`forward` calls the model either way.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import DataError

Inputs = torch.Tensor | Mapping[str, torch.Tensor]


def forward(model: nn.Module, inputs: Inputs) -> Any:
    """``model(inputs)`` for a tensor, ``model(**inputs)`` for a dict of tensors."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    return model(inputs)


def batch_size(inputs: Inputs) -> int:
    """Number of samples in ``inputs`` (the first dimension of the tensor or of the dict's first entry)."""
    if isinstance(inputs, Mapping):
        return int(next(iter(inputs.values())).shape[0])
    return int(inputs.shape[0])


def to_device(inputs: Any, device: torch.device | str) -> Any:
    """Move a tensor, a dict of tensors, or a tuple/list of them to ``device``."""
    if isinstance(inputs, torch.Tensor):
        return inputs.to(device)
    if isinstance(inputs, Mapping):
        return {k: to_device(v, device) for k, v in inputs.items()}
    if isinstance(inputs, tuple | list):
        return type(inputs)(to_device(v, device) for v in inputs)
    return inputs


# --------------------------------------------------------------------------------------------------
# Tasks: what "loss" and "metric" mean for a data set.


class Task:
    """A loss for analysis and fine-tuning, and a metric for evaluation.

    ``metric_sums(outputs, targets)`` returns (sum, count) so metrics aggregate exactly over batches.
    """

    name = "task"
    metric_name = "metric"
    higher_is_better = True
    #: True if a target is the model's own output on the input (a labels-free distortion task):
    #: the Hessian analysis then recomputes the targets on the very batches it uses.
    targets_from_model = False

    def loss(self, outputs: Any, targets: Any) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def metric_sums(self, outputs: Any, targets: Any) -> tuple[float, int]:  # pragma: no cover
        raise NotImplementedError


class Classification(Task):
    """Cross-entropy loss and top-1 accuracy (in percent)."""

    name = "classification"
    metric_name = "top1"

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(outputs, targets)

    def metric_sums(self, outputs: torch.Tensor, targets: torch.Tensor) -> tuple[float, int]:
        return float((outputs.argmax(-1) == targets).sum()) * 100.0, int(targets.shape[0])


@dataclass
class Dataset:
    """A data set with a fixed train/test split and its task.

    ``x_*`` are tensors (or dicts of tensors for text models); ``y_*`` are targets.
    """

    name: str
    x_train: Any
    y_train: Any
    x_test: Any
    y_test: Any
    task: Task
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input sample (without the batch dimension)."""
        x = self.x_train
        if isinstance(x, Mapping):
            x = next(iter(x.values()))
        return tuple(x.shape[1:])

    def train_batches(self, batch_size: int = 128, *, shuffle: bool = False, seed: int = 0):
        """(inputs, targets) batches of the training split."""
        return Batches(self.x_train, self.y_train, batch_size, shuffle=shuffle, seed=seed)

    def test_batches(self, batch_size: int = 256):
        """(inputs, targets) batches of the test split, in order."""
        return Batches(self.x_test, self.y_test, batch_size)

    @property
    def n_train(self) -> int:
        """Samples in the training split."""
        return batch_size(self.x_train)

    def calibration_batches(self, samples: int = 512, *, seed: int = 1234, batch_size: int = 128):
        """A fixed, seeded subset of ``samples`` training samples to calibrate activation ranges."""
        return Batches(
            self.x_train, self.y_train, batch_size, shuffle=True, seed=seed, limit=samples
        )

    def analysis_batches(self, samples: int, *, batch_size: int = 128, seed: int = 0):
        """The ``samples`` training samples a Hessian analysis averages over (a seeded subset,
        drawn anew on each pass), and on which the loss increase it predicts is measured."""
        n = min(int(samples), self.n_train)
        return Batches(self.x_train, self.y_train, batch_size, shuffle=True, seed=seed, limit=n)

    def example(self, n: int = 1) -> Any:
        """The first ``n`` test inputs (a tensor, or a dict of tensors)."""
        x = self.x_test
        if isinstance(x, Mapping):
            return {k: v[:n] for k, v in x.items()}
        return x[:n]


class Batches:
    """A re-iterable sequence of (inputs, targets) batches over in-memory tensors.

    Example:
        >>> b = Batches(torch.zeros(10, 3), torch.zeros(10), batch_size=4)
        >>> [batch_size(x) for x, _ in b]
        [4, 4, 2]
    """

    def __init__(
        self,
        x: Any,
        y: Any,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        limit: int | None = None,
    ):
        self.x, self.y, self.batch_size = x, y, int(batch_size)
        self.shuffle, self.seed = shuffle, seed
        self.n = _length(x) if limit is None else min(limit, _length(x))
        self._epoch = 0

    def __len__(self) -> int:
        return (self.n + self.batch_size - 1) // self.batch_size

    def __iter__(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self._epoch)
            order = torch.randperm(_length(self.x), generator=g)[: self.n]
            self._epoch += 1
        else:
            order = torch.arange(self.n)
        for i in range(0, self.n, self.batch_size):
            idx = order[i : i + self.batch_size]
            yield _index(self.x, idx), _index(self.y, idx)


def _length(x: Any) -> int:
    return batch_size(x)


def _index(x: Any, idx: torch.Tensor) -> Any:
    if isinstance(x, Mapping):
        return {k: v[idx] for k, v in x.items()}
    return x[idx]


@torch.no_grad()
def _accumulate(model: nn.Module, batches: Any, fn: Callable[[Any, Any], tuple[float, int]]):
    """Σ fn(outputs, targets) over ``batches`` as (total, count), with the model in eval mode
    (its mode restored afterwards)."""
    was_training = model.training
    model.eval()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    total, count = 0.0, 0
    try:
        for inputs, targets in batches:
            s, c = fn(forward(model, to_device(inputs, device)), to_device(targets, device))
            total, count = total + s, count + c
    finally:
        model.train(was_training)
    if count == 0:
        raise DataError("no evaluation data: the test split is empty")
    return total, count


def evaluate(model: nn.Module, batches: Any, task: Task) -> float:
    """The task's metric of ``model`` (run in eval mode, restored afterwards) over ``batches``.

    Example:
        >>> ds = load_data("digits")
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
        >>> 0 <= evaluate(net, ds.test_batches(), ds.task) <= 100
        True
    """
    total, count = _accumulate(model, batches, task.metric_sums)
    return total / count


def mean_loss(model: nn.Module, batches: Any, task: Task) -> float:
    """Sample-weighted mean of the task loss over ``batches`` (model in eval mode, restored)."""

    def weighted(out: Any, targets: Any) -> tuple[float, int]:
        n = batch_size(targets) if isinstance(targets, torch.Tensor) else batch_size(out)
        return float(task.loss(out, targets)) * n, n

    total, count = _accumulate(model, batches, weighted)
    return total / count


def check_fits(model: nn.Module, data: Dataset) -> None:
    """A one-line DataError when ``data``'s inputs do not fit ``model`` (two test inputs are run).

    Example:
        >>> check_fits(nn.Linear(3, 2), Dataset("x", torch.zeros(4, 5), None, torch.zeros(4, 5),
        ...                                      None, Classification()))
        Traceback (most recent call last):
        ...
        squeezer.errors.DataError: the data (x, inputs of shape (5,)) does not fit the model: ...
    """
    was = model.training
    try:
        with torch.no_grad():
            forward(model.eval(), data.example(2))
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise DataError(
            f"the data ({data.name}, inputs of shape {data.input_shape}) does not fit the model: "
            f"{first}"
        ) from None
    finally:
        model.train(was)


# --------------------------------------------------------------------------------------------------
# Data sets. A registry maps built-in names to loaders; other specs are files or folders.

DATASETS: dict[str, Callable[..., Dataset]] = {}


def register_dataset(name: str) -> Callable[[Callable[..., Dataset]], Callable[..., Dataset]]:
    """Decorator: make a loader available as ``--data NAME``."""

    def deco(fn: Callable[..., Dataset]) -> Callable[..., Dataset]:
        DATASETS[name] = fn
        return fn

    return deco


def load_data(spec: str, *, seed: int = 0, **kwargs: Any) -> Dataset:
    """Load a data set from a spec: a built-in name (``digits``, ``mnist1d``, ...), an ``.npz`` file
    with arrays ``x`` and ``y``, a folder of images in class sub-folders, or a ``.txt`` file of
    sentences (one a line).

    Example:
        >>> ds = load_data("digits")
        >>> ds.input_shape, ds.task.metric_name
        ((1, 8, 8), 'top1')
    """
    spec = str(spec)
    if spec in DATASETS:
        return DATASETS[spec](seed=seed, **kwargs)
    path = Path(spec)
    if path.suffix == ".npz":
        return _load_npz(path, seed)
    if path.suffix == ".txt":
        if "text" not in DATASETS:
            raise DataError("text data needs the 'hf' extra: pip install 'squeezer[hf]'")
        return DATASETS["text"](path=path, seed=seed, **kwargs)
    if path.is_dir():
        return _load_image_folder(path, seed)
    if not path.exists() and path.suffix == "":
        raise DataError(
            f"unknown data set {spec!r}; use one of {', '.join(sorted(DATASETS))}, an .npz file "
            "with arrays x and y, a folder of images in class sub-folders, or a .txt file"
        )
    if not path.exists():
        raise DataError(f"data file {spec} does not exist; check the path")
    raise DataError(
        f"cannot read {spec}: expected an .npz file with arrays x and y, a folder of images in class "
        "sub-folders, or a .txt file of sentences"
    )


def _split(x: torch.Tensor, y: torch.Tensor, seed: int, test_fraction: float = 0.25):
    """A seeded, stratification-free random split; the same seed gives the same split everywhere."""
    n = x.shape[0]
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=g)
    n_test = max(1, int(round(n * test_fraction)))
    te, tr = order[:n_test], order[n_test:]
    return x[tr], y[tr], x[te], y[te]


def _classification(name: str, x: torch.Tensor, y: torch.Tensor, seed: int, meta: dict) -> Dataset:
    """A classification data set from all samples, split by :func:`_split`."""
    return Dataset(name, *_split(x, y, seed), Classification(), meta)


@register_dataset("digits")
def _digits(seed: int = 0) -> Dataset:
    """scikit-learn's 1,797 real 8×8 handwritten digits, scaled to [0, 1], 75/25 split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    # The split is fixed (seed 0 whatever the run's seed): results stay comparable.
    return _classification("digits", x, y, 0, {"classes": 10})


@register_dataset("mnist1d")
def _mnist1d(seed: int = 0) -> Dataset:
    """The MNIST-1D benchmark (Greydanus 2020), generated offline with its default arguments."""
    import contextlib
    import io

    from mnist1d.data import get_dataset_args, make_dataset

    with contextlib.redirect_stdout(io.StringIO()):
        d = make_dataset(get_dataset_args())
    x_tr = torch.tensor(d["x"], dtype=torch.float32).unsqueeze(1)
    x_te = torch.tensor(d["x_test"], dtype=torch.float32).unsqueeze(1)
    y_tr = torch.tensor(d["y"], dtype=torch.long)
    y_te = torch.tensor(d["y_test"], dtype=torch.long)
    return Dataset("mnist1d", x_tr, y_tr, x_te, y_te, Classification(), {"classes": 10})


def _load_npz(path: Path, seed: int) -> Dataset:
    import numpy as np

    if not path.exists():
        raise DataError(f"data file {path} does not exist; check the path")
    try:
        with np.load(path, allow_pickle=False) as z:
            if "x" not in z or "y" not in z:
                raise DataError(
                    f"{path} must hold arrays named 'x' and 'y'; it has {sorted(z.files)}"
                )
            x, y = z["x"], z["y"]
    except DataError:
        raise
    except Exception as exc:  # zipfile/ValueError/OSError: a corrupt or non-npz file
        raise DataError(
            f"cannot read {path} as .npz ({type(exc).__name__}); re-save it with "
            "numpy.savez(path, x=inputs, y=labels)"
        ) from None
    if len(x) != len(y) or len(x) < 2:
        raise DataError(f"{path}: x has {len(x)} rows and y has {len(y)}; they must match (≥ 2)")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{path}: y must hold integer class labels, got {y.dtype}")
    # Integer inputs are indices (token ids for an Embedding): keep them integers.
    integer = np.issubdtype(x.dtype, np.integer)
    xt = torch.tensor(x, dtype=torch.long if integer else torch.float32)
    yt = torch.tensor(y, dtype=torch.long)
    return _classification(path.stem, xt, yt, seed,
                           {"classes": int(yt.max()) + 1, "source": path.name})  # fmt: skip


_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def _load_image_folder(path: Path, seed: int) -> Dataset:
    """Images in class sub-folders (``root/CLASS/*.png``), read with Pillow, resized to the first
    image's size, scaled to [0, 1], channels first."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    classes = sorted(p.name for p in path.iterdir() if p.is_dir())
    if len(classes) < 2:
        raise DataError(
            f"{path} needs at least two class sub-folders of images (root/CLASS/img.png)"
        )
    xs, ys, size, mode = [], [], None, None
    for ci, c in enumerate(classes):
        for f in sorted((path / c).iterdir()):
            if f.suffix.lower() not in _IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(f) as im:
                    if size is None:
                        size, mode = im.size, ("L" if im.mode in ("L", "1", "P", "I") else "RGB")
                    arr = np.asarray(im.convert(mode).resize(size), dtype=np.float32) / 255.0
            except (UnidentifiedImageError, OSError) as exc:
                raise DataError(f"cannot read image {f} ({exc}); remove or replace it") from None
            xs.append(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))
            ys.append(ci)
    if len(xs) < 2:
        raise DataError(f"{path} holds fewer than two readable images")
    x = torch.tensor(np.stack(xs))
    y = torch.tensor(ys, dtype=torch.long)
    return _classification(path.name, x, y, seed, {"classes": len(classes), "class_names": classes})
