"""The `scaling-plugins` command: demo (a tiny budget, real spawned ranks), report, check-config, --help."""
import json
import subprocess
import sys

import pytest

from scaling_plugins import POLICIES
from scaling_plugins.app.cli import main
from scaling_plugins.app.demo import default_policies, plan
from scaling_plugins.app.plots import FIGURES, TABLE_FILE
from tools.launchers import REPO, VENV_BIN, run_command

CLI = str(VENV_BIN / "scaling-plugins")


@pytest.fixture(scope="module")
def demo_folder(tmp_path_factory):
    """One real demo: reference at S = 1, then every default policy at S = 4 on 2 ranks, tiny budget."""
    out = tmp_path_factory.mktemp("runs")
    proc = run_command([CLI, "demo", "--budget", "48", "--scale", "4", "--evals", "2", "--out", str(out)],
                       timeout=300)
    (folder,) = out.iterdir()
    return folder, proc.stdout + proc.stderr


def test_demo_trains_every_run_and_prints_the_table(demo_folder):
    folder, output = demo_folder
    names = ["reference-S1"] + [f"{p.lower()}-S4" for p in default_policies()]
    for name in names:
        run = json.loads((folder / name / "run.json").read_text())
        assert run["summary"]["steps"] > 0 and (folder / name / "metrics.jsonl").stat().st_size > 0
        assert name in output
    table_lines = [line for line in output.splitlines() if line.startswith("| ")]
    assert len(table_lines) == 1 + len(names) and "val loss" in table_lines[0]
    assert "base steps" in output          # the progress bar of each run
    reference = json.loads((folder / "reference-S1" / "run.json").read_text())["summary"]
    adascale = json.loads((folder / "adascale-S4" / "run.json").read_text())["summary"]
    assert reference["steps"] == 48 and reference["samples"] == 48 * 8
    assert 12 <= adascale["steps"] < 48 and 1 < adascale["mean_gain"] <= 4   # S = 4: fewer, larger steps


def test_demo_writes_figures_a_person_can_open(demo_folder):
    folder, _ = demo_folder
    for name in FIGURES:
        data = (folder / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 20_000
    assert "mean gain" in (folder / TABLE_FILE).read_text()


def test_report_rerenders_from_saved_runs(demo_folder, tmp_path, capsys):
    folder, _ = demo_folder
    runs = sorted(p for p in folder.iterdir() if (p / "run.json").exists())
    assert main(["report", *map(str, runs), "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert all(run.name in printed for run in runs)
    assert all((tmp_path / name).exists() for name in FIGURES + (TABLE_FILE,))
    assert main(["report", str(tmp_path / "nothing-here")]) == 2


def test_help_explains_every_demo_option():
    proc = subprocess.run([CLI, "demo", "--help"], capture_output=True, text=True, check=True)
    for option in ("--backend", "--policy", "--workload", "--workers", "--scale", "--budget", "--seed", "--out"):
        assert option in proc.stdout
    assert "ddp" in proc.stdout and "deepspeed" in proc.stdout and "horovod" in proc.stdout
    top = subprocess.run([CLI, "--help"], capture_output=True, text=True, check=True).stdout
    assert "demo" in top and "report" in top and "check-config" in top


def test_demo_rejects_bad_options_before_training(capsys):
    assert main(["demo", "--scale", "6", "--workers", "4"]) == 2
    assert "multiple of workers" in capsys.readouterr().err
    assert main(["demo", "--policy", "NoSuchPolicy"]) == 2
    assert "valid policies" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["demo", "--workers", "0"])


def test_policy_list_prints_the_registry(capsys):
    assert main(["demo", "--policy", "list"]) == 0
    assert capsys.readouterr().out.split() == sorted(POLICIES)


def test_plan_gives_the_reference_and_each_policy_at_scale():
    specs = plan("digits", "ddp", ["AdaScale"], workers=2, scale=16, budget=100, seed=1)
    assert [(s.name, s.workers, s.accumulation, s.scale) for s in specs] == [
        ("reference-S1", 1, 1, 1), ("adascale-S16", 2, 8, 16)]
    assert all(s.budget == 100 and s.seed == 1 for s in specs)


@pytest.mark.parametrize("document, problems", [
    ({"type": "AdaScale", "params": {}}, []),
    ({"train_batch_size": 8, "scheduler": {"type": "AdaScale", "params": {"total_num_steps": 100}}}, []),
    ({"scheduler": {"type": "AdaScale", "params": {"smoothing": 1.5, "scale": 0, "foo": 1,
                                                  "schedule": {"type": "cosinus"}}}},
     ["scheduler.params.foo = 1: unknown parameter of AdaScale; allowed:",
      "scheduler.params.smoothing = 1.5: smoothing must lie in [0, 1)",
      "scheduler.params.scale = 0: scale must be >= 1",
      'scheduler.params.schedule = {"type": "cosinus"}: schedule.type=\'cosinus\' is not a known schedule; valid:']),
    ({"scheduler": {"type": "AdaScal"}}, ["scheduler.type = \"AdaScal\": not a policy; valid policies: ["]),
    ({"type": "AdaScale", "parms": {}}, ["policy.parms = {}: unknown key; allowed: ['params', 'type']"]),
    ([1, 2], ["(top level)"]),
    ({"type": "AutoWU", "params": {"warmup_min_lr": 0.1}},          # the missing budget is not the lr's fault
     ['policy.params = {"warmup_min_lr": 0.1}: total_num_steps is required']),
    ({"type": "AutoWU", "params": {"warmup_min_lr": 2.0, "total_num_steps": 100}},
     ["policy.params = {"]),                                       # min_lr >= max_lr: a rule tying two keys
])
def test_check_config_prints_every_problem_with_its_key_path(tmp_path, capsys, document, problems):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(document))
    assert main(["check-config", str(path)]) == (1 if problems else 0)
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if " = " in line or "(top level)" in line]
    assert len(lines) == len(problems)
    for expected in problems:
        assert any(expected in line for line in lines), (expected, out)
    assert out.rstrip().endswith("OK" if not problems else f"{len(problems)} problem(s)")


