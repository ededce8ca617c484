"""The ILP planner against brute-force enumeration, infeasibility messages, ties, the frontier."""

from __future__ import annotations

import itertools
import re

import numpy as np
import pytest
import torch
from torch import nn

from squeezer import measure
from squeezer.budget import BUDGET_KINDS
from squeezer.config import Budget, LayerQuant, Plan
from squeezer.costs import Costs, plan_costs
from squeezer.errors import ConfigError, InfeasibleBudgetError
from squeezer.layer_timing import layer_latency_table as latency_table
from squeezer.plan import achieved, pareto_frontier, plan
from squeezer.sensitivity import Sensitivity
from squeezer.ties import residual_ties

pytestmark = pytest.mark.usefixtures("one_thread")

BITS = (2, 4, 8)
KEYS = tuple(BUDGET_KINDS)  # size_bytes, bits, bops, latency_ms


def random_instance(seed: int, n_layers: int = 8, bits=BITS) -> tuple[Sensitivity, Costs]:
    """Ω falling with bits; sizes with scales; latency deliberately not monotone in bits."""
    g = torch.Generator().manual_seed(seed)

    def u(*shape):
        return torch.rand(*shape, generator=g, dtype=torch.float64)

    names = [f"l{i}" for i in range(n_layers)]
    sizes = torch.randint(50, 5000, (n_layers,), generator=g).tolist()
    params = dict(zip(names, sizes, strict=True))
    scale = u(n_layers) * 10 ** (u(n_layers) * 3)  # sensitivities spanning ~1000x
    omega = {
        k: {b: float(scale[i] * 4.0 ** (-b) * (1 + 0.3 * u(1))) for b in bits}
        for i, k in enumerate(names)
    }
    rows = {k: int(torch.randint(4, 64, (1,), generator=g)) for k in names}
    size = {k: {b: params[k] * b / 8 + 4 * rows[k] for b in bits} for k in names}
    macs = {k: int(params[k] * torch.randint(1, 50, (1,), generator=g)) for k in names}
    lat = {k: {b: float(u(1) + 0.1) for b in bits} for k in names}
    sens = Sensitivity(omega, "trace", tuple(bits), params)
    costs = Costs(
        params=params,
        size_bytes=size,
        macs=macs,
        latency_ms=lat,
        act_bits=8,
        fixed_bytes=float(u(1) * 1000),
        fixed_bops=float(u(1) * 1e5),
        fixed_latency_ms=float(u(1)),
    )
    return sens, costs


def brute_force(sens, costs, limits, ties=()):
    """Least ΣΩ over every assignment meeting ``limits`` (absolute values), or None."""
    names = sens.layers
    best, best_a = None, None
    for combo in itertools.product(sens.bits, repeat=len(names)):
        a = dict(zip(names, combo, strict=True))
        if any(len({a[k] for k in group}) > 1 for group in ties):
            continue
        if any(costs.total(key, a) > cap * (1 + 1e-12) for key, cap in limits.items()):
            continue
        om = sens.total(a)
        if best is None or om < best:
            best, best_a = om, a
    return best, best_a


def span(sens, costs, key):
    lo = costs.total(key, {k: min(sens.bits) for k in sens.layers})
    hi = costs.total(key, {k: max(sens.bits) for k in sens.layers})
    return lo, hi


def budget_of(limits):
    return Budget(**limits)


