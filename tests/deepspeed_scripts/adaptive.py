"""Launched by tests/test_adaptive_batch_backends.py: ``deepspeed --num_gpus 2 adaptive.py --out DIR --stage S``.

AdaptiveBatch as the config's ``"scheduler"`` entry (tests/adaptive_cases.py), micro-batch from
``train_micro_batch_size_per_gpu``; the loop calls ``engine.backward``/``engine.step`` per micro-batch and reads
``engine.gradient_accumulation_steps()``; the checkpoint is DeepSpeed's own (``engine.save_checkpoint``). Each
rank writes ``DIR/rank<k>.json``.
"""
from __future__ import annotations

from pathlib import Path

import deepspeed
import torch

import scaling_plugins.backends.deepspeed  # noqa: F401  (registers the policy names with DeepSpeed)
from tests.adaptive_cases import BASE_LR, MICRO_BATCH, PARAMS, WORLD, run_with_resume
from tests.deepspeed_scripts.common import config, setup, write_and_finish
from tests.policy_cases import Quadratic


class DeepSpeedLoop:
    def __init__(self, stage: int, checkpoint: Path) -> None:
        model = Quadratic()
        cfg = config(stage, optimizer={"type": "SGD", "params": {"lr": BASE_LR}},
                     scheduler={"type": "AdaptiveBatch", "params": PARAMS},
                     train_micro_batch_size_per_gpu=MICRO_BATCH)
        self.engine, _, _, self.scheduler = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                                                 config=cfg)
        self.checkpoint = checkpoint
        self.samples = 0

    def accumulation(self) -> int:
        return self.engine.gradient_accumulation_steps()

    def backward(self, x: torch.Tensor, accumulation: int) -> None:
        self.engine.backward(self.engine(x))
        self.engine.step()

    def step(self) -> None:
        """engine.step() after the last micro-batch was the optimizer step; DeepSpeed counted its batch."""
        self.samples += WORLD * self.scheduler.metrics()["accumulation_steps"] * MICRO_BATCH
        assert self.engine.global_samples == self.samples, (self.engine.global_samples, self.samples)

    def metrics(self) -> dict:
        return self.scheduler.metrics()

    def engine_accumulation(self) -> int:
        accumulation = self.engine.gradient_accumulation_steps()
        assert self.engine.train_batch_size() == WORLD * accumulation * MICRO_BATCH
        assert self.scheduler.accumulation_steps == accumulation
        return accumulation

    def state(self) -> str:
        self.engine.save_checkpoint(str(self.checkpoint))
        return str(self.checkpoint)

    def load(self, state: str) -> None:
        self.engine.load_checkpoint(state)
        self.samples = self.engine.global_samples

    def final_loss(self) -> float:
        return self.engine.module(torch.zeros(1, 20)).item()


def main() -> None:
    rank, args = setup()
    results = {f"zero{stage}": run_with_resume(lambda: DeepSpeedLoop(stage, Path(args.out, f"checkpoint-zero{stage}")),
                                                rank)
               for stage in (0, 2)}
    write_and_finish(args.out, rank, results)


if __name__ == "__main__":
    main()
