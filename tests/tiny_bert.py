"""A tiny randomly initialised BERT sentence encoder and random token batches, shared by the
Q-BERT and integer-encoder tests (no download: the weights are drawn from a seed)."""

from __future__ import annotations

import torch
import transformers

from squeezer.hf import SentenceEncoder


def tiny_encoder(seed: int = 0, hidden_act: str = "gelu") -> SentenceEncoder:
    cfg = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
        initializer_range=0.2,
        hidden_act=hidden_act,
        attn_implementation="eager",
    )
    with torch.random.fork_rng():  # transformers initialises from the global generator
        torch.manual_seed(seed)
        bert = transformers.BertModel(cfg, add_pooling_layer=False)
    return SentenceEncoder(bert).eval()


def token_data(n: int, seed: int, t: int = 12) -> dict[str, torch.Tensor]:
    """``n`` random sentences of 3..t tokens, padded to ``t``."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 100, (n, t), generator=g)
    lens = torch.randint(3, t + 1, (n,), generator=g)
    mask = (torch.arange(t)[None] < lens[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask}
