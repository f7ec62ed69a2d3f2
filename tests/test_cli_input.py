"""Bad input to the command and its files: each case gets a clear error or a documented, logged fallback, never a
traceback. Every row asserts the message, not only the exit status.

One table, ``CASES``: each row has an id, the files it writes, the command line (``{tmp}`` stands for the test's
folder), the exit status, and the message fragments expected on stdout ("out") or stderr ("err"). Every command
runs in-process through ``scaling_plugins.app.cli.main`` with the demo's rank spawning replaced by a sentinel, so a
demo row proves it failed before spawning (and the valid control row proves the sentinel is reached); rows that
need a missing dependency run the command in a subprocess where that import is blocked. Bad input to the library:
test_policy_input.py (policy and schedule params, states), test_ddp_input.py (DDP), test_engine_input.py
(Horovod, DeepSpeed).
"""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import pytest

from scaling_plugins.app import demo
from scaling_plugins.app.cli import main
from tools.launchers import REPO

SPAWNED = "spawned"   # the status of a row whose command reached the spawning of ranks

BLOCK_IMPORT = """\
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == {module!r}:
            raise ImportError(f"No module named {{name!r}} (blocked by the test)")
sys.meta_path.insert(0, Block())
from scaling_plugins.app.cli import main
sys.exit(main(sys.argv[1:]))
"""

Content = Union[str, bytes]


@dataclass(frozen=True)
class Case:
    """One bad input: files to write under the test folder, the command line, what must come out."""

    id: str
    argv: tuple[str, ...]
    status: Union[int, str]
    expect: tuple[tuple[str, str], ...]          # (stream, fragment): stream is "out" or "err"
    files: dict[str, Content] = field(default_factory=dict)
    without: Optional[str] = None                # a module made unimportable (runs in a subprocess)


# -- saved runs for `report` ------------------------------------------------------------------------------
def _run_files(name: str, scale: int) -> dict[str, Content]:
    """A small, valid saved run (what the trainer writes), under ``runs/<name>``."""
    spec = {"name": name, "policy": "AdaScale", "workload": "quadratic", "backend": "ddp", "budget": 8}
    summary = {"final_val_loss": 1.25, "final_val_accuracy": None, "steps": 3, "samples": 12, "wall_s": 0.5,
               "mean_gain": 1.5, "scale": scale, "final_progress": 8.0}
    steps = [{"step": s, "samples": 4 * s, "loss": 2.0 / s, "lr": 0.05, "gain": 1.5, "sigma_sq": None, "mu_sq": None,
              "noise_scale": None, "progress": 2.5 * s, "phase": None, "skipped_update": False} for s in (1, 2, 3)]
    evals = [{"step": s, "samples": 4 * s, "val_loss": 1.5 - 0.1 * s, "val_accuracy": None} for s in (0, 3)]
    return {f"runs/{name}/run.json": json.dumps({"spec": spec, "summary": summary}, indent=2),
            f"runs/{name}/metrics.jsonl": "".join(json.dumps(r) + "\n" for r in steps),
            f"runs/{name}/eval.jsonl": "".join(json.dumps(r) + "\n" for r in evals)}


def _runs(**damaged: Content) -> dict[str, Content]:
    """Two saved runs, "good" (S = 1) and "bad" (S = 4), with the files of "bad" given as keywords replaced
    (``metrics_jsonl=...`` replaces runs/bad/metrics.jsonl)."""
    files = {**_run_files("good", 1), **_run_files("bad", 4)}
    for name, content in damaged.items():
        files[f"runs/bad/{name.replace('_', '.')}"] = content
    return files


GOOD_METRICS = _run_files("bad", 4)["runs/bad/metrics.jsonl"]
TRUNCATED_METRICS = GOOD_METRICS[: GOOD_METRICS.rindex('"phase"') + 4]        # cut inside the last line's key
TRUNCATED_AT = TRUNCATED_METRICS.split("\n")[-1].rindex('"') + 1               # where the cut string starts
BAD_RUN_JSON = json.loads(_run_files("bad", 4)["runs/bad/run.json"])
WITHOUT_MEAN_GAIN = {"spec": BAD_RUN_JSON["spec"],
                     "summary": {k: v for k, v in BAD_RUN_JSON["summary"].items() if k != "mean_gain"}}
STRING_SCALE = {"spec": BAD_RUN_JSON["spec"], "summary": {**BAD_RUN_JSON["summary"], "scale": "4"}}
REPORT = ("report", "{tmp}/runs", "--out", "{tmp}/figures")
GOOD_IS_REPORTED = ("out", "| good ")

