"""nn.MultiheadAttention split into four Linear layers (squeezer.attention.SplitAttention): the
same function as PyTorch's module, in Transformer layers too, and quantized end to end."""

import itertools
import json

import pytest
import torch
from torch import nn

from squeezer import LayerQuant, Plan, QuantConfig, load_quantized, quantize
from squeezer.attention import SplitAttention
from squeezer.cli import main
from squeezer.graph import float_weights, is_quantizable, quantizable_layers, split_attention
from squeezer.measure import model_bytes, profile_layers
from squeezer.models import load_model, save_weights
from squeezer.quant.modules import QuantLinear
from squeezer.quant.storage import packed_state_dict
from squeezer.ties import residual_ties

pytestmark = pytest.mark.usefixtures("one_thread")

#: float32 round-off of a few dot products, softmaxes and sums of width 8-32.
ATOL = 2e-6


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _randomize(module, seed=0):
    """Non-zero biases (PyTorch initialises MultiheadAttention's to zero), so they are checked."""
    g = _gen(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return module


def _close(a, b, atol=ATOL):
    assert (a is None) == (b is None)
    if a is not None:
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=atol, rtol=1e-5)


MHA_CONFIGS = {
    "plain": {},
    "seq-first, no bias": {"batch_first": False, "bias": False},
    "kdim/vdim": {"kdim": 6, "vdim": 5},
    "bias_kv + zero_attn": {"add_bias_kv": True, "add_zero_attn": True},
    "one head": {"num_heads": 1},
}


def _masks(n, heads, tgt, src):
    g = _gen(1)
    kpm = torch.zeros(n, src, dtype=torch.bool)
    kpm[0, -2:] = True
    causal = torch.ones(tgt, src, dtype=torch.bool).triu(1)
    return {
        "none": {},
        "bool padding": {"key_padding_mask": kpm},
        "float 2-D attn": {"attn_mask": torch.randn(tgt, src, generator=g)},
        "3-D attn + float padding": {
            "attn_mask": torch.randn(n * heads, tgt, src, generator=g),
            "key_padding_mask": kpm.float() * -1e4,
        },
        "bool attn + bool padding": {"attn_mask": causal, "key_padding_mask": kpm},
        "causal hint": {"attn_mask": causal, "is_causal": True},
    }


@pytest.mark.parametrize("name", list(MHA_CONFIGS))
def test_split_attention_matches_multihead_attention(name):
    kw = {"embed_dim": 8, "num_heads": 2, "batch_first": True, **MHA_CONFIGS[name]}
    torch.manual_seed(0)
    mha = _randomize(nn.MultiheadAttention(**kw)).eval()
    split = split_attention(mha)
    assert isinstance(split, SplitAttention) and not split.training
    assert all(type(getattr(split, p)) is nn.Linear for p in ("q_proj", "k_proj", "v_proj"))
    n, heads, tgt, src = 3, kw["num_heads"], 4, 5
    g = _gen(2)
    shape = (lambda t, e: (n, t, e)) if kw["batch_first"] else (lambda t, e: (t, n, e))
    q = torch.randn(shape(tgt, 8), generator=g)
    k = torch.randn(shape(src, kw.get("kdim", 8)), generator=g)
    v = torch.randn(shape(src, kw.get("vdim", 8)), generator=g)
    for masks in _masks(n, heads, tgt, src).values():
        for need, avg in itertools.product((True, False), (True, False)):
            with torch.no_grad():
                ref = mha(q, k, v, need_weights=need, average_attn_weights=avg, **masks)
                got = split(q, k, v, need_weights=need, average_attn_weights=avg, **masks)
            _close(got[0], ref[0])
            _close(got[1], ref[1])
    # Unbatched inputs: batch_first does not apply.
    x = torch.randn(tgt, 8, generator=g)
    kv = torch.randn(src, kw.get("kdim", 8), generator=g), torch.randn(src, kw.get("vdim", 8))
    with torch.no_grad():
        for need in (True, False):
            ref = mha(x, *kv, key_padding_mask=torch.tensor([0, 0, 0, 1, 1.0]), need_weights=need)
            got = split(x, *kv, key_padding_mask=torch.tensor([0, 0, 0, 1, 1.0]), need_weights=need)
            _close(got[0], ref[0])
            _close(got[1], ref[1])


