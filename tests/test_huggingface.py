"""The Hugging Face Trainer and Accelerate with real transformers, accelerate and DeepSpeed, 2 CPU ranks (gloo):
the Trainer under the `deepspeed` launcher with the shipped configs/huggingface/adascale_zero2.json, and a loop of
one's own under `accelerate launch` (ZeRO-0). A tiny Llama is built from a config in code; nothing is downloaded.

Each launch is checked against a recomputation here: every step's gain from each micro-batch's own gradient
(computed in this process at the parameters the run had before the step), the learning rate the parameters show
(their change against SGD's momentum direction) = 0.1 × gain × WarmupDecayLR(τ), the stop at the budget, and a
resume that reproduces the rest of the run bit for bit.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from scaling_plugins.schedules import warmup_decay_lr
from scaling_plugins.stats import GradientSample, GradientStatistics
from tools.launchers import REPO, VENV_BIN, deepspeed, free_port, run_command

if os.environ.get("CI", "").lower() != "true":      # under CI a missing dependency fails below instead
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    pytest.importorskip("deepspeed")

from tests.hf_scripts.common import BASE_LR, GAS, tiny_model  # noqa: E402  (needs transformers)

CONFIG = REPO / "configs" / "huggingface" / "adascale_zero2.json"
ENV = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
WORKERS = 2
SCALE = WORKERS * GAS
BUDGET, WARMUP, MOMENTUM = 12, 2, 0.9
REL = 1e-5        # float32 gradients and parameters, reduced in another order than here


def load(out: Path) -> list[dict[str, Any]]:
    return [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(WORKERS)]


@pytest.fixture(scope="module")
def trainer_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("trainer")
    deepspeed("tests/hf_scripts/trainer_run.py", ["--out", str(out)], num_gpus=WORKERS, timeout=600, env=ENV)
    return out, load(out)


@pytest.fixture(scope="module")
def accelerate_run(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("accelerate")
    config = json.loads(CONFIG.read_text())
    config["zero_optimization"]["stage"] = 0
    config["gradient_clipping"] = 0.0              # Accelerate fills "auto" with 1.0; the lr is read off updates
    (out / "ds_config.json").write_text(json.dumps(config))
    run_command([str(VENV_BIN / "accelerate"), "launch", "--use_deepspeed", "--num_processes", str(WORKERS),
                 "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                 "--deepspeed_config_file", str(out / "ds_config.json"), "--main_process_port", str(free_port()),
                 "tests/hf_scripts/accelerate_loop.py", "--out", str(out)], timeout=600, env=ENV)
    return load(out)


# -- the recomputation ---------------------------------------------------------------------------------------
def flat_gradient(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    model.zero_grad()
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double()


def flat(params: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in params.values()]).double()


def recompute(ranks: list[dict]) -> list[dict[str, float]]:
    """Per step: the gain and τ from the n = workers × GAS micro-batch gradients at the step's parameters, and the
    learning rate of the update θ_t − θ_{t+1} = lr·v_t, v_t = momentum·v_{t−1} + ḡ_t (torch SGD)."""
    statistics = GradientStatistics(scale=SCALE)
    model = tiny_model()
    params = ranks[0]["params"] + [ranks[0]["final"]]
    progress, velocity, steps = 0.0, None, []
    for t in range(len(ranks[0]["steps"])):
        with torch.no_grad():
            for p, value in zip(model.parameters(), params[t].values()):
                p.copy_(value)
        grads = [flat_gradient(model, run["inputs"][t * GAS + i]) for run in ranks for i in range(GAS)]
        mean = torch.stack(grads).mean(0)
        statistics.update(GradientSample(sum(float(g.dot(g)) for g in grads), float(mean.dot(mean)), len(grads)))
        velocity = mean if velocity is None else MOMENTUM * velocity + mean
        update = flat(params[t]) - flat(params[t + 1])
        lr = float(update.dot(velocity) / velocity.dot(velocity))
        residual = float((update - lr * velocity).norm() / update.norm()) if lr else 0.0
        steps.append({"gain": statistics.gain, "progress_before": progress, "lr": lr, "residual": residual})
        progress += statistics.gain
    return steps


def expected_lr(gain: float, progress: float) -> float:
    schedule = warmup_decay_lr(total_num_steps=BUDGET, warmup_num_steps=WARMUP, warmup_max_lr=BASE_LR)
    return BASE_LR * gain * schedule(progress)


def check_gain_lr_and_stop(ranks: list[dict], steps_taken: int) -> None:
    """The run's gains, applied learning rates and its stop, against :func:`recompute`."""
    assert ranks[0]["steps"] == ranks[1]["steps"]                        # every rank, the same numbers
    assert not torch.equal(ranks[0]["inputs"][0], ranks[1]["inputs"][0])  # on data of its own
    reference = recompute(ranks)
    gains = [step["gain"] for step in ranks[0]["steps"]]
    assert gains == pytest.approx([r["gain"] for r in reference], rel=REL)
    assert all(1.2 < gain < SCALE - 0.2 for gain in gains)              # a real estimate, neither end of [1, S]
    for step, ref in zip(ranks[0]["steps"], reference):
        assert step["lr"] == pytest.approx(expected_lr(ref["gain"], ref["progress_before"]), rel=REL)
        assert ref["lr"] == pytest.approx(step["lr"], rel=REL, abs=1e-12)   # what the parameters moved by
        assert ref["residual"] < 1e-4                                       # along SGD's own direction
    assert [r["lr"] > 0 for r in reference][:2] == [False, True]           # WarmupDecayLR starts at warmup_min_lr 0
    stop = next(t for t, r in enumerate(reference, 1) if r["progress_before"] + r["gain"] >= BUDGET)
    assert steps_taken == len(reference) == stop < BUDGET                  # stopped at τ ≥ budget, not max_steps
    assert [step["done"] for step in ranks[0]["steps"]] == [False] * (stop - 1) + [True]