@pytest.mark.parametrize("key", KEYS)
def test_ilp_matches_brute_force_for_each_budget_kind(key):
    # 8 layers x 3 widths = 6561 assignments; 6 random instances per budget kind, budgets spread
    # from tight to loose.
    for seed in range(6):
        sens, costs = random_instance(100 * KEYS.index(key) + seed)
        lo, hi = span(sens, costs, key)
        cap = lo + (0.1 + 0.15 * seed) * (hi - lo)
        if key == "latency_ms":  # latency is not monotone in bits: span its true range
            lo_t = min(
                costs.total(key, dict(zip(sens.layers, c, strict=True)))
                for c in itertools.product(sens.bits, repeat=len(sens.layers))
            )
            cap = lo_t + (0.05 + 0.1 * seed) * (hi - lo_t)
        want, _ = brute_force(sens, costs, {key: cap})
        p = plan(sens, budget_of({key: cap}), costs=costs)
        got = p.bits()
        assert costs.total(key, got) <= cap * (1 + 1e-9)
        assert sens.total(got) == pytest.approx(want, rel=1e-9, abs=1e-15)
        assert p.meta["predicted_omega"] == pytest.approx(want, rel=1e-9, abs=1e-15)


def test_ilp_matches_brute_force_with_all_limits_and_ties():
    for seed in range(5):
        sens, costs = random_instance(1000 + seed)
        limits = {}
        for j, key in enumerate(KEYS):
            lo, hi = span(sens, costs, key)
            limits[key] = lo + (0.45 + 0.1 * ((seed + j) % 4)) * (hi - lo)
        if "latency_ms" in limits:
            limits["latency_ms"] = max(limits["latency_ms"], span(sens, costs, "latency_ms")[1])
        ties = (("l1", "l4"), ("l2", "l6", "l7"))
        want, _ = brute_force(sens, costs, limits, ties)
        if want is None:
            with pytest.raises(InfeasibleBudgetError):
                plan(sens, budget_of(limits), costs=costs, ties=ties)
            continue
        got = plan(sens, budget_of(limits), costs=costs, ties=ties).bits()
        assert got["l1"] == got["l4"] and got["l2"] == got["l6"] == got["l7"]
        for key, cap in limits.items():
            assert costs.total(key, got) <= cap * (1 + 1e-9)
        assert sens.total(got) == pytest.approx(want, rel=1e-9)


def test_ties_change_the_optimum_and_are_respected():
    # Untied, l0 (very sensitive) takes 8 bits and l1 (insensitive) 2 bits; tied they must agree,
    # and the tied optimum is the brute-force optimum over tie-respecting assignments.
    sens = Sensitivity(
        {"l0": {2: 100.0, 4: 10.0, 8: 0.0}, "l1": {2: 0.1, 4: 0.01, 8: 0.0}},
        "trace",
        (2, 4, 8),
        {"l0": 100, "l1": 100},
    )
    costs = Costs(params={"l0": 100, "l1": 100})
    assert plan(sens, Budget(bits=5), costs=costs).bits() == {"l0": 8, "l1": 2}
    tied = plan(sens, Budget(bits=5), costs=costs, ties=[("l0", "l1")]).bits()
    assert tied == {"l0": 4, "l1": 4}
    assert brute_force(sens, costs, {"bits": 5}, ties=[("l0", "l1")])[1] == tied


def test_infeasible_budget_names_the_smallest_feasible_value():
    sens, costs = random_instance(7, n_layers=6)
    lo, _ = span(sens, costs, "size_bytes")
    with pytest.raises(InfeasibleBudgetError) as err:
        plan(sens, Budget(size_bytes=lo * 0.9), costs=costs)
    msg = str(err.value)
    assert "\n" not in msg
    m = re.search(r"smallest feasible size is size=(\d+)B", msg)
    assert m, msg
    assert int(m.group(1)) == int(np.ceil(lo))  # the all-lowest-bits size
    # The suggestion is itself a valid budget string and is feasible.
    plan(sens, Budget.parse(f"size={m.group(1)}B"), costs=costs)


