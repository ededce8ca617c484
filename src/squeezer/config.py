"""Decisions as data: per-layer quantization settings, plans and budgets.

Everything here is a frozen, versioned dataclass keyed by layer FQN that round-trips through JSON
(``to_dict``/``from_dict``), so the planner only *produces* plans and `quantize` only *consumes* them.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, TypeVar

from torch import nn

from .errors import ConfigError
from .graph import quantizable_layers, split_attention
from .quant.primitives import GRANULARITIES, OBSERVERS, qrange

PLAN_VERSION = 1


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
            qrange(self.bits, self.symmetric)  # validates the range
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
            qrange(self.act_bits, self.act_symmetric)

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
        return json.dumps(self.to_dict(), indent=2, sort_keys=False, default=_json_default)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Plan:
        if not isinstance(d, Mapping) or "layers" not in d:
            raise ConfigError(
                "a plan is a JSON object with a 'layers' mapping; see plan.json of a run"
            )
        version = cls._checked_version(d)
        layers = {k: LayerQuant.from_dict(v) for k, v in d["layers"].items()}
        return cls(layers, meta=dict(d.get("meta", {})), version=version)


# --------------------------------------------------------------------------------------------------
# Budgets

_SIZE_UNITS = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
_BUDGET_KEYS = ("size", "bits", "bops", "latency")


@dataclass(frozen=True)
class Budget:
    """Limits a plan must meet; any combination. A value with ``relative`` set to True for a key is a
    fraction r of the span between the all-lowest and all-highest bit choice (HAWQ-V3's convention:
    ``size=0.5r`` = all-low + 0.5 × (all-high − all-low)).

    Attributes:
        size_bytes: model size in bytes, scales and float parts included.
        bits: average weight bits (parameter-weighted over quantized layers).
        bops: bit operations (MACs × weight bits × activation bits).
        latency_ms: summed per-layer latency from a measured table.
        relative: keys whose value is relative ("r" suffix).

    Example:
        >>> Budget.parse("size=1.5MB,bits=4")
        Budget(size_bytes=1500000.0, bits=4.0, bops=None, latency_ms=None, relative=())
    """

    size_bytes: float | None = None
    bits: float | None = None
    bops: float | None = None
    latency_ms: float | None = None
    relative: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if all(getattr(self, k) is None for k in ("size_bytes", "bits", "bops", "latency_ms")):
            raise ConfigError("an empty budget; give e.g. --budget bits=4 or --budget size=1.5MB")
        for k in ("size_bytes", "bits", "bops", "latency_ms"):
            v = getattr(self, k)
            if v is not None and not v > 0:
                raise ConfigError(f"budget {k} must be positive, got {v}")

    @classmethod
    def parse(cls, text: str) -> Budget:
        """Parse ``size=1.5MB``, ``bits=4.5``, ``bops=2e9``, ``latency=3ms``, ``size=0.5r``, joined by
        commas."""
        vals: dict[str, float] = {}
        relative: list[str] = []
        for part in filter(None, (p.strip() for p in str(text).split(","))):
            key, sep, raw = part.partition("=")
            key, raw = key.strip().lower(), raw.strip().lower()
            if not sep or not raw:
                raise ConfigError(f"budget term {part!r} is not KEY=VALUE; e.g. --budget bits=4")
            if key not in _BUDGET_KEYS:
                raise ConfigError(
                    f"unknown budget key {key!r}; use one of {', '.join(_BUDGET_KEYS)} "
                    "(e.g. size=1.5MB, bits=4.5, bops=2e9, latency=3ms)"
                )
            if key in vals:
                raise ConfigError(f"budget key {key!r} given twice")
            if raw.endswith("r") and not raw.endswith("ms"):
                relative.append({"size": "size_bytes", "latency": "latency_ms"}.get(key, key))
                vals[key] = _number(raw[:-1], part)
                if not 0 <= vals[key] <= 1:
                    raise ConfigError(f"a relative budget is a fraction in [0, 1], got {part!r}")
                continue
            if key == "size":
                m = re.fullmatch(r"([0-9.eE+-]+)\s*([kmg]i?b|b)?", raw)
                if not m:
                    raise ConfigError(
                        f"cannot read size {raw!r}; write e.g. size=1.5MB or size=300kB"
                    )
                vals[key] = _number(m.group(1), part) * _SIZE_UNITS[m.group(2) or "b"]
            elif key == "latency":
                vals[key] = _number(raw.removesuffix("ms"), part)
            else:
                vals[key] = _number(raw, part)
        if not vals:
            raise ConfigError("an empty budget; give e.g. --budget bits=4 or --budget size=1.5MB")
        return cls(
            size_bytes=vals.get("size"),
            bits=vals.get("bits"),
            bops=vals.get("bops"),
            latency_ms=vals.get("latency"),
            relative=tuple(relative),
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["relative"] = list(self.relative)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Budget:
        d = dict(d)
        d["relative"] = tuple(d.get("relative", ()))
        return cls(**d)

    def __str__(self) -> str:
        parts = []
        for k, name, unit in (
            ("size_bytes", "size", "B"),
            ("bits", "bits", ""),
            ("bops", "bops", ""),
            ("latency_ms", "latency", "ms"),
        ):
            v = getattr(self, k)
            if v is not None:
                parts.append(f"{name}={v:g}{'r' if k in self.relative else unit}")
        return ",".join(parts)


def _number(raw: str, part: str) -> float:
    try:
        return float(raw)
    except ValueError:
        raise ConfigError(f"budget term {part!r} does not hold a number") from None


def _json_default(o: Any) -> Any:
    if hasattr(o, "to_dict"):
        return o.to_dict()
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename, so a crash leaves no half file."""
    write_bytes_atomic(path, text.encode())


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file in the same folder, then os.replace)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; outputs are ordinary files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
