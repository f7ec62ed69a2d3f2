"""AdaScale as a policy, without an engine: learning rate, progress, budget, fallback, state, validation."""

import pytest

from scaling_plugins import AdaScale, GradientSample, ScalingWarning, StepObservation, build_policy
from scaling_plugins.policies import POLICIES


def observe(policy, L, T, n):
    policy.step(StepObservation(gradients=GradientSample(L, T, n)))


def test_lr_is_base_times_gain_times_schedule_at_progress_before_the_step():
    policy = AdaScale(schedule=lambda t: 1.0 / (1.0 + t), smoothing=0.0)
    policy.configure(world_size=2, accumulation_steps=1)
    observe(policy, 8.0, 3.0, 2)                       # gain 4/3, τ was 0
    assert policy.gain == pytest.approx(4 / 3)
    assert policy.learning_rate(0.3) == pytest.approx(0.3 * 4 / 3 * 1.0)
    assert policy.progress == pytest.approx(4 / 3)
    observe(policy, 12.0, 2.0, 2)                      # gain 2, τ was 4/3
    assert policy.learning_rate(0.3) == pytest.approx(0.3 * 2 / (1 + 4 / 3))
    assert policy.progress == pytest.approx(4 / 3 + 2)
    assert policy.steps == 2


def test_done_once_progress_reaches_the_budget():
    policy = AdaScale(total_num_steps=5, smoothing=0.0)
    policy.configure(2, 1)
    steps = 0
    while not policy.done:
        observe(policy, 12.0, 2.0, 2)                  # gain 2 every step
        steps += 1
    assert steps == 3 and policy.progress == 6.0


def test_scale_defaults_to_workers_times_accumulation_and_may_be_set():
    policy = AdaScale()
    policy.configure(world_size=4, accumulation_steps=3)
    assert policy.scale == 12
    policy = AdaScale(scale=6)
    policy.configure(world_size=2, accumulation_steps=1)
    assert policy.scale == 6


def test_single_gradient_falls_back_to_unit_gain_with_one_warning():
    policy = AdaScale()
    policy.configure(1, 1)
    with pytest.warns(ScalingWarning, match="no measurable variance") as shown:
        for _ in range(3):
            observe(policy, 5.0, 5.0, 1)
    assert policy.gain == 1.0 and policy.progress == 3.0
    assert len(shown) == 1


def test_single_gradient_without_fallback_is_refused():
    with pytest.raises(ValueError, match="needs >= 2 gradients"):
        AdaScale(single_gradient="error").configure(1, 1)


def test_resume_reproduces_learning_rates_bit_for_bit():
    samples = [(9.0 + i % 3, 1.0 + 0.1 * (i % 5), 4) for i in range(20)]
    full = AdaScale(schedule={"type": "cosine", "total_num_steps": 30})
    full.configure(4, 1)
    lrs = []
    for s in samples:
        observe(full, *s)
        lrs.append(full.learning_rate(0.1))
    first = AdaScale(schedule={"type": "cosine", "total_num_steps": 30})
    first.configure(4, 1)
    for s in samples[:7]:
        observe(first, *s)
    resumed = AdaScale(schedule={"type": "cosine", "total_num_steps": 30})
    resumed.configure(4, 1)
    resumed.load_state_dict(first.state_dict())
    assert resumed.learning_rate(0.1) == lrs[6]
    for s, expected in zip(samples[7:], lrs[7:]):
        observe(resumed, *s)
        assert resumed.learning_rate(0.1) == expected


def test_missing_gradient_sample_is_an_error_not_a_silent_gain():
    policy = AdaScale()
    policy.configure(2, 1)
    with pytest.raises(ValueError, match="needs gradient norms"):
        policy.step(StepObservation())


@pytest.mark.parametrize("params, message", [
    ({"scale": 0.5}, "scale must be >= 1"),
    ({"smoothing": 1.0}, r"smoothing must lie in \[0, 1\)"),
    ({"total_num_steps": 0}, "total_num_steps must be > 0"),
    ({"single_gradient": "zero"}, "single_gradient must be one of"),
    ({"schedule": "nope"}, "valid:"),
])
def test_bad_parameters_are_refused_naming_the_key(params, message):
    with pytest.raises(ValueError, match=message):
        build_policy({"type": "AdaScale", "params": params})


def test_registry_builds_by_name_and_lists_valid_names_for_unknown_ones():
    assert "AdaScale" in POLICIES
    assert isinstance(build_policy("AdaScale"), AdaScale)
    assert isinstance(build_policy({"type": "AdaScale", "params": {}}), AdaScale)
    with pytest.raises(ValueError, match=r"unknown policy 'AdaScal'; valid policies: \[.*'AdaScale'"):
        build_policy("AdaScal")


def test_unknown_parameter_key_lists_the_allowed_ones():
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['scal'\] for AdaScale; allowed: \[.*'scale'"):
        build_policy({"type": "AdaScale", "params": {"scal": 2}})
    with pytest.raises(ValueError, match=r"unknown keys \['param'\]"):
        build_policy({"type": "AdaScale", "param": {}})
