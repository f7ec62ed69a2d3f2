"""DeepSpeed-named schedules (scaling_plugins.schedules) against DeepSpeed's own schedulers, in one process."""
from __future__ import annotations

import pytest
import torch

from scaling_plugins.schedules import build_schedule

lr_schedules = pytest.importorskip("deepspeed.runtime.lr_schedules")

PEAK = 0.1
CASES = [
    ("WarmupLR", {"warmup_min_lr": 0.01, "warmup_max_lr": PEAK, "warmup_num_steps": 10}),
    ("WarmupLR", {"warmup_num_steps": 7, "warmup_type": "linear"}),
    ("WarmupDecayLR", {"total_num_steps": 40, "warmup_min_lr": 0.02, "warmup_max_lr": PEAK, "warmup_num_steps": 10}),
    ("WarmupCosineLR", {"total_num_steps": 40, "warmup_min_ratio": 0.1, "warmup_num_steps": 10}),
    ("WarmupCosineLR", {"total_num_steps": 30, "warmup_num_steps": 5, "cos_min_ratio": 0.2, "warmup_type": "linear"}),
]


@pytest.mark.parametrize("name,params", CASES)
def test_multiplier_times_peak_is_deepspeeds_rate(name: str, params: dict) -> None:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=PEAK)
    theirs = getattr(lr_schedules, name)(optimizer, **params)
    ours = build_schedule({"type": name, "params": params})
    for t in range(0, 60):
        theirs.last_batch_iteration = t
        assert PEAK * ours(t) == pytest.approx(theirs.get_lr()[0], rel=1e-12, abs=1e-15), (name, t)


@pytest.mark.parametrize("params,key", [
    ({"warmup_min_lr": 0.01}, "warmup_max_lr"),
    ({"warmup_min_lr": 0.2, "warmup_max_lr": 0.1}, "warmup_min_lr"),
    ({"warmup_num_steps": 0}, "warmup_num_steps"),
    ({"warmup_type": "cubic"}, "warmup_type"),
])
def test_bad_warmup_parameters_name_the_key(params: dict, key: str) -> None:
    with pytest.raises(ValueError, match=key):
        build_schedule({"type": "WarmupLR", "params": params})


def test_total_shorter_than_warmup_is_refused() -> None:
    with pytest.raises(ValueError, match="total_num_steps"):
        build_schedule({"type": "WarmupCosineLR", "total_num_steps": 5, "warmup_num_steps": 10})
