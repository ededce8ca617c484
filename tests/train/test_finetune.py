"""The fine-tuning trainer: gradients through the fake quantizers, the caller's models untouched,
seeded runs, distillation, LSQ, early stopping, and resume after an interruption to the very
weights of an uninterrupted run."""

from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn

from squeezer.data import Classification, Dataset, batch_size, evaluate
from squeezer.errors import ConfigError
from squeezer.quant.apply import load_quantized, quantize
from squeezer.quant.modules import ActQuantizer, QuantMixin, WeightQuantizer
from squeezer.quant.storage import packed_state_dict
from squeezer.templates import uniform_plan
from squeezer.train.distill import kd_loss, make_loss
from squeezer.train.finetune import FinetuneResult, finetune
from squeezer.train.lsq import fix_scales, learn_scales, learnable
from squeezer.train.select import validate

# The package exports the function under the module's name (as it does fit): the module itself.
finetune_module = importlib.import_module("squeezer.train.finetune")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def w3a4(trained_digits_cnn, digits):
    net, _ = trained_digits_cnn
    plan = uniform_plan(net, 3, act_bits=4)
    return net.eval(), plan, quantize(net, plan, calib=digits.calibration_batches())


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_gradients_reach_the_weights_through_both_quantizers(w3a4, digits):
    _, _, q = w3a4
    x, y = next(iter(digits.train_batches(32)))
    q = finetune_module.copy_model(q)
    nn.functional.cross_entropy(q(x), y).backward()
    layers = [m for m in q.modules() if isinstance(m, QuantMixin)]
    assert layers and all(m.weight.grad is not None and m.weight.grad.abs().sum() > 0
                          for m in layers)  # fmt: skip
    # ... and through an activation quantizer to the layer before it (the STE inside the range)
    first = layers[0]
    assert first.input_quantizer is not None
    xi = x.clone().requires_grad_(True)
    first.input_quantizer(xi).sum().backward()
    assert xi.grad is not None and xi.grad.abs().sum() > 0


def test_lsq_scales_get_gradients_and_fold_back_into_buffers(w3a4, digits):
    _, _, q = w3a4
    q = finetune_module.copy_model(q)
    keys = set(q.state_dict())
    params = learn_scales(q)
    assert learnable(q) and len(params) == sum(
        isinstance(m, WeightQuantizer | ActQuantizer) for m in q.modules()
    )
    x, y = next(iter(digits.train_batches(32)))
    nn.functional.cross_entropy(q(x), y).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in params)
    with torch.no_grad():
        before = q(x)
    fix_scales(q)
    assert not learnable(q) and set(q.state_dict()) == keys
    assert all(type(m) in (WeightQuantizer, ActQuantizer) for m in q.modules()
               if isinstance(m, WeightQuantizer | ActQuantizer))  # fmt: skip
    with torch.no_grad():
        torch.testing.assert_close(q(x), before)


def test_the_callers_models_are_untouched_and_the_result_is_new(w3a4, digits):
    net, _, q = w3a4
    q_before, net_before = _state(q), _state(net)
    q.train()
    r = finetune(q, digits, teacher=net, epochs=1, steps_per_epoch=3, lsq=True, progress=False)
    assert isinstance(r, FinetuneResult) and r.model is not q
    assert _same(_state(q), q_before) and _same(_state(net), net_before)
    assert q.training and not net.training  # modes as the caller left them
    assert not r.model.training
    assert not any(p is pq for p in r.model.parameters() for pq in q.parameters())
    assert not _same(_state(r.model), q_before)  # it did train
    assert set(r.model.state_dict()) == set(q_before)  # a plain quantized model again


def test_same_seed_same_weights_other_seed_other_weights(w3a4, digits):
    net, _, q = w3a4
    kw = dict(teacher=net, epochs=2, steps_per_epoch=4, progress=False, restore_best=False)
    a, b = finetune(q, digits, seed=3, **kw), finetune(q, digits, seed=3, **kw)
    c = finetune(q, digits, seed=4, **kw)
    assert _same(_state(a.model), _state(b.model))
    assert a.history == tuple({**h, "seconds": a.history[i]["seconds"]}
                              for i, h in enumerate(b.history))  # fmt: skip
    assert not _same(_state(a.model), _state(c.model))


