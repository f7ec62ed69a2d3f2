"""The fixed scaling rules (LinearScaling, SqrtScaling, LEGW), AdaScaleAdam and AutoWU as every backend test
drives them: the same specs, model and reference trajectories for DDP, DeepSpeed and Horovod."""
from __future__ import annotations

import math

import pytest
import torch

from scaling_plugins.policies import StepObservation, build_policy

STEPS, ACCUMULATION, BASE_LR = 6, 2, 0.05
# The fixed rules (checked against their own trajectory at k = 2 ranks × ACCUMULATION) and AdaScaleAdam.
RULES = {
    "LinearScaling": {"type": "LinearScaling", "params": {"warmup_num_steps": 12}},
    "SqrtScaling": {"type": "SqrtScaling", "params": {"schedule": {"type": "cosine", "total_num_steps": 40}}},
    "LEGW": {"type": "LEGW", "params": {"warmup_num_steps": 3,
                                        "schedule": {"type": "polynomial", "total_num_steps": 40, "power": 2}}},
    "AdaScaleAdam": {"type": "AdaScaleAdam", "params": {}},
}
# AutoWU on Quadratic, one gradient per rank per step: the loss falls, then rises as the warmup's lr passes
# the noise-floor knee (lr ≈ 1); the GP test fires around step 130, well before the cap (150).
AUTOWU = {"type": "AutoWU", "params": {"total_num_steps": 300, "steps_per_epoch": 5, "warmup_min_lr": 1e-3,
                                       "warmup_max_lr": 10.0}}
AUTOWU_CAP = 150


class Quadratic(torch.nn.Module):
    """Loss ½‖w − x‖² averaged over the batch x: SGD's noise floor grows with the learning rate, so under an
    exponential warmup the loss first falls, then rises — the curve AutoWU must catch."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.full((20,), 3.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * (self.w - x).pow(2).sum(1).mean()


def reference_lrs(name: str, world: int = 2, accumulation: int = ACCUMULATION, steps: int = STEPS) -> list[float]:
    """The learning rates RULES[name] sets outside any backend, for a run of that shape."""
    policy = build_policy(RULES[name])
    policy.configure(world, accumulation)
    lrs = []
    for _ in range(steps):
        policy.step(StepObservation())
        lrs.append(policy.learning_rate(BASE_LR))
    return lrs


def check_rule_run(name: str, first: dict, second: dict) -> None:
    """Both ranks' record of RULES[name] (lrs, gains, scale, params per step): identical on both ranks, k = 4,
    and the learning rates the policy sets on its own (AdaScaleAdam: base_lr·√gain, its schedule being 1)."""
    assert first == second
    assert first["scale"] == 2 * ACCUMULATION and len(first["lrs"]) == STEPS
    if name == "AdaScaleAdam":
        assert first["gains"][-1] > 1
        assert first["lrs"] == pytest.approx([BASE_LR * math.sqrt(g) for g in first["gains"]], rel=1e-12)
    else:
        assert len(set(first["lrs"])) > 1
        assert first["lrs"] == pytest.approx(reference_lrs(name), rel=1e-15)


def check_autowu_run(first: dict, second: dict) -> None:
    """Both ranks' AutoWU record (lrs, switch_step, peak_lr, losses, final weights): identical, the switch
    made by the GP test on finite losses before the cap, restarting at the peak and ending at exactly 0."""
    assert first == second
    assert len(first["lrs"]) == AUTOWU["params"]["total_num_steps"]
    assert first["switch_step"] < AUTOWU_CAP
    assert all(math.isfinite(x) for x in first["losses"])
    assert first["lrs"][first["switch_step"]] == first["peak_lr"] < AUTOWU["params"]["warmup_max_lr"]
    assert first["lrs"][-1] == 0.0


def check_resumed_at_new_scale(policy: str, saved: dict, resumed: dict, scale: int) -> None:
    """A policy state saved at one scale and loaded at ``scale`` (another world size): the scale follows, τ carries
    on, AdaScale's σ², μ² (base-batch units) carry over and its gain stays in [1, scale], a scaling rule's factor
    k follows. ``saved``: scale, progress, metrics at the save; ``resumed``: its ``"resumed"`` numbers right after
    the load, then gain and metrics after a step."""
    assert resumed["resumed"]["scale"] == scale and resumed["scale"] == scale
    assert resumed["resumed"]["progress"] == saved["progress"]
    if policy == "AdaScale":
        for key in ("sigma_sq", "mu_sq"):
            assert resumed["resumed"]["metrics"][key] == saved["metrics"][key]
        assert 1 <= resumed["gain"] <= scale
    else:
        assert resumed["metrics"]["lr_factor"] == scale