def test_infeasible_message_accounts_for_the_other_limits_and_ties():
    sens, costs = random_instance(11, n_layers=6)
    ties = (("l0", "l3"),)
    bits_cap = 5.0
    size_cap = span(sens, costs, "size_bytes")[0]  # the all-2-bit size,
    # unreachable once l1 is pinned to 8 bits.
    with pytest.raises(InfeasibleBudgetError) as err:
        plan(
            sens,
            Budget(size_bytes=size_cap, bits=bits_cap),
            costs=costs,
            ties=ties,
            pin={"l1": 8},
        )
    msg = str(err.value)
    m = re.search(r"size=(\d+)B", msg.split("smallest feasible")[1])
    assert m and "with the other limits" in msg, msg
    # Oracle: the least size over assignments meeting bits, ties and the pin.
    best = min(
        costs.total("size_bytes", a)
        for c in itertools.product(sens.bits, repeat=len(sens.layers))
        for a in [dict(zip(sens.layers, c, strict=True))]
        if a["l1"] == 8 and a["l0"] == a["l3"] and costs.total("bits", a) <= bits_cap
    )
    assert int(m.group(1)) == int(np.ceil(best))


def test_infeasible_bits_budget_message():
    sens, costs = random_instance(3, n_layers=4)
    with pytest.raises(InfeasibleBudgetError, match=r"smallest feasible bits is bits=2\b"):
        plan(sens, Budget(bits=1.5), costs=costs)


def test_relative_budget_follows_hawq_v3_convention():
    sens, costs = random_instance(5)
    lo, hi = span(sens, costs, "size_bytes")
    rel = plan(sens, Budget.parse("size=0.4r"), costs=costs)
    absolute = plan(sens, Budget(size_bytes=lo + 0.4 * (hi - lo)), costs=costs)
    assert rel.bits() == absolute.bits()
    assert rel.meta["budget_limits"]["size_bytes"] == pytest.approx(lo + 0.4 * (hi - lo))


def test_pin_and_candidate_subset():
    sens, costs = random_instance(9, n_layers=5)
    p = plan(sens, Budget(bits=4), costs=costs, pin={"l0": 2}, bits=(2, 4))
    assert p.bits()["l0"] == 2
    assert set(p.bits().values()) <= {2, 4}
    with pytest.raises(ConfigError, match="no sensitivity"):
        plan(sens, Budget(bits=4), costs=costs, bits=(3,))


def test_pareto_frontier_points_are_optimal_and_monotone():
    sens, costs = random_instance(21, n_layers=6)
    front = pareto_frontier(sens, costs, points=12)
    assert len(front) >= 3
    for a, b in itertools.pairwise(front):
        assert a.cost < b.cost and a.omega > b.omega
    for p in front:
        want, _ = brute_force(sens, costs, {"size_bytes": p.cost})
        assert p.omega == pytest.approx(want, rel=1e-9)
    lo, hi = span(sens, costs, "size_bytes")
    assert front[0].cost == pytest.approx(lo) and front[-1].cost == pytest.approx(hi)


def test_plan_meta_and_json_round_trip():
    sens, costs = random_instance(2, n_layers=5)
    p = plan(sens, Budget.parse("bits=4,size=0.6r"), costs=costs)
    assert p.meta["method"] == "trace" and p.meta["planner"] == "ilp-highs"
    assert p.meta["achieved"] == achieved(p.bits(), costs)
    assert p.meta["achieved"]["bits"] <= 4 + 1e-9
    assert Plan.from_json(p.to_json()) == p
    assert Costs.from_json(costs.to_json()) == costs


def _tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 6 * 6, 16),
        nn.ReLU(),
        nn.Linear(16, 4),
    )


