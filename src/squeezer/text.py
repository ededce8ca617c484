"""Sentences for embedding models, and the embedding-distortion task.

The ``sentences`` data set is real English, available offline and built at run time: sentences of
the docstrings of the Python standard library that runs squeezer (read with :mod:`ast`, never
imported), filtered to plain prose, deduplicated, sorted and split with a seeded shuffle. A ``.txt``
file of sentences (one a line) works the same way.

The task needs no labels. The target of an input is the FP32 model's own sentence embedding, and the
loss is the distortion ``½‖e − e_fp32‖²`` (equal to ``1 − cos`` for unit vectors). At the FP32 point
its residual is zero, so its Hessian is exactly the Gauss–Newton matrix ``JᵀJ``: positive
semi-definite, which is what Q-BERT's Hessian-based mixed precision (Shen et al., arXiv:1909.05840)
needs to rank layers. The metrics compare the compressed embeddings with the FP32 ones: mean cosine,
the Spearman correlation of the pairwise-similarity matrices, and top-10 retrieval overlap.
"""

from __future__ import annotations

import ast
import functools
import os
import re
import sysconfig
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .data import Dataset, Task, forward, register_dataset, to_device
from .errors import ConfigError, DataError
from .progress import progress

#: Folders of the standard library left out of the corpus (test suites, not documentation).
SKIP_DIRS: frozenset[str] = frozenset(
    {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
)
MIN_WORDS, MAX_WORDS = 6, 40

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_PARAGRAPH = re.compile(r"\n\s*\n")
# Markup, code and identifiers: a sentence holding any of these is not plain prose.
_NOT_PROSE = frozenset("=<>{}[]|\\`*#@$~^_/")


# --------------------------------------------------------------------------------------------------
# The corpus.


def prose_sentences(docstring: str) -> list[str]:
    """The plain-prose sentences of one (cleaned) docstring.

    Paragraphs holding indented lines or doctest prompts are code or lists and are skipped; a
    sentence is kept if it has 6–40 words, starts with a capital, ends with ``.``, ``!`` or ``?``,
    holds no markup characters and is at least 90% letters (spaces aside).

    Example:
        >>> prose_sentences("Return the sum of a and b. See also x_add.\\n\\n>>> add(1, 2)\\n3")
        ['Return the sum of a and b.']
    """
    out = []
    for para in _PARAGRAPH.split(docstring):
        lines = para.splitlines()
        if any(line.startswith((" ", "\t", ">>>", "...")) for line in lines):
            continue
        text = " ".join(line.strip() for line in lines)
        out.extend(s.strip() for s in _SENTENCE_END.split(text) if _is_prose(s.strip()))
    return out


def _is_prose(s: str) -> bool:
    if not MIN_WORDS <= len(s.split()) <= MAX_WORDS:
        return False
    if not s[0].isupper() or s[-1] not in ".!?" or _NOT_PROSE.intersection(s):
        return False
    chars = s.replace(" ", "")
    return sum(c.isalpha() for c in chars) >= 0.9 * len(chars)


def source_docstrings(source: str) -> list[str]:
    """Docstrings of the module, classes and functions in ``source`` (none if it does not parse).

    Example:
        >>> source_docstrings("'Mod.'\\ndef f():\\n    'Fun.'\\n")
        ['Mod.', 'Fun.']
    """
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    docs = (ast.get_docstring(n) for n in ast.walk(tree) if isinstance(n, kinds))
    return [d for d in docs if d]


@functools.lru_cache(maxsize=4)
def stdlib_sentences(root: str | None = None) -> tuple[str, ...]:
    """Sorted, deduplicated prose sentences from the docstrings of the ``.py`` files under ``root``.

    ``root`` defaults to this Python's standard library (``sysconfig``'s ``stdlib`` path); test
    suites and site-packages are skipped. The files are parsed, not imported, so nothing runs. The
    result depends only on the files (so on the Python version), not on the run. Parsing the whole
    standard library takes ~5 s; the result is cached for the process.

    Example:
        >>> s = stdlib_sentences()                               # doctest: +SKIP
        >>> len(s) > 5000                                        # doctest: +SKIP
        True
    """
    base = Path(root) if root is not None else Path(sysconfig.get_paths()["stdlib"])
    if not base.is_dir():
        raise DataError(f"{base} is not a folder; pass a folder of .py files to read")
    found: set[str] = set()
    for folder, dirs, files in os.walk(base):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            try:
                source = (Path(folder) / name).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            for doc in source_docstrings(source):
                found.update(prose_sentences(doc))
    return tuple(sorted(found))


def read_sentences(path: str | Path) -> list[str]:
    """The non-empty lines of a UTF-8 text file, stripped, duplicates removed (first kept).

    Example:
        >>> read_sentences("sentences.txt")                      # doctest: +SKIP
        ['The first sentence.', 'The second one.']
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(f"text file {path} does not exist; check the path") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path} as UTF-8 text ({type(exc).__name__})") from None
    return list(dict.fromkeys(s for s in (line.strip() for line in lines) if s))


def split_sentences(
    sentences: Sequence[str], *, seed: int = 0, test_fraction: float = 0.2
) -> tuple[list[str], list[str]]:
    """A seeded (train, test) split: sort, shuffle with a seeded generator, test is the first part.

    Sorting first makes the split a function of the set of sentences and the seed only.

    Example:
        >>> train, test = split_sentences([f"Sentence {i}." for i in range(10)], seed=0)
        >>> len(train), len(test)
        (8, 2)
    """
    items = sorted(set(sentences))
    if len(items) < 2:
        raise DataError(f"need at least two distinct sentences, got {len(items)}; add more text")
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(items), generator=g).tolist()
    n_test = min(len(items) - 1, max(1, round(len(items) * test_fraction)))
    return [items[i] for i in order[n_test:]], [items[i] for i in order[:n_test]]


# --------------------------------------------------------------------------------------------------
# Tokenizing and embedding.


def tokenize(
    tokenizer: Any, sentences: Sequence[str], max_len: int = 128
) -> dict[str, torch.Tensor]:
    """Fixed-length model inputs: ``{"input_ids", "attention_mask"}``, int64, shape [N, max_len].

    Every row is padded (or truncated) to ``max_len``, so all batches share one shape.

    Example:
        >>> x = tokenize(tokenizer, ["A sentence."], max_len=16)  # doctest: +SKIP
        >>> x["input_ids"].shape                                 # doctest: +SKIP
        torch.Size([1, 16])
    """
    if max_len < 2:
        raise DataError(f"max_len={max_len} leaves no room for a token; use max_len ≥ 8")
    enc = tokenizer(
        list(sentences),
        padding="max_length",
        truncation=True,
        max_length=int(max_len),
        return_tensors="pt",
    )
    return {k: enc[k].to(torch.int64) for k in ("input_ids", "attention_mask")}


# --------------------------------------------------------------------------------------------------
# Batches cut to their longest sentence.


def token_batches(
    inputs: Mapping[str, torch.Tensor],
    targets: torch.Tensor | None = None,
    batch_size: int = 32,
) -> list[Any]:
    """Length-sorted batches of token inputs, each cut to its longest sentence.

    Padding tokens never change a BERT sentence embedding (attention masks them, mean pooling skips
    them), so cutting padding columns leaves every output the same while saving most of the
    compute on short sentences. Returns ``[inputs_dict, ...]``, or ``[(inputs, targets), ...]``
    when ``targets`` is given; :func:`restore_order` puts per-batch outputs back in input order.

    Example:
        >>> x = {"input_ids": torch.tensor([[1, 2, 0], [1, 0, 0]]),
        ...      "attention_mask": torch.tensor([[1, 1, 0], [1, 0, 0]])}
        >>> [b["input_ids"].shape[1] for b in token_batches(x, batch_size=1)]
        [2, 1]
    """
    if "attention_mask" not in inputs:
        raise DataError("token inputs need an 'attention_mask'; tokenize with squeezer.text")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be positive, got {batch_size}")
    lens = inputs["attention_mask"].sum(1)
    order = torch.argsort(lens, descending=True, stable=True)
    out: list[Any] = []
    for i in range(0, len(order), batch_size):
        idx = order[i : i + batch_size]
        width = max(1, int(lens[idx].max()))
        x = {k: v[idx, :width] for k, v in inputs.items()}
        out.append(x if targets is None else (x, targets[idx]))
    return out


def restore_order(
    outputs: Sequence[torch.Tensor], inputs: Mapping[str, torch.Tensor]
) -> torch.Tensor:
    """Concatenate per-batch outputs of :func:`token_batches` and return them in input order.

    Example:
        >>> x = {"attention_mask": torch.tensor([[1, 0], [1, 1]])}
        >>> restore_order([torch.tensor([[2.0]]), torch.tensor([[1.0]])], x).flatten().tolist()
        [1.0, 2.0]
    """
    lens = inputs["attention_mask"].sum(1)
    order = torch.argsort(lens, descending=True, stable=True)
    cat = torch.cat(list(outputs))
    out = torch.empty_like(cat)
    out[order] = cat
    return out


@torch.no_grad()
def embed(model: nn.Module, inputs: Mapping[str, torch.Tensor], batch_size: int = 32):
    """``model``'s outputs over token ``inputs``, in input order: eval mode (training mode
    restored), on the model's device, returned on CPU in float32.

    The batches are :func:`token_batches` (length-sorted, each cut to its longest sentence), so a
    corpus of short sentences padded to ``max_len`` costs what its real tokens cost (6.5× less on
    the 20-token `sentences` at ``max_len`` 128), with the same embeddings.

    Example:
        >>> e = embed(encoder, tokenize(tokenizer, sentences))  # doctest: +SKIP
    """
    batches, outs = token_batches(inputs, batch_size=batch_size), []
    n = int(inputs["attention_mask"].shape[0])
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    model.eval()
    try:
        with progress(total=n, desc="embed", unit="sent") as bar:
            for batch in batches:
                outs.append(forward(model, to_device(batch, device)).float().cpu())
                bar.update(int(batch["attention_mask"].shape[0]))
    finally:
        model.train(was_training)
    return restore_order(outs, inputs)


class TokenDataset(Dataset):
    """A data set of tokenized text: every batch it hands out is length-sorted and cut to its
    longest sentence (:func:`token_batches`), which leaves a BERT embedding unchanged and saves
    most of the compute on short sentences.

    Calibration takes a seeded random subset, like the tensor data sets; analysis takes the first
    ``samples`` sentences of the (already shuffled) training split.
    """

    def train_batches(self, batch_size: int = 32, *, shuffle: bool = False, seed: int = 0):
        return token_batches(self.x_train, self.y_train, batch_size)

    def test_batches(self, batch_size: int = 64):
        return token_batches(self.x_test, self.y_test, batch_size)

    def calibration_batches(self, samples: int = 512, *, seed: int = 1234, batch_size: int = 32):
        g = torch.Generator().manual_seed(seed)
        n = self.n_train
        idx = torch.randperm(n, generator=g)[: min(samples, n)]
        return token_batches({k: v[idx] for k, v in self.x_train.items()}, self.y_train[idx],
                             batch_size)  # fmt: skip

    def analysis_batches(self, samples: int, *, batch_size: int = 32, seed: int = 0):
        n = min(int(samples), self.n_train)
        if n < 1:
            raise DataError("the training split holds no sentences to analyse")
        x = {k: v[:n] for k, v in self.x_train.items()}
        return token_batches(x, self.y_train[:n], batch_size)


# --------------------------------------------------------------------------------------------------
# The task and its metrics.


def _check_pair(fp32: torch.Tensor, comp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if fp32.ndim != 2 or fp32.shape != comp.shape:
        raise DataError(
            f"embeddings must be two [N, D] tensors of one shape, got {tuple(fp32.shape)} and "
            f"{tuple(comp.shape)}; pass the FP32 and compressed embeddings of the same sentences"
        )
    return fp32.detach().double(), comp.detach().double()


def mean_cosine(fp32: torch.Tensor, comp: torch.Tensor) -> float:
    """Mean cosine similarity between each compressed embedding and its FP32 embedding.

    Example:
        >>> round(mean_cosine(torch.eye(3), 2 * torch.eye(3)), 6)
        1.0
    """
    a, b = _check_pair(fp32, comp)
    return float(F.cosine_similarity(a, b, dim=-1).mean())


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks of a 1-D tensor, ties given their average rank."""
    values, inverse, counts = torch.unique(x, sorted=True, return_inverse=True, return_counts=True)
    del values
    ends = counts.cumsum(0).double()
    return (ends - (counts.double() - 1) / 2)[inverse]


