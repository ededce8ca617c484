"""The structured joint ILP (squeezer.plan_joint) against brute force, and its table as data."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from squeezer.errors import ConfigError, InfeasibleBudgetError
from squeezer.plan_joint import JointTable, plan_structured

GROUPS = {"g1": (0.0, 0.5), "g2": (0.0, 0.25, 0.5)}
LAYERS = {"a": ("g1", None), "b": ("g2", "g1"), "c": (None, "g2"), "d": ("g2", "g2")}
BITS = (2, 4, 8)


def _configs(k):
    og, ig = LAYERS[k]
    for b in BITS:
        for ro in GROUPS.get(og, (0.0,)):
            for ri in GROUPS.get(ig, (0.0,)):
                if og is not None and og == ig and ro != ri:
                    continue  # a depthwise layer: one group on both axes
                yield b, ro, ri


def _table(seed: int) -> JointTable:
    rng = np.random.default_rng(seed)
    omega, size, lat = {}, {}, {}
    for k in LAYERS:
        omega[k], size[k], lat[k] = {}, {}, {}
        for c in _configs(k):
            keep = (1 - c[1]) * (1 - c[2])
            omega[k][c] = float(rng.uniform(0, 1) * (8 / c[0]) + 3 * (1 - keep) * rng.uniform())
            size[k][c] = float(100 * keep * c[0] / 8 + rng.uniform(0, 5))
            lat[k][c] = float(keep * rng.uniform(1, 2))
    gc = {"g1": {0.0: 0.0, 0.5: -3.0}, "g2": {0.0: 0.0, 0.25: -1.0, 0.5: -2.0}}
    return JointTable(GROUPS, LAYERS, omega, {"size_bytes": size, "latency_ms": lat},
                      group_costs={"size_bytes": gc}, fixed={"size_bytes": 20.0, "latency_ms": -0.5})


def _brute(t: JointTable, limits, allowed=lambda c: True):
    best = None
    for rs in itertools.product(*GROUPS.values()):
        groups = dict(zip(GROUPS, rs, strict=True))
        for bits in itertools.product(BITS, repeat=len(LAYERS)):
            layers = {}
            for (k, (og, ig)), b in zip(LAYERS.items(), bits, strict=True):
                layers[k] = (b, groups.get(og, 0.0) if og else 0.0, groups.get(ig, 0.0) if ig else 0.0)
            if not all(allowed(c) for c in layers.values()):
                continue
            if any(t.total(key, groups, layers) > cap + 1e-9 for key, cap in limits.items()):
                continue
            om = sum(t.omega[k][c] for k, c in layers.items())
            if best is None or om < best[0]:
                best = (om, groups, layers)
    return best


@pytest.mark.parametrize("seed", range(4))
def test_plan_structured_matches_brute_force_and_beats_restricted(seed):
    t = _table(seed)
    full = t.total("size_bytes", dict.fromkeys(GROUPS, 0.0), {k: (8, 0.0, 0.0) for k in LAYERS})
    limits = {"size_bytes": 0.45 * full, "latency_ms": 2.5}
    ch = plan_structured(t, limits)
    om, groups, layers = _brute(t, limits)
    assert ch.omega == pytest.approx(om, rel=1e-6)
    # every layer agrees with its groups' ratios, and the prediction is the table's own total
    for k, (_b, ro, ri) in ch.layers.items():
        og, ig = LAYERS[k]
        assert ro == (ch.groups[og] if og else 0.0) and ri == (ch.groups[ig] if ig else 0.0)
    for key, cap in limits.items():
        assert ch.achieved[key] == pytest.approx(t.total(key, ch.groups, ch.layers))
        assert ch.achieved[key] <= cap + 1e-6
    for allowed in (lambda c: c[1] == c[2] == 0, lambda c: c[0] == 8):
        try:
            r = plan_structured(t, limits, allowed=allowed)
        except InfeasibleBudgetError:
            assert _brute(t, limits, allowed) is None
            continue
        assert r.omega == pytest.approx(_brute(t, limits, allowed)[0], rel=1e-6)
        assert r.omega >= ch.omega - 1e-9


def test_infeasible_names_the_least_reachable_value():
    t = _table(0)
    least = _brute_min(t, "latency_ms")
    with pytest.raises(InfeasibleBudgetError, match="latency=") as e:
        plan_structured(t, {"latency_ms": least * 0.9})
    assert f"{least:.4g}ms" in str(e.value)
    with pytest.raises(ConfigError, match="bops"):
        plan_structured(t, {"bops": 1.0})
    with pytest.raises(ConfigError, match="no allowed"):
        plan_structured(t, {"size_bytes": 1e9}, allowed=lambda c: c[0] == 3)


def _brute_min(t, key):
    vals = []
    for rs in itertools.product(*GROUPS.values()):
        groups = dict(zip(GROUPS, rs, strict=True))
        for bits in itertools.product(BITS, repeat=len(LAYERS)):
            layers = {k: (b, groups.get(og, 0.0) if og else 0.0, groups.get(ig, 0.0) if ig else 0.0)
                      for (k, (og, ig)), b in zip(LAYERS.items(), bits, strict=True)}
            vals.append(t.total(key, groups, layers))
    return min(vals)


def test_table_round_trips_through_json():
    t = _table(1)
    back = JointTable.from_dict(json.loads(json.dumps(t.to_dict())))
    assert back == t
    assert back.omega["b"][4, 0.25, 0.5] == t.omega["b"][4, 0.25, 0.5]
