"""Bad input under DeepSpeed (2 CPU ranks): ``deepspeed --num_gpus 2 bad_input.py --out DIR``.

Each case meets its bad input on both ranks alike; each rank writes ``DIR/rank<r>.json`` with every case's
outcome (``"Type: message"`` or "no error"); tests/test_engine_input.py asserts on the messages.
"""
from __future__ import annotations

import deepspeed
import torch

import scaling_plugins.backends.deepspeed  # noqa: F401  (registers the policy names with DeepSpeed)
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


def main() -> None:
    rank, args = setup()
    cases = (boundary_every_micro_batch, params_differ, sparse_embedding, extra_backward)
    results = {case.__name__: error_of(lambda: case(rank)) for case in cases}
    write_and_finish(args.out, rank, results)


if __name__ == "__main__":
    main()