def test_split_attention_self_attention_gradients_and_dropout():
    """Self-attention (query is key is value), gradients of the split weights, and dropout on the
    attention weights in train mode (the same random draws as PyTorch's with need_weights)."""
    torch.manual_seed(0)
    mha = _randomize(nn.MultiheadAttention(8, 2, dropout=0.3, batch_first=True))
    split = split_attention(mha)
    assert split.training
    x = torch.randn(2, 5, 8, generator=_gen(3))
    torch.manual_seed(7)
    ref = mha(x, x, x)
    torch.manual_seed(7)
    got = split(x, x, x)
    _close(got[0], ref[0])
    _close(got[1], ref[1])
    assert not torch.allclose(got[0], split.eval()(x, x, x)[0])  # dropout did act
    mha.eval()
    mha(x, x, x, need_weights=False)[0].square().sum().backward()
    split(x, x, x, need_weights=False)[0].square().sum().backward()
    g_split = torch.cat(
        [split.q_proj.weight.grad, split.k_proj.weight.grad, split.v_proj.weight.grad]
    )
    _close(g_split, mha.in_proj_weight.grad, atol=1e-5)
    _close(split.out_proj.weight.grad, mha.out_proj.weight.grad, atol=1e-5)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("norm_first", [False, True])
def test_transformer_encoder_layer_takes_its_ordinary_path(batch_first, norm_first):
    """In eval mode the original layer runs PyTorch's fused kernel; the split one its ordinary
    path (in_proj_bias is None); both give the same outputs, as in train mode."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(
        16, 2, 32, dropout=0.0, batch_first=batch_first, norm_first=norm_first
    )
    layer = _randomize(layer).eval()
    split = split_attention(layer)
    assert split is not layer and isinstance(split.self_attn, SplitAttention)
    assert isinstance(layer.self_attn, nn.MultiheadAttention)  # the caller's layer is untouched
    x = torch.randn(3, 6, 16, generator=_gen(4))
    if not batch_first:
        x = x.transpose(0, 1)
    kpm = torch.zeros(3, 6, dtype=torch.bool)
    kpm[1, -2:] = True
    causal = nn.Transformer.generate_square_subsequent_mask(6)
    cases = [{}, {"src_key_padding_mask": kpm}, {"src_mask": causal, "is_causal": True}]
    for kw in cases:
        with torch.no_grad():
            _close(split(x, **kw), layer(x, **kw), atol=1e-5)
        _close(split.train()(x, **kw), layer.train()(x, **kw), atol=1e-5)
        split.eval(), layer.eval()


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors:UserWarning")
def test_transformer_encoder_stack_and_decoder():
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, 0.0, batch_first=True), 2)
    enc = _randomize(enc).eval()
    split = split_attention(enc)
    assert enc.use_nested_tensor and not split.use_nested_tensor
    x = torch.randn(3, 6, 16, generator=_gen(5))
    kpm = torch.zeros(3, 6, dtype=torch.bool)
    kpm[1, -2:] = True
    with torch.no_grad():
        _close(split(x), enc(x), atol=1e-5)
        # PyTorch's nested-tensor path returns zeros at padded positions, its ordinary path (and the
        # split model's) their computed values: the real positions agree.
        _close(
            split(x, src_key_padding_mask=kpm)[~kpm], enc(x, src_key_padding_mask=kpm)[~kpm], 1e-5
        )
    _close(split(x, src_key_padding_mask=kpm), enc(x, src_key_padding_mask=kpm), atol=1e-5)

    dec = _randomize(nn.TransformerDecoderLayer(16, 2, 32, dropout=0.0, batch_first=False)).eval()
    sdec = split_attention(dec)
    assert isinstance(sdec.self_attn, SplitAttention)
    assert isinstance(sdec.multihead_attn, SplitAttention)
    tgt, memory = torch.randn(5, 3, 16, generator=_gen(6)), torch.randn(6, 3, 16, generator=_gen(7))
    kw = {
        "tgt_mask": nn.Transformer.generate_square_subsequent_mask(5),
        "tgt_is_causal": True,
        "memory_key_padding_mask": kpm,
    }
    with torch.no_grad():
        _close(sdec(tgt, memory, **kw), dec(tgt, memory, **kw), atol=1e-5)

    full = _randomize(nn.Transformer(16, 2, 1, 1, 32, dropout=0.0, batch_first=True)).eval()
    sfull = split_attention(full)
    assert sum(isinstance(m, SplitAttention) for m in sfull.modules()) == 3
    src, tg = torch.randn(2, 6, 16, generator=_gen(8)), torch.randn(2, 4, 16, generator=_gen(9))
    with torch.no_grad():
        _close(sfull(src, tg), full(src, tg), atol=1e-5)


def test_split_attention_is_a_no_op_without_attention_and_keeps_sharing():
    lin = nn.Sequential(nn.Linear(4, 4))
    assert split_attention(lin) is lin

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.MultiheadAttention(8, 2)
            self.b = self.a  # one module under two names
            self.a.requires_grad_(False)

        def forward(self, x):
            return self.b(self.a(x, x, x)[0], x, x)[0]

    net = Twice()
    split = split_attention(net)
    assert split.a is split.b and isinstance(split.a, SplitAttention)
    assert not any(p.requires_grad for p in split.parameters())
    assert isinstance(net.a, nn.MultiheadAttention)


def test_residual_ties_see_through_split_attention():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            x = x + self.attn(x, x, x, need_weights=False)[0]
            return self.a(x) + self.b(x)

    assert residual_ties(split_attention(Block())) == (("a", "b"),)


def test_linear_subclasses_stay_in_float():
    """MultiheadAttention reads its out_proj (a Linear subclass) by .weight: unsplit, it is not
    quantizable and is named as kept in float, and a subclass of MultiheadAttention (its own
    forward) is left alone instead of failing."""
    mha = nn.MultiheadAttention(8, 2)
    assert not is_quantizable(mha.out_proj)
    assert float_weights(nn.Sequential(mha)) == {
        "0": ("MultiheadAttention", 192),
        "0.out_proj": ("NonDynamicallyQuantizableLinear", 64),
    }

    class MyAttention(nn.MultiheadAttention):
        pass

    net = nn.Sequential(MyAttention(8, 2, batch_first=True))
    q = quantize(net, QuantConfig(LayerQuant(bits=4)))
    assert not any(isinstance(m, QuantLinear) for m in q.modules())
    x = torch.randn(2, 3, 8)
    with torch.no_grad():
        torch.testing.assert_close(q[0](x, x, x)[0], net[0](x, x, x)[0])


SPLIT_LAYERS = [
    f"layers.{i}.{name}"
    for i in range(2)
    for name in (
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.out_proj",
        "linear1",
        "linear2",
    )
]


def _encoder():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    return _randomize(nn.TransformerEncoder(layer, 2), seed=3).eval()


def test_quantize_transformer_encoder():
    enc = _encoder()
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    x = torch.randn(4, 6, 16, generator=_gen(10))
    assert list(quantizable_layers(split_attention(enc))) == SPLIT_LAYERS
    plan = QuantConfig(LayerQuant(bits=8, act_bits=8)).to_plan(enc)  # from the unsplit model
    assert list(plan.layers) == SPLIT_LAYERS
    q = quantize(enc, plan, calib=[x])
    after = enc.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert isinstance(enc.layers[0].self_attn, nn.MultiheadAttention)
    assert all(type(m) is QuantLinear for m in (q.get_submodule(f) for f in SPLIT_LAYERS))
    with torch.no_grad():
        ref, out = enc(x), q(x)
    # W8A8 of a 2-layer encoder on unit-scale inputs: a few 8-bit steps of its normalised outputs.
    assert (out - ref).abs().max() < 0.1
    assert (out - ref).abs().mean() < 0.02
    # A plan of only the unchanged FQNs of the unsplit model applies too.
    old_names = {k: LayerQuant(bits=4) for k in ("layers.0.self_attn.out_proj", "layers.1.linear2")}
    q4 = quantize(enc, Plan(old_names))
    assert sum(isinstance(m, QuantLinear) for m in q4.modules()) == 2
    # The packed storage round-trips into a model rebuilt from the float one.
    back = load_quantized(enc, plan, packed_state_dict(q))
    with torch.no_grad():
        torch.testing.assert_close(back(x), out)
    # Sizes and MACs count the split layers: q_proj is 16 x 16 per token.
    assert profile_layers(enc, x[:1])["layers.0.self_attn.q_proj"].macs == 6 * 16 * 16
    assert model_bytes(enc) == model_bytes(split_attention(enc))


def test_load_model_splits_after_loading_the_users_weights(tmp_path, monkeypatch):
    (tmp_path / "user_encoder.py").write_text(USER_ENCODER)
    monkeypatch.syspath_prepend(str(tmp_path))
    own = load_model("user_encoder:make", split=False)
    assert isinstance(own.encoder.layers[0].self_attn, nn.MultiheadAttention)
    _randomize(own)
    save_weights(own, tmp_path / "own.safetensors")  # the user's architecture
    save_weights(split_attention(own), tmp_path / "split.safetensors")  # the split one
    x = torch.randn(3, 1, 8, 8, generator=_gen(11))
    with torch.no_grad():
        ref = own.eval()(x)
        for name in ("own", "split"):
            m = load_model("user_encoder:make", weights=tmp_path / f"{name}.safetensors")
            assert isinstance(m.encoder.layers[0].self_attn, SplitAttention)
            torch.testing.assert_close(m(x), ref, atol=1e-5, rtol=1e-5)


USER_ENCODER = """
import torch
from torch import nn


