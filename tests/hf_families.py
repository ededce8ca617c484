"""Tiny Hugging Face models of every encoder family squeezer reads, built from small
``transformers`` configs with seeded random weights and saved with ``save_pretrained`` (no
download): shared by ``tests/test_hf_families.py`` and ``benchmarks/families.py``.

Each family keeps its own conventions where they matter to squeezer: RoBERTa, XLM-R and MPNet pad
with id 1 and count positions from ``padding_idx + 1``; ALBERT shares one layer across the depth
and factorises its embeddings; ELECTRA projects smaller embeddings up; DeBERTa-v2/v3 has no
absolute positions but relative attention (v2 also a convolution beside the first layer). The
tokenizer is a word-level ``BertTokenizer`` with the family's special tokens at the family's ids.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

WORDS = (
    "the a of to is and in it for return value list file name data this with when be are not "
    "if or by an as at from on each new given object string number true false none set get"
).split()

#: Small shapes every family shares (hidden 32, 2 layers, 4 heads).
BASE = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "max_position_embeddings": 40,
    "initializer_range": 0.2,
}

#: Special tokens of the families that pad with id 1 (``<s>`` 0, ``<pad>`` 1, ``</s>`` 2).
_ROBERTA_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
_BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _configs(t) -> dict:
    rel = {"relative_attention": True, "position_biased_input": False, "max_relative_positions": -1,
           "pos_att_type": ["p2c", "c2p"], "share_att_key": True, "position_buckets": 16,
           "norm_rel_ebd": "layer_norm", "type_vocab_size": 0}  # fmt: skip
    return {
        "bert": (t.BertConfig, t.BertModel, {}),
        "roberta": (t.RobertaConfig, t.RobertaModel, {"pad_token_id": 1, "type_vocab_size": 1}),
        "xlm-roberta": (
            t.XLMRobertaConfig,
            t.XLMRobertaModel,
            {"pad_token_id": 1, "type_vocab_size": 1},
        ),  # fmt: skip
        "distilbert": (
            t.DistilBertConfig,
            t.DistilBertModel,
            {"dim": 32, "n_layers": 2, "n_heads": 4, "hidden_dim": 64, "pad_token_id": 0},
        ),  # fmt: skip
        "albert": (t.AlbertConfig, t.AlbertModel, {"embedding_size": 16, "hidden_act": "gelu"}),
        "electra": (t.ElectraConfig, t.ElectraModel, {"embedding_size": 16}),
        "deberta-v3": (t.DebertaV2Config, t.DebertaV2Model, rel),
        "deberta-v2": (
            t.DebertaV2Config,
            t.DebertaV2Model,
            {**rel, "conv_kernel_size": 3, "conv_act": "gelu"},
        ),  # fmt: skip
        "mpnet": (t.MPNetConfig, t.MPNetModel, {"pad_token_id": 1}),
    }


#: The text families, in the order of the docs table.
TEXT_FAMILIES = (
    "bert", "roberta", "xlm-roberta", "distilbert", "albert", "electra", "deberta-v2",
    "deberta-v3", "mpnet",
)  # fmt: skip


def build_text(family: str, folder: str | Path, seed: int = 0) -> Path:
    """Save a tiny randomly initialised ``family`` encoder and its tokenizer to ``folder``."""
    import transformers as t

    t.utils.logging.disable_progress_bar()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config_cls, model_cls, extra = _configs(t)[family]
    roberta_like = extra.get("pad_token_id") == 1
    specials = _ROBERTA_SPECIALS if roberta_like else _BERT_SPECIALS
    letters = list("abcdefghijklmnopqrstuvwxyz.,")
    vocab = [*specials, *WORDS, *letters, *("##" + c for c in letters)]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    names = ("unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
    tokens = dict(zip(names, ("<unk>", "</s>", "<pad>", "<s>", "<mask>"), strict=True))
    tokenizer = t.BertTokenizer(str(folder / "vocab.txt"), **(tokens if roberta_like else {}))
    kw = {**BASE, "vocab_size": len(vocab), **extra}
    config = config_cls(**kw)
    with torch.random.fork_rng():  # transformers initialises from the global generator
        torch.manual_seed(seed)
        model = model_cls(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def corpus(path: str | Path, n: int = 240) -> Path:
    """A text file of ``n`` short sentences over :data:`WORDS` (one a line)."""
    rng = np.random.default_rng(0)
    lines = [" ".join(rng.choice(WORDS, size=int(rng.integers(3, 9)))) + "." for _ in range(n)]
    Path(path).write_text("\n".join(lines) + "\n")
    return Path(path)


def build_vit(folder: str | Path, seed: int = 0, num_labels: int = 4) -> Path:
    """Save a tiny randomly initialised ``ViTForImageClassification`` (16x16 images, patch 4)."""
    import transformers as t

    t.utils.logging.disable_progress_bar()
    config = t.ViTConfig(
        **{k: v for k, v in BASE.items() if k != "max_position_embeddings"},
        image_size=16, patch_size=4, num_channels=3, num_labels=num_labels,
    )  # fmt: skip
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = t.ViTForImageClassification(config)
    model.save_pretrained(folder)
    return Path(folder)


def image_npz(path: str | Path, n: int = 160, classes: int = 4, size: int = 16) -> Path:
    """An ``.npz`` of ``n`` images [3, size, size] whose class sets a bright quadrant."""
    rng = np.random.default_rng(0)
    y = np.arange(n) % classes
    x = rng.normal(0, 0.3, (n, 3, size, size)).astype(np.float32)
    h = size // 2
    for i, c in enumerate(y):
        r, q = divmod(int(c) % 4, 2)
        x[i, :, r * h : (r + 1) * h, q * h : (q + 1) * h] += 1.0
    np.savez(path, x=x, y=y.astype(np.int64))
    return Path(path)


class TinyViT(torch.nn.Module):
    """A vision transformer written with ``nn.TransformerEncoder``, as users write them: a patch
    convolution, a class token concatenated with ``cls.expand(len(x), -1, -1)`` (a Python int taken
    from a tensor, which a trace freezes), learned positions, and a linear head on the class token.
    ``nn.TransformerEncoder`` clones its layer, so the blocks start with equal weights."""

    def __init__(self, size: int = 16, patch: int = 4, dim: int = 32, classes: int = 4):
        super().__init__()
        nn = torch.nn
        self.patch = nn.Conv2d(3, dim, patch, patch)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.2)
        self.pos = nn.Parameter(torch.randn(1, (size // patch) ** 2 + 1, dim) * 0.2)
        layer = nn.TransformerEncoderLayer(dim, 4, 64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)
        self.input_shape = (3, size, size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(len(x), -1, -1), x], dim=1) + self.pos
        return self.head(self.norm(self.encoder(x)[:, 0]))


def tiny_vit() -> TinyViT:
    """``module:factory`` entry point: a :class:`TinyViT` with weights drawn from seed 0."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return TinyViT().eval()
