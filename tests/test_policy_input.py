"""Bad policy and schedule params and bad policy states, in the API (the same code builds the DeepSpeed
"scheduler" entry and check-config): each gets a clear error, never a silent wrong learning rate. Every row
asserts the message, not only the exception.

``SCHEMA``: policy entries with wrong types or non-finite numbers; ``STATES``: a state loaded into another policy.
"""
from __future__ import annotations

import math

import pytest

from scaling_plugins import AdaScale, build_policy

INF = float("inf")

SCHEMA = [  # (id, policy entry, fragment of the error message)
    ("scale Infinity", {"type": "AdaScale", "params": {"scale": INF}},
     "params: scale = inf (float): must be a finite number"),
    ("scale NaN", {"type": "LinearScaling", "params": {"scale": math.nan}},
     "params: scale = nan (float): must be a finite number"),
    ("AutoWU warmup_max_lr Infinity", {"type": "AutoWU", "params": {"total_num_steps": 10, "warmup_max_lr": INF}},
     "params: warmup_max_lr = inf (float): must be a finite number"),
    ("scale as a string", {"type": "AdaScale", "params": {"scale": "8"}},
     "params: scale = '8' (str): must be a finite number"),
    ("smoothing as a string", {"type": "AdaScale", "params": {"smoothing": "0.9"}},
     "params: smoothing = '0.9' (str): must be a finite number"),
    ("total_num_steps as a string", {"type": "LEGW", "params": {"total_num_steps": "100"}},
     "params: total_num_steps = '100' (str): must be a finite number"),
    ("schedule gamma as a string", {"type": "AdaScale", "params": {"schedule": {"type": "exponential", "gamma": "0.9"}}},
     "schedule 'exponential': gamma = '0.9' (str): must be a finite number"),
    ("schedule params a list", {"type": "AdaScale", "params": {"schedule": {"type": "cosine", "params": [100]}}},
     "schedule.params must be a mapping of parameter name to value, got [100]"),
    ("milestones with a string", {"type": "SqrtScaling",
                                  "params": {"schedule": {"type": "multistep", "milestones": [10, "20"]}}},
     "milestones = [10, '20'] (list): must be a list of finite numbers"),
    ("single_gradient not a string", {"type": "AdaScale", "params": {"single_gradient": 1}},
     "single_gradient = 1 (int): must be a string"),
    ("params a list", {"type": "AdaScale", "params": [1]}, "params must be a mapping, got [1]"),
]


@pytest.mark.parametrize("spec, message", [row[1:] for row in SCHEMA], ids=[row[0] for row in SCHEMA])
def test_schema_refuses_wrong_types_and_non_finite_numbers(spec, message):
    with pytest.raises(ValueError) as err:
        build_policy(spec)
    assert message in str(err.value)


def test_the_api_checks_types_the_same_way():
    with pytest.raises(ValueError, match=r"scale = inf \(float\): must be a finite number"):
        AdaScale(scale=INF)


STATES = [  # (id, policy loading, state saved by, fragment)
    ("AdaScale state into LinearScaling", "LinearScaling", "AdaScale",
     "this state was saved by policy 'AdaScale', not 'LinearScaling'"),
    ("LinearScaling state into AdaScale", "AdaScale", "LinearScaling",
     "this state was saved by policy 'LinearScaling', not 'AdaScale'"),
]


@pytest.mark.parametrize("loader, saver, message", [row[1:] for row in STATES], ids=[row[0] for row in STATES])
def test_state_of_another_policy_is_refused(loader, saver, message):
    saved = build_policy(saver).state_dict()
    with pytest.raises(ValueError) as err:
        build_policy(loader).load_state_dict(saved)
    assert message in str(err.value)


def test_state_without_format_version_is_refused():
    state = build_policy("AdaScale").state_dict()
    del state["format"]
    with pytest.raises(ValueError, match="not a scaling_plugins policy state \\(no 'policy' name and 'format'"):
        build_policy("AdaScale").load_state_dict(state)
