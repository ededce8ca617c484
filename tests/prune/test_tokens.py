"""Learned Token Pruning (squeezer.prune.tokens), against oracles: threshold 0 is the unpruned
encoder; tokens really dropped ("hard") equal the same decisions masked in place ("mask"); the
soft mask at a tiny temperature is the hard one; the calibrated thresholds meet their schedule."""

from __future__ import annotations

import pytest
import torch

from squeezer.errors import ConfigError
from squeezer.graph import copy_model
from squeezer.prune import PRUNERS, PruneSpec, prune
from squeezer.prune.tokens import (
    TokenPruned,
    calibrate_thresholds,
    kept_fractions,
    kept_schedule,
)

pytest.importorskip("transformers")
from tests.tiny_bert import tiny_encoder, token_data  # noqa: E402


def test_threshold_zero_is_the_unpruned_encoder():
    enc, x = tiny_encoder(), token_data(6, seed=1)
    with torch.no_grad():
        ref = enc(**x)
        for mode in ("hard", "mask"):
            for pool in ("kept", "exit"):
                got = TokenPruned(copy_model(enc), torch.zeros(2), mode=mode, pool=pool)(**x)
                torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("pool", ["kept", "exit"])
def test_dropped_tokens_equal_masked_tokens(pool):
    enc, x = tiny_encoder(), token_data(8, seed=2)
    th = torch.tensor([0.08, 0.1])
    hard = TokenPruned(copy_model(enc), th, mode="hard", pool=pool)
    mask = TokenPruned(copy_model(enc), th, mode="mask", pool=pool)
    with torch.no_grad():
        a, b = hard(**x), mask(**x)
        ref = enc(**x)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert float((a - ref).abs().max()) > 1e-3  # tokens did go
    assert float(hard.kept[-1]) < 0.9


def test_later_blocks_run_on_shorter_sequences():
    enc = tiny_encoder()
    x = {"input_ids": torch.randint(5, 100, (4, 12), generator=torch.Generator().manual_seed(3)),
         "attention_mask": torch.ones(4, 12, dtype=torch.long)}  # fmt: skip
    net = TokenPruned(copy_model(enc), torch.tensor([0.09, 0.09]))
    widths = []
    hook = net.model.encoder.layer[1].attention.register_forward_pre_hook(
        lambda m, args: widths.append(args[0].shape[1])
    )
    try:
        with torch.no_grad():
            net(**x)
    finally:
        hook.remove()
    assert widths and widths[0] < 12


def test_soft_mask_tends_to_the_hard_mask():
    enc, x = tiny_encoder(), token_data(6, seed=4)
    th = torch.tensor([0.07, 0.09])
    soft = TokenPruned(copy_model(enc), th, mode="soft", temperature=1e-7)
    with torch.no_grad():
        hard = TokenPruned(copy_model(enc), th, mode="mask")(**x)
        torch.testing.assert_close(soft(**x), hard, atol=1e-4, rtol=1e-4)
    soft.temperature = 0.01
    soft.thresholds.requires_grad_(True)
    soft(**x).sum().backward()
    assert soft.thresholds.grad is not None and float(soft.thresholds.grad.abs().sum()) > 0


def test_calibrated_thresholds_meet_the_schedule():
    enc = tiny_encoder()
    batches = [token_data(16, seed=s) for s in (5, 6)]
    net = TokenPruned(copy_model(enc), torch.zeros(2))
    kept = kept_schedule(0.3, 2)
    calibrate_thresholds(net, batches, kept)
    got = kept_fractions(net, batches)
    assert got == pytest.approx(kept, abs=0.04)
    assert net.mode == "hard" and net.record is None


def _data(enc):
    from squeezer.text import EmbeddingTask, TokenDataset, embed

    x, xt = token_data(64, seed=7), token_data(16, seed=8)
    return TokenDataset("tiny", x, embed(enc, x), xt, embed(enc, xt), EmbeddingTask(), {})


