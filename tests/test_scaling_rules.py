"""LinearScaling, SqrtScaling and LEGW: the ladder, trajectories over every base schedule, k, errors, resume."""
from __future__ import annotations

import copy
import math

import pytest

from scaling_plugins import schedules
from scaling_plugins.policies import LEGW, POLICIES, LinearScaling, SqrtScaling, StepObservation, build_policy

BASE_LR = 0.1
BASE_SCHEDULES = {
    "polynomial": {"type": "polynomial", "total_num_steps": 4000, "power": 2.0},
    "exponential": {"type": "exponential", "gamma": 0.999},
    "multistep": {"type": "multistep", "milestones": [600, 1200], "gamma": 0.1},
    "cosine": {"type": "cosine", "total_num_steps": 4000},
}


def trajectory(policy, steps: int, world: int = 1, accumulation: int = 1) -> list[tuple[float, float]]:
    """(progress τ at which the step's lr was fixed, lr) for each step."""
    policy.configure(world, accumulation)
    out = []
    for _ in range(steps):
        tau = policy.progress
        policy.step(StepObservation())
        out.append((tau, policy.learning_rate(BASE_LR)))
    return out


@pytest.mark.parametrize("k", [1, 2, 4, 8, 16])
def test_legw_ladder_on_constant_schedule(k):
    """At k·B0 the peak is √k·lr and the warmup lasts k·W0 base-scale steps (= W0 optimizer steps)."""
    w0 = 20
    lrs = trajectory(LEGW(scale=k, warmup_num_steps=w0), 3 * w0)
    peak = max(lr for _, lr in lrs)
    assert peak == pytest.approx(BASE_LR * math.sqrt(k), rel=1e-12)
    first_at_peak = next(i for i, (_, lr) in enumerate(lrs) if lr == pytest.approx(peak, rel=1e-12))
    assert first_at_peak == w0                      # optimizer steps of warmup: the same at every k
    assert lrs[first_at_peak][0] == k * w0          # base-scale steps (epochs) of warmup: × k
    assert lrs[0][1] == 0.0                         # LEGW's warmup starts from 0
    ramp = [lr for _, lr in lrs[:w0 + 1]]
    assert ramp == pytest.approx([peak * i / w0 for i in range(w0 + 1)], rel=1e-12)


def test_legw_each_doubling_multiplies_peak_by_sqrt2_and_warmup_epochs_by_2():
    rungs = [LEGW(scale=2 ** j, warmup_num_steps=10) for j in range(6)]
    for small, big in zip(rungs, rungs[1:]):
        assert big.peak_factor / small.peak_factor == pytest.approx(math.sqrt(2), rel=1e-12)
        assert big.scaled_warmup_steps(big.scale) == 2 * small.scaled_warmup_steps(small.scale)


@pytest.mark.parametrize("name", sorted(BASE_SCHEDULES))
def test_legw_over_base_schedule(name):
    """After both warmups, the lr at the same epoch (same τ) is √2 higher on the rung with twice the batch,
    and it follows the base schedule scaled by √k."""
    base = schedules.build_schedule(BASE_SCHEDULES[name])
    w0 = 25
    small = dict(trajectory(LEGW(scale=2, schedule=BASE_SCHEDULES[name], warmup_num_steps=w0), 1000))
    big = dict(trajectory(LEGW(scale=4, schedule=BASE_SCHEDULES[name], warmup_num_steps=w0), 500))
    common = [tau for tau in big if tau >= 4 * w0 and tau in small]
    assert len(common) > 100
    for tau in common:
        assert big[tau] == pytest.approx(math.sqrt(2) * small[tau], rel=1e-12)
        assert big[tau] == pytest.approx(BASE_LR * 2 * base(tau), rel=1e-12)
    assert max(big.values()) > max(small.values())