def check_resume(ranks: list[dict], straight: str, resumed: str, saved_at: int) -> None:
    for run in ranks:
        assert run[resumed]["steps"] == run[straight]["steps"][saved_at:]
    final, again = ranks[0][straight]["final"], ranks[0][resumed]["final"]
    assert all(torch.equal(final[name], again[name]) for name in final)


# -- the Trainer under the deepspeed launcher ------------------------------------------------------------------
@pytest.mark.slow
def test_trainer_gain_lr_and_stop_at_the_budget(trainer_run):
    _, ranks = trainer_run
    runs = [rank["straight"] for rank in ranks]
    check_gain_lr_and_stop(runs, runs[0]["global_step"])
    assert runs[0]["via_trainer"] == "AdaScaleScheduler"                 # scaling_driver(trainer) reached it


@pytest.mark.slow
def test_trainer_resumes_from_its_checkpoint_bit_for_bit(trainer_run):
    check_resume(trainer_run[1], "straight", "resumed", saved_at=2)


@pytest.mark.slow
def test_trainer_logs_reach_the_log_history_and_tensorboard(trainer_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, ranks = trainer_run
    straight = ranks[0]["straight"]
    logged = [entry for entry in straight["log_history"] if "learning_rate" in entry]
    assert [entry["step"] for entry in logged] == list(range(1, straight["global_step"] + 1))
    for entry, step in zip(logged, straight["steps"]):
        assert entry["scaling_plugins/gain"] == step["gain"]
        assert entry["scaling_plugins/progress"] == step["progress"]
        assert entry["scaling_plugins/lr"] == entry["learning_rate"] == step["lr"]
        assert entry["scaling_plugins/noise_scale"] > 0
    assert straight["callbacks"].index("ScalingCallback") < straight["callbacks"].index("TensorBoardCallback")
    (events,) = (out / "run" / "tensorboard").glob("events.out.tfevents.*")
    board = EventAccumulator(str(events))
    board.Reload()
    for field in ("gain", "progress", "noise_scale", "lr"):
        scalars = board.Scalars(f"train/scaling_plugins/{field}")
        assert [s.step for s in scalars] == [entry["step"] for entry in logged]
        assert [s.value for s in scalars] == pytest.approx([entry[f"scaling_plugins/{field}"] for entry in logged],
                                                           rel=1e-6)   # TensorBoard keeps float32


@pytest.mark.slow
def test_trainer_refuses_a_budget_counted_in_epochs(trainer_run):
    error = trainer_run[1][0]["epochs"]
    assert error.startswith("ValueError: scheduler.params.total_num_steps = ")
    assert "num_train_epochs = 1" in error and "Set max_steps" in error


@pytest.mark.slow
def test_the_same_scheduler_entry_runs_under_plain_deepspeed(trainer_run):
    plain = trainer_run[1][0]["plain"]
    assert plain["params"]["total_num_steps"] is None                  # no budget: the loop decides
    assert plain["params"]["schedule"] == {"type": "WarmupLR", "params": {
        "warmup_min_lr": 0.0, "warmup_max_lr": BASE_LR, "warmup_num_steps": 1}}
    assert any("plain DeepSpeed" in message and "total_num_steps=none" in message
               for message in trainer_run[1][0]["warnings"])


# -- Accelerate under accelerate launch ------------------------------------------------------------------------
@pytest.mark.slow
def test_accelerate_gain_lr_and_stop_at_the_budget(accelerate_run):
    assert accelerate_run[0]["num_processes"] == WORKERS
    runs = [rank["straight"] for rank in accelerate_run]
    check_gain_lr_and_stop(runs, runs[0]["global_steps"])
    assert runs[0]["via_engine"] == "AdaScaleScheduler"


@pytest.mark.slow
def test_accelerate_resumes_from_save_state_bit_for_bit(accelerate_run):
    check_resume(accelerate_run, "straight", "resumed", saved_at=2)


@pytest.mark.slow
def test_accelerate_without_accumulate_is_refused_by_the_backward_count(accelerate_run):
    """Without ``accelerator.accumulate(model)`` every micro-batch is a boundary and DeepSpeed steps on each: one
    warning at the first such step, an error at the third, on every rank."""
    for rank in accelerate_run:
        case = rank["no_accumulate"]
        message = "1 backward pass(es) in this step, but gradient_accumulation_steps is 2"
        assert case["error"].startswith(f"RuntimeError: {message}") and "3 steps in a row" in case["error"]
        assert len(case["gains"]) == 2
        assert [m for m in case["warnings"] if message in m] == [case["warnings"][0]]