def test_qat_with_distillation_recovers_accuracy(w3a4, digits):
    net, plan, q = w3a4
    fp32 = evaluate(net, digits.test_batches(), digits.task)
    # 2-bit weights lose several points after post-training quantization on this net
    q2 = quantize(net, uniform_plan(net, 2, act_bits=4), calib=digits.calibration_batches())
    ptq = evaluate(q2, digits.test_batches(), digits.task)
    r = finetune(q2, digits, teacher=net, epochs=3, lr=1e-3, lsq=True, progress=False)
    qat = evaluate(r.model, digits.test_batches(), digits.task)
    assert fp32 - ptq > 2.0
    assert qat > ptq + 0.5 * (fp32 - ptq), (fp32, ptq, qat)
    # history: epoch 0 is the model as given, then one row per epoch
    assert [h["epoch"] for h in r.history] == [0, 1, 2, 3]
    assert r.history[0]["train_loss"] is None and all(h["train_loss"] > 0 for h in r.history[1:])
    # the stored form (packed codes + scales) rebuilds the fine-tuned model exactly
    back = load_quantized(net, uniform_plan(net, 2, act_bits=4), packed_state_dict(r.model))
    x = digits.x_test[:64]
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(x), r.model(x))


def test_weight_scales_track_the_weights_or_stay_frozen(w3a4, digits):
    net, _, q = w3a4
    kw = dict(teacher=net, epochs=1, steps_per_epoch=5, lr=1e-2, lsq=False, progress=False,
              restore_best=False)  # fmt: skip
    scales = {n: b for n, b in _state(q).items() if n.endswith("weight_quantizer.scale")}
    frozen = _state(finetune(q, digits, weight_scales="frozen", **kw).model)
    assert all(torch.equal(frozen[n], s) for n, s in scales.items())
    tracked = finetune(q, digits, **kw).model
    for m in tracked.modules():  # each scale is its final weight's min-max scale
        if isinstance(m, QuantMixin):
            ref = WeightQuantizer(m.spec, m.weight_quantizer.channel_axis)
            ref.calibrate(m.weight)
            torch.testing.assert_close(m.weight_quantizer.scale, ref.scale)
    assert not all(torch.equal(_state(tracked)[n], s) for n, s in scales.items())


def test_early_stop_and_best_epoch(w3a4, digits):
    net, _, q = w3a4
    # a learning rate far too large: the held-out metric gets worse, training stops after
    # `patience` epochs, and the weights of epoch 0 (the model as given) come back
    r = finetune(q, digits, teacher=net, epochs=6, lr=5.0, optimizer="sgd", patience=1,
                 steps_per_epoch=3, progress=False)  # fmt: skip
    assert r.stopped_early and len(r.history) < 7
    assert r.best_epoch == 0
    x = digits.x_test[:32]
    with torch.no_grad():
        torch.testing.assert_close(r.model(x), q.eval()(x))


def test_a_saturated_held_out_metric_does_not_throw_the_training_away():
    # Two well-separated clusters and a linear classifier already right on every sample, with
    # tiny margins: the held-out accuracy is 100 % before training and stays there, while the
    # loss falls. Ranked by the metric alone no epoch beats epoch 0, so the training was lost
    # (the bug seen on a trained digits net); ranked by the held-out loss the last epoch wins.
    g = torch.Generator().manual_seed(0)
    y = torch.arange(400) % 2
    x = torch.randn(400, 2, generator=g) * 0.3 + (y[:, None] * 2.0 - 1.0) * torch.tensor([3.0, 0])
    data = Dataset("clusters", x[:300], y[:300], x[300:], y[300:], Classification())
    net = nn.Linear(2, 2)
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[-0.01, 0.0], [0.01, 0.0]]))
        net.bias.zero_()
    kw = dict(distill=False, epochs=3, lr=0.05, batch_size=32, progress=False)
    r = finetune(net, data, **kw)
    h = r.history
    assert all(row["val_metric"] == 100.0 for row in h)  # saturated from epoch 0 on
    assert [row["val_loss"] for row in h] == sorted((row["val_loss"] for row in h), reverse=True)
    assert r.best_epoch == 3 and h[3]["val_loss"] < 0.5 * h[0]["val_loss"]
    with torch.no_grad():  # the returned model is the trained one, not the one given
        assert not torch.equal(r.model.weight, net.weight)
        assert float(nn.functional.cross_entropy(r.model(x[300:]), y[300:])) < 0.5 * float(
            nn.functional.cross_entropy(net(x[300:]), y[300:]))  # fmt: skip
    # ranked by the metric, ties go to the loss: the same epoch; and a bad choice is refused
    assert finetune(net, data, select="metric", **kw).best_epoch == 3
    with pytest.raises(ConfigError, match="select"):
        finetune(net, data, select="accuracy", **kw)


