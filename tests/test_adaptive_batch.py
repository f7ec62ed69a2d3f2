"""AdaptiveBatch without a backend: the limits and their messages, the choice A = clamp(round(k·B_simple/(W·m))), when
it is made, AdaScale's scale following it, the state across a resume (also on another number of workers), and the
Hugging Face Trainer refusing it. The backends under their launchers: tests/test_adaptive_batch_backends.py; the
application (demo, trainer, figures, study): tests/test_adaptive_batch_app.py; the policy contract (config, state
round trip, ...) runs it with every policy in tests/test_policy_contract.py."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from scaling_plugins import AdaptiveBatch, GradientSample, StepObservation, build_policy
from scaling_plugins.batch_size import BatchLimits, noise_scale_accumulation
from scaling_plugins.stats import adascale_gain


def adaptive(**params) -> AdaptiveBatch:
    return build_policy({"type": "AdaptiveBatch", "params": params})


def exact_sample(sigma_sq: float, mu_sq: float, scale: float, count: int) -> GradientSample:
    """The reduced numbers whose estimate at ``scale`` is exactly (σ², μ²): L/n = μ² + σ²·n/S, T = μ² + σ²/S."""
    return GradientSample(local_sq_sum=count * (mu_sq + sigma_sq * count / scale),
                          mean_sq_norm=mu_sq + sigma_sq / scale, count=count)


@pytest.mark.parametrize("params, message", [
    ({"min_batch": 64, "max_batch": 32}, "params: min_batch = 64 > max_batch = 32: min_batch must be <= max_batch"),
    ({"max_accumulation_steps": 0}, "params: max_accumulation_steps = 0: must be an integer >= 1"),
    ({"max_accumulation_steps": 2.5}, "params: max_accumulation_steps = 2.5 (float): must be an integer"),
    ({"min_batch": 0}, "params: min_batch = 0: must be an integer >= 1 (samples per optimizer step) or null"),
    ({"change_interval": 0}, "params: change_interval = 0: must be an integer >= 1 (optimizer steps)"),
    ({"noise_scale_factor": 0.0}, "params: noise_scale_factor = 0.0: must be > 0"),
    ({"noise_scale_smoothing": 1.0}, "params: noise_scale_smoothing = 1.0: must lie in [0, 1)"),
    ({"micro_batch_size": 0}, "params: micro_batch_size = 0: must be an integer >= 1 or null"),
    ({"base_batch": -1}, "params: base_batch = -1: must be > 0 or null"),
])
def test_bad_limits_are_refused_naming_the_key_the_value_and_what_is_allowed(params, message):
    with pytest.raises(ValueError) as err:
        adaptive(**params)
    assert str(err.value).startswith(message)


@pytest.mark.parametrize("params, shape, message", [
    ({"min_batch": 20, "micro_batch_size": 8}, (2, 2),
     "min_batch = 20 is not a multiple of micro_batch_size × workers = 8 × 2 = 16: allowed are 16, 32, 48, ..."),
    ({"max_batch": 36, "micro_batch_size": 4}, (2, 2),
     "max_batch = 36 is not a multiple of micro_batch_size × workers = 4 × 2 = 8: allowed are 8, 16, 24, ..."),
    ({"min_batch": 32}, (2, 2), "min_batch = 32 is in samples, so micro_batch_size (samples per micro-batch on "
                                "each worker) is needed"),
    ({"min_batch": 64, "micro_batch_size": 8}, (2, 1),
     "accumulation_steps = 1 with 2 worker(s) gives a batch of 16, outside AdaptiveBatch's limits: allowed "
     "accumulation steps are 4 to 16 (batches 64 to 256)"),
    ({}, (1, 1), "accumulation_steps = 1 with 1 worker(s) gives a batch of 1, outside AdaptiveBatch's limits: "
                 "allowed accumulation steps are 2 to 16"),
    ({"min_batch": 512, "micro_batch_size": 8}, (2, 1),
     "no batch size fits the limits with 2 worker(s) × micro_batch_size 8: accumulation steps from 32 "
     "(min_batch = 512"),
    ({"base_batch": 8}, (2, 1), "base_batch = 8 is in samples, so micro_batch_size is needed too"),
    ({"base_batch": 64, "micro_batch_size": 8}, (2, 1), "the smallest batch, 16 samples, is below base_batch = 64"),
])
def test_limits_that_do_not_fit_the_run_are_refused_at_attach(params, shape, message):
    with pytest.raises(ValueError) as err:
        adaptive(**params).configure(*shape)
    assert str(err.value).startswith(message)


def test_the_engine_micro_batch_must_agree_with_a_given_one():
    policy = adaptive(micro_batch_size=8)
    with pytest.raises(ValueError, match="micro_batch_size = 8 but the engine's micro-batch is 4"):
        policy.set_micro_batch_size(4)
    filled = adaptive(min_batch=32)
    filled.set_micro_batch_size(8)     # what DeepSpeed does with train_micro_batch_size_per_gpu
    filled.configure(2, 2)
    assert (filled.micro_batch_size, filled.base_batch, filled.scale) == (8, 8, 4.0)


def test_accumulation_range_and_the_choice_within_it():
    assert BatchLimits().accumulation_range(1, None) == (2, 16)          # 2 gradients per step on one worker
    assert BatchLimits().accumulation_range(4, None) == (1, 16)
    assert BatchLimits(32, 128, 16).accumulation_range(2, 8) == (2, 8)
    assert BatchLimits(None, 1024, 12).accumulation_range(2, 8) == (1, 12)
    assert noise_scale_accumulation(100.0, 2.0, 16, 1, 16) == 13         # 200/16 = 12.5 rounds half up
    assert noise_scale_accumulation(90.0, 2.0, 16, 1, 16) == 11
    assert noise_scale_accumulation(1.0, 2.0, 16, 3, 16) == 3            # below the range: its low end
    assert noise_scale_accumulation(1e9, 2.0, 16, 1, 16) == 16
    assert noise_scale_accumulation(math.inf, 2.0, 16, 1, 7) == 7        # μ² = 0: no mean gradient to measure


def drive(policy: AdaptiveBatch, world: int, noise: list[tuple[float, float]]) -> list[dict]:
    """What a backend does: step the policy on exact (σ², μ²) samples, read the metrics, follow the request."""
    records = []
    for sigma_sq, mu_sq in noise:
        policy.step(StepObservation(gradients=exact_sample(sigma_sq, mu_sq, policy.scale, policy.num_gradients)))
        records.append({**policy.metrics(), "requested": policy.requested_accumulation_steps})
        if policy.requested_accumulation_steps != policy.accumulation_steps:
            policy.configure(world, policy.requested_accumulation_steps)
    return records


def test_the_batch_follows_k_times_the_noise_scale_at_decision_steps_only():
    policy = adaptive(micro_batch_size=4, smoothing=0.0, noise_scale_smoothing=0.0, change_interval=5,
                      noise_scale_factor=2.0, max_accumulation_steps=12)
    policy.configure(2, 1)
    noise = [(1.0, 1.0 / b) for b in [0.5] * 5 + [6.0] * 5 + [20.0] * 5 + [1000.0] * 5 + [3.0] * 5]
    records = drive(policy, 2, noise)
    expected = {5: 1, 10: 6, 15: 12, 20: 12, 25: 3}   # round(k·B0·b/(W·m)) = round(b), within 1..12
    progress = 0.0
    for step, (record, (sigma_sq, mu_sq)) in enumerate(zip(records, noise), start=1):
        accumulation = record["accumulation_steps"]
        assert record["batch_size"] == 2 * accumulation * 4 and record["scale"] == 2 * accumulation
        assert record["noise_scale"] == record["batch_noise_scale"] == pytest.approx(4 * sigma_sq / mu_sq)
        assert record["gain"] == pytest.approx(adascale_gain(sigma_sq, mu_sq, 2 * accumulation))
        progress += record["gain"]
        assert record["progress"] == pytest.approx(progress)                         # τ carries on
        if step in expected:
            assert record["requested"] == expected[step]
        elif step > 1:
            assert record["requested"] == accumulation                              # no decision in between
    assert [r["accumulation_steps"] for r in records] == [1] * 10 + [6] * 5 + [12] * 10
    assert policy.accumulation_steps == 3 and policy.scale == 6.0


def test_a_resume_brings_the_batch_back_and_follows_another_number_of_workers():
    policy = adaptive(micro_batch_size=2, noise_scale_smoothing=0.0, change_interval=2, max_accumulation_steps=16)
    policy.configure(2, 1)
    drive(policy, 2, [(1.0, 0.25)] * 4)                 # B_simple = 8 samples: A = round(2·8/4) = 4
    assert policy.accumulation_steps == 4
    state = policy.state_dict()
    for world, accumulation in ((2, 4), (4, 2), (16, 1)):   # the same 8 gradients per step, within 1..16
        resumed = adaptive(micro_batch_size=2, noise_scale_smoothing=0.0, change_interval=2, max_accumulation_steps=16)
        resumed.configure(world, 1)
        resumed.load_state_dict(state)
        resumed.configure(world, 1)                      # the backend: the new job's shape, then the request
        assert resumed.requested_accumulation_steps == accumulation
    assert resumed.metrics()["accumulation_steps"] == 4   # the last step taken was at A = 4 on 2 workers


def test_the_controller_smooths_the_noise_scale_on_its_own_and_the_gain_keeps_adascales_smoothing():
    """B_simple jumps from 1 to 9 base batches: the controller's EMA (θ = noise_scale_smoothing) follows it within
    a few dozen steps, AdaScale's (θ = 1 − S/1000 for the gain) over hundreds; each a bias-corrected EMA of the
    step's σ̂², μ̂²."""
    policy = adaptive(noise_scale_smoothing=0.9, change_interval=1000)
    policy.configure(2, 2)
    noise = [(1.0, 1.0)] * 20 + [(9.0, 1.0)] * 30
    record = drive(policy, 2, noise)[-1]
    weights = [0.1 * 0.9 ** age for age in range(len(noise))]
    expected = sum(w * sigma_sq for w, (sigma_sq, _) in zip(weights, reversed(noise))) / sum(weights)
    assert record["batch_noise_scale"] == pytest.approx(expected) and expected > 8.6
    assert record["noise_scale"] < 6.0 and policy.statistics.smoothing == pytest.approx(1 - 4 / 1000)


def test_without_micro_batch_batches_are_counted_in_micro_batches():
    policy = adaptive(noise_scale_smoothing=0.0, change_interval=1)
    policy.configure(4, 1)
    record = drive(policy, 4, [(1.0, 0.1)])[0]           # B_simple = 10 base batches = 10 micro-batches
    assert record["batch_size"] is None and record["batch_noise_scale"] == pytest.approx(10.0)
    assert policy.accumulation_steps == 5                # round(2·10/4)


def test_the_hugging_face_trainer_refuses_a_batch_controller():
    pytest.importorskip("transformers")
    from scaling_plugins.integrations.huggingface import check_fixed_batch

    with pytest.raises(ValueError, match="changes the batch .* but the Trainer keeps its own"):
        check_fixed_batch(SimpleNamespace(policy=adaptive()))
    check_fixed_batch(SimpleNamespace(policy=build_policy("AdaScale")))