def test_plan_costs_agree_with_measure():
    net = _tiny_cnn()
    x = torch.zeros(2, 1, 6, 6)
    template = LayerQuant(act_bits=8)
    costs = plan_costs(net, (2, 4, 8, 32), example=x, template=template)
    sens = Sensitivity(
        {k: {2: 3.0, 4: 2.0, 8: 1.0, 32: 0.0} for k in costs.params},
        "trace",
        (2, 4, 8, 32),
        dict(costs.params),
    )
    p = plan(sens, Budget(bits=6), costs=costs)
    # A layer left in float keeps float activations (quantize leaves it whole); the others 8-bit.
    assert {s.bits for s in p.layers.values()} >= {32} and min(p.bits().values()) <= 8
    for s in p.layers.values():
        assert s.granularity == "channel" and s.act_bits == (None if s.bits >= 16 else 8)
    assert p.meta["achieved"]["size_bytes"] == pytest.approx(measure.model_bytes(net, p))
    assert p.meta["achieved"]["bits"] == pytest.approx(measure.average_bits(net, p))
    prof = measure.profile_layers(net, x)
    assert p.meta["achieved"]["bops"] == pytest.approx(sum(measure.bops(prof, p).values()))


def test_plan_costs_of_a_subset_count_the_rest_as_float():
    net = _tiny_cnn()
    costs = plan_costs(net, (4, 8), layers=["4"])
    p = Plan({"4": LayerQuant(bits=4, act_bits=8)})
    assert costs.total("size_bytes", {"4": 4}) == pytest.approx(measure.model_bytes(net, p))


def test_budget_kind_without_costs_is_a_config_error():
    sens, costs = random_instance(1, n_layers=3)
    bare = Costs(params=costs.params)
    with pytest.raises(ConfigError, match="size budget needs"):
        plan(sens, Budget(size_bytes=1e6), costs=bare)


def test_residual_ties_on_a_resnet():
    from squeezer.zoo import create

    ties = residual_ties(create("digits_resnet"))
    # The first block adds its input (after a ReLU) unchanged: no tie. The second block adds its
    # last conv (through BN) and its 1x1 shortcut conv (through BN).
    assert ties == (("layers.1.conv2", "layers.1.shortcut.0"),)
    assert residual_ties(_tiny_cnn()) == ()


def test_residual_ties_fall_back_to_none_when_untraceable():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
                return self.a(x) + self.b(x)
            return self.a(x)

    with pytest.warns(UserWarning, match="cannot trace"):
        assert residual_ties(DataDependent()) == ()


def test_tie_with_unknown_layer_is_a_config_error():
    sens, costs = random_instance(4, n_layers=3)
    with pytest.raises(ConfigError, match="tied layers"):
        plan(sens, Budget(bits=4), costs=costs, ties=[("l0", "nope")])


def test_latency_budget_from_a_proxy_table():
    net = _tiny_cnn()
    x = torch.randn(8, 1, 6, 6, generator=torch.Generator().manual_seed(0))
    table = latency_table(net, x, (2, 4, 8), backend="proxy", runs=5)
    for row in table.values():
        assert row[2] == pytest.approx(row[8] / 4) and row[4] == pytest.approx(row[8] / 2)
    costs = plan_costs(net, (2, 4, 8), example=x, latency=table)
    sens = Sensitivity(
        {k: {2: 4.0, 4: 1.0, 8: 0.0} for k in costs.params}, "trace", (2, 4, 8), costs.params
    )
    lo, hi = span(sens, costs, "latency_ms")
    p = plan(sens, Budget(latency_ms=(lo + hi) / 2), costs=costs)
    assert p.meta["achieved"]["latency_ms"] <= (lo + hi) / 2
    assert brute_force(sens, costs, {"latency_ms": (lo + hi) / 2})[0] == pytest.approx(
        p.meta["predicted_omega"]
    )


@pytest.mark.slow
def test_latency_table_in_onnxruntime():
    pytest.importorskip("onnxruntime")
    net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    table = latency_table(net, x, (2, 8, 32), runs=20)
    assert set(table) == {"0", "2"}
    for row in table.values():
        assert row[2] == row[8] > 0 and row[32] > 0  # no sub-byte kernels: 2 bits time as 8