class _Interrupted(Exception):
    pass


def test_resume_after_an_interruption_gives_the_uninterrupted_weights(w3a4, digits, tmp_path,
                                                                      monkeypatch):  # fmt: skip
    net, _, q = w3a4
    kw = dict(teacher=net, epochs=4, steps_per_epoch=4, lr=1e-3, lsq=True, progress=False)
    full = finetune(q, digits, **kw)

    ckpt = tmp_path / "ft.ckpt"
    save = finetune_module._save_checkpoint
    calls = []

    def killed_after_two(*args, **kwargs):
        save(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            raise _Interrupted  # the process dies right after epoch 2's checkpoint

    monkeypatch.setattr(finetune_module, "_save_checkpoint", killed_after_two)
    with pytest.raises(_Interrupted):
        finetune(q, digits, checkpoint=ckpt, **kw)
    monkeypatch.setattr(finetune_module, "_save_checkpoint", save)
    assert ckpt.is_file() and not list(tmp_path.glob(".*.tmp"))  # written atomically
    resumed = finetune(q, digits, checkpoint=ckpt, resume=True, **kw)
    assert _same(_state(resumed.model), _state(full.model))
    strip = [{k: v for k, v in h.items() if k != "seconds"} for h in full.history]
    assert [{k: v for k, v in h.items() if k != "seconds"} for h in resumed.history] == strip

    # a finished checkpoint resumes to the same result without training
    again = finetune(q, digits, checkpoint=ckpt, resume=True, **kw)
    assert _same(_state(again.model), _state(full.model))
    # other settings: refused, with the setting named
    with pytest.raises(ConfigError, match="lr="):
        finetune(q, digits, checkpoint=ckpt, resume=True, **{**kw, "lr": 2e-3})
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="cannot read the checkpoint"):
        finetune(q, digits, checkpoint=tmp_path / "junk.ckpt", resume=True, **kw)


def test_a_float_model_fine_tunes_too_and_bad_settings_are_refused(digits):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(),
                        nn.Linear(32, 10))  # fmt: skip
    r = finetune(net, digits, distill=False, epochs=2, lr=3e-3, progress=False)
    assert r.history[-1]["val_metric"] > r.history[0]["val_metric"]
    assert torch.equal(r.model[2].running_mean, net[2].running_mean)  # BatchNorm frozen
    r2 = finetune(net, digits, distill=False, epochs=1, lr=3e-3, freeze_bn=False, progress=False)
    assert not torch.equal(r2.model[2].running_mean, net[2].running_mean)
    with pytest.raises(ConfigError, match="teacher"):
        finetune(net, digits, epochs=1, progress=False)  # distillation without a teacher
    for bad in ({"epochs": 0}, {"val_fraction": 1.0}, {"lr": -1.0}, {"optimizer": "adam"},
                {"weight_scales": "learn"}, {"patience": 0}):  # fmt: skip
        with pytest.raises(ConfigError):
            finetune(net, digits, distill=False, progress=False, **bad)
    with pytest.raises(ConfigError, match="alpha"):
        finetune(net, digits, teacher=net, alpha=1.5, progress=False)


def test_distillation_losses():
    s = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    y = torch.tensor([0, 1])
    # the teacher agrees with the student: only the cross-entropy share is left
    ce = nn.functional.cross_entropy(s, y)
    torch.testing.assert_close(kd_loss(s, s, y, alpha=0.95, temperature=6.0), 0.05 * ce)
    assert float(kd_loss(s, -s, y, alpha=1.0, temperature=6.0)) > 0
    emb = make_loss(_EmbeddingLike(), distill=True)
    e = torch.randn(4, 8)
    assert float(emb(e, e, None)) == pytest.approx(0.0, abs=1e-6)
    assert float(emb(e, -e, None)) == pytest.approx(2.0)
    labels_only = make_loss(Classification(), distill=False)
    torch.testing.assert_close(labels_only(s, y, None), ce)


class _EmbeddingLike(Classification):
    targets_from_model = True


