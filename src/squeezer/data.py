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

from .errors import DataError, first_line

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

    def splits(self, batch_size: int = 256) -> dict[str, Any]:
        """Each split as one batch, for validation (:func:`check_fits`)."""
        return {"training": [(self.x_train, self.y_train)], "test": [(self.x_test, self.y_test)]}


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


def validate_batches(name: str, task: Task, splits: Mapping[str, Any]) -> dict[str, int]:
    """Check every ``(inputs, targets)`` batch of each split before any work: no split empty,
    inputs and float targets finite, classification labels whole numbers ≥ 0 in a 1-D tensor as
    long as the batch, and at least two classes in the training split. Returns the sample count
    of each split and the largest label (``max_label``, -1 without labels); a one-line DataError
    otherwise.

    Example:
        >>> validate_batches("d", Classification(), {"training": [(torch.zeros(2, 3),
        ...                  torch.tensor([0, 1]))], "test": [(torch.zeros(1, 3), torch.tensor([1]))]})
        {'training': 2, 'test': 1, 'max_label': 1}
    """
    labels = isinstance(task, Classification)
    out, top, classes = {}, -1, set()
    for split, batches in splits.items():
        n = 0
        for x, y in batches:
            for t in x.values() if isinstance(x, Mapping) else [x]:
                _finite(t, f"the {split} inputs of {name}")
            if labels:
                top = max(top, _labels(y, batch_size(x), f"the {split} labels of {name}"))
                if split == "training" and len(classes) < 2:
                    classes.update(torch.unique(y).tolist())
            elif isinstance(y, torch.Tensor):
                _finite(y, f"the {split} targets of {name}")
            n += batch_size(x)
        if n == 0:
            raise DataError(f"the {split} split of {name} is empty; give it at least one sample")
        out[split] = n
    if labels and len(classes) < 2:
        raise DataError(
            f"the training split of {name} holds one class only ({sorted(classes)}); a classifier "
            "needs samples of at least two classes to calibrate, analyse and evaluate"
        )
    return {**out, "max_label": top}