def test_block_units_group_each_blocks_layers():
    from squeezer.layer_timing import block_units

    enc = nn.Module()
    enc.layers = nn.ModuleList(
        nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8)) for _ in range(3)
    )
    enc.head = nn.Linear(8, 2)
    names = [f"layers.{i}.{j}" for i in range(3) for j in (0, 2)] + ["head"]
    # the encoder layer (the ModuleList's item), not its inner Sequential's single layers
    assert block_units(enc, names) == [
        ["layers.0.0", "layers.0.2"], ["layers.1.0", "layers.1.2"], ["layers.2.0", "layers.2.2"],
        ["head"],
    ]  # fmt: skip
    assert block_units(enc, ["layers.0.0", "head"]) == [["layers.0.0"], ["head"]]


def test_block_level_latency_table_times_blocks_and_shares_by_weight_size(monkeypatch):
    pytest.importorskip("onnxruntime")
    from squeezer import quantize
    from squeezer.layer_timing import context_latency_costs
    from squeezer.templates import uniform_plan

    net = nn.Sequential(
        nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 32)),
        nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32)),
        nn.Linear(32, 4),
    ).eval()
    x = torch.randn(16, 32, generator=torch.Generator().manual_seed(0))
    q = quantize(net, uniform_plan(net, 8, act_bits=8), calib=[(x, None)])
    layers = ["0.0", "0.2", "1.0", "1.2", "2"]
    with pytest.raises(ConfigError, match="unknown latency-table unit"):
        context_latency_costs(net, q, x, (8, 32), layers, unit="stage", runs=2)
    table, base, edges, rec = context_latency_costs(net, q, x, (8, 32), layers, unit="block",
                                                    runs=5)  # fmt: skip
    # 3 units (two blocks and the head): the int8 graph, 3 singles and 2 neighbouring pairs
    assert (rec["unit"], rec["units"], rec["exports"]) == ("block", 3, 6)
    assert len(rec["variants_ms"]) == 5 and len(edges) == 2
    assert set(table) == set(layers) and base > 0
    # one block's cost split by weight size (both Linears of block 0 hold 32 x 128 weights)
    assert table["0.0"][32] == pytest.approx(table["0.2"][32])
    assert table["1.0"][32] == pytest.approx(table["1.2"][32])
    assert all(row[8] == 0.0 for row in table.values())
    # every single-block variant is predicted at exactly what was measured
    (a, _, b01), (_, _, b12) = edges
    pred = base + table["0.0"][32] + table["0.2"][32] + b01
    assert pred == pytest.approx(rec["variants_ms"]["0.0,0.2"], rel=1e-6, abs=1e-9)
    pred = base + table["1.0"][32] + table["1.2"][32] + b01 + b12
    assert pred == pytest.approx(rec["variants_ms"]["1.0,1.2"], rel=1e-6, abs=1e-9)
    # "auto" (what compress and plan use): layers while they need at most MAX_LAYER_EXPORTS
    # exports (5 layers: 10), blocks past that
    from squeezer import layer_timing

    monkeypatch.setattr(layer_timing, "MAX_LAYER_EXPORTS", 8)
    *_, rec = context_latency_costs(net, q, x, (8, 32), layers, runs=2)
    assert (rec["unit"], rec["units"]) == ("block", 3)


def test_moved_names_still_work_with_a_deprecation_warning():
    import importlib

    import squeezer.costs

    old = importlib.import_module("squeezer.plan")  # the module (squeezer.plan is also a function)

    with pytest.warns(DeprecationWarning, match="moved to squeezer.costs.plan_costs"):
        assert old.plan_costs is squeezer.costs.plan_costs
    with pytest.warns(DeprecationWarning):
        assert old.residual_ties is residual_ties
    with pytest.raises(AttributeError):
        old.no_such_name  # noqa: B018