def test_an_encoder_distils_on_its_fp32_embeddings_without_labels():
    transformers = pytest.importorskip("transformers")  # noqa: F841
    from tiny_bert import tiny_encoder, token_data

    from squeezer.qbert import qbert_plan
    from squeezer.text import EmbeddingTask, TokenDataset, embed

    enc = tiny_encoder(0)
    x_tr, x_te = token_data(96, 1), token_data(32, 2)
    data = TokenDataset("tiny", x_tr, embed(enc, x_tr), x_te, embed(enc, x_te), EmbeddingTask())
    plan = qbert_plan(enc, 3, group_size=None)
    q = quantize(enc, plan, calib=data.calibration_batches(64))
    before = evaluate(q, data.test_batches(), data.task)
    r = finetune(q, data, epochs=3, lr=1e-3, batch_size=16, progress=False)
    after = evaluate(r.model, data.test_batches(), data.task)
    assert after > before, (before, after)
    assert r.metric_name == "cosine"


def test_a_streamed_data_set_holds_out_batches():
    from torch.utils.data import TensorDataset

    from squeezer.stream import stream_data

    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 6, generator=g)
    y = (x[:, 0] > 0).long()
    data = stream_data("toy", TensorDataset(x, y), Classification())
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 2))
    r = finetune(net, data, distill=False, epochs=3, lr=1e-2, batch_size=16, progress=False)
    assert r.history[-1]["val_metric"] > r.history[0]["val_metric"]
    assert isinstance(data, Dataset) is False


def test_validation_is_one_pass_with_the_loss_and_metric_of_two():
    from squeezer.data import Batches, mean_loss

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(70, 5, generator=g), torch.randint(0, 3, (70,), generator=g)
    net = nn.Linear(5, 3)
    calls = []
    net.register_forward_hook(lambda *a: calls.append(1))
    val = Batches(x, y, 32)  # batches of 32, 32, 6: the loss weighted by samples
    loss, metric, kd = validate(net, val, Classification())
    assert len(calls) == len(val) == 3  # one forward per held-out batch
    assert loss == pytest.approx(mean_loss(net, val, Classification()), rel=1e-6)
    assert metric == pytest.approx(evaluate(net, val, Classification()))
    assert kd is None  # no teacher's outputs given
    assert validate(net, None, Classification()) == (None, None, None)


def test_given_held_out_batches_replace_the_split_of_the_training_data(monkeypatch):
    from squeezer.data import Batches

    g = torch.Generator().manual_seed(0)
    y = torch.arange(300) % 2
    x = torch.randn(300, 2, generator=g) + (y[:, None] * 2.0 - 1.0)
    data = Dataset("two", x[:200], y[:200], x[200:], y[200:], Classification())
    held = Batches(x[250:], y[250:], 64)  # 50 samples outside the training split
    torch.manual_seed(0)
    net = nn.Linear(2, 2)
    seen = []
    step = finetune_module._step
    monkeypatch.setattr(finetune_module, "_step",
                        lambda *a, **k: (seen.append(batch_size(a[4])), step(*a, **k))[1])  # fmt: skip
    r = finetune(net, data, val_data=held, distill=False, epochs=2, lr=0.05, batch_size=50,
                 progress=False)  # fmt: skip
    assert sum(seen) == 2 * 200  # every training sample trains, in both epochs: none held out
    assert r.options["val_data"] is True
    # the held-out figures of epoch 0 are the given model's on the given batches
    assert (r.history[0]["val_loss"], r.history[0]["val_metric"]) == pytest.approx(
        validate(net, held, Classification())[:2])
    assert all(h["val_metric"] is not None for h in r.history)


# --------------------------------------------------------------------------------------------------
# Hidden-state distillation (encoders)


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def test_hidden_states_are_read_by_hooks_that_are_always_removed():
    pytest.importorskip("transformers")
    from tiny_bert import tiny_encoder, token_data

    from squeezer.train.distill import HiddenStates, hidden_loss, hidden_modules

    enc = tiny_encoder(0)
    assert hidden_modules(enc) == ["model.encoder.layer.0", "model.encoder.layer.1"]
    names = hidden_modules(enc, attention=True)
    assert names == ["model.encoder.layer.0.attention", "model.encoder.layer.0",
                     "model.encoder.layer.1.attention", "model.encoder.layer.1"]  # fmt: skip
    x = token_data(6, seed=3)
    with torch.no_grad(), HiddenStates(enc, names) as hs:
        assert _hooks(enc) == 4
        enc(**x)
    assert _hooks(enc) == 0 and list(hs.outputs) == names
    assert all(h.shape == (6, 12, 32) for h in hs.outputs.values())
    with pytest.raises(RuntimeError), HiddenStates(enc, names):  # removed on an error too
        raise RuntimeError("boom")
    assert _hooks(enc) == 0
    # the student equal to the teacher: no loss, either distance
    for kind in ("mse", "cosine"):
        same = hidden_loss(hs.outputs, hs.outputs, x["attention_mask"], kind=kind)
        assert float(same) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ConfigError, match="no module"):
        HiddenStates(nn.Linear(2, 2), names)


