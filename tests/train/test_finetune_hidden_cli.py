"""``squeezer finetune DIR --distill-hidden W`` on a tiny BERT run folder: it writes the fine-tuned
model and its metrics, and the hidden-state term enters the loss (its training differs from
``--distill-hidden 0`` on the same folder, seed and batches)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from squeezer.cli import main
from squeezer.data import evaluate
from squeezer.runfolder import load_compressed

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = "a an the of to in is it be and or for with when this that value name list file".split()


@pytest.fixture(scope="module")
def encoder_run(tmp_path_factory):
    """A 4-bit uniform run folder of the tiny random BERT of ``tiny_bert`` (saved with a word
    vocabulary of its size) on a 160-line corpus of those words."""
    from tiny_bert import tiny_encoder

    d = tmp_path_factory.mktemp("hf")
    bert = tiny_encoder(0).model
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "."]
    pad = [f"[unused{i}]" for i in range(bert.config.vocab_size - len(specials) - len(WORDS))]
    (d / "vocab.txt").write_text("\n".join([*specials, *WORDS, *pad]) + "\n")
    bert.save_pretrained(d / "model")
    transformers.BertTokenizer(str(d / "vocab.txt")).save_pretrained(d / "model")
    rng = np.random.default_rng(0)
    lines = [" ".join(rng.choice(WORDS, size=int(rng.integers(3, 9)))) + "." for _ in range(160)]
    (d / "corpus.txt").write_text("\n".join(lines) + "\n")
    out = d / "run"
    rc = main(["compress", f"hf:{d / 'model'}", "--data", str(d / "corpus.txt"), "--budget",
               "bits=4", "--method", "uniform", "--act-bits", "8", "--max-len", "16", "--out",
               str(out), "--quiet", "--threads", "1"])  # fmt: skip
    assert rc == 0
    return out


def _finetune(src, dst, weight: str) -> dict:
    shutil.copytree(src, dst)
    rc = main(["finetune", str(dst), "--epochs", "2", "--lr", "1e-3", "--distill-hidden", weight,
               "--quiet", "--threads", "1"])  # fmt: skip
    assert rc == 0
    return json.loads((dst / "metrics.json").read_text())


def test_distill_hidden_from_the_cli_trains_on_the_hidden_states(tmp_path, encoder_run):
    before = (encoder_run / "model.safetensors").read_bytes()
    ptq = json.loads((encoder_run / "metrics.json").read_text())["after"]["metric"]
    plain = _finetune(encoder_run, tmp_path / "plain", "0")
    hidden = _finetune(encoder_run, tmp_path / "hidden", "5")
    rec = hidden["finetune"]
    assert rec["options"]["hidden_weight"] == 5.0 and plain["finetune"]["options"]["hidden_weight"] == 0
    assert rec["ptq"] == pytest.approx(ptq) and [h["epoch"] for h in rec["history"]] == [0, 1, 2]
    assert hidden["after"]["name"].endswith("+ QAT (2 ep)") and hidden["after"]["metric"] == rec["after"]
    # the folder holds the fine-tuned model: reloaded, it scores what metrics.json says
    _, q, _, data = load_compressed(tmp_path / "hidden")
    assert evaluate(q, data.test_batches(), data.task) == pytest.approx(rec["after"])
    assert (tmp_path / "hidden" / "model.safetensors").read_bytes() != before
    # same folder, seed and batches: the first epoch's loss carries the hidden term (> 0 for a
    # 4-bit student), and the weights it trains to differ from the embedding-only run's
    train = [r["history"][1]["train_loss"] for r in (plain["finetune"], rec)]
    assert train[1] > train[0] * 1.5, train
    a = (tmp_path / "plain" / "model.safetensors").read_bytes()
    assert a != (tmp_path / "hidden" / "model.safetensors").read_bytes()
    assert (encoder_run / "model.safetensors").read_bytes() == before  # the source run untouched
