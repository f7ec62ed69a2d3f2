"""AdaScaleAdam: AdaScale's gain under the square-root rule; SGD AdaScale stays the default."""
from __future__ import annotations

import copy
import math

import pytest

from scaling_plugins import ScalingWarning
from scaling_plugins.policies import AdaScale, AdaScaleAdam, StepObservation, build_policy
from scaling_plugins.stats import GradientSample

# Two workers × two micro-batches with spread-out local norms: a gain well above 1.
SAMPLES = [GradientSample(local_sq_sum=4.0 * (3.0 + 0.1 * i), mean_sq_norm=1.0 + 0.05 * i, count=4)
           for i in range(30)]


def lrs_and_gains(policy, samples=SAMPLES):
    out = []
    for sample in samples:
        policy.step(StepObservation(gradients=sample))
        out.append((policy.learning_rate(0.1), policy.gain, policy.progress))
    return out


def test_square_root_of_the_gain_and_the_same_progress():
    sgd = AdaScale(schedule={"type": "cosine", "total_num_steps": 100})
    sgd.configure(2, 2)
    with pytest.warns(ScalingWarning, match="validated SGD only"):
        adam = build_policy({"type": "AdaScaleAdam",
                             "params": {"schedule": {"type": "cosine", "total_num_steps": 100}}})
        adam.configure(2, 2)
    for (lr_sgd, gain_sgd, tau_sgd), (lr_adam, gain_adam, tau_adam) in zip(lrs_and_gains(sgd), lrs_and_gains(adam)):
        assert gain_adam == gain_sgd and tau_adam == tau_sgd
        assert 1.2 < gain_adam <= 4
        assert lr_adam == pytest.approx(lr_sgd / math.sqrt(gain_sgd), rel=1e-12)   # = 0.1·√r·schedule(τ)


def test_sgd_rule_is_the_default():
    policy = build_policy("AdaScale")
    assert type(policy) is AdaScale
    policy.configure(2, 2)
    lr, gain, _ = lrs_and_gains(policy, SAMPLES[:1])[0]
    assert gain > 1.2 and lr == pytest.approx(0.1 * gain, rel=1e-12)


def test_resume_is_exact():
    with pytest.warns(ScalingWarning):
        full, part, resumed = AdaScaleAdam(), AdaScaleAdam(), AdaScaleAdam()
        for policy in (full, part, resumed):
            policy.configure(2, 2)
    reference = lrs_and_gains(full)
    lrs_and_gains(part, SAMPLES[:11])
    resumed.load_state_dict(copy.deepcopy(part.state_dict()))
    assert lrs_and_gains(resumed, SAMPLES[11:]) == reference[11:]
