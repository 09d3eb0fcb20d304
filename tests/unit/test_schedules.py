import json
import math

import pytest

from mtp_plugin.core import (
    ConstantLambda,
    CosineLambda,
    LinearLambda,
    PiecewiseLambda,
    deepseek_v3_lambda,
    schedule_from_state_dict,
    schedule_state_dict,
)


def test_constant():
    assert ConstantLambda(value=0.25)(0) == 0.25
    assert ConstantLambda(value=0.25)(10**15) == 0.25


def test_deepseek_v3_boundary_belongs_to_later_piece():
    s = deepseek_v3_lambda()
    assert s(0) == 0.3
    assert s(10 * 10**12 - 1) == 0.3
    assert s(10 * 10**12) == 0.1
    assert s(10 * 10**12 + 1) == 0.1
    assert s(14.8e12) == 0.1


def test_piecewise_several_boundaries():
    s = PiecewiseLambda(boundaries_tokens=(100, 200), values=(0.5, 0.3, 0.1))
    assert [s(t) for t in (0, 99, 100, 199, 200, 10**9)] == [0.5, 0.5, 0.3, 0.3, 0.1, 0.1]


def test_linear_endpoints_and_midpoint():
    s = LinearLambda(start_value=0.3, end_value=0.1, start_tokens=1000, end_tokens=3000)
    assert s(0) == 0.3 and s(1000) == 0.3
    assert math.isclose(s(2000), 0.2)
    assert math.isclose(s(1500), 0.25)
    assert s(3000) == 0.1 and s(10**9) == 0.1


def test_cosine_endpoints_and_midpoint():
    s = CosineLambda(start_value=0.3, end_value=0.1, start_tokens=0, end_tokens=100)
    assert math.isclose(s(0), 0.3)
    assert math.isclose(s(50), 0.2)
    assert math.isclose(s(25), 0.1 + 0.2 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert math.isclose(s(100), 0.1) and math.isclose(s(101), 0.1)


@pytest.mark.parametrize(
    "schedule",
    [
        ConstantLambda(value=0.2),
        deepseek_v3_lambda(switch_tokens=5e6),
        LinearLambda(start_value=0.3, end_value=0.0, start_tokens=10, end_tokens=20),
        CosineLambda(start_value=1.0, end_value=0.1, start_tokens=0, end_tokens=7),
    ],
)
def test_state_dict_round_trip_through_json(schedule):
    restored = schedule_from_state_dict(json.loads(json.dumps(schedule_state_dict(schedule))))
    assert restored == schedule
    assert [restored(t) for t in range(0, 30, 3)] == [schedule(t) for t in range(0, 30, 3)]


def test_unknown_kind_in_state_dict():
    with pytest.raises(ValueError, match="unknown λ schedule kind 'step'"):
        schedule_from_state_dict({"kind": "step", "value": 0.1})
