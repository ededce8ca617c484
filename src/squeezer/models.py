"""Resolving a MODEL spec (``zoo:NAME``, ``pkg.module:factory``, ``hf:DIR``) and loading weights safely.

Weights load from safetensors or from a torch file with ``weights_only=True``; a full pickle (which
can run arbitrary code) loads only when the caller opts in with ``trust_pickle=True``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import UnsupportedModelError
from .factory import resolve_factory
from .graph import split_attention


def load_model(
    spec: str,
    *,
    weights: str | os.PathLike | None = None,
    trust_pickle: bool = False,
    split: bool = True,
) -> nn.Module:
    """Build the model a spec names, load ``weights`` into it, and split its attention.

    The weights load into the architecture the spec builds (so a ``model.state_dict()`` of the
    user's own model fits), or, failing that, into its split form (a state dict saved from it).
    Then every ``nn.MultiheadAttention`` becomes a :class:`squeezer.attention.SplitAttention` of
    four Linear layers (:func:`squeezer.graph.split_attention`): the model every command analyses,
    plans, quantizes and saves.

    Args:
        spec: ``zoo:NAME`` (built-in), ``pkg.module:factory`` (a callable returning an nn.Module),
            or ``hf:DIR`` / ``hf:minilm`` (Hugging Face encoders; needs the ``hf`` extra).
        weights: a ``.safetensors`` file or a torch state-dict file.
        trust_pickle: allow a weights file that is a full pickle (it can execute code).
        split: split the attention. False keeps the architecture as built (to train it and save
            weights the user's own code loads), unless the weights fit only its split form.

    Example:
        >>> m = load_model("zoo:digits_cnn")
        >>> m.input_shape
        (1, 8, 8)
    """
    spec = str(spec)
    if spec.startswith("zoo:"):
        from .zoo import create

        model = create(spec[4:])
    elif spec.startswith("hf:"):
        try:
            from .hf import load_hf
        except ImportError as exc:  # pragma: no cover - hf module ships with the package
            raise UnsupportedModelError(f"hf: models are unavailable ({exc})") from exc
        model = load_hf(spec, trust_pickle=trust_pickle).model
    elif ":" in spec:
        model = _from_factory(spec)
    else:
        raise UnsupportedModelError(
            f"cannot resolve model {spec!r}; write zoo:NAME (see 'squeezer zoo'), "
            "pkg.module:factory, or hf:DIR"
        )
    if weights is not None:
        model = _with_weights(model, weights, trust_pickle=trust_pickle)
    if split:
        model = split_attention(model)
    model.eval()
    return model


def _with_weights(model: nn.Module, path: str | os.PathLike, *, trust_pickle: bool) -> nn.Module:
    """``model`` with the weights of ``path``; if they were saved from the split model (keys such
    as ``<mha>.q_proj.weight``), a split copy of ``model`` with them."""
    sd = read_state_dict(path, trust_pickle=trust_pickle)
    if set(sd) != set(model.state_dict()):
        split = split_attention(model)
        if split is not model and set(sd) == set(split.state_dict()):
            model = split
    _load_state_dict(model, sd, path)
    return model


def _from_factory(spec: str) -> nn.Module:
    model = resolve_factory(spec, "model")
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(
            f"{spec} returned a {type(model).__name__}, not a torch.nn.Module"
        )
    return model


def read_state_dict(path: str | os.PathLike, *, trust_pickle: bool = False) -> dict[str, Any]:
    """A state dict from a ``.safetensors`` file or a torch file (``weights_only`` unless trusted)."""
    path = Path(path)
    if path.exists() and not path.is_file():
        raise UnsupportedModelError(f"weights {path} is not a file; give a weights file")
    if not path.is_file():
        raise UnsupportedModelError(f"weights file {path} does not exist; check the path")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise UnsupportedModelError(
                f"{path} is not a valid safetensors file ({str(exc).splitlines()[0][:80]}); "
                "re-export it with safetensors.torch.save_file"
            ) from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except Exception as exc:
        text = str(exc)
        if not trust_pickle and ("weights_only" in text or "Unsupported global" in text):
            raise UnsupportedModelError(
                f"{path} is a full pickle, which can run arbitrary code; if you trust it, pass "
                "--trust-pickle (or save a state_dict / safetensors instead)"
            ) from None
        raise UnsupportedModelError(
            f"cannot read weights {path} ({type(exc).__name__}); save them with "
            "torch.save(model.state_dict(), path) or safetensors"
        ) from None
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UnsupportedModelError(f"{path} does not hold a state dict of tensors")
    return obj


def load_weights(model: nn.Module, path: str | os.PathLike, *, trust_pickle: bool = False) -> None:
    """Load a weights file into ``model`` (which the caller just built), strictly."""
    _load_state_dict(model, read_state_dict(path, trust_pickle=trust_pickle), path)


def _load_state_dict(model: nn.Module, sd: dict[str, Any], path: str | os.PathLike) -> None:
    own = model.state_dict()
    wrong = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in sd.items()
             if k in own and tuple(v.shape) != tuple(own[k].shape)]  # fmt: skip
    if wrong:
        k, got, want = wrong[0]
        raise UnsupportedModelError(
            f"{Path(path).name} does not fit the model: {len(wrong)} tensors have other shapes "
            f"({k}: {got} in the file, {want} in the model); was it saved from another size or "
            "architecture?"
        )
    result = model.load_state_dict(sd, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise UnsupportedModelError(
            f"{Path(path).name} does not fit the model: missing {result.missing_keys[:3]}, "
            f"unexpected {result.unexpected_keys[:3]}; was it saved from another architecture?"
        )


def check_weights(model: nn.Module, source: str = "the model") -> None:
    """A one-line UnsupportedModelError if a floating parameter or buffer of ``model`` holds NaN or
    infinity (such weights would poison every Hessian product and quantization range).

    Example:
        >>> net = nn.Linear(2, 2)
        >>> with torch.no_grad():
        ...     _ = net.weight.fill_(float("nan"))
        >>> check_weights(net)
        Traceback (most recent call last):
        ...
        squeezer.errors.UnsupportedModelError: the weights of the model hold NaN or infinity ...
    """
    from torch.nn.parameter import is_lazy

    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if not is_lazy(t) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise UnsupportedModelError(
                f"the weights of {source} hold NaN or infinity ({bad} values in {name}); the "
                "training diverged or the file is damaged: give finite weights"
            )


def save_weights(
    model_or_state: nn.Module | dict[str, torch.Tensor],
    path: str | os.PathLike,
    metadata: dict[str, str] | None = None,
) -> None:
    """Write a state dict to ``path`` as safetensors, atomically."""
    from safetensors.torch import save

    from .atomic import write_bytes_atomic

    sd = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    sd = {k: v.detach().cpu().clone().contiguous() for k, v in sd.items()}
    write_bytes_atomic(path, save(sd, metadata=metadata))
