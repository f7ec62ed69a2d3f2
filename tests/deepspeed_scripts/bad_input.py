"""Bad input under DeepSpeed (2 CPU ranks): ``deepspeed --num_gpus 2 bad_input.py --out DIR``.

Each case meets its bad input on both ranks alike; each rank writes ``DIR/rank<r>.json`` with every case's
outcome (``"Type: message"`` or "no error"); tests/test_engine_input.py asserts on the messages.
"""
from __future__ import annotations

import deepspeed
import torch

from scaling_plugins.backends.deepspeed import initialize   # importing registers the policy names with DeepSpeed
from tests.deepspeed_scripts.common import config, error_of, setup, write_and_finish


def engine_for(rank: int, gas: int, scheduler: dict):
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                      config=config(0, gas=gas, scheduler=scheduler))
    return engine


def boundary_every_micro_batch(rank: int) -> None:
    """What Accelerate does without ``accelerator.accumulate(model)``: every micro-batch is a boundary."""
    engine = engine_for(rank, 2, {"type": "AdaScale", "params": {}})
    for _ in range(4):
        engine.set_gradient_accumulation_boundary(True)
        engine.backward(engine(torch.ones(1, 2)).sum())
        engine.step()


def params_differ(rank: int) -> None:
    engine_for(rank, 1, {"type": "AdaScale", "params": {"total_num_steps": 100 + rank}})


def sparse_embedding(rank: int) -> None:
    model = torch.nn.Sequential(torch.nn.Embedding(10, 2, sparse=True), torch.nn.Linear(2, 1))
    deepspeed.initialize(model=model, model_parameters=model.parameters(),
                         config=config(0, scheduler={"type": "AdaScale", "params": {}}))


def extra_backward(rank: int) -> None:
    engine = engine_for(rank, 1, {"type": "AdaScale", "params": {}})
    with engine.lr_scheduler.extra_backward():
        engine.backward(engine(torch.ones(1, 2)).sum())


def step_lr(optimizer: torch.optim.Optimizer):
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=10)


def client_scheduler_and_policy(rank: int) -> None:
    """A policy in the config and lr_scheduler= given too: DeepSpeed would run the latter only."""
    model = torch.nn.Linear(2, 1)
    deepspeed.initialize(model=model, model_parameters=model.parameters(), lr_scheduler=step_lr,
                         config=config(0, scheduler={"type": "AdaScale", "params": {}}))


def auto_batch_size(rank: int) -> None:
    """Batch sizes left "auto" under plain deepspeed.initialize (only HF fills them)."""
    model = torch.nn.Linear(2, 1)
    deepspeed.initialize(model=model, model_parameters=model.parameters(),
                         config={**config(0, scheduler={"type": "AdaScale", "params": {}}),
                                 "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto"})


def auto_batch_size_with_policy_argument(rank: int) -> None:
    """The same through scaling_plugins.backends.deepspeed.initialize(..., policy=...)."""
    model = torch.nn.Linear(2, 1)
    initialize(model=model, model_parameters=model.parameters(), policy="AdaScale",
               config={**config(0), "train_batch_size": "auto"})


def auto_optimizer_lr(rank: int) -> None:
    """The config's optimizer lr left "auto" under plain deepspeed.initialize."""
    model = torch.nn.Linear(2, 1)
    deepspeed.initialize(model=model, model_parameters=model.parameters(),
                         config=config(0, scheduler={"type": "AdaScale", "params": {}},
                                       optimizer={"type": "SGD", "params": {"lr": "auto", "momentum": 0.9}}))


def adascale_on_adam(rank: int) -> None:
    """Warned about on stderr (no logging set up here): AdaScale's rule is SGD's."""
    model = torch.nn.Linear(2, 1)
    deepspeed.initialize(model=model, model_parameters=model.parameters(),
                         config=config(0, scheduler={"type": "AdaScale", "params": {}},
                                       optimizer={"type": "Adam", "params": {"lr": 1e-3, "torch_adam": True}}))


def scheduler_auto(rank: int) -> None:
    """Warned about on stderr: "auto" in scheduler.params under plain DeepSpeed, read as the Trainer's defaults."""
    model = torch.nn.Linear(2, 1)
    deepspeed.initialize(model=model, model_parameters=model.parameters(),
                         config=config(0, scheduler={"type": "AdaScale", "params": {"warmup_num_steps": "auto"}}))


def main() -> None:
    rank, args = setup()
    cases = (boundary_every_micro_batch, params_differ, sparse_embedding, extra_backward, client_scheduler_and_policy,
             auto_batch_size, auto_batch_size_with_policy_argument, auto_optimizer_lr, adascale_on_adam,
             scheduler_auto)
    results = {case.__name__: error_of(lambda: case(rank)) for case in cases}
    write_and_finish(args.out, rank, results)


if __name__ == "__main__":
    main()