class DigitsTransformer(nn.Module):
    \"\"\"Each 8x8 image as 8 tokens (its rows) of 16 features.\"\"\"

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(64, 8 * 16)  # the rows' features and their positions, at once
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        tokens = self.embed(x.flatten(1)).reshape(x.shape[0], 8, 16)
        return self.head(self.encoder(tokens).mean(1))


def make():
    torch.manual_seed(0)
    return DigitsTransformer()
"""


def test_cli_transformer_train_compress_export(tmp_path, capsys, monkeypatch):
    """A user's transformer classifier through the CLI: every projection is quantized (nothing
    stays in float), and the ONNX export agrees in ONNX Runtime."""
    pytest.importorskip("onnxruntime")
    (tmp_path / "user_encoder.py").write_text(USER_ENCODER)
    monkeypatch.syspath_prepend(str(tmp_path))
    model, t, c = "user_encoder:make", str(tmp_path / "t"), str(tmp_path / "c")
    assert main(["train", model, "--data", "digits", "--epochs", "3", "--out", t]) == 0
    w = str(tmp_path / "t" / "model.safetensors")
    args = ["--weights", w, "--data", "digits", "--budget", "bits=4", "--hessian-samples", "64"]
    assert main(["compress", model, *args, "--out", c]) == 0
    assert "stay in float" not in capsys.readouterr().out
    m = json.loads((tmp_path / "c" / "metrics.json").read_text())
    assert m["float_layers"] == {}
    fqns = {row["fqn"] for row in m["layers"]}
    assert {f"encoder.{f}" for f in SPLIT_LAYERS} | {"embed", "head"} == fqns
    assert m["after"]["avg_bits"] <= 4.0
    assert m["after"]["metric"] >= m["before"]["metric"] - 10
    assert main(["export", c]) == 0
    m = json.loads((tmp_path / "c" / "metrics.json").read_text())
    assert set(m["export"]["layers"].values()) == {"qdq-int8"}
    assert m["export"]["argmax_agreement"] >= 0.9
