"""Streamed data sets: samples or batches read as the pipeline uses them, never all held at once.

A :class:`StreamDataset` has the batching methods of :class:`squeezer.data.Dataset`
(``calibration_batches``, ``analysis_batches``, ``test_batches``, ``train_batches``, ``example``,
``n_train``, ``input_shape``, ``task``), so every stage runs on it unchanged, while memory stays
that of a few batches however large the data set. It is what ``--data pkg.module:factory`` (a
user's ``torch.utils.data.Dataset``, ``DataLoader`` or iterable of batches) and an image folder
become. Its two splits are *views* of the user's source:

- an indexable source (a map-style ``torch.utils.data.Dataset``, a ``DataLoader`` over one, an
  image folder) is read by index, so calibration and analysis draw seeded random subsets;
- anything else (an ``IterableDataset``, a generator of batches) is read in its own order.

This module sits below :mod:`squeezer.data`, which builds these from data specs and validates them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from .errors import DataError

#: Test inputs a streamed set materialises as ``x_test`` (the export check and bench use these),
#: and training samples as ``x_train``/``y_train`` (for callers that want tensors).
TEST_HEAD, TRAIN_HEAD = 256, 2048


def _rows(x: Any) -> int:
    return int((next(iter(x.values())) if isinstance(x, Mapping) else x).shape[0])


def _cat(xs: list[Any]) -> Any:
    if xs and isinstance(xs[0], Mapping):
        return {k: torch.cat([x[k] for x in xs]) for k in xs[0]}
    return torch.cat(xs)


def _pair(batch: Any) -> tuple[Any, Any]:
    if isinstance(batch, tuple | list) and len(batch) == 2:
        x, y = batch
        return x, (y if isinstance(y, torch.Tensor) else torch.as_tensor(y))
    raise DataError(
        f"a batch of the data is a {type(batch).__name__}, not an (inputs, targets) pair; make the "
        "data set's items (input, target) tuples"
    )


class Indexed:
    """The samples ``indices`` of a map-style data set (``ds[i] -> (input, target)``), collated a
    batch at a time; any order or seeded subset of them can be read."""

    def __init__(self, ds: Any, indices: Any, collate: Callable | None = None):
        from torch.utils.data import default_collate

        self.ds, self.indices = ds, torch.as_tensor(indices, dtype=torch.long)
        self.collate = collate or default_collate

    def count(self) -> int:
        return len(self.indices)

    def batches(self, size: int, *, seed: int | None = None, limit: int | None = None):
        idx = self.indices
        if seed is not None:
            idx = idx[torch.randperm(len(idx), generator=torch.Generator().manual_seed(seed))]
        idx = idx[:limit]
        for i in range(0, len(idx), size):
            yield _pair(self.collate([self.ds[int(j)] for j in idx[i : i + size]]))


class Batched:
    """The batches of an iterable of ``(inputs, targets)`` batches, in its own order and batch
    size, those whose index ``keep`` accepts. ``make()`` gives a fresh iterable for each pass (the
    user's factory again, if it returned a one-shot iterator). A full pass counts the samples."""

    def __init__(self, make: Callable[[], Any], keep: Callable[[int], bool] = lambda i: True):
        self.make, self.keep, self.n = make, keep, None

    def count(self) -> int:
        if self.n is None:
            for _ in self.batches(0):
                pass
        return self.n

    def batches(self, size: int, *, seed: int | None = None, limit: int | None = None):
        left, seen = (float("inf") if limit is None else limit), 0
        for i, batch in enumerate(self.make()):
            if left <= 0:
                return
            if self.keep(i):
                x, y = _pair(batch)
                if _rows(x) > left:
                    x, y = _head(x, int(left)), y[: int(left)]
                left -= _rows(x)
                seen += _rows(x)
                yield x, y
        if limit is None:
            self.n = seen


def _head(x: Any, n: int) -> Any:
    return {k: v[:n] for k, v in x.items()} if isinstance(x, Mapping) else x[:n]


class Pass:
    """A re-iterable pass over a view; with ``epochs`` each pass draws a new seeded subset (as
    :class:`squeezer.data.Batches` does)."""

    def __init__(self, view: Any, size: int, seed: int | None = None, limit: int | None = None,
                 epochs: bool = False):  # fmt: skip
        self.view, self.size, self.seed, self.limit, self.epochs = (
            view,
            int(size),
            seed,
            limit,
            epochs,
        )
        self._epoch = 0

    def __len__(self) -> int:
        n = self.view.count()
        n = n if self.limit is None else min(n, self.limit)
        return -(-n // self.size)

    def __iter__(self):
        seed = None if self.seed is None else self.seed + self._epoch
        self._epoch += int(self.epochs)
        return self.view.batches(self.size, seed=seed, limit=self.limit)


class StreamDataset:
    """A data set read a batch at a time (see the module docstring), with its task.

    Example:
        >>> from torch.utils.data import TensorDataset
        >>> from squeezer.data import Classification
        >>> src = TensorDataset(torch.zeros(8, 3), torch.arange(8) % 2)
        >>> ds = stream_data("toy", src, Classification())
        >>> ds.n_train, [x.shape[0] for x, _ in ds.train_batches(4)]
        (6, [4, 2])
    """

    def __init__(self, name: str, train: Any, test: Any, task: Any, meta: dict | None = None):
        self.name, self.train, self.test, self.task = name, train, test, task
        self.meta = dict(meta or {})
        self._first: tuple[Any, Any] | None = None

    @property
    def n_train(self) -> int:
        """Samples in the training split (counted by one pass if the source cannot say)."""
        return self.train.count()

    @property
    def input_shape(self) -> tuple[int, ...]:
        x = self.example(1)
        return tuple((next(iter(x.values())) if isinstance(x, Mapping) else x).shape[1:])

    def train_batches(self, batch_size: int = 128, *, shuffle: bool = False, seed: int = 0):
        return Pass(self.train, batch_size, seed if shuffle else None, epochs=shuffle)

    def test_batches(self, batch_size: int = 256):
        return Pass(self.test, batch_size)

    def calibration_batches(self, samples: int = 512, *, seed: int = 1234, batch_size: int = 128):
        return Pass(self.train, batch_size, seed, limit=samples)

    def analysis_batches(self, samples: int, *, batch_size: int = 128, seed: int = 0):
        return Pass(self.train, batch_size, seed, limit=int(samples), epochs=True)

    def splits(self, batch_size: int = 256) -> dict[str, Any]:
        """Every batch of each split, for validation (a full pass also counts a split)."""
        return {"training": self.train.batches(batch_size), "test": self.test.batches(batch_size)}

    def example(self, n: int = 1) -> Any:
        """The first ``n`` test inputs."""
        parts = [x for x, _ in self.test.batches(n, limit=n)]
        if not parts:
            raise DataError(f"the test split of {self.name} is empty; give it at least one sample")
        return _cat(parts)

    @property
    def x_test(self) -> Any:
        """The first :data:`TEST_HEAD` test inputs (not all: the set is streamed)."""
        return self.example(TEST_HEAD)

    @property
    def x_train(self) -> Any:
        """The first :data:`TRAIN_HEAD` training inputs (not all: the set is streamed)."""
        return self._train_head()[0]

    @property
    def y_train(self) -> Any:
        return self._train_head()[1]

    def _train_head(self) -> tuple[Any, Any]:
        if self._first is None:
            parts = list(self.train.batches(256, limit=TRAIN_HEAD))
            self._first = (_cat([x for x, _ in parts]), torch.cat([y for _, y in parts]))
        return self._first


def _view(source: Any, again: Callable[[], Any]) -> Indexed | Batched:
    """A view of all of a user's source: indexed if it is a map-style data set (or a DataLoader
    of one, keeping its ``collate_fn``), batched otherwise."""
    from torch.utils.data import DataLoader, IterableDataset

    collate = None
    if isinstance(source, DataLoader) and not isinstance(source.dataset, IterableDataset):
        source, collate = source.dataset, source.collate_fn
    if isinstance(source, IterableDataset):  # samples, not batches: batch them here
        return Batched(lambda: DataLoader(source, batch_size=64))
    if isinstance(source, list | tuple):  # a list of batches, not of samples
        return Batched(lambda: source)
    if hasattr(source, "__getitem__") and hasattr(source, "__len__"):
        return Indexed(source, torch.arange(len(source)), collate)
    try:
        one_shot = iter(source) is source
    except TypeError:
        raise DataError(
            f"the data factory returned an object of type {type(source).__name__}; return a torch Dataset, a "
            "DataLoader, an iterable of (inputs, targets) batches, or a (train, test) pair of them"
        ) from None
    return Batched(again if one_shot else (lambda: source))


def stream_data(name: str, source: Any, task: Any, *, seed: int = 0,
                again: Callable[[], Any] | None = None, test_fraction: float = 0.25,
                meta: dict | None = None) -> StreamDataset:  # fmt: skip
    """A :class:`StreamDataset` from what a user's factory returns: a ``(train, test)`` pair or a
    ``{"train": ..., "test": ...}`` dict of sources, or one source split here (by a seeded
    permutation when it is indexable, every fourth batch held out for testing otherwise). A source
    is a ``torch.utils.data.Dataset`` of ``(input, target)`` items, a ``DataLoader`` or any
    iterable of ``(inputs, targets)`` batches. ``again()`` returns the source anew (for one-shot
    iterators; default: the same object).

    Example: see :class:`StreamDataset`.
    """
    again = again or (lambda: source)
    pair = None
    if isinstance(source, Mapping) and {"train", "test"} <= set(source):
        pair = ("train", "test")
    elif isinstance(source, tuple) and len(source) == 2 and not isinstance(source[0], torch.Tensor):
        pair = (0, 1)
    if pair is not None:
        tr, te = (_view(source[k], lambda k=k: again()[k]) for k in pair)
        return StreamDataset(name, tr, te, task, meta)
    whole = _view(source, again)
    if isinstance(whole, Batched):
        return StreamDataset(name, Batched(whole.make, lambda i: i % 4 != 3),
                             Batched(whole.make, lambda i: i % 4 == 3), task, meta)  # fmt: skip
    n = whole.count()
    if n < 2:
        raise DataError(f"{name} holds {n} samples; a train/test split needs at least 2")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = max(1, round(n * test_fraction))
    return StreamDataset(name, Indexed(whole.ds, order[n_test:], whole.collate),
                         Indexed(whole.ds, order[:n_test], whole.collate), task, meta)  # fmt: skip


class ImageFiles:
    """Images in class sub-folders as a map-style data set, each read when asked for: Pillow,
    resized to the first image's size, scaled to [0, 1], channels first."""

    def __init__(self, files: list[Path], labels: list[int]):
        from PIL import Image, UnidentifiedImageError

        self.files, self.labels = files, labels
        try:
            with Image.open(files[0]) as im:
                self.size, self.mode = im.size, ("L" if im.mode in ("L", "1", "P", "I") else "RGB")
        except (UnidentifiedImageError, OSError) as exc:
            raise DataError(f"cannot read image {files[0]} ({exc}); remove or replace it") from None

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        import numpy as np
        from PIL import Image, UnidentifiedImageError

        f = self.files[i]
        try:
            with Image.open(f) as im:
                arr = np.asarray(im.convert(self.mode).resize(self.size), dtype=np.float32) / 255.0
        except (UnidentifiedImageError, OSError) as exc:
            raise DataError(f"cannot read image {f} ({exc}); remove or replace it") from None
        x = torch.from_numpy(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1).copy())
        return x, self.labels[i]
