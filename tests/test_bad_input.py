"""Bad input (issue 16): each case gets a clear error or a documented, logged fallback, never a silent wrong
learning rate, a hang or a traceback from deep inside. Every row asserts the message, not only the exception.

The command (cases 10-15 and its file handling), one table ``CASES``: each row has an id, the files it writes,
the command line (``{tmp}`` stands for the test's folder), the exit status, and the message fragments expected
on stdout ("out") or stderr ("err"). Every command runs in-process through ``scaling_plugins.app.cli.main`` with
the demo's rank spawning replaced by a sentinel, so a demo row proves it failed before spawning (and the valid
control row proves the sentinel is reached); rows that need a missing dependency run the command in a
subprocess where that import is blocked.

The library, one table per setting:
- ``SCHEMA`` and ``STATES``: policy and schedule params and policy states, in the API (the same code builds the
  DeepSpeed entry and check-config);
- ``RANK_CASES``: DDP on 2 real gloo ranks, where both ranks meet the same bad input; each rank's message;
- the cases that need their own job (one rank differs from the other, a resume on another world size), and
  ``ENGINE_CASES``: Horovod's and DeepSpeed's under their real launchers.
"""
from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from scaling_plugins import AdaScale, build_policy
from scaling_plugins.app import demo
from scaling_plugins.app.cli import main
from scaling_plugins.backends.ddp import attach
from tests.distributed import REPO, VENV_BIN, run_command, run_ranks

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
QUICK_DEMO = ("demo", "--workload", "quadratic", "--budget", "4", "--scale", "2", "--no-progress")