# -- configs for `check-config` ---------------------------------------------------------------------------
LEGW = json.dumps({"type": "LEGW", "params": {"warmup_num_steps": 10, "total_num_steps": 100}})
LEGW_DEEPSPEED = json.dumps({"train_batch_size": 16, "gradient_accumulation_steps": 4,
                             "scheduler": {"type": "LEGW", "params": {"warmup_num_steps": 10,
                                                                      "total_num_steps": 100}}})
AUTOWU = json.dumps({"type": "AutoWU", "params": {"total_num_steps": 100}})
HJSON_DEEPSPEED = ('// DeepSpeed reads its config with Hjson: comments and trailing commas are fine\n'
                   '{"train_micro_batch_size_per_gpu": 1,\n "scheduler": {"type": "AdaScale", "params": {},},\n}\n')
HJSON_ERROR_DEEPSPEED = '// a comment\n{"scheduler": {"type": "AdaScale", "params": {}},\n "train_batch_size": }\n'
SCHEDULER_TWICE = ('{"train_batch_size": 2,\n "scheduler": {"type": "AdaScale", "params": {}},\n'
                   ' "scheduler": {"type": "LinearScaling", "params": {}}}')
AUTO_DEEPSPEED = json.dumps({"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": 1,
                             "optimizer": {"type": "SGD", "params": {"lr": "auto", "momentum": 0.9}},
                             "scheduler": {"type": "AdaScale", "params": {}}})
QUICK_DEMO = ("demo", "--workload", "quadratic", "--budget", "4", "--scale", "2", "--no-progress")

