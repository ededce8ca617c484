"""Decisions as data: per-layer quantization settings and plans (budgets: :mod:`squeezer.budget`).

Everything here is a frozen, versioned dataclass keyed by layer FQN that round-trips through JSON
(``to_dict``/``from_dict``), so the planner only *produces* plans and `quantize` only *consumes* them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, TypeVar

from torch import nn

from .atomic import (
    json_default,
    write_bytes_atomic,  # noqa: F401  (old import path)
    write_text_atomic,
)
from .budget import Budget  # noqa: F401  (old import path)
from .errors import ConfigError
from .graph import quantizable_layers, split_attention

#: How many weights share one (scale, zero point): all, one output channel, or a group of a row.
GRANULARITIES = ("tensor", "channel", "group")
#: How a weight or activation range is found.
OBSERVERS = ("minmax", "percentile", "mse")

PLAN_VERSION = 1


def check_bits(bits: int) -> None:
    """A ConfigError unless ``bits`` is a quantizer width squeezer supports (2–16)."""
    if not 2 <= int(bits) <= 16:
        raise ConfigError(f"bits must be between 2 and 16, got {bits}; use e.g. 4 or 8")


@dataclass(frozen=True)
class LayerQuant:
    """How one layer is quantized.

    Attributes:
        bits: weight bit-width (2–8; 16 or 32 keep the layer in floating point).
        granularity: "tensor", "channel" (per output channel) or "group".
        group_size: entries per group along a flattened output row, for "group".
        symmetric: symmetric (zero point 0) weight codes.
        observer: weight range observer: "minmax", "percentile" or "mse".
        act_bits: bit-width of the layer's input activations, or None to leave them in float.
        act_observer: activation range observer (percentile clipping by default, as ZeroQ advises).
        act_percentile: the percentile for the "percentile" activation observer.
        act_symmetric: symmetric activation codes (asymmetric by default: ReLU outputs are one-sided).

    Example:
        >>> LayerQuant(bits=4, granularity="group", group_size=32).bits
        4
    """

    bits: int = 8
    granularity: str = "channel"
    group_size: int | None = None
    symmetric: bool = True
    observer: str = "minmax"
    act_bits: int | None = None
    act_observer: str = "percentile"
    act_percentile: float = 99.99
    act_symmetric: bool = False

    def __post_init__(self) -> None:
        if self.bits not in (16, 32):
            check_bits(self.bits)
        if self.granularity not in GRANULARITIES:
            raise ConfigError(
                f"unknown granularity {self.granularity!r}; choose one of {', '.join(GRANULARITIES)}"
            )
        if self.granularity == "group" and not self.group_size:
            raise ConfigError("granularity 'group' needs group_size, e.g. group_size=64")
        for obs in (self.observer, self.act_observer):
            if obs not in OBSERVERS:
                raise ConfigError(f"unknown observer {obs!r}; choose one of {', '.join(OBSERVERS)}")
        if self.act_bits is not None:
            check_bits(self.act_bits)

    @property
    def is_float(self) -> bool:
        """True if the weights stay in floating point (bits 16 or 32)."""
        return self.bits >= 16

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LayerQuant:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown layer settings {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)


@dataclass(frozen=True)
class QuantConfig:
    """One setting for every quantizable layer, except the FQNs in ``skip`` (kept in float).

    The layers are those :func:`squeezer.quantize` sees: a model's ``nn.MultiheadAttention``
    counts as its ``q_proj``, ``k_proj``, ``v_proj`` and ``out_proj`` (see
    :func:`squeezer.graph.split_attention`).

    Example:
        >>> cfg = QuantConfig(LayerQuant(bits=8, act_bits=8))
        >>> plan = cfg.to_plan(nn.Sequential(nn.Linear(4, 2)))
        >>> plan.layers["0"].bits
        8
    """

    layer: LayerQuant = field(default_factory=LayerQuant)
    skip: tuple[str, ...] = ()

    def to_plan(self, model: nn.Module) -> Plan:
        layers = quantizable_layers(split_attention(model))
        missing = [s for s in self.skip if s not in layers]
        if missing:
            raise ConfigError(f"skip names unknown layers {missing}; known: {list(layers)}")
        return Plan(
            {fqn: self.layer for fqn in layers if fqn not in self.skip},
            meta={"method": "uniform", "bits": self.layer.bits},
        )


class JsonFile:
    """The JSON file round trip of a versioned record: ``save``, ``load`` and ``from_json`` on top
    of the class's own ``to_json`` and ``from_dict``. The file is written atomically; unreadable
    files, invalid JSON and a newer format version are one-line ConfigErrors naming ``_json_kind``.
    """

    _json_kind: str  # what the messages call the record ("plan", ...)
    _json_version: int  # the newest format version this squeezer reads

    @classmethod
    def _checked_version(cls, d: Mapping[str, Any]) -> int:
        """``d``'s format version (the current one if it names none), refused if it is newer."""
        version = int(d.get("version", cls._json_version))
        if version > cls._json_version:
            raise ConfigError(
                f"{cls._json_kind} version {version} is newer than this squeezer understands "
                f"({cls._json_version}); upgrade squeezer"
            )
        return version

    @classmethod
    def from_json(cls: type[_J], text: str) -> _J:
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as exc:
            raise ConfigError(
                f"the {cls._json_kind} is not valid JSON ({exc}); regenerate it"
            ) from exc

    def save(self, path: str | os.PathLike) -> None:
        write_text_atomic(path, self.to_json())

    @classmethod
    def load(cls: type[_J], path: str | os.PathLike) -> _J:
        try:
            return cls.from_json(Path(path).read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read {cls._json_kind} {path}: {exc.strerror}") from exc


_J = TypeVar("_J", bound=JsonFile)


@dataclass(frozen=True)
class Plan(JsonFile):
    """Per-layer quantization settings keyed by FQN; layers not named stay in float.

    Example:
        >>> p = Plan({"fc": LayerQuant(bits=4)}, meta={"method": "hessian"})
        >>> Plan.from_json(p.to_json()) == p
        True
    """

    layers: Mapping[str, LayerQuant]
    meta: Mapping[str, Any] = field(default_factory=dict)
    version: int = PLAN_VERSION

    _json_kind = "plan"
    _json_version = PLAN_VERSION

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Plan)
            and dict(self.layers) == dict(other.layers)
            and json.dumps(self.meta, sort_keys=True, default=str)
            == json.dumps(other.meta, sort_keys=True, default=str)
            and self.version == other.version
        )

    def __hash__(self) -> int:
        return hash(self.to_json())

    def bits(self) -> dict[str, int]:
        """{FQN: weight bits}."""
        return {k: v.bits for k, v in self.layers.items()}

    def with_layer(self, fqn: str, lq: LayerQuant) -> Plan:
        """A new plan with ``fqn`` set to ``lq``."""
        return replace(self, layers={**self.layers, fqn: lq})

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "meta": dict(self.meta),
            "layers": {k: v.to_dict() for k, v in self.layers.items()},
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False, default=json_default)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Plan:
        if not isinstance(d, Mapping) or "layers" not in d:
            raise ConfigError(
                "a plan is a JSON object with a 'layers' mapping; see plan.json of a run"
            )
        version = cls._checked_version(d)
        layers = {k: LayerQuant.from_dict(v) for k, v in d["layers"].items()}
        return cls(layers, meta=dict(d.get("meta", {})), version=version)
