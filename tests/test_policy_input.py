"""Bad policy and schedule params and bad policy states, in the API (the same code builds the DeepSpeed
"scheduler" entry and check-config): each gets a clear error, never a silent wrong learning rate. Every row
asserts the message, not only the exception.

``SCHEMA``: policy entries with wrong types or non-finite numbers; ``STATES``: a state loaded into another policy, or
a damaged one (a missing entry, a wrong type, a non-finite number, nested entries such as ``statistics`` included),
refused whole before anything changes.
"""
from __future__ import annotations

import math

import pytest

from scaling_plugins import AdaScale, GradientSample, StepObservation, build_policy
from scaling_plugins.stats import GradientStatistics

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


DELETE = object()   # in a state's changes: remove the entry


def saved_state(saver) -> dict:
    """The state of policy ``saver`` (a name, or ``(name, {entry path: new value or DELETE})``) after 3 steps at
    2 workers × 2 micro-batches, with the changes applied (``"statistics.scale"`` is an entry of an entry)."""
    name, changes = (saver, {}) if isinstance(saver, str) else saver
    policy = build_policy({"type": name, "params": {"total_num_steps": 10}})
    policy.configure(2, 2)
    for step in range(3):
        policy.step(StepObservation(GradientSample(local_sq_sum=8.0 + step, mean_sq_norm=1.0, count=4), loss=1.0))
    state = policy.state_dict()
    for path, value in changes.items():
        *parents, key = path.split(".")
        entry = state
        for parent in parents:
            entry = entry[parent]
        if value is DELETE:
            del entry[key]
        else:
            entry[key] = value
    return state


STATES = [  # (id, policy loading, state saved by (a name, or (name, changes to its state)), fragment)
    ("AdaScale state into LinearScaling", "LinearScaling", "AdaScale",
     "this state was saved by policy 'AdaScale', not 'LinearScaling'"),
    ("LinearScaling state into AdaScale", "AdaScale", "LinearScaling",
     "this state was saved by policy 'LinearScaling', not 'AdaScale'"),
    ("progress NaN", "AdaScale", ("AdaScale", {"progress": math.nan}),
     "policy state: progress = nan: must be a finite number >= 0 (the state is damaged or was edited: load the "
     "dict state_dict() returned, unchanged)"),
    ("progress Infinity", "LinearScaling", ("LinearScaling", {"progress": INF}),
     "policy state: progress = inf: must be a finite number >= 0"),
    ("statistics without scale", "AdaScale", ("AdaScale", {"statistics.scale": DELETE}),
     "policy state: statistics has no 'scale' entry (it has ['last_update_skipped', 'mu_sq', 'sigma_sq']; the "
     "state is damaged or was edited"),
    ("statistics sigma_sq NaN", "AdaScale", ("AdaScale", {"statistics.sigma_sq.raw": math.nan}),
     "policy state: statistics.sigma_sq.raw = nan: must be a finite number (the state"),
    ("statistics not a mapping", "AdaScaleAdam", ("AdaScaleAdam", {"statistics": 1.0}),
     "policy state: statistics = 1.0: must be a mapping with ['last_update_skipped', 'mu_sq', 'scale', 'sigma_sq']"),
    ("gain missing", "AdaScale", ("AdaScale", {"gain": DELETE}), "policy state has no 'gain' entry"),
    ("steps as a string", "LinearScaling", ("LinearScaling", {"steps": "3"}),
     "policy state: steps = '3': must be an integer >= 0"),
    ("world_size 0", "LEGW", ("LEGW", {"world_size": 0}), "policy state: world_size = 0: must be an integer >= 1"),
    ("AdaptiveBatch noise NaN", "AdaptiveBatch", ("AdaptiveBatch", {"noise.mu_sq.weight": math.nan}),
     "policy state: noise.mu_sq.weight = nan: must be a finite number >= 0"),
    ("AdaptiveBatch stepped scale NaN", "AdaptiveBatch", ("AdaptiveBatch", {"stepped": [2, 2, math.nan]}),
     "policy state: stepped[2] = nan: must be a finite number >= 1"),
    ("AutoWU unknown phase", "AutoWU", ("AutoWU", {"phase": "cooldown"}),
     "policy state: phase = 'cooldown': must be one of ['warmup', 'decay']"),
    ("AutoWU decay without a switch step", "AutoWU", ("AutoWU", {"phase": "decay"}),
     "policy state: phase = 'decay' needs switch_step and peak_lr, got None and None"),
    ("AutoWU lr Infinity", "AutoWU", ("AutoWU", {"lr": INF}), "policy state: lr = inf: must be a finite number >= 0"),
]


@pytest.mark.parametrize("loader, saver, message", [row[1:] for row in STATES], ids=[row[0] for row in STATES])
def test_a_state_the_policy_cannot_load_is_refused_and_changes_nothing(loader, saver, message):
    saved = saved_state(saver)
    policy = build_policy({"type": loader, "params": {"total_num_steps": 10}})
    policy.configure(2, 2)
    before = policy.state_dict()
    with pytest.raises(ValueError) as err:
        policy.load_state_dict(saved)
    assert message in str(err.value)
    assert policy.state_dict() == before   # checked whole before anything changed: not half-loaded


def test_state_without_format_version_is_refused():
    state = build_policy("AdaScale").state_dict()
    del state["format"]
    with pytest.raises(ValueError, match="not a scaling_plugins policy state \\(no 'policy' name and 'format'"):
        build_policy("AdaScale").load_state_dict(state)


def test_a_driver_state_given_to_the_policy_is_named():
    driver_state = {"policy": build_policy("AdaScale").state_dict(), "base_lrs": [0.1]}
    with pytest.raises(ValueError) as err:
        build_policy("AdaScale").load_state_dict(driver_state)
    assert ("got keys ['base_lrs', 'policy']: this is a driver's state (driver.state_dict(), with 'policy' and "
            "'base_lrs'); pass it to driver.load_state_dict(), or its 'policy' entry here") in str(err.value)


def test_a_damaged_statistics_state_is_refused_before_any_change():
    statistics = GradientStatistics(4.0)
    statistics.update(GradientSample(local_sq_sum=9.0, mean_sq_norm=1.0, count=4))
    before = statistics.state_dict()
    damaged = {**before, "scale": 8.0, "mu_sq": {"raw": 1.0}}
    with pytest.raises(ValueError) as err:
        statistics.load_state_dict(damaged)
    assert "statistics state: mu_sq has no 'weight' entry" in str(err.value)
    assert statistics.state_dict() == before