@pytest.mark.parametrize("name", sorted(BASE_SCHEDULES))
def test_linear_scaling_with_gradual_warmup(name):
    """Goyal et al.: k defaults to workers × accumulation = 8; linear warmup from the base rate to 8× it over
    W base-scale steps, then 8 × the base schedule."""
    base = schedules.build_schedule(BASE_SCHEDULES[name])
    warmup = 400
    policy = LinearScaling(schedule=BASE_SCHEDULES[name], warmup_num_steps=warmup)
    lrs = trajectory(policy, 300, world=4, accumulation=2)
    assert policy.scale == 8
    end = base(warmup)
    for tau, lr in lrs:
        if tau < warmup:
            expected = BASE_LR * (1 + (8 - 1) * tau / warmup) * end
        else:
            expected = BASE_LR * 8 * base(tau)
        assert lr == pytest.approx(expected, rel=1e-12)
    assert lrs[0][1] == pytest.approx(BASE_LR * end, rel=1e-12)   # starts at the base rate
    assert [tau for tau, _ in lrs[:3]] == [0, 8, 16]                # τ advances by k per step


@pytest.mark.parametrize("name", sorted(BASE_SCHEDULES))
def test_sqrt_scaling_over_base_schedule(name):
    base = schedules.build_schedule(BASE_SCHEDULES[name])
    for tau, lr in trajectory(SqrtScaling(scale=9, schedule=BASE_SCHEDULES[name]), 200):
        assert lr == pytest.approx(BASE_LR * 3 * base(tau), rel=1e-12)


def test_sqrt_scaling_warmup_starts_at_base_rate():
    lrs = trajectory(SqrtScaling(scale=4, warmup_num_steps=40), 30)
    assert lrs[0][1] == pytest.approx(BASE_LR)
    assert lrs[5][1] == pytest.approx(BASE_LR * (1 + (2 - 1) * 20 / 40))
    assert lrs[10][1] == pytest.approx(2 * BASE_LR)


def test_k_from_batch_sizes_and_from_run_shape():
    policy = LinearScaling(base_batch=256, micro_batch_size=64)
    policy.configure(8, 2)                       # 16 micro-batches of 64 = 1024 = 4 × 256
    assert policy.scale == 4
    policy = SqrtScaling()
    policy.configure(3, 2)
    assert policy.scale == 6
    policy.configure(5, 1)                       # elastic change: k follows the run's shape
    assert policy.scale == 5 and policy.peak_factor == pytest.approx(math.sqrt(5))
    policy = LEGW(scale=2.5)
    policy.configure(16, 4)                      # user-set k wins
    assert policy.scale == 2.5


@pytest.mark.parametrize("cls", [LinearScaling, SqrtScaling, LEGW])
def test_resume_reproduces_the_trajectory(cls):
    params = {"schedule": BASE_SCHEDULES["cosine"], "warmup_num_steps": 300}
    full = cls(**params)
    uninterrupted = trajectory(full, 200, world=4)
    first = cls(**params)
    trajectory(first, 37, world=4)
    state = copy.deepcopy(first.state_dict())
    resumed = cls(**params)
    resumed.configure(4, 1)
    resumed.load_state_dict(state)
    assert resumed.learning_rate(BASE_LR) == uninterrupted[36][1]
    rest = trajectory(resumed, 200 - 37, world=4)
    assert rest == uninterrupted[37:]


def test_done_after_budget_in_base_scale_steps():
    policy = LinearScaling(total_num_steps=100)
    policy.configure(4, 1)
    for _ in range(24):
        policy.step(StepObservation())
    assert not policy.done
    policy.step(StepObservation())
    assert policy.done and policy.progress == 100


def test_registered_and_built_from_config():
    for name in ("LinearScaling", "SqrtScaling", "LEGW"):
        assert name in POLICIES
    policy = build_policy({"type": "LEGW", "params": {"scale": 4, "warmup_num_steps": 5,
                                                      "schedule": {"type": "polynomial", "total_num_steps": 100}}})
    assert isinstance(policy, LEGW) and policy.peak_factor == 2


@pytest.mark.parametrize("params, message", [
    ({"scale": 0.5}, r"scale \(k\) must be >= 1, got 0.5"),
    ({"scale": 2, "base_batch": 256, "micro_batch_size": 64}, "either scale or base_batch"),
    ({"base_batch": 0, "micro_batch_size": 64}, "must be > 0"),
    ({"warmup_num_steps": -1}, "warmup_num_steps must be >= 0, got -1"),
    ({"warmup_start_factor": 2.0}, r"warmup_start_factor must lie in \[0, 1\], got 2.0"),
    ({"total_num_steps": 0}, "total_num_steps must be > 0"),
    ({"schedule": "cosinus"}, r"schedule.type='cosinus' is not a known schedule; valid: \[.*'cosine', .*'polynomial'"),
    ({"warmup_epochs": 5}, r"unknown key\(s\) \['warmup_epochs'\] for LinearScaling; allowed: \["),
])
def test_bad_parameters_are_rejected_with_the_key_and_what_is_allowed(params, message):
    with pytest.raises(ValueError, match=message):
        build_policy({"type": "LinearScaling", "params": params})


