"""The structure of BERT-family encoders: where the embeddings and the blocks are, and what role
each quantizable layer plays (query, key, value, attention output, FFN in and out, the embedding
tables). Q-BERT's layer template (:mod:`squeezer.qbert`) and the integer-only encoder
(:mod:`squeezer.integer.encoder`) both read it; it imports neither.
"""

from __future__ import annotations

import re

from torch import nn

from .errors import UnsupportedModelError
from .graph import quantizable_layers

#: Embedding tables added to every token whatever the text (tiny, with a systematic error).
POSITION_TABLES = ("position_embeddings", "token_type_embeddings")

_LAYER = re.compile(r"(?:^|\.)encoder\.layer\.(\d+)\.")


def is_bert_like(model: nn.Module) -> bool:
    """True if ``model`` (or its ``.model``) has ``embeddings`` and ``encoder.layer``.

    Example:
        >>> is_bert_like(nn.Linear(2, 2))
        False
    """
    try:
        bert_of(model)
    except UnsupportedModelError:
        return False
    return True


def bert_of(model: nn.Module) -> nn.Module:
    """The BERT-style module inside ``model`` (``model`` itself, or ``model.model`` of a
    :class:`squeezer.hf.SentenceEncoder`): the one with ``embeddings`` and ``encoder.layer``.

    Example:
        >>> bert_of(load_hf("hf:minilm").model).config.num_hidden_layers  # doctest: +SKIP
        6
    """
    for m in (model, getattr(model, "model", None)):
        if (
            m is not None
            and hasattr(m, "embeddings")
            and hasattr(getattr(m, "encoder", None), "layer")
        ):
            return m
    raise UnsupportedModelError(
        f"{type(model).__name__} is not a BERT-style encoder (no .embeddings and .encoder.layer); "
        "give the model as hf:DIR (a Hugging Face BERT-family folder)"
    )


def layer_roles(model: nn.Module) -> dict[str, str]:
    """``{FQN: role}`` of every quantizable layer: ``word_embeddings``, ``position_embeddings``,
    ``token_type_embeddings``, ``query``, ``key``, ``value``, ``attention_output``,
    ``intermediate``, ``output`` (or ``other``).

    Example:
        >>> layer_roles(encoder)["model.encoder.layer.0.attention.output.dense"]  # doctest: +SKIP
        'attention_output'
    """
    bert_of(model)
    roles = {}
    for fqn in quantizable_layers(model):
        last = fqn.rsplit(".", 1)[-1]
        if last.endswith("_embeddings"):
            roles[fqn] = last
        elif last in ("query", "key", "value"):
            roles[fqn] = last
        elif fqn.endswith("attention.output.dense"):
            roles[fqn] = "attention_output"
        elif fqn.endswith("intermediate.dense"):
            roles[fqn] = "intermediate"
        elif fqn.endswith("output.dense"):
            roles[fqn] = "output"
        else:
            roles[fqn] = "other"
    return roles


def blocks(model: nn.Module) -> dict[str, str]:
    """``{FQN: block}`` of every quantizable layer: ``"embeddings"`` or ``"layer.<i>"`` (the i-th
    encoder block), ``"other"`` for anything else.

    Example:
        >>> blocks(encoder)["model.encoder.layer.3.intermediate.dense"]  # doctest: +SKIP
        'layer.3'
    """
    roles = layer_roles(model)
    out = {}
    for fqn, role in roles.items():
        m = _LAYER.search(fqn)
        if m:
            out[fqn] = f"layer.{int(m.group(1))}"
        elif role.endswith("_embeddings"):
            out[fqn] = "embeddings"
        else:
            out[fqn] = "other"
    return out


