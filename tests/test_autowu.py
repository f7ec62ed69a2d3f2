"""AutoWU: warmup and decay trajectories, switch detection on synthetic loss curves, resume, errors."""
from __future__ import annotations

import builtins
import json
import math

import numpy as np
import pytest

from scaling_plugins.policies import AutoWU, StepObservation, build_policy

TOTAL, EPOCH = 1200, 20
MINIMUM = 300   # where the U-shaped curve bottoms out


def u_curve(seed: int = 1) -> np.ndarray:
    """Falls linearly from 2 to 0.5 at step MINIMUM, then rises quadratically; Gaussian noise 0.05."""
    t = np.arange(TOTAL)
    clean = np.where(t < MINIMUM, 2.0 - 1.5 * t / MINIMUM, 0.5 + 1.5 * ((t - MINIMUM) / MINIMUM) ** 2)
    return clean + 0.05 * np.random.default_rng(seed).standard_normal(TOTAL)


def decreasing_curve(seed: int, noise: float) -> np.ndarray:
    """A typical training loss: exponential decay toward 0.3, never rising."""
    t = np.arange(TOTAL)
    return 0.3 + 2 * np.exp(-t / 200) + noise * np.random.default_rng(seed).standard_normal(TOTAL)


def run(policy: AutoWU, losses, steps: int | None = None) -> list[float]:
    """Feed losses one step at a time; the learning rate of each step."""
    lrs = []
    for loss in losses[:steps]:
        policy.step(StepObservation(loss=float(loss)))
        lrs.append(policy.learning_rate(123.0))
    return lrs


@pytest.fixture(scope="module")
def u_run():
    policy = AutoWU(total_num_steps=TOTAL, steps_per_epoch=EPOCH)
    return policy, run(policy, u_curve())


def test_warmup_is_exponential_and_reaches_max_lr_at_the_cap():
    # steps_per_epoch = budget: no test ever runs during the warmup, so the cap decides.
    policy = AutoWU(total_num_steps=100, steps_per_epoch=100, warmup_min_lr=1e-4, warmup_max_lr=0.5,
                    warmup_num_steps=40)
    lrs = run(policy, np.linspace(1, 0, 100))
    assert lrs[0] == pytest.approx(1e-4)
    ratios = [b / a for a, b in zip(lrs[:40], lrs[1:41])]
    assert ratios == pytest.approx([(0.5 / 1e-4) ** (1 / 40)] * 40, rel=1e-9)
    assert lrs[40] == pytest.approx(0.5) and policy.switch_step == 40 and policy.peak_lr == 0.5
    assert max(lrs) == pytest.approx(0.5)


@pytest.mark.parametrize("decay_type", ["cos", "const-cos"])
def test_decay_reaches_exactly_zero_at_the_last_step(decay_type):
    total, cap = 200, 50
    policy = AutoWU(total_num_steps=total, steps_per_epoch=total, warmup_num_steps=cap, decay_type=decay_type)
    lrs = run(policy, np.ones(total))
    decay = lrs[cap:]
    assert lrs[-1] == 0.0 and all(x > 0 for x in lrs[:-1])
    assert all(b <= a for a, b in zip(decay, decay[1:]))
    assert policy.done
    last = total - 1
    if decay_type == "cos":
        t = 100
        assert lrs[t] == pytest.approx(0.5 * (1 + math.cos(math.pi * (t - cap) / (last - cap))))
    else:
        start = 0.8 * last
        assert lrs[cap:math.floor(start) + 1] == [1.0] * (math.floor(start) + 1 - cap)   # constant
        t = 180
        assert lrs[t] == pytest.approx(0.5 * (1 + math.cos(math.pi * (t - start) / (last - start))))


def test_switch_detected_after_the_loss_minimum(u_run):
    policy, lrs = u_run
    assert policy.phase == "decay"
    # The loss rises after step 300; 3 positive epochs of 20 steps are needed, so no switch before ~360,
    # and the rise is clear well before the cap (600).
    assert MINIMUM + 3 * EPOCH <= policy.switch_step + 1 <= MINIMUM + 8 * EPOCH
    assert (policy.switch_step + 1) % EPOCH == 0
    assert policy.last_test.positive and policy.last_test.probability > 0.95
    # Restart from the warmup lr at the smoothed loss's minimum, not from the lr at the switch.
    minimum = policy.last_test.minimum_index
    assert abs(minimum - MINIMUM) <= 2 * EPOCH
    assert policy.peak_lr == policy.warmup_lr(minimum) < policy.warmup_lr(policy.switch_step)
    assert lrs[policy.switch_step] == policy.peak_lr
    assert lrs[-1] == 0.0
    decay = lrs[policy.switch_step:]
    assert all(b <= a for a, b in zip(decay, decay[1:]))


