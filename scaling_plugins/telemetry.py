"""Metrics out: one per-step record, the same for every backend, to JSONL and (when installed) TensorBoard.

A step record has exactly the keys in ``STEP_FIELDS``:

    step            optimizer steps taken so far
    samples         training samples seen so far (all ranks)
    loss            training loss of the step (mean over ranks and micro-batches)
    lr              learning rate the optimizer used (first param group)
    gain            AdaScale gain r (1 for policies without one)
    sigma_sq, mu_sq smoothed gradient variance and squared mean, scale-1 units (None where not measured)
    noise_scale     gradient noise scale B_simple = B0·σ²/μ² in samples (None when μ² = 0 or not measured)
    progress        the policy's progress (scale-invariant τ for AdaScale, steps otherwise)
    phase           the policy's phase (e.g. AutoWU's "warmup"/"decay"), None for single-phase policies
    skipped_update  True when the statistics update of the step was skipped (non-finite norms)
    batch_size      samples in the step (all ranks; None where the backend does not know the micro-batch)
    accumulation_steps  micro-batches per worker in the step (a batch-size controller moves it)
    batch_noise_scale   B_simple in samples as a batch-size controller smooths it (None for other policies)

Non-finite numbers are written as None (JSON has no infinity). Backends build a record with
:func:`record_from` from a controller (anything with ``metrics()``) or its metrics dict; DeepSpeed's monitor
takes :func:`monitor_events` of it. Only rank 0 writes.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Mapping, Optional, Union

log = logging.getLogger(__name__)

STEP_FIELDS = ("step", "samples", "loss", "lr", "gain", "sigma_sq", "mu_sq", "noise_scale", "progress", "phase",
               "skipped_update", "batch_size", "accumulation_steps", "batch_noise_scale")
METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.jsonl"


def _clean(value: Any) -> Any:
    """Plain JSON values: tensors and numpy scalars become numbers, non-finite floats None."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def record_from(source: Union[Mapping[str, Any], Any], **overrides: Any) -> dict[str, Any]:
    """The standard step record from a controller's ``metrics()`` (or the dict itself) plus ``overrides``.

    Keys outside ``STEP_FIELDS`` are dropped; missing ones are None, except ``skipped_update`` (False).
    """
    metrics = source if isinstance(source, Mapping) else source.metrics()
    unknown = set(overrides) - set(STEP_FIELDS)
    if unknown:
        raise ValueError(f"record_from: unknown field(s) {sorted(unknown)}; allowed: {list(STEP_FIELDS)}")
    merged = {**metrics, **overrides}
    record = {key: _clean(merged.get(key)) for key in STEP_FIELDS}
    record["skipped_update"] = bool(record["skipped_update"])
    return record


def monitor_events(record: Mapping[str, Any], prefix: str = "scaling_plugins") -> list[tuple[str, float, int]]:
    """``(label, value, samples)`` triples for DeepSpeed's ``MonitorMaster.write_events``: every numeric field."""
    samples = int(record.get("samples") or 0)
    return [(f"{prefix}/{key}", float(value), samples) for key, value in record.items()
            if key not in ("step", "samples") and isinstance(value, (int, float))]


class TelemetryWriter:
    """Writes step records to ``run_dir/metrics.jsonl`` and evaluations to ``run_dir/eval.jsonl`` on rank 0,
    mirroring both to TensorBoard under ``run_dir/tensorboard`` when it is installed and ``tensorboard`` is on.
    On other ranks every call does nothing. ``resume_after``: a run resumed from a checkpoint taken after that
    step keeps the records up to it and appends; later ones (written before the run was interrupted, and
    about to be redone) are dropped."""

    def __init__(self, run_dir: Union[str, Path], rank: int = 0, tensorboard: bool = True,
                 resume_after: Optional[int] = None) -> None:
        self.enabled = rank == 0
        self.run_dir = Path(run_dir)
        self._steps = self._evals = None
        self._board = None
        if not self.enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._steps = _open_records(self.run_dir / METRICS_FILE, resume_after)
        self._evals = _open_records(self.run_dir / EVAL_FILE, resume_after)
        if tensorboard:
            self._board = _tensorboard_writer(self.run_dir / "tensorboard")

    def write_step(self, record: Mapping[str, Any]) -> None:
        """One step record (build it with :func:`record_from`)."""
        if not self.enabled:
            return
        self._steps.write(json.dumps(dict(record)) + "\n")
        if self._board is not None:
            for label, value, _ in monitor_events(record, prefix="train"):
                self._board.add_scalar(label, value, global_step=record["step"])

    def write_eval(self, step: int, samples: int, loss: float, accuracy: Optional[float]) -> None:
        """One validation result, at ``step`` after ``samples`` training samples."""
        if not self.enabled:
            return
        record = {"step": step, "samples": samples, "val_loss": _clean(loss), "val_accuracy": _clean(accuracy)}
        self._evals.write(json.dumps(record) + "\n")
        self._evals.flush()
        if self._board is not None:
            self._board.add_scalar("val/loss", loss, global_step=step)
            if accuracy is not None:
                self._board.add_scalar("val/accuracy", accuracy, global_step=step)

    def close(self) -> None:
        for handle in (self._steps, self._evals, self._board):
            if handle is not None:
                handle.close()
        self._steps = self._evals = self._board = None

    def __enter__(self) -> "TelemetryWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _open_records(path: Path, keep_until: Optional[int]) -> Any:
    """``path`` opened for writing: emptied, or with only its records of step ≤ ``keep_until`` kept."""
    kept = [] if keep_until is None else [r for r in read_jsonl(path) if r["step"] <= keep_until]
    handle = open(path, "w", encoding="utf-8")
    handle.writelines(json.dumps(record) + "\n" for record in kept)
    return handle


def _tensorboard_writer(log_dir: Path) -> Optional[Any]:
    """A ``SummaryWriter`` when TensorBoard is installed, else None (logged once)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.info("TensorBoard is not installed (pip install tensorboard); writing JSONL only")
        return None
    return SummaryWriter(log_dir=str(log_dir))


def read_jsonl(path: Union[str, Path]) -> list[dict[str, Any]]:
    """Every record of a JSONL file (an empty list when the file does not exist)."""
    path = Path(path)
    if not path.exists():
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