CASES = [
    # 1 and 9: check-config on a non-finite scale and on a DeepSpeed "scheduler" without "params"
    Case("config-scale-infinity", ("check-config", "{tmp}/c.json"), 1,
         (("out", "policy.params.scale = Infinity: scale = inf (float): must be a finite number"),),
         {"c.json": '{"type": "AdaScale", "params": {"scale": Infinity}}'}),
    Case("config-deepspeed-scheduler-without-params", ("check-config", "{tmp}/c.json"), 1,
         (("out", "scheduler.params = null: required by DeepSpeed, which builds the scheduler with **params: use {} "
                  "for every default"),),
         {"c.json": '{"train_batch_size": 2, "scheduler": {"type": "AdaScale"}}'}),
    # 10: check-config on a file that is not UTF-8, and its relatives
    Case("config-not-utf8", ("check-config", "{tmp}/c.json"), 1,
         (("out", "c.json: line 2, column 22: not UTF-8 text (byte 0xe9); save the file as UTF-8"),),
         {"c.json": b'{"type": "AdaScale",\n "params": {"x": "caf\xe9"}}'}),
    Case("config-bad-json-at-its-line", ("check-config", "{tmp}/c.json"), 1,
         (("out", "c.json: line 3, column 1: not valid JSON: Expecting property name enclosed in double quotes"),),
         {"c.json": '{"type": "AdaScale",\n "params": {"smoothing": 0.5,\n}}'}),
    Case("config-is-a-folder", ("check-config", "{tmp}"), 1, (("out", ": cannot read: Is a directory"),)),
    # 15: LEGW settings that fail at attach at some scales; AutoWU without scikit-learn
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
    # 11, 12 and the rest of demo's options: refused before any rank is spawned
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
    # 13, 14: report skips a damaged run with a warning naming the file and line (or key), reports the rest
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


# == the library ================================================================================================
INF = float("inf")

SCHEMA = [  # (id, policy entry, fragment of the error message)
    ("scale Infinity", {"type": "AdaScale", "params": {"scale": INF}},
     "params: scale = inf (float): must be a finite number"),
    ("scale NaN", {"type": "LinearScaling", "params": {"scale": math.nan}},
     "params: scale = nan (float): must be a finite number"),
    ("AutoWU warmup_max_lr Infinity", {"type": "AutoWU", "params": {"total_num_steps": 10, "warmup_max_lr": INF}},
     "params: warmup_max_lr = inf (float): must be a finite number"),
    ("scale as a string", {"type": "AdaScale", "params": {"scale": "8"}},
     "params: scale = '8' (str): must be a finite number"),
    ("smoothing as a string", {"type": "AdaScale", "params": {"smoothing": "0.9"}},
     "params: smoothing = '0.9' (str): must be a finite number"),
    ("total_num_steps as a string", {"type": "LEGW", "params": {"total_num_steps": "100"}},
     "params: total_num_steps = '100' (str): must be a finite number"),
    ("schedule gamma as a string", {"type": "AdaScale", "params": {"schedule": {"type": "exponential", "gamma": "0.9"}}},
     "schedule 'exponential': gamma = '0.9' (str): must be a finite number"),
    ("schedule params a list", {"type": "AdaScale", "params": {"schedule": {"type": "cosine", "params": [100]}}},
     "schedule.params must be a mapping of parameter name to value, got [100]"),
    ("milestones with a string", {"type": "SqrtScaling",
                                  "params": {"schedule": {"type": "multistep", "milestones": [10, "20"]}}},
     "milestones = [10, '20'] (list): must be a list of finite numbers"),
    ("single_gradient not a string", {"type": "AdaScale", "params": {"single_gradient": 1}},
     "single_gradient = 1 (int): must be a string"),
    ("params a list", {"type": "AdaScale", "params": [1]}, "params must be a mapping, got [1]"),
]


@pytest.mark.parametrize("spec, message", [row[1:] for row in SCHEMA], ids=[row[0] for row in SCHEMA])
def test_schema_refuses_wrong_types_and_non_finite_numbers(spec, message):
    with pytest.raises(ValueError) as err:
        build_policy(spec)
    assert message in str(err.value)


def test_the_api_checks_types_the_same_way():
    with pytest.raises(ValueError, match=r"scale = inf \(float\): must be a finite number"):
        AdaScale(scale=INF)


STATES = [  # (id, policy loading, state saved by, fragment)
    ("AdaScale state into LinearScaling", "LinearScaling", "AdaScale",
     "this state was saved by policy 'AdaScale', not 'LinearScaling'"),
    ("LinearScaling state into AdaScale", "AdaScale", "LinearScaling",
     "this state was saved by policy 'LinearScaling', not 'AdaScale'"),
]


@pytest.mark.parametrize("loader, saver, message", [row[1:] for row in STATES], ids=[row[0] for row in STATES])
def test_state_of_another_policy_is_refused(loader, saver, message):
    saved = build_policy(saver).state_dict()
    with pytest.raises(ValueError) as err:
        build_policy(loader).load_state_dict(saved)
    assert message in str(err.value)


def test_state_without_format_version_is_refused():
    state = build_policy("AdaScale").state_dict()
    del state["format"]
    with pytest.raises(ValueError, match="not a scaling_plugins policy state \\(no 'policy' name and 'format'"):
        build_policy("AdaScale").load_state_dict(state)


# -- DDP, both ranks meeting the same bad input ------------------------------------------------------------------
def _model_and_optimizer(lr: float = 0.1):
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    return model, DDP(model), torch.optim.SGD(model.parameters(), lr=lr)


def _backward(ddp: DDP) -> None:
    ddp(torch.ones(1, 2)).sum().backward()


def accumulation_differs(rank: int) -> None:
    _, ddp, opt = _model_and_optimizer()
    attach(ddp, opt, "AdaScale", accumulation_steps=2 if rank == 0 else 4)


def policy_differs(rank: int) -> None:
    _, ddp, opt = _model_and_optimizer()
    attach(ddp, opt, "AdaScale" if rank == 0 else "LinearScaling")


def params_differ(rank: int) -> None:
    _, ddp, opt = _model_and_optimizer()
    attach(ddp, opt, {"type": "AdaScale", "params": {"total_num_steps": 100 + rank}})


def fewer_backward_passes(rank: int) -> None:
    _, ddp, opt = _model_and_optimizer()
    ctl = attach(ddp, opt, "AdaScale", accumulation_steps=4)
    for _ in range(5):
        _backward(ddp)
        ctl.step()
        opt.zero_grad()


def step_before_backward(rank: int) -> None:
    _, ddp, opt = _model_and_optimizer()
    attach(ddp, opt, "LinearScaling").step()


def loss_vector(rank: int) -> None:
    _, ddp, opt = _model_and_optimizer()
    ctl = attach(ddp, opt, {"type": "AutoWU", "params": {"total_num_steps": 10}})
    _backward(ddp)
    ctl.step(torch.ones(4))


def attach_twice(rank: int) -> None:
    _, ddp, opt = _model_and_optimizer()
    attach(ddp, opt, "LinearScaling")
    attach(ddp, opt, "LinearScaling")


def zero_lr(rank: int) -> None:
    _, ddp, opt = _model_and_optimizer(lr=0.0)
    ctl = attach(ddp, opt, "LinearScaling")
    _backward(ddp)
    ctl.step()


def sparse_embedding(rank: int) -> None:
    model = torch.nn.Sequential(torch.nn.Embedding(10, 2, sparse=True), torch.nn.Linear(2, 1))
    attach(DDP(model), torch.optim.SGD(model.parameters(), lr=0.1), "AdaScale")


def ddp_mixed_precision(rank: int) -> None:
    from torch.nn.parallel.distributed import _MixedPrecision

    model = torch.nn.Linear(2, 1)
    ddp = DDP(model, mixed_precision=_MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16))
    attach(ddp, torch.optim.SGD(model.parameters(), lr=0.1), "AdaScale")


