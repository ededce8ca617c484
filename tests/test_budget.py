"""Every budget kind of the one declaration parses, prints and round-trips, and the planner's cost
tables know it."""

from __future__ import annotations

import pytest

from squeezer.budget import BUDGET_KINDS, Budget
from squeezer.costs import Costs
from squeezer.errors import ConfigError


@pytest.mark.parametrize("attr", list(BUDGET_KINDS))
def test_every_kind(attr):
    kind = BUDGET_KINDS[attr]
    b = Budget.parse(kind.example)
    assert list(b.limits()) == [attr]
    assert Budget.parse(str(b)) == b and Budget.from_dict(b.to_dict()) == b
    rel = Budget.parse(f"{kind.key}=0.5r")
    assert rel.relative == (attr,) and str(rel) == f"{kind.key}=0.5r"
    assert isinstance(Costs(params={"a": 1}).available(attr), bool)


def test_whole_bits_and_errors():
    assert Budget.parse("bits=4").whole_bits == 4
    assert Budget.parse("bits=4.5").whole_bits is None
    assert Budget.parse("bits=4,size=1MB").whole_bits is None
    for bad, msg in (("", "empty"), ("foo=1", "unknown budget key"), ("bits=x", "number"),
                     ("bits=1,bits=2", "twice"), ("size=2r", "fraction"), ("bits=-1", "positive"),
                     ("bits=inf", "finite"), ("bops=1e400", "finite")):
        with pytest.raises(ConfigError, match=msg):
            Budget.parse(bad)  # fmt: skip
