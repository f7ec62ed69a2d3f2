"""Base schedules as pure functions of progress, and building them from config entries."""
import math

import pytest

from scaling_plugins.schedules import (SCHEDULES, build_schedule, constant, cosine, exponential, linear_warmup,
                                       multi_step, polynomial, step_decay)


def test_values_at_chosen_points():
    assert constant(0.5)(123.0) == 0.5
    assert step_decay(10, 0.5)(9.9) == 1.0 and step_decay(10, 0.5)(20.0) == 0.25
    assert multi_step([30, 60], 0.1)(29.0) == 1.0
    assert multi_step([30, 60], 0.1)(45.0) == pytest.approx(0.1)
    assert multi_step([30, 60], 0.1)(61.5) == pytest.approx(0.01)
    assert exponential(0.9)(2.0) == pytest.approx(0.81)
    assert cosine(100)(50.0) == pytest.approx(0.5)
    assert cosine(100)(150.0) == pytest.approx(0.0)
    assert cosine(100, cos_min_ratio=0.1)(100.0) == pytest.approx(0.1)
    assert polynomial(100, power=2)(50.0) == pytest.approx(0.25)


def test_linear_warmup_ramps_into_the_following_schedule():
    sched = linear_warmup(10, warmup_min_ratio=0.0, after=cosine(110))
    assert sched(0.0) == 0.0
    assert sched(5.0) == pytest.approx(0.5 * cosine(110)(10.0))
    assert sched(60.0) == pytest.approx(cosine(110)(60.0))
    assert linear_warmup(0, after="constant")(0.0) == 1.0


def test_progress_may_be_fractional_as_adascale_advances_it_by_the_gain():
    assert math.isclose(exponential(0.5)(1.5), 0.5 ** 1.5)


def test_build_from_names_mappings_and_callables():
    assert build_schedule(None)(7.0) == 1.0
    assert build_schedule("constant")(3.0) == 1.0
    assert build_schedule({"type": "cosine", "total_num_steps": 10})(5.0) == pytest.approx(0.5)
    assert build_schedule({"type": "cosine", "params": {"total_num_steps": 10}})(10.0) == pytest.approx(0.0)
    nested = build_schedule({"type": "linear_warmup", "warmup_num_steps": 4,
                             "after": {"type": "exponential", "gamma": 0.5}})
    assert nested(2.0) == pytest.approx(0.5 * 0.5 ** 4)
    assert build_schedule(lambda t: 2 * t)(3.0) == 6.0
    assert set(SCHEDULES) >= {"constant", "step", "multistep", "exponential", "cosine", "polynomial", "linear_warmup"}


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"'cosin'.*valid: \[.*'cosine'"):
        build_schedule("cosin")


def test_bad_parameters_name_the_key():
    with pytest.raises(ValueError, match="total_num_steps must be > 0"):
        build_schedule({"type": "cosine", "total_num_steps": 0})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['total_steps'\].*allowed: "
                                         r"\['cos_min_ratio', 'total_num_steps'\]"):
        build_schedule({"type": "cosine", "total_steps": 5})     # the old name is refused, naming the new one
    with pytest.raises(ValueError, match="bad parameters"):      # a required one missing
        build_schedule({"type": "cosine"})