CASES = [
    # check-config on a non-finite scale and on a DeepSpeed "scheduler" without "params"
    Case("config-scale-infinity", ("check-config", "{tmp}/c.json"), 1,
         (("out", "policy.params.scale = Infinity: scale = inf (float): must be a finite number"),),
         {"c.json": '{"type": "AdaScale", "params": {"scale": Infinity}}'}),
    Case("config-deepspeed-scheduler-without-params", ("check-config", "{tmp}/c.json"), 1,
         (("out", "scheduler.params = null: required by DeepSpeed, which builds the scheduler with **params: use {} "
                  "for every default"),),
         {"c.json": '{"train_batch_size": 2, "scheduler": {"type": "AdaScale"}}'}),
    # check-config on a file that is not UTF-8, and its relatives
    Case("config-not-utf8", ("check-config", "{tmp}/c.json"), 1,
         (("out", "c.json: line 2, column 22: not UTF-8 text (byte 0xe9); save the file as UTF-8"),),
         {"c.json": b'{"type": "AdaScale",\n "params": {"x": "caf\xe9"}}'}),
    Case("config-bad-json-at-its-line", ("check-config", "{tmp}/c.json"), 1,
         (("out", "c.json: line 3, column 1: not valid JSON: Expecting property name enclosed in double quotes"),),
         {"c.json": '{"type": "AdaScale",\n "params": {"smoothing": 0.5,\n}}'}),
    Case("config-is-a-folder", ("check-config", "{tmp}"), 1, (("out", ": cannot read: Is a directory"),)),
    # check-config reads a DeepSpeed config as DeepSpeed does (Hjson, a key twice refused); "auto" only HF fills
    Case("config-deepspeed-hjson-read-as-deepspeed-reads-it", ("check-config", "{tmp}/c.json"), 0,
         (("out", "c.json: read as DeepSpeed reads it (Hjson: comments, trailing commas); the Hugging Face Trainer "
                  "and Accelerate read a ds_config file with json.load, which refuses it"),
          ("out", "c.json: DeepSpeed config: checked its scheduler entry 'AdaScale'"), ("out", "c.json: OK")),
         {"c.json": HJSON_DEEPSPEED}),
    Case("config-deepspeed-hjson-error-at-its-line", ("check-config", "{tmp}/c.json"), 1,
         (("out", "c.json: line 3, column 22: not valid as DeepSpeed reads it (Hjson): Found a punctuator character "
                  "when expecting a quoteless string"),), {"c.json": HJSON_ERROR_DEEPSPEED}),
    Case("config-deepspeed-scheduler-twice", ("check-config", "{tmp}/c.json"), 1,
         (("out", "c.json: key(s) given twice: scheduler; DeepSpeed refuses a config with a key twice (and json.load "
                  "would keep only the last): keep one of each"), ("out", "c.json: 1 problem(s)")),
         {"c.json": SCHEDULER_TWICE}),
    Case("config-deepspeed-auto-outside-hf", ("check-config", "{tmp}/c.json"), 0,
         (("out", 'c.json: warning: train_micro_batch_size_per_gpu, optimizer.params.lr = "auto": only the Hugging '
                  'Face Trainer and Accelerate fill "auto" there; plain deepspeed.initialize refuses it. Give numbers '
                  "unless the file is for the Trainer or Accelerate"), ("out", "c.json: OK")),
         {"c.json": AUTO_DEEPSPEED}),
    # check-config on LEGW settings that fail at attach at some scales; AutoWU without scikit-learn
    Case("config-legw-fails-at-the-given-shape", ("check-config", "{tmp}/c.json", "--workers", "2",
                                                   "--accumulation", "8"), 1,
         (("out", "policy.params = {\"warmup_num_steps\": 10, \"total_num_steps\": 100}: fails at attach with "
                  "2 worker(s) × 8 accumulation step(s): warmup_num_steps=10 is a warmup of 160 base-scale steps "
                  "at k=16, not shorter than total_num_steps=100"),), {"c.json": LEGW}),
    Case("config-legw-warns-at-the-shapes-that-fail", ("check-config", "{tmp}/c.json"), 0,
         (("out", "warning: policy.params fails at attach with 10-1024 worker(s) (of 1-1024 tried) × 1 "
                  "accumulation step(s); at 10 worker(s)"), ("out", "c.json: OK")), {"c.json": LEGW}),
    Case("config-legw-takes-deepspeeds-accumulation", ("check-config", "{tmp}/c.json", "--workers", "4"), 1,
         (("out", "scheduler.params = {"), ("out", "fails at attach with 4 worker(s) × 4 accumulation step(s)")),
         {"c.json": LEGW_DEEPSPEED}),
    Case("config-legw-fits-its-shape", ("check-config", "{tmp}/c.json", "--workers", "3", "--accumulation", "3"),
         0, (("out", "c.json: OK"),), {"c.json": LEGW}),
    Case("config-autowu-without-sklearn", ("check-config", "{tmp}/c.json"), 1,
         (("out", 'policy.params = {"total_num_steps": 100}: AutoWU\'s loss test needs scikit-learn: '
                  "pip install 'scaling_plugins[autowu]'"), ("out", "c.json: 1 problem(s)")),
         {"c.json": AUTOWU}, without="sklearn"),
    # demo's options: refused before any rank is spawned
    Case("demo-budget-inf", QUICK_DEMO + ("--budget", "inf"), 2,
         (("err", "argument --budget: budget must be a finite number of base-scale steps > 0, got inf"),)),
    Case("demo-budget-nan", QUICK_DEMO + ("--budget", "nan"), 2,
         (("err", "argument --budget: budget must be a finite number of base-scale steps > 0, got nan"),)),
    Case("demo-seed-negative", QUICK_DEMO + ("--seed", "-1"), 2,
         (("err", "argument --seed: seed must be an integer in [0, 2**63 - 1], got -1"),)),
    Case("demo-out-is-a-file", QUICK_DEMO + ("--out", "{tmp}/taken"), 2,
         (("err", "cannot write the runs (--out) into {tmp}/taken: {tmp}/taken is a file, not a folder"),),
         {"taken": "not a folder"}),
    Case("demo-out-below-a-file", QUICK_DEMO + ("--out", "{tmp}/taken/runs"), 2,
         (("err", "cannot write the runs (--out) into {tmp}/taken/runs: {tmp}/taken is a file, not a folder"),),
         {"taken": "not a folder"}),
    Case("demo-same-policy-twice", QUICK_DEMO + ("--policy", "AdaScale", "--policy", "AdaScale"), 2,
         (("err", "runs ['adascale-S2'] would share a folder: give each policy once"),)),
    Case("demo-policy-invalid-at-the-runs-shape", QUICK_DEMO + ("--policy", "AutoWU", "--scale", "4"), 2,
         (("err", "run 'autowu-S4' (AutoWU on quadratic, 2 worker(s) × 2 accumulation): "),
          ("err", "total_num_steps"))),
    Case("demo-valid-options-reach-spawning", QUICK_DEMO + ("--out", "{tmp}/runs"), SPAWNED, ()),
    # report skips a damaged run with a warning naming the file and line (or key), reports the rest
    Case("report-truncated-metrics", REPORT, 1,
         (("err", f"warning: skipping {{tmp}}/runs/bad/metrics.jsonl: line 3, column {TRUNCATED_AT}: not valid "
                  "JSON: Unterminated string"), GOOD_IS_REPORTED), _runs(metrics_jsonl=TRUNCATED_METRICS)),
    Case("report-run-json-is-a-list", REPORT, 1,
         (("err", 'skipping {tmp}/runs/bad/run.json: expected an object {"spec": ..., "summary": ...}, got list'),
          GOOD_IS_REPORTED), _runs(run_json="[]")),
    Case("report-run-json-lacks-a-key", REPORT, 1,
         (("err", "skipping {tmp}/runs/bad/run.json: summary.mean_gain is missing (a number is required)"),
          GOOD_IS_REPORTED), _runs(run_json=json.dumps(WITHOUT_MEAN_GAIN))),
    Case("report-run-json-lacks-summary", REPORT, 1,
         (("err", 'skipping {tmp}/runs/bad/run.json: "summary" must be an object, missing'), GOOD_IS_REPORTED),
         _runs(run_json=json.dumps({"spec": {}}))),
    Case("report-run-json-string-number", REPORT, 1,
         (("err", "skipping {tmp}/runs/bad/run.json: summary.scale must be a number, got '4'"), GOOD_IS_REPORTED),
         _runs(run_json=json.dumps(STRING_SCALE))),
    Case("report-run-json-bad-json-at-its-line", REPORT, 1,
         (("err", "skipping {tmp}/runs/bad/run.json: line 2, column 13: not valid JSON: Expecting value"),
          GOOD_IS_REPORTED), _runs(run_json='{"spec": {},\n "summary": }')),
    Case("report-metrics-record-not-an-object", REPORT, 1,
         (("err", "skipping {tmp}/runs/bad/metrics.jsonl: line 2: expected a JSON object per line, got list"),
          GOOD_IS_REPORTED), _runs(metrics_jsonl=GOOD_METRICS.splitlines()[0] + "\n[1, 2]\n")),
    Case("report-metrics-field-not-a-number", REPORT, 1,
         (("err", "skipping {tmp}/runs/bad/metrics.jsonl: line 1: lr must be a number or null, got 'high'"),
          GOOD_IS_REPORTED), _runs(metrics_jsonl='{"step": 1, "lr": "high"}\n')),
    Case("report-eval-not-utf8", REPORT, 1,
         (("err", "skipping {tmp}/runs/bad/eval.jsonl: line 1, column 13: not UTF-8 text (byte 0xff)"),
          GOOD_IS_REPORTED), _runs(eval_jsonl=b'{"step": 0, \xff}\n')),
    Case("report-unfinished-run", REPORT, 1,
         (("err", "skipping {tmp}/runs/bad: no run.json (an unfinished run?)"), GOOD_IS_REPORTED),
         {k: v for k, v in _runs().items() if k != "runs/bad/run.json"}),
    Case("report-missing-folder-among-good-ones", ("report", "{tmp}/runs", "{tmp}/elsewhere", "--out", "{tmp}/f"),
         1, (("err", "skipping {tmp}/elsewhere: no such folder"), GOOD_IS_REPORTED), _runs()),
    Case("report-out-is-a-file", ("report", "{tmp}/runs", "--out", "{tmp}/taken/figures"), 2,
         (("err", "cannot write the figures (--out) into {tmp}/taken/figures: {tmp}/taken is a file, not a folder"),),
         {**_runs(), "taken": "not a folder"}),
    Case("report-without-matplotlib", REPORT, 2,
         (("err", "scaling-plugins report: plots need matplotlib: pip install 'scaling_plugins[plot]'"),
          GOOD_IS_REPORTED), _runs(), without="matplotlib"),
    Case("report-nothing-loadable", ("report", "{tmp}/runs/bad"), 2,
         (("err", "skipping {tmp}/runs/bad/run.json: expected an object"),
          ("err", "no run could be loaded; nothing to report")), _runs(run_json="[]")),
]


