"""The quality-at-scale study: its grid (what each method gets), the noise-scale arithmetic, and the CI slice
`scaling-plugins bench quality --quick` run for real (table, goal checks, figures, resume)."""
import json
import math

import pytest

from scaling_plugins.app.cli import main
from scaling_plugins.app.noise_scale import batch_size_advice, flattening_scale, run_noise_scale, steps_ratio
from scaling_plugins.app.quality import (FULL, QUICK, REFERENCE, S1_METHODS, SMOOTHING_VALUES, Base, Grid, grid_cells,
                                    method_spec, run_cells)
from scaling_plugins.app.quality_report import QUALITY_FIGURE, REPORT_FILE, STEPS_FIGURE
from scaling_plugins.app.training import policy_entry
from tools.launchers import VENV_BIN, run_command

CLI = str(VENV_BIN / "scaling-plugins")


def test_full_grid_runs_every_method_at_every_scale_with_three_seeds(tmp_path):
    cells = grid_cells(FULL, tmp_path, {w: Base(0.1) for w in FULL.workloads})
    per_seed = len(S1_METHODS) + (len(FULL.methods) - 1) * (len(FULL.scales) - 1)
    ablation = FULL.seeds * len(SMOOTHING_VALUES) * len(FULL.smoothing_ablation)
    assert len(cells) == len(FULL.workloads) * FULL.seeds * per_seed + ablation
    thetas = [c.spec for c in cells if "theta" in c.spec.name]
    assert len(thetas) == ablation and {s.policy_params["smoothing"] for s in thetas} == set(SMOOTHING_VALUES)
    assert {(s.policy, s.scale) for s in thetas} == {("AdaScale", 32)}
    assert FULL.seeds >= 3 and set(FULL.scales) == {1, 4, 8, 16, 32}
    assert {c.spec.name.split("-")[0] for c in cells if c.spec.scale == 1} == set(S1_METHODS)
    assert all(c.spec.workers == 1 and c.spec.accumulation == c.spec.scale for c in cells)
    assert len({c.folder for c in cells}) == len(cells)


def test_methods_share_the_base_settings_and_differ_only_by_their_rule():
    base = Base(0.02, (0.1, 4.0))
    specs = {m: method_spec(FULL, "digits", m, 16 if m != REFERENCE else 1, 1, base) for m in FULL.methods}
    budget = FULL.budget_of("digits")
    assert {s.lr for s in specs.values()} == {0.02} and {s.budget for s in specs.values()} == {budget}
    assert specs[REFERENCE].policy == "AdaScale" and specs[REFERENCE].scale == 1
    assert specs["LinearScaling"].policy_params == {"warmup_num_steps": 0.1 * budget}
    assert specs["LEGW"].policy_params == {"warmup_num_steps": 0.1 * budget / 32}   # × k = 10% at S = 32
    autowu = policy_entry(specs["AutoWU"])["params"]
    assert autowu["warmup_min_lr"] == pytest.approx(0.002) and autowu["warmup_max_lr"] == pytest.approx(0.08)
    assert autowu["total_num_steps"] == math.ceil(budget / 16)      # the same epochs as the reference
    assert policy_entry(specs["AdaScale"])["params"]["total_num_steps"] == budget   # the budget in τ


def test_two_rank_grid_splits_scale_into_workers_times_accumulation(tmp_path):
    grid = Grid(workloads=("digits",), scales=(1, 4, 32), seeds=1, workers=2)
    cells = grid_cells(grid, tmp_path, {"digits": Base(0.1)})
    shapes = {(c.spec.scale, c.spec.workers, c.spec.accumulation) for c in cells}
    assert shapes == {(1, 1, 1), (4, 2, 2), (32, 2, 16)}
    with pytest.raises(ValueError, match="multiple of workers"):
        Grid(scales=(1, 3), workers=2)
    with pytest.raises(ValueError, match="unknown"):
        Grid(methods=("Nope",))


def test_noise_scale_summary_and_the_flattening_of_steps():
    records = [{"sigma_sq": 4.0 * (1 + i / 10), "mu_sq": 1.0} for i in range(100)] + [{"sigma_sq": None, "mu_sq": None}]
    measured = run_noise_scale(records, base_batch=8)
    assert measured.early < measured.median < measured.late and measured.median == pytest.approx(8 * 4 * 5.95, rel=0.01)
    assert run_noise_scale([{"sigma_sq": None, "mu_sq": None}], 8) is None
    scales = [1, 4, 8, 16, 32]
    for b in (3, 6, 12):   # a constant noise scale of b base batches: the log-log slope is −½ at S = b
        assert flattening_scale(scales, [steps_ratio(s, 8 * b, 8) for s in scales]) == pytest.approx(b, rel=0.05)
    assert flattening_scale(scales, [1 / s for s in scales]) is None   # perfect scaling never flattens
    assert "larger batches buy few steps" in batch_size_advice(measured)


@pytest.fixture(scope="module")
def quick_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("quality")
    proc = run_command([CLI, "bench", "quality", "--quick", "--out", str(out)], timeout=300)
    return out, proc.stdout + proc.stderr


def test_quick_slice_trains_every_cell_and_writes_the_report(quick_study):
    out, output = quick_study
    cells = grid_cells(QUICK, out, {"digits": Base(0.02)})
    for cell in cells:
        summary = json.loads((cell.folder / "run.json").read_text())["summary"]
        assert summary["scale"] == cell.spec.scale and summary["steps"] > 0
    report = (out / REPORT_FILE).read_text()
    assert "scaling-plugins bench quality --quick" in report
    assert report.count("| AdaScale | ") == 2 and "| reference | 1 | 1 |" in report
    assert "AdaScale S = 16:" in report and "LinearScaling S = 16:" in report and "B_simple" in report
    assert "larger batches buy few steps" in output
    for figure in (QUALITY_FIGURE, STEPS_FIGURE):
        data = (out / figure).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 20_000
    adascale = json.loads((out / "digits" / "AdaScale-S16-seed0" / "run.json").read_text())["summary"]
    assert adascale["final_progress"] >= QUICK.budget > adascale["steps"]    # τ reached the budget in fewer steps


def test_a_second_run_resumes_and_trains_nothing(quick_study):
    out, _ = quick_study
    cells = grid_cells(QUICK, out, {"digits": Base(0.02)})
    messages = []
    run_cells(cells, jobs=2, log=messages.append)   # nothing left to train: no process is started
    assert messages == [f"{len(cells)} of {len(cells)} cells already finished: skipped"]


def test_report_command_prints_the_batch_size_advice(quick_study, tmp_path, capsys):
    out, _ = quick_study
    assert main(["report", str(out / "digits" / "AdaScale-S16-seed0"), str(out / "digits" / "reference-S1-seed0"),
                 "--out", str(tmp_path)]) == 0
    (advice,) = [line for line in capsys.readouterr().out.splitlines() if "B_simple" in line]
    assert advice.startswith("AdaScale-S16-seed0 (S=16): gradient noise scale") and "buy few steps" in advice
