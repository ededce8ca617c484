"""The structure of transformer encoders: where the embeddings and the blocks are, and what role
each quantizable layer plays (query, key, value, attention output, FFN in and out, the embedding
tables), found by structure (a list of blocks of Linear layers after ``.embeddings``), not by class
name, so BERT, RoBERTa, XLM-R, DistilBERT, ALBERT, ELECTRA, DeBERTa-v2/v3 and MPNet all read.
Q-BERT's layer template (:mod:`squeezer.qbert`) and the integer-only encoder
(:mod:`squeezer.integer.encoder`) both read it; it imports neither.
"""

from __future__ import annotations

from torch import nn

from .errors import UnsupportedModelError
from .graph import quantizable_layers

#: Embedding tables added to every token whatever the text (tiny, with a systematic error).
POSITION_TABLES = ("position_embeddings", "token_type_embeddings")


def is_bert_like(model: nn.Module) -> bool:
    """True if ``model`` (or its ``.model``) is a transformer encoder by structure: token
    embeddings (``.embeddings``) and a list of blocks (:func:`encoder_of`). BERT, RoBERTa, XLM-R,
    DistilBERT, ALBERT, ELECTRA, DeBERTa-v2/v3 and MPNet all are.

    Example:
        >>> is_bert_like(nn.Linear(2, 2))
        False
    """
    try:
        encoder_of(model)
    except UnsupportedModelError:
        return False
    return True


def encoder_of(model: nn.Module) -> nn.Module:
    """The encoder inside ``model`` (``model`` itself, or ``model.model`` of a
    :class:`squeezer.hf.SentenceEncoder`): the module with ``embeddings`` and a list of blocks
    (:func:`block_list`), whatever its class and its layers' names.

    Example:
        >>> type(encoder_of(load_hf("hf:my-distilbert").model)).__name__  # doctest: +SKIP
        'DistilBertModel'
    """
    for m in (model, getattr(model, "model", None)):
        if m is not None and hasattr(m, "embeddings") and block_list(m) is not None:
            return m
    raise UnsupportedModelError(
        f"{type(model).__name__} is not a transformer encoder (no .embeddings and no list of "
        "blocks of Linear layers); give the model as hf:DIR (a Hugging Face encoder folder)"
    )


def block_list(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """``(FQN, blocks)``: the innermost ``nn.ModuleList`` of ``model`` whose entries each hold at
    least four Linear layers (attention and FFN): ``encoder.layer`` in BERT, ``transformer.layer``
    in DistilBERT, ``encoder.albert_layer_groups.0.albert_layers`` in ALBERT (whose one block runs
    at every depth). None if there is none.

    Example:
        >>> block_list(bert)[0]                                  # doctest: +SKIP
        'encoder.layer'
    """
    found = None
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) and all(_linears(b) >= 4 for b in m):
            found = (name, m)  # named_modules is pre-order: a later hit is nested deeper
    return found


def _linears(m: nn.Module) -> int:
    return sum(isinstance(x, nn.Linear) for x in m.modules())


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


#: Roles of a block's Linear layers in the order the families register them (query, key and
#: value, the attention output, the FFN's two layers).
BLOCK_ROLES = ("query", "key", "value", "attention_output", "intermediate", "output")
#: Names the families give those layers (BERT, DistilBERT, DeBERTa, MPNet, ALBERT), by role.
_ROLE_NAMES = {
    "query": ("query", "q_lin", "query_proj", "q"),
    "key": ("key", "k_lin", "key_proj", "k"),
    "value": ("value", "v_lin", "value_proj", "v"),
    "attention_output": ("attention.output.dense", "out_lin", "attention.dense", "attn.o"),
    "intermediate": ("intermediate.dense", "lin1", "ffn"),
    "output": ("output.dense", "lin2", "ffn_output"),
}


def layer_roles(model: nn.Module) -> dict[str, str]:
    """``{FQN: role}`` of every quantizable layer: ``word_embeddings``, ``position_embeddings``,
    ``token_type_embeddings``, ``query``, ``key``, ``value``, ``attention_output``,
    ``intermediate``, ``output`` (or ``other``).

    Inside a block, a layer takes the role its name gives in one of the families (BERT's
    ``attention.self.query``, DistilBERT's ``q_lin``, DeBERTa's ``query_proj``, MPNet's ``attn.q``);
    a block of exactly six Linear layers under other names takes :data:`BLOCK_ROLES` in order.

    Example:
        >>> layer_roles(encoder)["model.encoder.layer.0.attention.output.dense"]  # doctest: +SKIP
        'attention_output'
    """
    encoder_of(model)
    roles = {}
    for fqn in quantizable_layers(model):
        last = fqn.rsplit(".", 1)[-1]
        roles[fqn] = last if last.endswith("_embeddings") else "other"
    for prefix, block in _blocks_of(model):
        names = [n for n, m in block.named_modules() if isinstance(m, nn.Linear)]
        by_name = {n: _role_by_name(n) for n in names}
        if len(names) == len(BLOCK_ROLES) and sorted(by_name.values()) != sorted(BLOCK_ROLES):
            by_name = dict(zip(names, BLOCK_ROLES, strict=True))
        for n, role in by_name.items():
            if f"{prefix}.{n}" in roles:
                roles[f"{prefix}.{n}"] = role
    return roles


def _role_by_name(name: str) -> str:
    for role, names in _ROLE_NAMES.items():
        if any(name == n or name.endswith("." + n) for n in names):
            return role
    return "other"


def _blocks_of(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``[(FQN of block i, block i)]`` in ``model``'s own FQNs."""
    enc = encoder_of(model)
    prefix = next(name for name, m in model.named_modules() if m is enc)
    name, blocks_ = block_list(enc)
    base = ".".join(p for p in (prefix, name) if p)
    return [(f"{base}.{i}", b) for i, b in enumerate(blocks_)]


def blocks(model: nn.Module) -> dict[str, str]:
    """``{FQN: block}`` of every quantizable layer: ``"embeddings"`` or ``"layer.<i>"`` (the i-th
    encoder block), ``"other"`` for anything else.

    Example:
        >>> blocks(encoder)["model.encoder.layer.3.intermediate.dense"]  # doctest: +SKIP
        'layer.3'
    """
    roles = layer_roles(model)
    starts = [(f"{p}.", f"layer.{i}") for i, (p, _) in enumerate(_blocks_of(model))]
    out = {}
    for fqn, role in roles.items():
        hit = next((b for p, b in starts if fqn.startswith(p)), None)
        if hit is not None:
            out[fqn] = hit
        elif role.endswith("_embeddings"):
            out[fqn] = "embeddings"
        else:
            out[fqn] = "other"
    return out