def test_registry_pruner_trains_thresholds_and_leaves_the_model():
    assert "tokens" in PRUNERS
    enc = tiny_encoder()
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    p = prune(enc, PruneSpec("tokens", ratio=0.3, options={"steps": 8, "samples": 64}), _data(enc))
    for k, v in enc.state_dict().items():
        assert torch.equal(v, before[k]), k
    for m in enc.modules():
        assert not m._forward_pre_hooks and not m._forward_hooks
    assert isinstance(p.model, TokenPruned) and p.model.mode == "hard"
    assert 0.15 < 1 - p.stats["kept_fraction"] < 0.45
    assert not p.model.thresholds.requires_grad
    # the thresholds reload with the weights
    again = TokenPruned(copy_model(enc), torch.zeros(2))
    again.load_state_dict(p.model.state_dict())
    x = token_data(4, seed=9)
    with torch.no_grad():
        torch.testing.assert_close(again(**x), p.model(**x), atol=0, rtol=0)


def test_bad_input():
    enc = tiny_encoder()
    with pytest.raises(ConfigError, match="needs|data"):
        prune(enc, PruneSpec("tokens", ratio=0.3), None)
    with pytest.raises(ConfigError, match="thresholds"):
        TokenPruned(copy_model(enc), torch.zeros(3))
    with pytest.raises(ConfigError, match="pooling"):
        TokenPruned(copy_model(enc), torch.zeros(2), pool="cls")
    with pytest.raises(ConfigError, match="too high"):
        kept_schedule(0.9, 6)


def test_export_is_refused():
    pytest.importorskip("onnx")
    from squeezer.errors import ExportError, UnsupportedModelError
    from squeezer.export import export_float_onnx

    net = TokenPruned(copy_model(tiny_encoder()), torch.zeros(2))
    with pytest.raises((ExportError, UnsupportedModelError), match="PyTorch only"):
        export_float_onnx(net, token_data(2, seed=0))


def test_exit_pooling_pools_each_pruned_token_where_it_left():
    # Pruning only in the last block: everything before it is the unpruned encoder, so the oracle
    # is the unpruned final states for the kept tokens and the last block's attention output for
    # the pruned ones, averaged over all the tokens.
    enc, x = tiny_encoder(), token_data(6, seed=11)
    net = TokenPruned(copy_model(enc), torch.tensor([0.0, 0.1]), mode="mask", pool="exit")
    states = {}
    bert = enc.model
    hook = bert.encoder.layer[1].attention.register_forward_hook(
        lambda m, a, out: states.__setitem__("att", out[0])
    )
    try:
        with torch.no_grad():
            got = net(**x)
            final = bert(**x).last_hidden_state
    finally:
        hook.remove()
    net.record = []
    with torch.no_grad():
        net(**x)
    s, live = net.record[1]
    net.record = None
    kept = ((s >= 0.1) & (live > 0)).float()
    kept = kept.scatter(1, s.masked_fill(live <= 0, -1).argmax(1, keepdim=True), 1.0)
    assert 0 < float(kept.sum()) < float(live.sum())  # some tokens go, some stay
    m = x["attention_mask"].float()
    mix = kept[..., None] * final + (m - kept)[..., None] * states["att"]
    want = torch.nn.functional.normalize(mix.sum(1) / m.sum(1, keepdim=True), dim=-1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_soft_stage_converges_to_the_target_ratio():
    # From thresholds 0 (every token kept) the soft stage must bring the kept fraction to the
    # target: its step is in units of the mean score, so it moves at the scores' scale.
    from squeezer.prune.tokens import train_thresholds

    enc = tiny_encoder()
    data = _data(enc)
    net = TokenPruned(copy_model(enc), torch.zeros(2), temperature=0.25 / 8)
    # (a random tiny encoder's cosine loss is ~0.3, so the penalty is raised to dominate it)
    info = train_thresholds(net, data, 0.7, unit=1 / 8, steps=40, lr=0.3, penalty=100.0,
                            batch_size=16)  # fmt: skip
    assert info["history"][0]["kept"] > 0.8
    last = [h["kept"] for h in info["history"][-8:]]  # two passes over the 4 batches
    assert sum(last) / len(last) == pytest.approx(0.7, abs=0.05)
    got = kept_fractions(net, [x for x, _ in data.train_batches(16)])
    assert sum(got) / 2 == pytest.approx(0.7, abs=0.08)
    assert net.mode == "hard" and not net.thresholds.requires_grad
