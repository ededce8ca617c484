"""Every encoder family squeezer reads, and two vision transformers, end to end (issue 12).

Each model is built from a tiny ``transformers`` config (hidden 32, 2 layers, seeded random
weights) and saved with ``save_pretrained`` to a temporary folder (``hf_families``). Oracles:
transformers' own FP32 outputs for the loaded encoder, and ONNX Runtime against squeezer's
simulation for the exported file, at more than one batch size.
"""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("onnxruntime")

import hf_families as fam  # noqa: E402  (needs transformers)

from squeezer.cli import main  # noqa: E402
from squeezer.encoders import BLOCK_ROLES, blocks, encoder_of, layer_roles  # noqa: E402
from squeezer.errors import ExportError, UnsupportedModelError  # noqa: E402
from squeezer.graph import float_weights  # noqa: E402
from squeezer.hf import load_hf, mean_pool  # noqa: E402
from squeezer.text import tokenize  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("families")
    fam.corpus(d / "corpus.txt", n=120)
    fam.image_npz(d / "img.npz", n=96)
    return d


@pytest.fixture(scope="module")
def folders(work):
    return {f: fam.build_text(f, work / f) for f in fam.TEXT_FAMILIES}


@pytest.mark.parametrize("family", fam.TEXT_FAMILIES)
def test_family_loads_by_structure_and_matches_transformers(family, folders):
    """The sentence embedding is transformers' own last hidden state, mean-pooled; every block's
    six Linear layers get their roles, whatever the family names them."""
    model, tokenizer = load_hf(f"hf:{folders[family]}")
    raw = transformers.AutoModel.from_pretrained(str(folders[family]), attn_implementation="eager")
    x = tokenize(tokenizer, ["the value of a list.", "return it.", "get each new name"], 12)
    with torch.no_grad():
        ref = mean_pool(raw.eval()(**x).last_hidden_state, x["attention_mask"])
        got = model(**x)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    assert encoder_of(model) is model.model
    roles, blk = layer_roles(model), blocks(model)
    for b in sorted({v for v in blk.values() if v.startswith("layer.")}):
        assert sorted(roles[k] for k, v in blk.items() if v == b) == sorted(BLOCK_ROLES)
    assert "word_embeddings" in roles.values()
    # DeBERTa reads its relative-position table as .weight: a float weight, not a planned layer
    rel = "model.encoder.rel_embeddings"
    assert (rel in float_weights(model)) == family.startswith("deberta")
    assert rel not in roles


def _export_steps(run) -> tuple[float, dict]:
    e = json.loads((run / "metrics.json").read_text())["export"]
    return e["max_abs_error"] / e["output_step"], e


@pytest.mark.parametrize("family", fam.TEXT_FAMILIES)
def test_cli_compress_export_each_family(family, folders, work, capsys):
    """Uniform W8A8 through the CLI, then the ONNX export and its check: ONNX Runtime computes
    what squeezer simulates (before, RoBERTa's and MPNet's exports were 2.7 and 4.5 output steps
    off: the residual sums before each LayerNorm were requantized to 8 bits)."""
    run = work / f"run-{family}"
    args = ["compress", f"hf:{folders[family]}", "--data", str(work / "corpus.txt"),
            "--budget", "bits=8", "--method", "uniform", "--max-len", "16", "--out", str(run),
            "--quiet"]  # fmt: skip
    assert main(args) == 0, capsys.readouterr().err
    m = json.loads((run / "metrics.json").read_text())
    assert m["metric_name"] == "cosine" and m["after"]["metric"] > 0.99
    assert json.loads((run / "plan.json").read_text())["meta"]["template"] == "qbert"
    assert main(["export", str(run)]) == 0, capsys.readouterr().err
    steps, e = _export_steps(run)
    assert steps < 0.5, e
    assert all("not found" not in s or "embeddings" in k for k, s in e["layers"].items())


@pytest.mark.slow
@pytest.mark.parametrize("family", ["albert", "deberta-v2", "mpnet"])
def test_cli_mixed_plan_bench(family, folders, work, capsys):
    """Q-BERT mixed precision (Hessian analysis), a re-plan, export and bench."""
    run = work / f"mixed-{family}"
    args = ["compress", f"hf:{folders[family]}", "--data", str(work / "corpus.txt"),
            "--budget", "bits=6", "--max-len", "16", "--out", str(run), "--quiet"]  # fmt: skip
    assert main(args) == 0, capsys.readouterr().err
    assert main(["plan", str(run), "--budget", "bits=5"]) == 0, capsys.readouterr().err
    assert json.loads((run / "metrics.json").read_text())["after"]["avg_bits"] <= 5 + 1e-9
    assert main(["export", str(run)]) == 0, capsys.readouterr().err
    assert main(["bench", str(run), "--batch", "1", "4", "--runs", "3", "--warmup", "1"]) == 0
    assert "batch_4" in json.loads((run / "metrics.json").read_text())["latency"]


