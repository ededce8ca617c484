"""Head and FFN-neuron pruning of BERT-style encoders (squeezer.prune.heads), against oracles: the
pruned model equals the unpruned one with those heads and neurons gated to zero; the Hessian score
equals the finite-difference curvature of the output distortion; the pruned model reloads,
quantizes and exports."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from squeezer.errors import ConfigError, UnsupportedModelError
from squeezer.prune import PRUNERS, PruneSpec, prune
from squeezer.prune.heads import (
    Selection,
    encoder_blocks,
    encoder_macs,
    gated,
    hessian_importance,
    magnitude_importance,
    rebuild,
    remove_units,
    select,
)

pytest.importorskip("transformers")
from tests.tiny_bert import tiny_encoder, token_data  # noqa: E402


def _gates(model, sel: Selection, dtype=torch.float32):
    gh, gn = [], []
    for b in encoder_blocks(model):
        h = torch.zeros(b.heads, dtype=dtype)
        h[sel.heads[b.prefix]] = 1
        n = torch.zeros(b.neurons, dtype=dtype)
        n[sel.neurons[b.prefix]] = 1
        gh.append(h)
        gn.append(n)
    return gh, gn


SEL = Selection(
    {"model.encoder.layer.0": [0, 2], "model.encoder.layer.1": [1, 2, 3]},
    {"model.encoder.layer.0": list(range(0, 64, 3)), "model.encoder.layer.1": [5, 6, 60]},
)


def test_pruned_equals_gated_model():
    enc, x = tiny_encoder(), token_data(6, seed=1)
    small = remove_units(enc, SEL)
    with torch.no_grad(), gated(enc, *_gates(enc, SEL)):
        masked = enc(**x)
    with torch.no_grad():
        got = small(**x)
    torch.testing.assert_close(got, masked, atol=1e-6, rtol=1e-5)
    assert [b.heads for b in encoder_blocks(small)] == [2, 3]
    assert [b.neurons for b in encoder_blocks(small)] == [22, 3]
    assert small.model.encoder.layer[0].attention.self.query.weight.shape == (16, 32)
    with torch.no_grad():  # and the pruning changed something
        assert (enc(**x) - got).abs().max() > 1e-3


def test_user_model_untouched_and_no_hooks_left():
    enc = tiny_encoder()
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    p = prune(enc, PruneSpec("heads", ratio=0.4, importance="hessian"), _data(enc))
    for k, v in enc.state_dict().items():
        assert torch.equal(v, before[k]), k
    for net in (enc, p.model):
        for m in net.modules():
            assert not m._forward_pre_hooks and not m._forward_hooks
        assert all(not t.requires_grad or t.grad is None for t in net.parameters())


def test_rebuild_and_reload(tmp_path):
    from squeezer.models import read_state_dict, save_weights

    enc, x = tiny_encoder(), token_data(5, seed=2)
    small = remove_units(enc, SEL)
    save_weights(small.state_dict(), tmp_path / "model.safetensors")
    from squeezer.prune.heads import architecture

    again = rebuild(tiny_encoder(seed=7), architecture(small))
    again.load_state_dict(read_state_dict(tmp_path / "model.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(**x), small(**x), atol=0, rtol=0)
    with pytest.raises(ConfigError, match="not a head or FFN size"):
        rebuild(enc, {"model.encoder.layer.9.attention.self": {"num_attention_heads": 2}})


def test_hessian_score_is_the_distortion_curvature():
    """½·G_ξξ against ½‖e(1 − δ) − e(1)‖² / δ² (float64, one gate at a time, central in δ)."""
    enc = tiny_encoder().double()
    x = token_data(4, seed=3)
    imp = hessian_importance(enc, [x], probes=3000, seed=0)
    blocks = encoder_blocks(enc)
    with torch.no_grad():
        ref = enc(**x)
    delta = 1e-4
    for kind, i, j in (("h", 0, 1), ("h", 1, 3), ("n", 0, 10), ("n", 1, 40)):
        gh = [torch.ones(b.heads, dtype=torch.float64) for b in blocks]
        gn = [torch.ones(b.neurons, dtype=torch.float64) for b in blocks]
        (gh if kind == "h" else gn)[i][j] = 1 - delta
        with torch.no_grad(), gated(enc, gh, gn):
            out = enc(**x)
        exact = 0.5 * (out - ref).pow(2).sum(-1).mean() / delta**2
        est = (imp.heads if kind == "h" else imp.neurons)[i][j]
        assert est == pytest.approx(float(exact), rel=0.1), (kind, i, j)


def test_select_by_macs_and_floors():
    enc = tiny_encoder()
    imp = magnitude_importance(enc)
    sel = select(enc, imp, macs=0.5)
    small = remove_units(enc, sel)
    ratio = 1 - encoder_macs(small) / encoder_macs(enc)
    assert ratio == pytest.approx(0.5, abs=0.05)
    sel = select(enc, imp, heads=0.99, neurons=0.0, min_heads=2)
    assert all(len(v) == 2 for v in sel.heads.values())
    assert all(len(v) == 64 for v in sel.neurons.values())
    with pytest.raises(ConfigError):
        select(enc, imp, heads=1.5)
    with pytest.raises(ConfigError):
        select(enc, imp, macs=0.3, heads=0.2)


def test_magnitude_scores_follow_the_weights():
    enc = tiny_encoder()
    with torch.no_grad():
        b = encoder_blocks(enc)[0]
        rows = slice(2 * b.head_dim, 3 * b.head_dim)
        for lin in (b.attention.query, b.attention.key, b.attention.value):
            lin.weight[rows] *= 1e-3
        b.attn_out.weight[:, rows] *= 1e-3
        b.ffn_in.weight[7] = 0
    imp = magnitude_importance(enc)
    assert int(imp.heads[0].argmin()) == 2
    assert int(imp.neurons[0].argmin()) == 7
    sel = select(enc, imp, heads=0.125, neurons=1 / 128)
    assert 2 not in sel.heads["model.encoder.layer.0"]
    assert 7 not in sel.neurons["model.encoder.layer.0"]


def _data(enc):
    from squeezer.text import EmbeddingTask, TokenDataset, embed

    x = token_data(24, seed=4)
    xt = token_data(8, seed=5)
    return TokenDataset("tiny", x, embed(enc, x), xt, embed(enc, xt), EmbeddingTask(), {})


def test_registry_pruner_and_bad_input():
    assert "heads" in PRUNERS
    enc = tiny_encoder()
    p = prune(enc, PruneSpec("heads", ratio=0.3, importance="hessian"), _data(enc))
    assert p.stats["macs_after"] < p.stats["macs_before"]
    assert p.stats["params_after"] < p.stats["params_before"]
    assert set(p.architecture) <= {f"model.encoder.layer.{i}.{m}" for i in (0, 1)
                                   for m in ("attention.self", "intermediate.dense")}  # fmt: skip
    q = prune(enc, PruneSpec("heads", options={"heads": 0.5, "neurons": 0.25}), None)
    assert q.stats["heads_after"] == 4 and q.stats["neurons_after"] == 96
    with pytest.raises(ConfigError, match="needs data"):
        prune(enc, PruneSpec("heads", importance="hessian"), None)
    with pytest.raises(ConfigError, match="macs"):
        prune(enc, PruneSpec("heads", target="params"), None)
    with pytest.raises(UnsupportedModelError):
        prune(nn.Sequential(nn.Linear(3, 3)), PruneSpec("heads"), None)


def test_pruned_model_quantizes_and_exports(tmp_path):
    pytest.importorskip("onnxruntime")
    from squeezer.export.onnx import export_onnx
    from squeezer.quant.apply import quantize
    from squeezer.templates import uniform_plan

    enc, x = tiny_encoder(), token_data(8, seed=6)
    small = remove_units(enc, SEL)
    q = quantize(small, uniform_plan(small, 8), calib=[x])
    with torch.no_grad():
        cos = torch.nn.functional.cosine_similarity(q(**x), small(**x)).min()
    assert cos > 0.98
    report = export_onnx(q, tmp_path / "m.onnx", x)
    assert (tmp_path / "m.onnx").is_file() and report is not None
