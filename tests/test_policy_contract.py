"""The contract every registered policy keeps, checked for each name in ``POLICIES`` with no per-policy code:
a policy registered later is tested here as soon as it is registered.

- its JSON config (``{"type": name, "params": {...}}`` as text) builds the same policy as the mapping;
- ``state_dict`` → ``torch.save``/``torch.load(weights_only=True)`` → ``load_state_dict`` into a fresh policy
  continues the learning-rate trajectory exactly;
- ``configure`` called twice with the same shape is the same as once;
- an unknown key is refused with every allowed key listed.
"""
from __future__ import annotations

import io
import json
import math
import warnings

import pytest
import torch

from scaling_plugins import POLICIES, GradientSample, StepObservation, build_policy
from scaling_plugins.config import allowed_keys

WORLD, ACCUMULATION, STEPS, RESUME_AT, BASE_LR = 2, 2, 40, 17, 0.1


def spec_of(name: str) -> dict:
    """The smallest config of policy ``name``: every default, and a budget where the policy takes one (some
    policies, AutoWU among them, need one)."""
    params = {"total_num_steps": STEPS} if "total_num_steps" in allowed_keys(POLICIES[name]) else {}
    return {"type": name, "params": params}


def observation(step: int) -> StepObservation:
    """A deterministic step: noisy gradient norms (n = WORLD × ACCUMULATION) and a loss that falls, then rises."""
    n = WORLD * ACCUMULATION
    mean_sq = 1.0 + 0.5 * math.sin(step)
    local = n * (mean_sq + 2.0 + math.cos(3 * step))
    loss = (step - 25) ** 2 / 100 + 0.05 * math.sin(7 * step)
    return StepObservation(gradients=GradientSample(local_sq_sum=local, mean_sq_norm=mean_sq, count=n), loss=loss)


def trajectory(policy, start: int, stop: int) -> list[float]:
    lrs = []
    for step in range(start, stop):
        policy.step(observation(step))
        lrs.append(policy.learning_rate(BASE_LR))
    return lrs


def configured(spec, times: int = 1):
    policy = build_policy(spec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # AdaScaleAdam warns that AdaScale was validated for SGD only
        for _ in range(times):
            policy.configure(WORLD, ACCUMULATION)
    return policy


@pytest.fixture(params=sorted(POLICIES))
def name(request) -> str:
    return request.param


def test_json_config_builds_the_same_policy(name):
    spec = spec_of(name)
    from_text = configured(json.loads(json.dumps(spec)))
    reference = trajectory(configured(spec), 0, STEPS)
    assert trajectory(from_text, 0, STEPS) == reference


def test_state_dict_round_trip_continues_the_trajectory(name):
    spec = spec_of(name)
    uninterrupted = configured(spec)
    reference = trajectory(uninterrupted, 0, STEPS)
    first = configured(spec)
    assert trajectory(first, 0, RESUME_AT) == reference[:RESUME_AT]
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = configured(spec)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.learning_rate(BASE_LR) == reference[RESUME_AT - 1]
    assert trajectory(resumed, RESUME_AT, STEPS) == reference[RESUME_AT:]
    assert (resumed.steps, resumed.progress) == (uninterrupted.steps, uninterrupted.progress)


def test_configure_twice_is_idempotent(name):
    spec = spec_of(name)
    once, twice = configured(spec), configured(spec, times=2)
    assert twice.state_dict() == once.state_dict()
    assert trajectory(twice, 0, STEPS) == trajectory(once, 0, STEPS)


def test_unknown_key_is_refused_with_the_allowed_keys(name):
    with pytest.raises(ValueError) as err:
        build_policy({"type": name, "params": {**spec_of(name)["params"], "no_such_key": 1}})
    message = str(err.value)
    assert "no_such_key" in message
    for key in allowed_keys(POLICIES[name]):
        assert key in message
