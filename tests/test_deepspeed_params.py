"""A DeepSpeed "scheduler" entry's params as HF's Trainer, Accelerate and plain DeepSpeed hand them
(scaling_plugins.scheduler_params): HF's flat schedule keys and "auto". In this process; the launched runs
are in tests/test_huggingface.py."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from scaling_plugins import ScalingWarning, build_policy
from scaling_plugins.app.config_check import check_file
from scaling_plugins.scheduler_params import resolve_scheduler_params
from scaling_plugins.backends.shared.driver import PolicyDriver
from scaling_plugins.schedules import warmup_cosine_lr, warmup_decay_lr, warmup_lr

REPO = Path(__file__).resolve().parent.parent
# HF's WarmupLR template with "type" changed to AdaScale, as the Trainer fills it (learning_rate 0.1, warmup 5)
WARMUP_LR_FILLED = {"warmup_min_lr": 0, "warmup_max_lr": 0.1, "warmup_num_steps": 5}
TAUS = [0.0, 0.5, 1.0, 2.7, 4.9, 5.0, 30.0, 99.0, 100.0, 140.0]


def schedule_of(params: dict) -> list[float]:
    policy = build_policy({"type": "AdaScale", "params": params})
    return [policy.schedule(tau) for tau in TAUS]


def test_hf_warmup_lr_template_is_warmup_lr_without_a_budget():
    params = resolve_scheduler_params("AdaScale", WARMUP_LR_FILLED)
    assert params == {"schedule": {"type": "WarmupLR", "params": WARMUP_LR_FILLED}}
    assert schedule_of(params) == [warmup_lr(0, 0.1, 5)(tau) for tau in TAUS]
    assert not build_policy({"type": "AdaScale", "params": params}).done


def test_hf_warmup_decay_lr_template_is_warmup_decay_lr_to_the_budget():
    params = resolve_scheduler_params("AdaScale", {**WARMUP_LR_FILLED, "total_num_steps": 100})
    assert params == {"total_num_steps": 100,
                      "schedule": {"type": "WarmupDecayLR", "params": {**WARMUP_LR_FILLED, "total_num_steps": 100}}}
    assert schedule_of(params) == [warmup_decay_lr(100, 0, 0.1, 5)(tau) for tau in TAUS]
    assert build_policy({"type": "AdaScale", "params": params}).total_num_steps == 100


def test_a_named_schedule_takes_the_flat_keys_it_has():
    params = resolve_scheduler_params("AdaScaleAdam", {"schedule": "WarmupCosineLR", "warmup_num_steps": 5,
                                                       "total_num_steps": 100})
    assert params["schedule"] == {"type": "WarmupCosineLR", "params": {"warmup_num_steps": 5, "total_num_steps": 100}}
    assert schedule_of(params) == [warmup_cosine_lr(100, warmup_num_steps=5)(tau) for tau in TAUS]
    nested = {"type": "WarmupDecayLR", "params": {"total_num_steps": 80, "warmup_num_steps": 5}}
    params = resolve_scheduler_params("AdaScale", {"schedule": nested, "warmup_min_lr": 0, "total_num_steps": 100})
    assert params["schedule"]["params"] == {"total_num_steps": 80, "warmup_num_steps": 5, "warmup_min_lr": 0}


@pytest.mark.parametrize(("params", "message"), [
    ({"schedule": "WarmupCosineLR", "warmup_min_lr": 0, "total_num_steps": 10},
     "scheduler.params.warmup_min_lr = 0: neither AdaScale nor its schedule 'WarmupCosineLR' takes it"),
    ({"schedule": {"type": "WarmupLR", "params": {"warmup_num_steps": 10}}, "warmup_num_steps": 5},
     "scheduler.params.warmup_num_steps = 5 and scheduler.params.schedule's warmup_num_steps = 10 differ"),
    ({"schedule": "Cosine", "warmup_num_steps": 5}, "schedule.type = 'Cosine' is not a known schedule"),
    ({"scale": "auto"}, "scheduler.params.scale = 'auto': only ['total_num_steps', 'warmup_max_lr', "
                        "'warmup_min_lr', 'warmup_num_steps'] may be \"auto\""),
    ({"schedule": {"type": "WarmupLR", "params": {"warmup_num_steps": "auto"}}},
     "scheduler.params.schedule.params.warmup_num_steps = 'auto': \"auto\" is allowed only directly in "
     "scheduler.params"),
])
def test_what_cannot_be_resolved_is_refused_by_key(params, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")):
        resolve_scheduler_params("AdaScale", params)


def test_unfilled_auto_reads_as_the_trainers_defaults_with_one_warning():
    template = {key: "auto" for key in ("warmup_min_lr", "warmup_max_lr", "warmup_num_steps", "total_num_steps")}
    with pytest.warns(ScalingWarning) as shown:
        params = resolve_scheduler_params("AdaScale", template, optimizer_lr=0.05)
    assert params == {"schedule": {"type": "WarmupLR", "params": {
        "warmup_min_lr": 0.0, "warmup_max_lr": 0.05, "warmup_num_steps": 1}}}
    (warning,) = shown
    assert "plain DeepSpeed" in str(warning.message) and "total_num_steps=none (no budget" in str(warning.message)
    assert resolve_scheduler_params("AdaScale", {"warmup_max_lr": "auto"}) == {}    # the optimizer's lr: the default


def test_policies_with_keys_of_their_own_keep_them():
    for name, params in (("LinearScaling", {"warmup_num_steps": 5, "total_num_steps": 100}),
                         ("LEGW", {"warmup_min_lr": 0, "warmup_num_steps": 5}),
                         ("AutoWU", {"warmup_min_lr": 1e-4, "warmup_max_lr": 0.1, "warmup_num_steps": 5,
                                     "total_num_steps": 100})):
        assert resolve_scheduler_params(name, params) == params


def test_the_shipped_deepspeed_configs_pass_through_unchanged():
    for path in sorted((REPO / "configs" / "deepspeed").glob("*.json")):
        entry = json.loads(path.read_text())["scheduler"]
        assert resolve_scheduler_params(entry["type"], entry["params"]) == entry["params"], path.name


def test_check_config_reads_the_hf_config_as_the_backend_does():
    problems, notes = check_file(REPO / "configs" / "huggingface" / "adascale_zero2.json")
    assert problems == [] and any("checked its scheduler entry 'AdaScale'" in note for note in notes)


class CountingDriver(PolicyDriver):
    """A driver without an engine, for a policy that needs no gradient norms."""

    def backward_passes(self) -> int:
        return self.accumulation_steps


def test_a_step_past_the_budget_is_shown_once():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    driver = CountingDriver(optimizer, {"type": "LinearScaling", "params": {"total_num_steps": 4}}, world_size=2)
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        for _ in range(2):
            driver.advance()
        assert driver.done and shown == []
        for _ in range(3):
            driver.advance()
    (warning,) = shown
    assert warning.category is ScalingWarning
    assert "'LinearScaling' is done (budget total_num_steps=4 reached, progress 4)" in str(warning.message)