def hook_registered_first(rank: int) -> None:
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import fp16_compress_hook

    _, ddp, opt = _model_and_optimizer()
    ddp.register_comm_hook(None, fp16_compress_hook)
    attach(ddp, opt, "AdaScale")


def powersgd(rank: int) -> None:
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook

    _, ddp, opt = _model_and_optimizer()
    state = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=1)
    attach(ddp, opt, "AdaScale", comm_hook=powerSGD_hook.powerSGD_hook, comm_hook_state=state)


RANK_CASES = [  # (id, case, {rank: fragment of the error or of the logged warning})
    ("accumulation 2 on one rank, 4 on the other", accumulation_differs,
     {0: "accumulation_steps (ranks grouped by equal value: [[0], [1]]; this rank has 2)",
      1: "accumulation_steps (ranks grouped by equal value: [[0], [1]]; this rank has 4)"}),
    ("a different policy on each rank", policy_differs,
     {0: "the ranks disagree on their policy settings: policy (ranks grouped by equal value: [[0], [1]]; "
         "this rank has 'AdaScale')", 1: "this rank has 'LinearScaling'"}),
    ("different params on each rank", params_differ, {0: "params (ranks grouped by equal value: [[0], [1]]"}),
    ("one backward pass per step, 4 declared", fewer_backward_passes,
     {0: "RuntimeError: 1 backward pass(es) in this step, but accumulation_steps is 4", 1: "3 steps in a row"}),
    ("one backward pass per step, 4 declared: the warning first", fewer_backward_passes,
     {0: "WARNING 1 backward pass(es) in this step, but accumulation_steps is 4: the policy's scale and "
         "statistics assume 4 (run that many micro-batches per step, or pass the accumulation you run); an "
         "error if it happens 3 steps in a row"}),
    ("step() before any backward (LinearScaling)", step_before_backward,
     {0: "RuntimeError: no backward pass since the last step: call loss.backward()"}),
    ("a loss vector passed to ctl.step", loss_vector,
     {0: "ValueError: the loss given to the step must be one number (the batch's mean loss), got a tensor of "
         "shape (4,)"}),
    ("attach twice", attach_twice, {0: "ValueError: this optimizer already follows policy 'LinearScaling'"}),
    ("lr = 0", zero_lr, {0: "WARNING a param group has lr 0: policy 'LinearScaling' multiplies it, so that "
                            "group does not train"}),
    ("a sparse embedding", sparse_embedding,
     {0: "ValueError: module(s) ['0'] make sparse gradients (sparse=True), which DDP's communication hooks cannot "
         "carry the statistics in: build them with sparse=False"}),
    ("DDP's own mixed_precision", ddp_mixed_precision,
     {0: "ValueError: DistributedDataParallel(mixed_precision=...) registers DDP's own communication hook"}),
    ("a communication hook registered before attach", hook_registered_first,
     {0: "ValueError: this DDP model already has a communication hook and DDP allows one: pass yours to "
         "attach(..., comm_hook=hook, comm_hook_state=state)"}),
    ("PowerSGD", powersgd, {0: "ValueError: PowerSGD cannot carry AdaScale's statistics: its reduced gradient is a "
                               "low-rank approximation"}),
]