def test_check_config_accepts_every_shipped_deepspeed_config(capsys):
    configs = sorted((REPO / "configs" / "deepspeed").glob("*.json"))
    assert configs
    for config in configs:
        assert main(["check-config", str(config)]) == 0, capsys.readouterr().out
    assert capsys.readouterr().out.count(": OK") == len(configs)


def test_check_config_knows_deepspeeds_last_batch_iteration(tmp_path, capsys):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"scheduler": {"type": "AdaScale", "params": {"last_batch_iteration": -1}}}))
    assert main(["check-config", str(path)]) == 0
    path.write_text(json.dumps({"scheduler": {"type": "AdaScale", "params": {"last_batch_iteration": 7}}}))
    assert main(["check-config", str(path)]) == 1
    assert "scheduler.params.last_batch_iteration = 7: only -1 is allowed" in capsys.readouterr().out
    path.write_text(json.dumps({"type": "AdaScale", "params": {"last_batch_iteration": -1}}))   # not DeepSpeed
    assert main(["check-config", str(path)]) == 1


def test_check_config_reports_malformed_json_and_engine_schedulers(tmp_path, capsys):
    broken = tmp_path / "broken.json"
    broken.write_text('{"scheduler": {"type": "AdaScale",}}')   # a trailing comma: DeepSpeed (Hjson) reads it
    assert main(["check-config", str(broken)]) == 1
    out = capsys.readouterr().out
    assert "read as DeepSpeed reads it (Hjson" in out and "scheduler.params = null: required by DeepSpeed" in out
    broken.write_text('{"scheduler": {"type": "AdaScale", "params": {}}')
    assert main(["check-config", str(broken)]) == 1
    assert "not valid" in capsys.readouterr().out
    native = tmp_path / "native.json"
    native.write_text(json.dumps({"scheduler": {"type": "StepLR", "params": {"step_size": 3}}}))
    assert main(["check-config", str(native)]) == 0
    assert "not a scaling_plugins policy" in capsys.readouterr().out


def test_console_script_exit_status(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"type": "AdaScale", "params": {"smoothing": -1}}))
    proc = subprocess.run([CLI, "check-config", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 1 and "policy.params.smoothing = -1" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "scaling_plugins.app.cli", "check-config", str(bad)],
                          capture_output=True, text=True)
    assert proc.returncode == 1


def test_demo_says_how_to_get_a_backend_it_cannot_run(capsys, monkeypatch):
    from scaling_plugins.app import engines

    monkeypatch.setitem(engines.ENGINE_MODULES, "horovod", "horovod_not_installed_here")
    assert main(["demo", "--backend", "horovod", "--budget", "8", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "backend 'horovod' is not available" in err and "make horovod" in err
