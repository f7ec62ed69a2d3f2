"""The EMA scaling rule ρ → ρ^κ and the ModelEMA helper."""
from __future__ import annotations

import copy

import pytest
import torch

from scaling_plugins.ema import ModelEMA, scale_ema_momentum


def test_momentum_rule_and_errors():
    assert scale_ema_momentum(0.99, 4) == 0.99 ** 4
    assert scale_ema_momentum(0.9, 1) == 0.9
    with pytest.raises(ValueError, match=r"momentum \(ρ\) must lie in \[0, 1\), got 1.0"):
        scale_ema_momentum(1.0, 2)
    with pytest.raises(ValueError, match=r"kappa \(κ, the batch multiple\) must be >= 1, got 0.5"):
        ModelEMA(torch.nn.Linear(2, 2), momentum=0.9, kappa=0.5)


def model_with(value: float) -> torch.nn.Module:
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)
        model[1].running_mean.fill_(value)
    return model


def test_one_step_at_kappa_equals_kappa_base_steps_toward_fixed_weights():
    """Toward a fixed θ, one update with ρ^κ lands where κ updates with ρ land (the rule's derivation)."""
    start, target = model_with(0.0), model_with(1.0)
    base = ModelEMA(start, momentum=0.9)
    scaled = ModelEMA(start, momentum=0.9, kappa=4)
    for _ in range(4):
        base.update(target)
    scaled.update(target)
    for a, b in zip(base.module.parameters(), scaled.module.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(a, torch.full_like(a, 1 - 0.9 ** 4))
    assert torch.equal(scaled.module[1].running_mean, target[1].running_mean)   # buffers copied
    assert not any(p.requires_grad for p in scaled.module.parameters())


def test_per_step_kappa_such_as_adascale_gain():
    ema = ModelEMA(model_with(0.0), momentum=0.99, kappa=2)
    ema.update(model_with(1.0), kappa=3.5)
    weight = ema.module[0].weight
    torch.testing.assert_close(weight, torch.full_like(weight, 1 - 0.99 ** 3.5))
    with pytest.raises(ValueError, match="kappa"):
        ema.update(model_with(1.0), kappa=0.0)


def test_state_dict_roundtrip_continues_identically():
    ema = ModelEMA(model_with(0.0), momentum=0.95, kappa=2)
    ema.update(model_with(1.0))
    clone = ModelEMA(model_with(5.0), momentum=0.5)
    clone.load_state_dict(copy.deepcopy(ema.state_dict()))
    assert clone.momentum == 0.95 and clone.kappa == 2 and clone.updates == 1
    for e in (ema, clone):
        e.update(model_with(2.0))
    for a, b in zip(ema.module.state_dict().values(), clone.module.state_dict().values()):
        assert torch.equal(a, b)