def _finite(t: Any, what: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise DataError(f"{what} are a {type(t).__name__}, not tensors; give tensors or arrays")
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise DataError(f"{what} hold {bad} NaN or infinite values; clean or drop those samples")


def _labels(y: Any, n: int, what: str) -> int:
    """The largest of one batch's class labels, after checking their type, shape and sign."""
    if not isinstance(y, torch.Tensor) or y.is_floating_point() or y.dtype == torch.bool:
        kind = y.dtype if isinstance(y, torch.Tensor) else type(y).__name__
        raise DataError(f"{what} must be integer class indices, got {kind}")
    if y.ndim != 1 or y.shape[0] != n:
        raise DataError(
            f"{what} have shape {tuple(y.shape)} for {n} inputs; give one class index per input "
            "(not one-hot rows)"
        )
    if y.numel() and int(y.min()) < 0:
        raise DataError(f"{what} include {int(y.min())}; class labels run from 0 to classes - 1")
    return int(y.max()) if y.numel() else -1


def check_fits(model: nn.Module, data: Any) -> dict[str, int]:
    """Check ``data`` (:func:`validate_batches` over its ``splits()``: one pass, streamed for a
    :class:`~squeezer.stream.StreamDataset`) and that it fits ``model``: two test inputs are
    run, the outputs must be finite and, for classification, have a class for every label.
    Returns the validation counts; a one-line DataError otherwise.

    Example:
        >>> check_fits(nn.Linear(3, 2), Dataset("x", torch.zeros(4, 5), torch.tensor([0, 1, 0, 1]),
        ...            torch.zeros(4, 5), torch.tensor([0, 1, 0, 1]), Classification()))
        Traceback (most recent call last):
        ...
        squeezer.errors.DataError: the data (x, inputs of shape (5,)) does not fit the model: ...
    """
    stats = validate_batches(data.name, data.task, data.splits())
    example = data.example(2)
    shape = tuple((next(iter(example.values())) if isinstance(example, Mapping) else example)
                  .shape[1:])  # fmt: skip
    was = model.training
    try:
        with torch.no_grad():
            out = forward(model.eval(), example)
    except Exception as exc:  # the user's forward may raise anything
        first = first_line(exc, 160)
        raise DataError(
            f"the data ({data.name}, inputs of shape {shape}) does not fit the model: {first}"
        ) from None
    finally:
        model.train(was)
    if isinstance(out, torch.Tensor) and out.is_floating_point() and not torch.isfinite(out).all():
        raise DataError(
            f"the model's outputs on {data.name} are NaN or infinite (inputs and weights are "
            "finite); check the model's forward and the input scaling"
        )
    if isinstance(data.task, Classification):
        classes = out.shape[1] if isinstance(out, torch.Tensor) and out.ndim >= 2 else 0
        if stats["max_label"] >= classes:
            raise DataError(
                f"{data.name} has class labels up to {stats['max_label']}, but the model gives "
                f"{classes} class scores per input; give a model with ≥ {stats['max_label'] + 1} "
                "outputs, or relabel the data 0..classes-1"
            )
    return stats


# --------------------------------------------------------------------------------------------------
# Data sets. A registry maps built-in names to loaders; other specs are files or folders.

DATASETS: dict[str, Callable[..., Dataset]] = {}
#: Built-in data sets labelled by the model itself (``photos``): their loaders take ``model=``.
LABELLED_BY_MODEL: set[str] = set()


def register_dataset(
    name: str, *, labels_from_model: bool = False
) -> Callable[[Callable[..., Dataset]], Callable[..., Dataset]]:
    """Decorator: make a loader available as ``--data NAME``; ``labels_from_model``: its loader
    labels the data with the FP32 model's predictions (``load_data`` passes ``model`` on)."""

    def deco(fn: Callable[..., Dataset]) -> Callable[..., Dataset]:
        DATASETS[name] = fn
        if labels_from_model:
            LABELLED_BY_MODEL.add(name)
        return fn

    return deco


def load_data(spec: str, *, seed: int = 0, **kwargs: Any) -> Dataset:
    """Load a data set from a spec: a built-in name (``digits``, ``mnist1d``, ...), an ``.npz`` file
    with arrays ``x`` and ``y`` (and optionally the user's own test split ``x_test``, ``y_test``), a
    folder of images in class sub-folders (read lazily), a ``.txt`` file of sentences (one a line),
    or ``pkg.module:factory``, a callable returning a ``torch.utils.data.Dataset``, a
    ``DataLoader`` or an iterable of ``(inputs, targets)`` batches (streamed; see
    :mod:`squeezer.stream`).

    Example:
        >>> ds = load_data("digits")
        >>> ds.input_shape, ds.task.metric_name
        ((1, 8, 8), 'top1')
    """
    spec = str(spec)
    if spec in DATASETS:
        if spec not in LABELLED_BY_MODEL and "tokenizer" not in kwargs:
            kwargs.pop("model", None)  # only data labelled by the model (or text) takes it
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
    if ":" in spec and not path.exists():
        return _load_factory(spec, seed)
    if not path.exists() and path.suffix == "":
        raise DataError(
            f"unknown data set {spec!r}; use one of {', '.join(sorted(DATASETS))}, an .npz file "
            "with arrays x and y, a folder of images in class sub-folders, a .txt file, or "
            "pkg.module:factory"
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
    """``x`` and ``y`` split 75/25 by the seed, or, if the file holds ``x_test`` and ``y_test``,
    ``x``/``y`` for training and those for testing (the user's own split)."""
    import numpy as np

    if not path.exists():
        raise DataError(f"data file {path} does not exist; check the path")
    try:
        with np.load(path, allow_pickle=False) as z:
            if "x" not in z or "y" not in z or ("x_test" in z) != ("y_test" in z):
                raise DataError(
                    f"{path} must hold arrays named 'x' and 'y' (and optionally both 'x_test' and "
                    f"'y_test'); it has {sorted(z.files)}"
                )
            arrays = {k: z[k] for k in ("x", "y", "x_test", "y_test") if k in z}
    except DataError:
        raise
    except Exception as exc:  # zipfile/ValueError/OSError: a corrupt or non-npz file
        raise DataError(
            f"cannot read {path} as .npz ({type(exc).__name__}); re-save it with "
            "numpy.savez(path, x=inputs, y=labels)"
        ) from None
    tensors = {}
    for k, a in arrays.items():
        if k.startswith("y") and not np.issubdtype(a.dtype, np.integer):
            raise DataError(f"{path}: {k} must hold integer class labels, got {a.dtype}")
        if a.ndim == 0 or not (np.issubdtype(a.dtype, np.number) or a.dtype == bool):
            raise DataError(f"{path}: {k} must be a numeric array with one row per sample")
        # Integer inputs are indices (token ids for an Embedding): keep them integers.
        integer = np.issubdtype(a.dtype, np.integer)
        tensors[k] = torch.tensor(a, dtype=torch.long if integer else torch.float32)
    for sx, sy in (("x", "y"), ("x_test", "y_test")):
        if sx in tensors and len(tensors[sx]) != len(tensors[sy]):
            raise DataError(f"{path}: {sx} has {len(tensors[sx])} rows and {sy} "
                            f"{len(tensors[sy])}; they must match")  # fmt: skip
    x, y = tensors["x"], tensors["y"]
    meta = {"classes": int(y.max()) + 1 if len(y) else 0, "source": path.name}
    if "x_test" in tensors:
        return Dataset(path.stem, x, y, tensors["x_test"], tensors["y_test"], Classification(),
                       {**meta, "split": "file"})  # fmt: skip
    if len(x) < 2:
        raise DataError(f"{path}: x has {len(x)} rows; a train/test split needs at least 2")
    return _classification(path.stem, x, y, seed, meta)


_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def _load_factory(spec: str, seed: int):
    """``--data pkg.module:factory``: what the factory returns, streamed
    (:func:`squeezer.stream.stream_data`); class labels, so a classification task."""
    from .factory import resolve_factory
    from .stream import stream_data

    def make():
        return resolve_factory(spec, "data")

    return stream_data(spec.partition(":")[2], make(), Classification(), seed=seed, again=make,
                       meta={"source": spec})  # fmt: skip


def _load_image_folder(path: Path, seed: int):
    """Images in class sub-folders (``root/CLASS/*.png``), streamed: only the file names are
    listed up front; each image is read when a batch needs it."""
    try:
        classes = sorted(p.name for p in path.iterdir() if p.is_dir())
        listed = [(f, ci) for ci, c in enumerate(classes) for f in sorted((path / c).iterdir())
                  if f.suffix.lower() in _IMAGE_SUFFIXES]  # fmt: skip
    except OSError as exc:
        raise DataError(
            f"cannot list {path} ({type(exc).__name__}); check its permissions"
        ) from None
    if len(classes) < 2:
        raise DataError(
            f"{path} needs at least two class sub-folders of images (root/CLASS/img.png)"
        )
    if len(listed) < 2:
        raise DataError(f"{path} holds fewer than two images")
    from .stream import ImageFiles, stream_data

    images = ImageFiles([f for f, _ in listed], [c for _, c in listed])
    return stream_data(path.name, images, Classification(), seed=seed,
                       meta={"classes": len(classes), "class_names": classes})  # fmt: skip
