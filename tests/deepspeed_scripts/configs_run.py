"""Launched by tests/test_deepspeed_configs.py: `deepspeed --num_gpus 2 configs_run.py --out DIR`.

Runs every config in configs/deepspeed/ for a few steps on a small MLP and writes, per config and rank: the
reference first-step statistics computed independently here (each micro-batch's own gradient in float64 on a
plain copy of the model, summed over ranks with torch.distributed), the policy's gains and progress, the lr
each param group really had when the optimizer stepped, DeepSpeed's own grad norm, and (rank 0) the csv
monitor's files; and collectives per step, counted the same way for bare DeepSpeed with the same config.
"""
from __future__ import annotations

import copy
import csv
import json
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

import scaling_plugins.backends.deepspeed  # noqa: F401  (registers the policies with DeepSpeed)
from tests.deepspeed_scripts.common import LrRecorder, collectives, setup, write_and_finish

REPO = Path(__file__).resolve().parents[2]
STEPS = 4
WIDTH_IN, WIDTH_OUT = 8, 4


def mlp() -> torch.nn.Module:
    torch.manual_seed(3)
    return torch.nn.Sequential(torch.nn.Linear(WIDTH_IN, 32), torch.nn.Tanh(), torch.nn.Linear(32, WIDTH_OUT))


def batch(step: int, micro: int, rank: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(10_000 * step + 100 * micro + rank)
    return torch.randn(size, WIDTH_IN, generator=gen), 2 + torch.randn(size, WIDTH_OUT, generator=gen)


def reference_first_step(model: torch.nn.Module, rank: int, gas: int, size: int, dtype: torch.dtype) -> dict:
    """L, T and n of step 0 from each micro-batch's own gradient, in float64 on the weights and inputs the
    engine sees (rounded to ``dtype``), summed over ranks with torch.distributed."""
    ref = copy.deepcopy(model).to(dtype).to(torch.float64)
    local_sq, grad_sum = torch.zeros((), dtype=torch.float64), None
    for micro in range(gas):
        x, y = (t.to(dtype).to(torch.float64) for t in batch(0, micro, rank, size))
        ref.zero_grad()
        torch.nn.functional.mse_loss(ref(x), y).backward()
        grad = torch.cat([p.grad.reshape(-1) for p in ref.parameters()])
        local_sq += grad.dot(grad)
        grad_sum = grad if grad_sum is None else grad_sum + grad
    dist.all_reduce(local_sq)
    dist.all_reduce(grad_sum)
    n = dist.get_world_size() * gas
    mean = grad_sum / n
    return {"local_sq_sum": local_sq.item(), "mean_sq_norm": mean.dot(mean).item(), "count": n}


def train_step(engine: object, step: int, rank: int, cfg: dict, dtype: torch.dtype) -> None:
    for micro in range(cfg["gradient_accumulation_steps"]):
        x, y = batch(step, micro, rank, cfg["train_micro_batch_size_per_gpu"])
        engine.backward(torch.nn.functional.mse_loss(engine(x.to(dtype)), y.to(dtype)))
        engine.step()


def bare_collectives(cfg: dict, rank: int, dtype: torch.dtype) -> list[dict]:
    """Collectives per step of bare DeepSpeed: the same config without the "scheduler" entry."""
    bare = {key: value for key, value in cfg.items() if key not in ("scheduler", "csv_monitor")}
    model = mlp()
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=bare)
    return [collectives(lambda: train_step(engine, step, rank, cfg, dtype)) for step in range(STEPS)]


def run_config(path: Path, rank: int, out: str) -> dict:
    cfg = json.loads(path.read_text())
    if "csv_monitor" in cfg:
        cfg["csv_monitor"]["output_path"] = str(Path(out) / "csv")
    model = mlp()
    dtype = torch.bfloat16 if cfg.get("bf16", {}).get("enabled") else torch.float32
    reference = reference_first_step(model, rank, cfg["gradient_accumulation_steps"],
                                     cfg["train_micro_batch_size_per_gpu"], dtype)
    engine, _, _, scheduler = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    recorder = LrRecorder(engine)
    record = {"reference": reference, "gains": [], "progress_before": [], "grad_norms": [], "moments": [],
              "collectives": [], "bare_collectives": bare_collectives(cfg, rank, dtype),
              "optimizer": type(engine.optimizer).__name__,
              "initial_lrs": [g["initial_lr"] for g in engine.optimizer.param_groups]}
    for step in range(STEPS):
        record["progress_before"].append(scheduler.progress)
        record["collectives"].append(collectives(lambda: train_step(engine, step, rank, cfg, dtype)))
        record["gains"].append(scheduler.gain)
        metrics = scheduler.metrics()
        record["moments"].append([metrics["sigma_sq"], metrics["mu_sq"]])
        norm = engine.get_global_grad_norm()
        record["grad_norms"].append(None if norm is None else float(norm))
    record["lrs_used"] = recorder.lrs
    if rank == 0 and "csv_monitor" in cfg:
        folder = Path(cfg["csv_monitor"]["output_path"]) / cfg["csv_monitor"]["job_name"]
        record["csv"] = {f.stem: list(csv.reader(f.open())) for f in sorted(folder.glob("*.csv"))}
    return record


def main() -> None:
    rank, args = setup()
    configs = sorted((REPO / "configs" / "deepspeed").glob("*.json"))
    write_and_finish(args.out, rank, {path.name: run_config(path, rank, args.out) for path in configs})


if __name__ == "__main__":
    main()