class Spawned(Exception):
    """Raised in place of spawning a demo's ranks."""


def _write(root: Path, files: dict[str, Content]) -> None:
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")


def _in_process(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[Union[int, str], str, str]:
    """(status, stdout, stderr) of ``main(argv)``; status SPAWNED when it got as far as spawning ranks."""
    try:
        status: Union[int, str] = main(argv)
    except SystemExit as exit_:   # argparse's usage errors
        status = exit_.code
    except Spawned:
        status = SPAWNED
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def _blocked(argv: list[str], module: str) -> tuple[int, str, str]:
    """(status, stdout, stderr) of the command in a subprocess where ``module`` cannot be imported."""
    proc = subprocess.run([sys.executable, "-c", BLOCK_IMPORT.format(module=module), *argv], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_gets_a_clear_message(case: Case, tmp_path: Path, capsys, monkeypatch) -> None:
    _write(tmp_path, case.files)
    argv = [arg.replace("{tmp}", str(tmp_path)) for arg in case.argv]

    def no_spawning(*args, **kwargs):
        raise Spawned

    monkeypatch.setattr(demo, "run_local", no_spawning)
    status, out, err = _blocked(argv, case.without) if case.without else _in_process(argv, capsys)
    streams = {"out": out, "err": err}
    assert status == case.status, (out, err)
    for stream, fragment in case.expect:
        assert fragment.replace("{tmp}", str(tmp_path)) in streams[stream], (fragment, out, err)
    assert "Traceback" not in out + err
