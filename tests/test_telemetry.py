"""Telemetry: the one step record every backend writes, JSONL on rank 0 only, TensorBoard when installed."""
import math

import pytest

from scaling_plugins.spawn import run_local
from scaling_plugins.telemetry import (STEP_FIELDS, TelemetryWriter, monitor_events, read_jsonl, record_from)
from scaling_plugins.training import RunSpec


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


def test_a_real_two_rank_run_writes_one_record_per_step(tmp_path):
    pytest.importorskip("tensorboard")
    spec = RunSpec(name="t", workload="digits", workers=2, accumulation=2, budget=64, evals=2)
    summary = run_local(spec, tmp_path / "t", progress_bar=False)
    steps = read_jsonl(tmp_path / "t" / "metrics.jsonl")
    assert len(steps) == summary["steps"] and [r["step"] for r in steps] == list(range(1, len(steps) + 1))
    assert all(tuple(r) == STEP_FIELDS for r in steps)
    assert [r["samples"] for r in steps] == [32 * r["step"] for r in steps]   # S = 4 × B0 = 8
    assert all(1 <= r["gain"] <= 4 and r["lr"] > 0 and r["sigma_sq"] > 0 for r in steps)
    assert steps[-1]["progress"] >= 64 > steps[-2]["progress"]
    evals = read_jsonl(tmp_path / "t" / "eval.jsonl")
    assert evals[0]["step"] == 0 and evals[-1]["step"] == len(steps) and len(evals) >= 3
    assert list((tmp_path / "t" / "tensorboard").glob("events.out.tfevents.*"))