def _similarities(e: torch.Tensor) -> torch.Tensor:
    e = F.normalize(e, dim=-1)
    return e @ e.T


def similarity_spearman(fp32: torch.Tensor, comp: torch.Tensor) -> float:
    """Spearman correlation between the FP32 and compressed pairwise cosine similarities.

    Both similarity matrices are compared on their strict upper triangle (each pair once). Cost and
    memory grow as N²: a few thousand sentences at most.

    Example:
        >>> e = torch.randn(20, 8, generator=torch.Generator().manual_seed(0))
        >>> round(similarity_spearman(e, 2 * e), 6)
        1.0
    """
    a, b = _check_pair(fp32, comp)
    if a.shape[0] < 3:
        raise DataError(f"Spearman needs at least 3 sentences, got {a.shape[0]}")
    i, j = torch.triu_indices(a.shape[0], a.shape[0], offset=1)
    ra, rb = _ranks(_similarities(a)[i, j]), _ranks(_similarities(b)[i, j])
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = (ra.norm() * rb.norm()).clamp(min=1e-300)
    return float((ra @ rb) / denom)


def topk_overlap(fp32: torch.Tensor, comp: torch.Tensor, k: int = 10) -> float:
    """Mean fraction of each sentence's k nearest neighbours (itself excluded) that both agree on.

    Example:
        >>> e = torch.randn(30, 8, generator=torch.Generator().manual_seed(0))
        >>> topk_overlap(e, e, k=10)
        1.0
    """
    a, b = _check_pair(fp32, comp)
    n = a.shape[0]
    if not 1 <= k < n:
        raise DataError(f"top-{k} overlap needs more than k={k} sentences, got {n}; lower k")
    eye = torch.eye(n, dtype=torch.bool)
    na = _similarities(a).masked_fill(eye, float("-inf")).topk(k, dim=1).indices
    nb = _similarities(b).masked_fill(eye, float("-inf")).topk(k, dim=1).indices
    hits = (na.unsqueeze(2) == nb.unsqueeze(1)).any(dim=2).sum()
    return float(hits) / (n * k)