@pytest.mark.parametrize("seed, noise", [(0, 0.02), (1, 0.1)])
def test_no_false_switch_on_a_decreasing_loss(seed, noise):
    policy = AutoWU(total_num_steps=TOTAL, steps_per_epoch=EPOCH, seed=seed)
    lrs = run(policy, decreasing_curve(seed, noise), steps=TOTAL // 2 + 1)
    assert policy.switch_step == TOTAL // 2                # only the cap ended the warmup
    assert policy.peak_lr == policy.warmup_max_lr == lrs[-1] == 1.0
    assert policy.last_test is not None and not policy.last_test.positive


def test_diverged_loss_counts_as_positive():
    losses = list(np.linspace(3, 1, 50)) + [float("nan")] * 100
    policy = AutoWU(total_num_steps=400, steps_per_epoch=10)
    run(policy, losses)
    assert policy.switch_step == 79          # epochs ending at steps 59, 69, 79 hold NaNs
    assert policy.peak_lr == policy.warmup_lr(49)


def test_resume_mid_warmup_makes_the_same_decision(u_run):
    reference, reference_lrs = u_run
    losses = u_curve()
    cut = reference.switch_step - EPOCH - 7     # mid-epoch, with a positive streak under way
    first = AutoWU(total_num_steps=TOTAL, steps_per_epoch=EPOCH)
    run(first, losses, steps=cut)
    assert first.phase == "warmup" and first.positive_streak >= 1
    state = json.loads(json.dumps(first.state_dict()))   # survives a JSON checkpoint
    assert len(state["losses"]) == cut and state["phase"] == "warmup"
    resumed = AutoWU(total_num_steps=TOTAL, steps_per_epoch=EPOCH)
    resumed.load_state_dict(state)
    assert resumed.learning_rate(123.0) == reference_lrs[cut - 1]
    rest = run(resumed, losses[cut:])
    assert resumed.switch_step == reference.switch_step and resumed.peak_lr == reference.peak_lr
    assert rest == reference_lrs[cut:]


def test_needs_the_loss():
    policy = AutoWU(total_num_steps=10)
    assert AutoWU.needs_loss
    with pytest.raises(ValueError, match=r"DDP driver.step\(loss\), Horovod opt.step\(loss=loss\), DeepSpeed "
                                         r"engine.backward\(loss\)"):
        policy.step(StepObservation())


def test_built_by_name_with_deepspeed_style_params():
    policy = build_policy({"type": "AutoWU", "params": {"total_num_steps": 1000, "warmup_min_lr": 1e-4,
                                                        "warmup_max_lr": 0.4, "decay_type": "const-cos"}})
    assert policy.warmup_num_steps == 500 and policy.steps_per_epoch == 10
    assert policy.metrics()["phase"] == "warmup"


def test_the_first_group_gets_the_absolute_rate_and_the_others_keep_their_ratio_to_it():
    policy = AutoWU(total_num_steps=100, warmup_min_lr=1e-3, warmup_max_lr=0.4)
    policy.step(StepObservation(loss=1.0))
    assert [policy.learning_rate(0.1) for _ in range(3)] == [policy.warmup_lr(0)] * 3   # absolute, as WarmupLR
    assert policy.learning_rate(0.01) == pytest.approx(policy.warmup_lr(0) / 10, rel=1e-15)
    policy.step(StepObservation(loss=0.9))
    assert policy.learning_rate(0.1) == policy.warmup_lr(1)
    assert policy.learning_rate(0.5) == pytest.approx(5 * policy.warmup_lr(1), rel=1e-15)
    assert policy.learning_rate(0.0) == 0.0
    policy.load_state_dict(policy.state_dict())        # the reference is the first group seen after a load
    assert policy.learning_rate(0.5) == policy.warmup_lr(1)


def test_a_first_group_at_lr_0_beside_a_training_group_is_refused():
    policy = AutoWU(total_num_steps=100)
    assert policy.learning_rate(0.0) == policy.warmup_lr(0)     # one group: its own lr is not used
    with pytest.raises(ValueError, match="in proportion to the first group's, which is 0, while another group's "
                                         "is 0.1: give the first param group a non-zero lr"):
        policy.learning_rate(0.1)


@pytest.mark.parametrize("params, message", [
    ({}, "total_num_steps is required"),
    ({"total_num_steps": 100, "warmup_min_lr": 0.5, "warmup_max_lr": 0.5},
     r"need 0 < warmup_min_lr < warmup_max_lr, got warmup_min_lr=0.5, warmup_max_lr=0.5"),
    ({"total_num_steps": 100, "warmup_max_lr": "1.0"},
     r"warmup_max_lr = '1.0' \(str\): must be a finite number"),
    ({"total_num_steps": 100, "warmup_num_steps": 150},
     r"warmup_num_steps=150 must be < total_num_steps=100"),
    ({"total_num_steps": 100, "decay_type": "linear"},
     r"decay_type='linear' is not a known decay; valid: \['cos', 'const-cos'\]"),
    ({"total_num_steps": 100, "threshold": 1.5}, r"threshold must lie in \[0.5, 1\), got 1.5"),
    ({"total_num_steps": 100, "patience": 0}, "patience must be an int >= 1, got 0"),
    ({"total_num_steps": 100, "steps_per_epoch": 2.5}, r"steps_per_epoch = 2.5 \(float\): must be an integer"),
    ({"total_num_steps": 100, "max_points": 3}, "max_points must be an int >= 10, got 3"),
    ({"total_num_steps": 100, "warmup_lr": 0.1}, r"unknown key\(s\) \['warmup_lr'\] for AutoWU; allowed: \["),
])
def test_bad_parameters_are_rejected(params, message):
    with pytest.raises(ValueError, match=message):
        build_policy({"type": "AutoWU", "params": params})


def test_missing_scikit_learn_says_how_to_install(monkeypatch):
    real_import = builtins.__import__

    def no_sklearn(name, *args, **kwargs):
        if name.startswith("sklearn"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_sklearn)
    with pytest.raises(ImportError, match=r"pip install 'scaling_plugins\[autowu\]'"):
        AutoWU(total_num_steps=100)
