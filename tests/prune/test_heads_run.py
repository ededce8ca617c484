"""``squeezer compress hf:DIR --prune heads`` and ``--prune tokens`` end to end on a tiny BERT
folder: the run folder records the pruned shapes, reloads the smaller model and re-plans it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from squeezer.cli import main
from squeezer.runfolder import load_compressed

transformers = pytest.importorskip("transformers")

WORDS = "the a of to is and in it for return value list file name data this with when be".split()


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, "."]
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n")
    cfg = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=64,
                                  max_position_embeddings=40, initializer_range=0.2)  # fmt: skip
    with torch.random.fork_rng():
        torch.manual_seed(0)
        transformers.BertModel(cfg).save_pretrained(d / "model")
    transformers.BertTokenizer(str(d / "vocab.txt")).save_pretrained(d / "model")
    rng = np.random.default_rng(0)
    lines = [" ".join(rng.choice(WORDS, size=int(rng.integers(3, 9)))) + "." for _ in range(160)]
    (d / "corpus.txt").write_text("\n".join(lines) + "\n")
    return d


def _compress(tiny_hf, out, *extra):
    return main(["compress", f"hf:{tiny_hf / 'model'}", "--data", str(tiny_hf / "corpus.txt"),
                 "--budget", "bits=8", "--method", "uniform", "--max-len", "16",
                 "--out", str(out), "--quiet", *extra])  # fmt: skip


def test_heads_run_reloads_and_replans(tmp_path, capsys, tiny_hf):
    out = tmp_path / "run"
    rc = _compress(tiny_hf, out, "--prune", "heads", "--prune-ratio", "0.4",
                   "--prune-importance", "hessian", "--prune-finetune", "1")  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    rec = json.loads((out / "prune.json").read_text())
    assert rec["stats"]["macs_after"] == pytest.approx(0.6 * rec["stats"]["macs_before"], rel=0.1)
    dense, q, _, data = load_compressed(out)
    for i, layer in enumerate(q.model.encoder.layer):
        heads = rec["architecture"].get(f"model.encoder.layer.{i}.attention.self", {})
        assert layer.attention.self.num_attention_heads == heads.get("num_attention_heads", 4)
    m = json.loads((out / "metrics.json").read_text())
    from squeezer.data import evaluate

    assert evaluate(q, data.test_batches(), data.task) == pytest.approx(m["after"]["metric"])
    assert main(["quantize", str(out)]) == 0, (
        capsys.readouterr().err
    )  # re-applied on the pruned model


def test_tokens_run_reloads(tmp_path, capsys, tiny_hf):
    out = tmp_path / "run"
    rc = _compress(tiny_hf, out, "--prune", "tokens", "--prune-ratio", "0.3")
    assert rc == 0, capsys.readouterr().err
    rec = json.loads((out / "prune.json").read_text())
    assert 0.1 < rec["stats"]["macs_removed_approx"] < 0.5
    _, q, _, data = load_compressed(out)
    from squeezer.prune.tokens import TokenPruned

    assert isinstance(q, TokenPruned)
    assert float(q.thresholds.abs().sum()) > 0  # the learned thresholds came back
    m = json.loads((out / "metrics.json").read_text())
    from squeezer.data import evaluate

    assert evaluate(q, data.test_batches(), data.task) == pytest.approx(m["after"]["metric"])
