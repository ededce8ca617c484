import pytest

from squeezer.config import Budget, LayerQuant, Plan
from squeezer.errors import ConfigError


def test_plan_json_round_trip(tmp_path):
    p = Plan(
        {
            "conv1": LayerQuant(bits=4, act_bits=8),
            "fc": LayerQuant(
                bits=3, granularity="group", group_size=16, symmetric=False, observer="mse"
            ),
            "emb": LayerQuant(bits=32),
        },
        meta={"method": "hessian", "budget": "bits=4", "predicted": 0.25},
    )
    assert Plan.from_json(p.to_json()) == p
    p.save(tmp_path / "plan.json")
    assert Plan.load(tmp_path / "plan.json") == p


@pytest.mark.parametrize(
    "text,expected",
    [
        ("bits=4.5", Budget(bits=4.5)),
        ("size=1.2MB", Budget(size_bytes=1.2e6)),
        ("size=300kB,bits=4", Budget(size_bytes=3e5, bits=4)),
        ("size=2MiB", Budget(size_bytes=2 * 2**20)),
        ("latency=3ms", Budget(latency_ms=3)),
        ("bops=2e9", Budget(bops=2e9)),
        ("size=0.5r", Budget(size_bytes=0.5, relative=("size_bytes",))),
    ],
)
def test_budget_parse(text, expected):
    assert Budget.parse(text) == expected
    assert Budget.from_dict(expected.to_dict()) == expected


@pytest.mark.parametrize(
    "text,msg",
    [
        ("speed=3", "unknown budget key"),
        ("bits", "KEY=VALUE"),
        ("size=big", "cannot read size"),
        ("bits=-1", "positive"),
        ("", "empty budget"),
        ("size=2r", "fraction"),
    ],
)
def test_budget_errors(text, msg):
    with pytest.raises(ConfigError, match=msg):
        Budget.parse(text)


def test_layerquant_validation():
    with pytest.raises(ConfigError):
        LayerQuant(bits=1)
    with pytest.raises(ConfigError):
        LayerQuant(granularity="group")
    with pytest.raises(ConfigError):
        LayerQuant.from_dict({"bits": 4, "colour": "red"})