def test_vit_folder_loads_as_an_image_classifier(work):
    """Oracle: transformers' own logits; no tokenizer; the input shape from the config."""
    folder = fam.build_vit(work / "vit")
    model, tokenizer = load_hf(f"hf:{folder}")
    assert tokenizer is None and model.input_shape == (3, 16, 16)
    raw = transformers.AutoModelForImageClassification.from_pretrained(
        str(folder), attn_implementation="eager"
    ).eval()
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(x), raw(pixel_values=x).logits, atol=1e-5, rtol=0)


def test_cli_vit_folder_with_images(work, capsys):
    run = work / "run-vit"
    folder = fam.build_vit(work / "vit")
    args = ["compress", f"hf:{folder}", "--data", str(work / "img.npz"), "--budget", "bits=8",
            "--method", "uniform", "--out", str(run), "--quiet"]  # fmt: skip
    assert main(args) == 0, capsys.readouterr().err
    assert json.loads((run / "metrics.json").read_text())["metric_name"] == "top1"
    assert main(["export", str(run)]) == 0, capsys.readouterr().err
    assert _export_steps(run)[0] < 0.5


def test_cli_torch_vit_with_class_token_exports(work, capsys, monkeypatch):
    """``cls.expand(len(x), -1, -1)``: the trace froze the batch size at 2 and ONNX Runtime failed
    on 64 samples ('Non concat axis dimensions must match', exit 1)."""
    import os

    monkeypatch.syspath_prepend(os.path.dirname(fam.__file__))
    run = work / "run-torch-vit"
    args = ["compress", "hf_families:tiny_vit", "--data", str(work / "img.npz"), "--budget",
            "bits=8", "--method", "uniform", "--out", str(run), "--quiet"]  # fmt: skip
    assert main(args) == 0, capsys.readouterr().err
    assert main(["export", str(run)]) == 0, capsys.readouterr().err
    steps, e = _export_steps(run)
    assert all(s == "qdq-int8" for k, s in e["layers"].items() if k.startswith("encoder")), e
    assert steps < 2


def _quantized_vit(example):
    from squeezer import LayerQuant, QuantConfig, quantize
    from squeezer.graph import split_attention

    net = split_attention(fam.tiny_vit())
    return quantize(net, QuantConfig(LayerQuant(bits=8, act_bits=8)), calib=[example])


@pytest.mark.parametrize("batch", [1, 5, 7])
def test_dynamic_batch_runs_at_every_batch_size(tmp_path, batch):
    """The exported graph follows the input's batch size (the class token's frozen [2, 1, D]
    expansion is rebuilt from Shape(input)); ONNX Runtime agrees with squeezer at each size."""
    import numpy as np

    from squeezer.export import export_onnx, ort_session

    g = torch.Generator().manual_seed(0)
    x = torch.randn(24, 3, 16, 16, generator=g)
    q = _quantized_vit(x)
    rep = export_onnx(q, tmp_path / "vit.onnx", x)
    sess = ort_session((tmp_path / "vit.onnx").read_bytes(), threads=1)
    xb = torch.randn(batch, 3, 16, 16, generator=g)
    (got,) = sess.run(None, {sess.get_inputs()[0].name: xb.numpy()})
    with torch.no_grad():
        ref = q(xb).numpy()
    assert got.shape == ref.shape
    assert float(np.abs(got - ref).max()) <= 2 * rep.output_step


class _ArangeByLen(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x) + torch.arange(len(x), dtype=x.dtype)[:, None]


def test_batch_dependence_that_cannot_be_rebuilt_is_an_export_error(tmp_path):
    from squeezer import LayerQuant, QuantConfig, quantize
    from squeezer.export import export_onnx

    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    q = quantize(_ArangeByLen(), QuantConfig(LayerQuant(bits=8, act_bits=8)), calib=[x])
    with pytest.raises(ExportError, match="depends on the batch size.*x.shape"):
        export_onnx(q, tmp_path / "m.onnx", x)
    assert not (tmp_path / "m.onnx").exists()


def test_decoders_are_refused_in_one_line(tmp_path, capsys):
    gpt = tmp_path / "gpt"
    with torch.random.fork_rng():
        transformers.GPT2LMHeadModel(
            transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=50)
        ).save_pretrained(gpt)
    with pytest.raises(UnsupportedModelError, match="with a decoder .GPT2LMHeadModel"):
        load_hf(f"hf:{gpt}")
    corpus = fam.corpus(tmp_path / "c.txt", n=20)
    args = ["compress", f"hf:{gpt}", "--data", str(corpus), "--budget", "bits=8", "--out",
            str(tmp_path / "run")]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "decoder" in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "run").exists()