def test_fit_to_latency_rescales_the_cap_until_the_measured_plan_meets_the_budget(monkeypatch):
    """A runtime 30% slower than the table: the first plan misses the target, the cap is scaled
    by target / measured and the re-solved plan meets it; the checks are kept in the plan."""
    from squeezer import layer_timing
    from squeezer.errors import InfeasibleBudgetError

    def plan_for(cap):  # a stand-in ILP: predicted latency == the cap
        return Plan({"fc": LayerQuant(bits=8)}, meta={"achieved": {"latency_ms": cap}})

    monkeypatch.setattr(layer_timing, "exported_latency", lambda qm, ex, **kw: 1.3 * qm)
    build = lambda p: p.meta["achieved"]["latency_ms"]  # noqa: E731  (the "model": its prediction)
    got = layer_timing.fit_to_latency(plan_for(10.0), 10.0, plan_for, build, None)
    checks = got.meta["latency_checks"]
    assert [round(c["measured_ms"], 6) for c in checks] == [13.0, 10.0]
    assert got.meta["measured_latency_ms"] == pytest.approx(10.0)

    # never met (the runtime always 2x over, solves fail below a floor): the fastest tried
    def floor(cap):
        if cap < 6:
            raise InfeasibleBudgetError("no")
        return plan_for(cap)

    monkeypatch.setattr(layer_timing, "exported_latency", lambda qm, ex, **kw: 2 * qm)
    got = layer_timing.fit_to_latency(plan_for(10.0), 10.0, floor, build, None)
    assert got.meta["measured_latency_ms"] == pytest.approx(20.0)
    assert len(got.meta["latency_checks"]) == 1
    # with the table's floor known, the scaled cap (5) stops at it and the fastest plan is
    # checked too, once (the next scaling would fall below the floor again)
    got = layer_timing.fit_to_latency(plan_for(10.0), 10.0, floor, build, None, floor_ms=6.0)
    assert [round(c["cap_ms"], 6) for c in got.meta["latency_checks"]] == [10.0, 6.0]
    assert got.meta["measured_latency_ms"] == pytest.approx(12.0)


# --------------------------------------------------------------------------------------------------
# Bits and sparsity under one budget (plan_joint)


def _joint_problem(seed: int):
    g = np.random.default_rng(seed)
    pairs = [(b, r) for b in (2, 4, 8) for r in (0.0, 0.5, 0.75)]
    omega = {f"l{i}": {c: float(g.uniform(0, 1) / c[0] + g.uniform(0, 1) * c[1]) for c in pairs}
             for i in range(4)}  # fmt: skip
    size = {k: {c: float(g.uniform(50, 150)) * c[0] * (1 - c[1] / 2) for c in pairs}
            for k in omega}  # fmt: skip
    return omega, size


@pytest.mark.parametrize("seed", range(4))
def test_plan_joint_matches_brute_force_and_beats_restricted(seed):
    from squeezer.plan import plan_joint

    omega, size = _joint_problem(seed)
    layers = list(omega)
    cap = 0.45 * sum(max(row.values()) for row in size.values())
    best = min(
        (sum(omega[k][c] for k, c in zip(layers, combo, strict=True)), combo)
        for combo in itertools.product(*(list(omega[k]) for k in layers))
        if sum(size[k][c] for k, c in zip(layers, combo, strict=True)) <= cap
    )
    jp = plan_joint(omega, size, cap + 10, fixed_bytes=10)
    assert jp.omega == pytest.approx(best[0], rel=1e-9)
    assert jp.size_bytes <= cap + 10 + 1e-6
    for allowed in (lambda c: c[1] == 0, lambda c: c[0] == 8):
        try:
            restricted = plan_joint(omega, size, cap + 10, fixed_bytes=10, allowed=allowed)
        except InfeasibleBudgetError:
            continue
        assert all(allowed(c) for c in restricted.choices.values())
        assert jp.omega <= restricted.omega + 1e-12


def test_plan_joint_infeasible_names_smallest_size():
    from squeezer.plan import plan_joint

    omega, size = _joint_problem(0)
    least = sum(min(row.values()) for row in size.values())
    with pytest.raises(InfeasibleBudgetError, match=r"smallest allowed size is \d+B"):
        plan_joint(omega, size, least - 1)