def run_case(rank: int, world: int, case) -> str:
    """The case's exception as ``"Type: message"`` (or "no error") after its logged warnings, one per line."""
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(f"{record.levelname} {record.getMessage()}")
    logging.getLogger("scaling_plugins").addHandler(handler)
    try:
        case(rank)
        outcome = "no error"
    except Exception as err:  # noqa: BLE001 - the test asserts on the type and message
        outcome = f"{type(err).__name__}: {err}"
    return "\n".join([*records, outcome])


@pytest.fixture(scope="module")
def rank_outcomes() -> dict:
    """Every RANK_CASES case on one 2-rank gloo job (each case meets its bad input on both ranks alike)."""
    cases = {case.__name__: case for _, case, _ in RANK_CASES}
    return dict(zip(cases, zip(*run_ranks(_run_all, 2, list(cases.values())))))


def _run_all(rank: int, world: int, cases: list) -> list[str]:
    return [run_case(rank, world, case) for case in cases]


@pytest.mark.parametrize("case, expected", [row[1:] for row in RANK_CASES], ids=[row[0] for row in RANK_CASES])
def test_ddp_bad_input_on_both_ranks(rank_outcomes, case, expected):
    outcomes = rank_outcomes[case.__name__]
    for rank, fragment in expected.items():
        assert fragment in outcomes[rank], outcomes[rank]


# -- DDP: one rank differs, and a resume on another world size -----------------------------------------------------
def frozen_on_one_rank(rank: int, world: int) -> str:
    model, ddp, opt = _model_and_optimizer()
    ctl = attach(ddp, opt, "AdaScale")
    if rank == 1:
        model.weight.requires_grad_(False)
        _backward(ddp)      # DDP never launches the bucket that waits for the frozen weight
        return run_case(rank, world, lambda r: ctl.step())
    return "rank 0 trains as usual"   # it would wait in the all-reduce that rank 1 never joins


def test_requires_grad_turned_off_on_one_rank_after_the_wrap_is_named():
    outcome = run_ranks(frozen_on_one_rank, 2)[1]
    assert "RuntimeError: 1 backward pass(es) ran but DDP reduced no gradients in this step" in outcome
    assert "requires_grad changed after the DistributedDataParallel wrap" in outcome