def embedding_metrics(fp32: torch.Tensor, comp: torch.Tensor, k: int = 10) -> dict[str, float]:
    """All three fidelity metrics: ``cosine``, ``spearman`` and ``top{k}``.

    Example:
        >>> e = torch.randn(30, 8, generator=torch.Generator().manual_seed(0))
        >>> sorted(embedding_metrics(e, e))
        ['cosine', 'spearman', 'top10']
    """
    return {
        "cosine": mean_cosine(fp32, comp),
        "spearman": similarity_spearman(fp32, comp),
        f"top{k}": topk_overlap(fp32, comp, k),
    }


class EmbeddingTask(Task):
    """Labels-free distortion task: the target is the FP32 embedding of the same input.

    ``loss`` is ``½‖e − e_fp32‖²`` summed over the embedding and averaged over the batch
    (``mean(1 − cos)`` for unit vectors); its Hessian at the FP32 point is Gauss–Newton. The batch
    metric is the mean cosine; :meth:`metrics` adds the whole-set Spearman and top-10 overlap.
    """

    name = "embedding"
    metric_name = "cosine"
    higher_is_better = True
    targets_from_model = True

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return 0.5 * (outputs - targets).pow(2).sum(dim=-1).mean()

    def metric_sums(self, outputs: torch.Tensor, targets: torch.Tensor) -> tuple[float, int]:
        cos = F.cosine_similarity(outputs.double(), targets.double(), dim=-1)
        return float(cos.sum()), int(cos.shape[0])

    def metrics(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        """Whole-set metrics (``outputs`` and ``targets`` hold every test embedding)."""
        return embedding_metrics(targets, outputs)


# --------------------------------------------------------------------------------------------------
# Data sets: ``--data sentences`` and ``--data FILE.txt``.


def embedding_dataset(
    name: str,
    train: Sequence[str],
    test: Sequence[str],
    *,
    model: nn.Module | None,
    tokenizer: Any,
    max_len: int = 128,
    n_train: int | None = 1024,
    n_test: int | None = 512,
    batch_size: int = 64,
    meta: dict[str, Any] | None = None,
) -> Dataset:
    """Tokenize two sentence lists and attach the FP32 model's embeddings as targets.

    ``n_train``/``n_test`` keep the first sentences of each (already shuffled) list; ``None`` keeps
    all. The targets are computed once here, with ``model`` in eval mode.

    Example:
        >>> ds = embedding_dataset("demo", train, test, model=enc, tokenizer=tok)  # doctest: +SKIP
        >>> ds.x_train["input_ids"].shape, ds.y_train.shape      # doctest: +SKIP
        (torch.Size([1024, 128]), torch.Size([1024, 384]))
    """
    _need_model(name, model, tokenizer)
    train, test = list(train)[:n_train], list(test)[:n_test]
    x_train, x_test = tokenize(tokenizer, train, max_len), tokenize(tokenizer, test, max_len)
    y_train, y_test = embed(model, x_train, batch_size), embed(model, x_test, batch_size)
    if y_train.ndim != 2:
        raise DataError(
            f"the {name!r} data needs a sentence-embedding model (output [N, D]), got output shape "
            f"{tuple(y_train.shape)}; load the model with an hf: spec"
        )
    info = {"max_len": int(max_len), "n_train": len(train), "n_test": len(test)}
    info.update(meta or {})
    info.update({"train_text": train, "test_text": test})
    return TokenDataset(name, x_train, y_train, x_test, y_test, EmbeddingTask(), info)


def _need_model(name: str, model: Any, tokenizer: Any) -> None:
    if model is None or tokenizer is None:
        raise DataError(
            f"the {name!r} data is text, whose targets are an encoder's own embeddings: give MODEL "
            "as hf:DIR or hf:minilm (from Python: load_data(spec, model=..., tokenizer=...))"
        )


@register_dataset("sentences")
def load_sentences(
    seed: int = 0,
    *,
    model: nn.Module | None = None,
    tokenizer: Any = None,
    root: str | None = None,
    **kwargs: Any,
) -> Dataset:
    """Standard-library docstring sentences (see :func:`stdlib_sentences`) as an embedding data set.

    Keyword arguments go to :func:`embedding_dataset` (``max_len``, ``n_train``, ``n_test``, ...).

    Example:
        >>> model, tok = load_hf("hf:minilm")                    # doctest: +SKIP
        >>> ds = load_data("sentences", model=model, tokenizer=tok, max_len=64)  # doctest: +SKIP
    """
    _need_model("sentences", model, tokenizer)  # before the 5 s parse of the standard library
    train, test = split_sentences(stdlib_sentences(root), seed=seed)
    source = {"source": "python-stdlib-docstrings", "python": sysconfig.get_python_version()}
    return embedding_dataset(
        "sentences", train, test, model=model, tokenizer=tokenizer, meta=source, **kwargs
    )


@register_dataset("text")
def load_text(
    path: str | Path,
    seed: int = 0,
    *,
    model: nn.Module | None = None,
    tokenizer: Any = None,
    **kwargs: Any,
) -> Dataset:
    """A UTF-8 text file of sentences, one a line, as an embedding data set (seeded 80/20 split).

    Example:
        >>> ds = load_data("my_sentences.txt", model=model, tokenizer=tok)  # doctest: +SKIP
    """
    train, test = split_sentences(read_sentences(path), seed=seed)
    return embedding_dataset(
        Path(path).stem,
        train,
        test,
        model=model,
        tokenizer=tokenizer,
        meta={"source": Path(path).name},
        **kwargs,
    )
