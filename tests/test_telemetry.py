"""Telemetry: the one step record every backend writes, JSONL on rank 0 only, TensorBoard when installed."""
import csv
import importlib.util
import math

import pytest

from scaling_plugins.app.spawn import run_local
from scaling_plugins.telemetry import (STEP_FIELDS, TelemetryWriter, monitor_events, read_jsonl, record_from)
from scaling_plugins.app.training import RunSpec


class FakeController:
    def metrics(self):
        return {"step": 3, "lr": 0.5, "gain": 2.0, "progress": 6.0, "sigma_sq": 1.0, "mu_sq": 0.0,
                "noise_scale": math.inf, "skipped_update": True, "scale": 4.0}


def test_record_has_exactly_the_standard_fields():
    record = record_from(FakeController(), samples=96, loss=1.25)
    assert tuple(record) == STEP_FIELDS
    assert record["step"] == 3 and record["samples"] == 96 and record["loss"] == 1.25
    assert record["noise_scale"] is None          # infinite (μ² = 0): JSON has no infinity
    assert record["phase"] is None and record["skipped_update"] is True
    assert record_from({"gain": 1.0})["skipped_update"] is False
    with pytest.raises(ValueError, match="unknown field"):
        record_from({}, gradient=1.0)


def test_monitor_events_feed_deepspeed_monitor_with_samples_as_x():
    events = monitor_events(record_from(FakeController(), samples=96, loss=1.25))
    labels = {label: (value, x) for label, value, x in events}
    assert labels["scaling_plugins/lr"] == (0.5, 96) and labels["scaling_plugins/loss"] == (1.25, 96)
    assert "scaling_plugins/phase" not in labels and "scaling_plugins/noise_scale" not in labels


def test_writer_only_writes_on_rank_zero(tmp_path):
    with TelemetryWriter(tmp_path / "r1", rank=1) as writer:
        writer.write_step(record_from(FakeController()))
    assert not (tmp_path / "r1").exists()
    with TelemetryWriter(tmp_path / "r0", rank=0, tensorboard=False) as writer:
        writer.write_step(record_from(FakeController()))
        writer.write_eval(3, 96, 0.5, None)
    assert read_jsonl(tmp_path / "r0" / "metrics.jsonl")[0]["gain"] == 2.0
    assert read_jsonl(tmp_path / "r0" / "eval.jsonl") == [{"step": 3, "samples": 96, "val_loss": 0.5,
                                                          "val_accuracy": None}]


@pytest.mark.slow
def test_every_backend_writes_the_same_records(tmp_path):
    """The same run (AdaScale, S = 2 workers × 2 micro-batches, quadratic) under DDP, DeepSpeed and Horovod:
    one record per step with the standard fields, and the same gains, learning rates and progress step for
    step; evaluations before the first step and after the last; TensorBoard events when it is installed, and
    DeepSpeed's csv monitor under DeepSpeed."""
    from tools.launchers import VENV_BIN

    backends = ["ddp", "deepspeed"] + (["horovod"] if (VENV_BIN / "horovodrun").exists() else [])
    records, summaries = {}, {}
    for backend in backends:
        spec = RunSpec(name=backend, workload="quadratic", backend=backend, workers=2, accumulation=2, budget=24,
                       evals=2, tensorboard=backend == "ddp")
        summaries[backend] = run_local(spec, tmp_path / backend, progress_bar=False)
        records[backend] = read_jsonl(tmp_path / backend / "metrics.jsonl")
    reference = records["ddp"]
    assert len(reference) == summaries["ddp"]["steps"] > 5 and any(r["gain"] > 1.1 for r in reference)
    assert [r["step"] for r in reference] == list(range(1, len(reference) + 1))
    assert [r["samples"] for r in reference] == [4 * r["step"] for r in reference]   # S = 4 × B0 = 1
    assert all(1 <= r["gain"] <= 4 and r["lr"] > 0 and r["sigma_sq"] > 0 for r in reference)
    assert reference[-1]["progress"] >= 24 > reference[-2]["progress"]
    evals = read_jsonl(tmp_path / "ddp" / "eval.jsonl")
    assert evals[0]["step"] == 0 and evals[-1]["step"] == len(reference) and len(evals) >= 3
    if importlib.util.find_spec("tensorboard"):
        assert list((tmp_path / "ddp" / "tensorboard").glob("events.out.tfevents.*"))
    # under DeepSpeed the same numbers also reach DeepSpeed's own (csv) monitor, against samples seen
    with open(tmp_path / "deepspeed" / "deepspeed_monitor" / "scaling_plugins_gain.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["step", "gain"]
    assert [(int(x), float(g)) for x, g in rows[1:]] == [(r["samples"], r["gain"]) for r in records["deepspeed"]]
    for backend, steps in records.items():
        assert [tuple(r) for r in steps] == [STEP_FIELDS] * len(reference), backend
        for mine, theirs in zip(steps, reference):
            for key in ("gain", "lr", "progress", "sigma_sq", "mu_sq", "loss"):
                assert mine[key] == pytest.approx(theirs[key], rel=1e-5), (backend, key, mine["step"])