def checkpoint_at(rank: int, world: int, policy: str, state: dict | None) -> dict:
    """Two AdaScale/LinearScaling steps on ``world`` ranks (or a resume from ``state``): scale, gain, τ, σ², μ²."""
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    ddp = DDP(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ctl = attach(ddp, opt, policy)
    before = {}
    if state is not None:
        ctl.load_state_dict(state)
        before = {"scale": ctl.scale, "progress": ctl.progress, "metrics": ctl.metrics()}
    data = torch.Generator().manual_seed(rank)
    for _ in range(2):
        ddp(torch.randn(1, 2, generator=data)).sum().backward()
        ctl.step()
        opt.zero_grad()
    return {"state": ctl.state_dict(), "scale": ctl.scale, "progress": ctl.progress, "gain": ctl.gain,
            "metrics": ctl.metrics(), "resumed": before}


@pytest.mark.parametrize("policy", ["AdaScale", "LinearScaling"])
def test_resume_on_another_world_size_follows_the_new_scale(policy):
    saved = run_ranks(checkpoint_at, 4, policy, None)[0]
    assert saved["scale"] == 4
    resumed = run_ranks(checkpoint_at, 2, policy, saved["state"])[0]
    assert resumed["resumed"]["scale"] == 2 and resumed["scale"] == 2
    assert resumed["resumed"]["progress"] == saved["progress"]                  # τ carries on
    if policy == "AdaScale":
        for key in ("sigma_sq", "mu_sq"):                                        # base-batch units carry over
            assert resumed["resumed"]["metrics"][key] == saved["metrics"][key]
        assert 1 <= resumed["gain"] <= 2
    else:
        assert resumed["metrics"]["lr_factor"] == 2                              # k follows the new scale


# -- Horovod and DeepSpeed, under their real launchers ---------------------------------------------------------
MPI_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1", "OMPI_MCA_mpi_yield_when_idle": "1"}
ENGINE_CASES = [  # (id, launcher, case, {rank: fragment})
    ("Horovod: a different policy on each rank", "horovod", "policy_differs",
     {0: "the ranks disagree on their policy settings: policy (ranks grouped by equal value: [[0], [1]]"}),
    ("Horovod: gradient_predivide_factor=0", "horovod", "predivide_zero",
     {0: "ValueError: gradient_predivide_factor must be a finite number > 0, got 0"}),
    ("Horovod: one backward pass per step, 2 declared", "horovod", "fewer_passes",
     {0: "RuntimeError: 1 backward pass(es) in this step, but backward_passes_per_step is 2"}),
    ("DeepSpeed: a boundary after every micro-batch with gas 2 (Accelerate without accumulate)", "deepspeed",
     "boundary_every_micro_batch", {0: "RuntimeError: 1 backward pass(es) in this step, but "
                                       "gradient_accumulation_steps is 2"}),
    ("DeepSpeed: different scheduler params on each rank", "deepspeed", "params_differ",
     {0: "the ranks disagree on their policy settings: params (ranks grouped by equal value: [[0], [1]]"}),
    ("DeepSpeed: a sparse embedding", "deepspeed", "sparse_embedding",
     {0: "ValueError: module(s) ['0'] make sparse gradients (sparse=True), which DeepSpeed reduces apart from the "
         "buffers the statistics ride: build them with sparse=False"}),
    ("DeepSpeed: extra_backward (SAM)", "deepspeed", "extra_backward",
     {0: "ValueError: extra_backward() is not supported under DeepSpeed"}),
]
LAUNCH = {
    "horovod": lambda out: [str(VENV_BIN / "horovodrun"), "--gloo", "-np", "2", str(VENV_BIN / "python"),
                            str(REPO / "tests" / "horovod_scripts" / "bad_input.py"), str(out)],
    "deepspeed": lambda out: [str(VENV_BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(_port()),
                              str(REPO / "tests" / "deepspeed_scripts" / "bad_input.py"), "--out", str(out)],
}


def _port() -> int:
    from tests.distributed import free_port

    return free_port()


@pytest.fixture(scope="module", params=sorted(LAUNCH))
def engine_outcomes(request, tmp_path_factory) -> tuple[str, list[dict]]:
    if request.param == "horovod":
        pytest.importorskip("horovod.torch", reason="Horovod is not installed: run `make horovod`")
    out = tmp_path_factory.mktemp(request.param)
    run_command(LAUNCH[request.param](out), timeout=300, env={**MPI_ENV, "DS_ACCELERATOR": "cpu"})
    return request.param, [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.slow
def test_engine_bad_input(engine_outcomes):
    engine, ranks = engine_outcomes
    rows = [row for row in ENGINE_CASES if row[1] == engine]
    assert rows
    for _, _, case, expected in rows:
        for rank, fragment in expected.items():
            assert fragment in ranks[rank][case], (case, ranks[rank][case])
