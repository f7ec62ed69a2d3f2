"""Every config in configs/deepspeed/ under the real `deepspeed` launcher (2 CPU ranks, gloo), in one launch.

Checked per config: the first-step σ², μ² and gain against statistics computed independently from each
micro-batch's own float64 gradient; the lr every param group really had when the optimizer stepped
(= initial lr × gain × schedule(τ), τ advancing by the gain); agreement across ranks; collectives per step
equal to bare DeepSpeed's with the same config; and for a config with DeepSpeed's csv monitor, the policy's
metrics written beside DeepSpeed's own.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from scaling_plugins.schedules import build_schedule
from scaling_plugins.stats import GradientSample, GradientStatistics
from tests.distributed import rank_results
from tools.launchers import deepspeed

CONFIGS = sorted(Path(__file__).resolve().parent.parent.joinpath("configs", "deepspeed").glob("*.json"))


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("configs")
    deepspeed("tests/deepspeed_scripts/configs_run.py", ["--out", str(out)])
    return rank_results(out)


def test_the_configs_cover_every_deepspeed_optimizer_path():
    stages = {json.loads(path.read_text())["zero_optimization"]["stage"] for path in CONFIGS}
    assert stages == {0, 1, 2, 3}
    assert any(json.loads(path.read_text()).get("bf16", {}).get("enabled") for path in CONFIGS)
    assert any(json.loads(path.read_text())["gradient_accumulation_steps"] > 1 for path in CONFIGS)


@pytest.mark.slow
def test_every_config_ran_and_ranks_agree(results):
    rank0, rank1 = results
    assert sorted(rank0) == [path.name for path in CONFIGS]
    for name in rank0:
        assert {k: v for k, v in rank0[name].items() if k != "csv"} == rank1[name], name
    optimizers = {run["optimizer"] for run in rank0.values()}
    assert optimizers == {"SGD", "FP16_UnfusedOptimizer", "BF16_Optimizer", "DeepSpeedZeroOptimizer",
                          "DeepSpeedZeroOptimizer_Stage3"}


@pytest.mark.slow
@pytest.mark.parametrize("path", CONFIGS, ids=[path.stem for path in CONFIGS])
def test_first_step_statistics_match_an_independent_computation(results, path):
    run = results[0][path.name]
    config = json.loads(path.read_text())
    reference = GradientStatistics(scale=run["reference"]["count"])
    reference.update(GradientSample(**run["reference"]))
    assert 1.2 < reference.gain < reference.scale - 0.2          # neither end of [1, S]: a real estimate
    rel = 2e-2 if config.get("bf16", {}).get("enabled") else 1e-5
    assert run["moments"][0] == pytest.approx([reference.sigma_sq, reference.mu_sq], rel=rel)
    assert run["gains"][0] == pytest.approx(reference.gain, rel=rel)
    if config["gradient_clipping"] > 0:          # the clip bound, and the gain still used unclipped norms
        assert run["grad_norms"][0] > config["gradient_clipping"]


@pytest.mark.slow
@pytest.mark.parametrize("path", CONFIGS, ids=[path.stem for path in CONFIGS])
def test_lr_used_is_initial_lr_times_gain_times_schedule_of_progress(results, path):
    run = results[0][path.name]
    params = json.loads(path.read_text())["scheduler"]["params"]
    schedule = build_schedule(params.get("schedule"))
    progress = 0.0
    for step, (gain, lrs) in enumerate(zip(run["gains"], run["lrs_used"])):
        assert run["progress_before"][step] == pytest.approx(progress, rel=1e-12)
        expected = [initial * gain * schedule(progress) for initial in run["initial_lrs"]]
        assert lrs == pytest.approx(expected, rel=1e-12, abs=1e-15), step
        progress += gain
    assert any(lr > 0 for (lr, *_) in run["lrs_used"])


@pytest.mark.slow
@pytest.mark.parametrize("path", CONFIGS, ids=[path.stem for path in CONFIGS])
def test_collectives_per_step_equal_bare_deepspeed_with_the_same_config(results, path):
    run = results[0][path.name]
    assert run["collectives"] == run["bare_collectives"]
    assert all(step.get("gloo:all_reduce", 0) >= 1 for step in run["collectives"])


@pytest.mark.slow
def test_csv_monitor_gets_the_policy_metrics_beside_deepspeeds(results):
    monitored = [path for path in CONFIGS if "csv_monitor" in json.loads(path.read_text())]
    assert monitored
    for path in monitored:
        run = results[0][path.name]
        csv = run["csv"]
        assert [float(v) for _, v in csv["scaling_plugins_gain"][1:]] == run["gains"]
        assert [float(v) for _, v in csv["scaling_plugins_lr"][1:]] == [lr for (lr, *_) in run["lrs_used"]]
        assert [row[0] for row in csv["scaling_plugins_gain"]] == [row[0] for row in csv["Train_Samples_lr"]]
        for field in ("sigma_sq", "mu_sq", "noise_scale", "progress", "skipped_update"):
            assert len(csv[f"scaling_plugins_{field}"]) == len(run["gains"]) + 1, field
