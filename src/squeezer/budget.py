"""Budgets: the limits a plan must meet, and the one declaration of the budget kinds.

A budget kind is a quantity every candidate plan has a value of (size in bytes, average weight
bits, bit operations, latency). :data:`BUDGET_KINDS` declares each kind once — its attribute on
:class:`Budget`, its key on the command line and its unit — and everything else (parsing,
printing, the planner's constraint rows and its error messages) reads that table.

A value may be relative (HAWQ-V3's convention, arXiv:2011.10680): ``size=0.5r`` is the all-lowest
plan's size plus 0.5 × (all-highest − all-lowest).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from .errors import ConfigError


@dataclass(frozen=True)
class BudgetKind:
    """One kind of budget: ``attr`` on :class:`Budget`, ``key`` in ``--budget``, ``unit`` suffix."""

    attr: str
    key: str
    unit: str
    example: str


#: The budget kinds, by attribute name. Add a kind here (and its cost in squeezer.costs.Costs).
BUDGET_KINDS: dict[str, BudgetKind] = {
    k.attr: k
    for k in (
        BudgetKind("size_bytes", "size", "B", "size=1.5MB"),
        BudgetKind("bits", "bits", "", "bits=4.5"),
        BudgetKind("bops", "bops", "", "bops=2e9"),
        BudgetKind("latency_ms", "latency", "ms", "latency=3ms"),
    )
}
_BY_KEY = {k.key: k for k in BUDGET_KINDS.values()}
_SIZE_UNITS = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
_EMPTY = "an empty budget; give e.g. --budget bits=4 or --budget size=1.5MB"


@dataclass(frozen=True)
class Budget:
    """Limits a plan must meet; any combination. A key listed in ``relative`` holds a fraction r of
    the span between the all-lowest and all-highest choice.

    Attributes:
        size_bytes: model size in bytes, scales and float parts included.
        bits: average weight bits (parameter-weighted over quantized layers).
        bops: bit operations (MACs × weight bits × activation bits).
        latency_ms: summed per-layer latency from a measured table.
        relative: attributes whose value is relative ("r" suffix).

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
        if not self.limits():
            raise ConfigError(_EMPTY)
        for attr, v in self.limits().items():
            if not (v > 0 and math.isfinite(v)):
                raise ConfigError(f"budget {attr} must be positive and finite, got {v}")

    def limits(self) -> dict[str, float]:
        """{attribute: value} of the kinds this budget limits, in :data:`BUDGET_KINDS` order."""
        return {a: getattr(self, a) for a in BUDGET_KINDS if getattr(self, a) is not None}

    @property
    def whole_bits(self) -> int | None:
        """N if the budget is exactly ``bits=N`` (whole, absolute, nothing else), else None."""
        if set(self.limits()) == {"bits"} and not self.relative and float(self.bits).is_integer():
            return int(self.bits)
        return None

    @classmethod
    def parse(cls, text: str) -> Budget:
        """Parse ``size=1.5MB``, ``bits=4.5``, ``bops=2e9``, ``latency=3ms``, ``size=0.5r``, joined
        by commas."""
        vals: dict[str, float] = {}
        relative: list[str] = []
        for part in filter(None, (p.strip() for p in str(text).split(","))):
            key, sep, raw = part.partition("=")
            key, raw = key.strip().lower(), raw.strip().lower()
            if not sep or not raw:
                raise ConfigError(f"budget term {part!r} is not KEY=VALUE; e.g. --budget bits=4")
            kind = _BY_KEY.get(key)
            if kind is None:
                raise ConfigError(
                    f"unknown budget key {key!r}; use one of {', '.join(_BY_KEY)} "
                    f"(e.g. {', '.join(k.example for k in BUDGET_KINDS.values())})"
                )
            if kind.attr in vals:
                raise ConfigError(f"budget key {key!r} given twice")
            if raw.endswith("r") and not raw.endswith("ms"):
                relative.append(kind.attr)
                vals[kind.attr] = _number(raw[:-1], part)
                if not 0 <= vals[kind.attr] <= 1:
                    raise ConfigError(f"a relative budget is a fraction in [0, 1], got {part!r}")
            elif kind.attr == "size_bytes":
                m = re.fullmatch(r"([0-9.eE+-]+)\s*([kmg]i?b|b)?", raw)
                if not m:
                    raise ConfigError(
                        f"cannot read size {raw!r}; write e.g. size=1.5MB or size=300kB"
                    )
                vals[kind.attr] = _number(m.group(1), part) * _SIZE_UNITS[m.group(2) or "b"]
            else:
                vals[kind.attr] = _number(raw.removesuffix(kind.unit or "\0"), part)
        if not vals:
            raise ConfigError(_EMPTY)
        return cls(**vals, relative=tuple(relative))

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
        return ",".join(
            f"{BUDGET_KINDS[a].key}={v:g}{'r' if a in self.relative else BUDGET_KINDS[a].unit}"
            for a, v in self.limits().items()
        )


def _number(raw: str, part: str) -> float:
    try:
        return float(raw)
    except ValueError:
        raise ConfigError(f"budget term {part!r} does not hold a number") from None
