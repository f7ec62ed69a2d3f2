"""AdaptiveBatch in the application: the demo's plan, the built-in trainer reading the accumulation before each step,
the figures and the table, check-config on a DeepSpeed config, and the adaptive quality study (its grid, and its CI
slice run for real)."""
from __future__ import annotations

import json

import pytest

from scaling_plugins.app.config_check import Shape, check_document
from scaling_plugins.app.demo import plan
from scaling_plugins.app.plots import load_run, render
from scaling_plugins.app.quality import ADAPTIVE, Base, grid_cells
from scaling_plugins.app.quality_report import REPORT_FILE
from scaling_plugins.app.spawn import run_local
from scaling_plugins.app.training import RunSpec, policy_entry
from tools.launchers import VENV_BIN, run_command


def test_the_demo_starts_a_controller_at_its_smallest_batch_and_lets_it_grow_to_the_scale():
    specs = plan("digits", "ddp", ["AdaptiveBatch", "AdaScale"], workers=2, scale=16, budget=100, seed=0)
    assert [(s.name, s.workers, s.accumulation) for s in specs] == [
        ("reference-S1", 1, 1), ("adaptivebatch-S16", 2, 1), ("adascale-S16", 2, 8)]
    assert specs[1].policy_params == {"max_accumulation_steps": 8}
    alone = plan("digits", "ddp", ["AdaptiveBatch"], workers=1, scale=8, budget=100, seed=0, reference=False)[0]
    assert (alone.accumulation, alone.policy_params) == (2, {"max_accumulation_steps": 8})


@pytest.mark.slow
def test_the_built_in_trainer_runs_each_step_at_the_chosen_batch(tmp_path):
    """The trainer reads the accumulation before every step (2 spawned gloo ranks, DDP): the records' batches add up
    to the samples, the batch grew, and the figures and table show the range of S."""
    spec = RunSpec(name="adaptive", workload="quadratic", policy="AdaptiveBatch", workers=2, accumulation=1,
                   budget=60, evals=2, tensorboard=False, policy_params={"max_accumulation_steps": 8})
    summary = run_local(spec, tmp_path / "adaptive", progress_bar=False)
    run = load_run(tmp_path / "adaptive")
    batches = [r["batch_size"] for r in run.steps]
    assert [r["samples"] for r in run.steps] == [sum(batches[:i + 1]) for i in range(len(batches))]
    assert batches == [2 * r["accumulation_steps"] * 1 for r in run.steps]          # quadratic: B0 = 1
    assert batches[0] == 2 and max(batches) > 2 and summary["samples"] == sum(batches)
    assert summary["scale_range"] == [2, max(batches)] and run.steps[-1]["progress"] >= 60
    written = render([run], tmp_path / "figures")
    assert (tmp_path / "figures" / "batch.png") in written
    assert f"| 2-{max(batches)} " in (tmp_path / "figures" / "table.md").read_text()


def test_the_adaptive_study_runs_the_controller_once_up_to_the_largest_scale_beside_fixed_scales(tmp_path):
    cells = grid_cells(ADAPTIVE, tmp_path, {w: Base(0.1) for w in ADAPTIVE.workloads})
    shapes = {(c.spec.name.rsplit("-", 1)[0], c.spec.workers, c.spec.accumulation) for c in cells}
    assert shapes == {("reference-S1", 1, 1), ("AdaScale-S8", 2, 4), ("AdaScale-S32", 2, 16),
                      ("AdaptiveBatch-S32", 2, 1)}
    assert len(cells) == len(ADAPTIVE.workloads) * ADAPTIVE.seeds * len(shapes) and ADAPTIVE.seeds >= 3
    adaptive = [c.spec for c in cells if c.spec.policy == "AdaptiveBatch"]
    assert all(spec.policy_params == {"max_accumulation_steps": 16} for spec in adaptive)
    assert policy_entry(adaptive[0])["params"]["micro_batch_size"] == 8   # digits' micro-batch: batches in samples


@pytest.fixture(scope="module")
def quick_adaptive_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("quality_adaptive")
    run_command([str(VENV_BIN / "scaling-plugins"), "bench", "quality", "--adaptive", "--quick", "--out", str(out)],
                timeout=600)
    return out


@pytest.mark.slow
def test_the_quick_adaptive_study_reports_steps_samples_and_wall_time_against_fixed_scales(quick_adaptive_study):
    out = quick_adaptive_study
    report = (out / REPORT_FILE).read_text()
    assert "scaling-plugins bench quality --adaptive --quick" in report
    summary = json.loads((out / "digits" / "AdaptiveBatch-S8-seed0" / "run.json").read_text())["summary"]
    low, high = summary["scale_range"]
    assert low == 2 and low <= high <= 8
    assert f"| AdaptiveBatch | {low}–{high} | 1 | {summary['final_val_loss']:.4f} ± 0.0000 |" in report
    assert f"| {summary['steps']} | {summary['samples']} |" in report
    assert "vs the best fixed S (AdaScale S = 8)" in report and "- optimizer steps: " in report
    data = (out / "adaptive_digits.png").read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 20_000


def test_check_config_reads_the_micro_batch_of_a_deepspeed_config(tmp_path):
    config = {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 2,
              "scheduler": {"type": "AdaptiveBatch", "params": {"min_batch": 32, "max_batch": 256}}}
    assert check_document(config, Shape(workers=2)) == ([], ["DeepSpeed config: checked its scheduler entry "
                                                              "'AdaptiveBatch'"])
    (problem,), _ = check_document(config, Shape(workers=3))
    assert str(problem).endswith("fails at attach with 3 worker(s) × 2 accumulation step(s): min_batch = 32 is not a "
                                 "multiple of micro_batch_size × workers = 8 × 3 = 24: allowed are 24, 48, 72, ...")
    config["scheduler"]["params"]["micro_batch_size"] = 4
    (problem,), _ = check_document(config, Shape(workers=2))
    assert str(problem).endswith("micro_batch_size = 4 but the engine's micro-batch is 8 "
                                 "(train_micro_batch_size_per_gpu): leave micro_batch_size out or make them equal")