def test_hidden_loss_reads_real_tokens_only_and_its_gradient_reaches_the_first_block():
    pytest.importorskip("transformers")
    from tiny_bert import tiny_encoder, token_data

    from squeezer.train.distill import HiddenStates, hidden_loss, hidden_modules

    teacher, student = tiny_encoder(0), tiny_encoder(1)
    x = token_data(8, seed=3)
    mask = x["attention_mask"]
    names = hidden_modules(teacher)
    with torch.no_grad(), HiddenStates(teacher, names) as ht:
        teacher(**x)
    with HiddenStates(student, names) as hs:
        student(**x)
    loss = hidden_loss(hs.outputs, ht.outputs, mask)
    assert float(loss.detach()) > 0
    # what the student does on padding does not count
    moved = {k: v + 5.0 * (1 - mask)[..., None] for k, v in hs.outputs.items()}
    torch.testing.assert_close(hidden_loss(moved, ht.outputs, mask), loss)
    assert float(hidden_loss(moved, ht.outputs, None).detach()) > float(loss.detach())
    loss.backward()
    q = student.model.encoder.layer[0].attention.self.query.weight
    assert q.grad is not None and q.grad.abs().sum() > 0
    bad = {k: v[:, :5] for k, v in hs.outputs.items()}
    with pytest.raises(ConfigError, match="same hidden size"):
        hidden_loss(bad, ht.outputs, mask)


def test_a_pruned_encoder_distils_its_hidden_states_from_the_unpruned_one():
    pytest.importorskip("transformers")
    from tiny_bert import tiny_encoder, token_data

    from squeezer.prune import PruneSpec, prune
    from squeezer.text import EmbeddingTask, TokenDataset, embed

    enc = tiny_encoder(0)
    x_tr, x_te = token_data(96, 1), token_data(32, 2)
    data = TokenDataset("tiny", x_tr, embed(enc, x_tr), x_te, embed(enc, x_te), EmbeddingTask())
    pruned = prune(enc, PruneSpec("heads", options={"heads": 0.5, "neurons": 0.5}), None).model
    before_state = _state(pruned)
    kw = dict(epochs=3, lr=1e-3, batch_size=16, progress=False, seed=0)
    with pytest.raises(ConfigError, match="needs the FP32 model"):
        finetune(pruned, data, hidden_weight=1.0, **kw)
    with pytest.raises(ConfigError, match="hidden loss"):
        finetune(pruned, data, teacher=enc, hidden_weight=1.0, hidden_loss="l1", **kw)
    plain = finetune(pruned, data, **kw)
    r = finetune(pruned, data, teacher=enc, hidden_weight=1.0, hidden_attention=True, **kw)
    assert _hooks(r.model) == 0 and _hooks(enc) == 0 and _hooks(pruned) == 0
    assert _same(_state(pruned), before_state)  # the caller's model untouched
    assert r.options["hidden_weight"] == 1.0
    before = evaluate(pruned, data.test_batches(), data.task)
    after = evaluate(r.model, data.test_batches(), data.task)
    assert after > before, (before, after)
    # the hidden term changes the training: not the embedding-only run's weights
    assert not _same(_state(r.model), _state(plain.model))


def test_a_quantized_bn_classifier_takes_the_cnn_recipe_everything_else_the_plain_one(w3a4, digits):
    from squeezer.train.finetune import BN_CLASSIFIER_RECIPE, PLAIN_RECIPE

    net, _, q = w3a4
    assert any(isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d) for m in q.modules())
    kw = dict(teacher=net, epochs=1, steps_per_epoch=1, progress=False)

    def picked(r):
        return {k: r.options[k] for k in BN_CLASSIFIER_RECIPE}

    assert picked(finetune(q, digits, **kw)) == BN_CLASSIFIER_RECIPE
    # a float model (pruning's recovery) and lsq=False keep the plain defaults (lr 1e-4 ...)
    plain = {**PLAIN_RECIPE, "lr": 1e-4}
    assert picked(finetune(net, digits, **kw)) == plain
    assert picked(finetune(q, digits, lsq=False, **kw)) == plain
    # any setting given wins over the recipe
    r = finetune(q, digits, lr=3e-4, batch_size=16, freeze_bn=True, **kw)
    assert picked(r) == {"lr": 3e-4, "lsq": True, "batch_size": 16, "freeze_bn": True}