@pytest.mark.parametrize("cls", [LinearScaling, SqrtScaling, LEGW])
def test_base_batch_alone_takes_the_engines_micro_batch_size(cls):
    """DeepSpeed calls set_micro_batch_size(train_micro_batch_size_per_gpu) before configure: k = m × n / B0."""
    policy = build_policy({"type": cls.__name__, "params": {"base_batch": 128}})
    policy.set_micro_batch_size(32)
    policy.configure(4, 2)                       # 8 micro-batches of 32 = 256 = 2 × 128
    assert policy.micro_batch_size == 32 and policy.scale == 2
    given = cls(base_batch=128, micro_batch_size=32)
    given.set_micro_batch_size(32)               # the same as the engine's: fine
    given.configure(4, 2)
    assert given.scale == 2
    unscaled = cls()
    unscaled.set_micro_batch_size(32)            # without base_batch the micro-batch does not change k
    unscaled.configure(4, 2)
    assert unscaled.scale == 8


def test_a_micro_batch_size_other_than_the_engines_is_refused():
    policy = LinearScaling(base_batch=128, micro_batch_size=16)
    with pytest.raises(ValueError, match=r"^micro_batch_size = 16 but the engine's micro-batch is 32 "
                                         r"\(train_micro_batch_size_per_gpu\): leave micro_batch_size out or make "
                                         r"them equal$"):
        policy.set_micro_batch_size(32)


@pytest.mark.parametrize("cls", [LinearScaling, SqrtScaling, LEGW])
@pytest.mark.parametrize("params, message", [
    ({"base_batch": 256}, r"^base_batch = 256 is in samples, so micro_batch_size is needed too \(samples per "
                          r"micro-batch on each worker; DeepSpeed takes it from train_micro_batch_size_per_gpu\): "
                          r"base_batch and micro_batch_size go together$"),
    ({"micro_batch_size": 64}, r"^micro_batch_size = 64 without base_batch: base_batch and micro_batch_size go "
                               r"together \(k = micro_batch_size × workers × accumulation steps / base_batch\); "
                               r"give base_batch too, or leave micro_batch_size out$"),
])
def test_one_batch_size_without_the_other_is_refused_at_configure(cls, params, message):
    """Outside DeepSpeed nothing fills micro_batch_size: configure (what attach calls) refuses base_batch alone,
    before any step; a micro_batch_size given without base_batch would be unused, and is refused too."""
    policy = build_policy({"type": cls.__name__, "params": params})
    with pytest.raises(ValueError, match=message):
        policy.configure(2, 1)


def test_k_below_one_from_batch_sizes_is_rejected_at_configure():
    policy = SqrtScaling(base_batch=512, micro_batch_size=64)
    with pytest.raises(ValueError, match=r"k = 4 gradients × micro_batch_size / base_batch = 0.5 must be >= 1"):
        policy.configure(4, 1)


@pytest.mark.parametrize("rule, warmup, k", [("LEGW", 10, 16), ("LinearScaling", 100, 2)])
def test_a_scaled_warmup_that_does_not_fit_the_budget_is_refused(rule, warmup, k):
    with pytest.raises(ValueError, match=r"warmup_num_steps=\d+ is a warmup of \d+ base-scale steps at k=\d+, "
                                         r"not shorter than total_num_steps=100"):
        build_policy({"type": rule, "params": {"warmup_num_steps": warmup, "scale": k, "total_num_steps": 100}})


def test_the_demo_sizes_each_rules_base_warmup_to_a_tenth_of_the_budget_at_its_scale():
    from scaling_plugins.app.demo import demo_params

    for rule in ("LEGW", "LinearScaling", "SqrtScaling"):
        params = demo_params(rule, 200, 16)
        policy = build_policy({"type": rule, "params": {**params, "scale": 16, "total_num_steps": 200}})
        assert policy.scaled_warmup_steps(16) == pytest.approx(20)
