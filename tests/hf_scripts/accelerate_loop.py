"""Accelerate with DeepSpeed and a training loop of one's own, 2 CPU ranks: ``accelerate launch --use_deepspeed
--num_processes 2 --deepspeed_config_file CONFIG tests/hf_scripts/accelerate_loop.py --out DIR``, CONFIG being
the shipped HF config with ZeRO-0 and no clipping (tests/test_huggingface.py writes it).

Phases, in one process per rank: the loop with ``accelerator.accumulate(model)`` until the policy is done
(``accelerator.save_state`` after step 2); the same loop resumed from that state; and the loop without
``accumulate`` (every micro-batch a gradient boundary), which the backward-pass count must refuse. Each rank writes
``DIR/rank<r>.pt``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DummyOptim, DummyScheduler, InitProcessGroupKwargs

from scaling_plugins.integrations.huggingface import scaling_driver
from tests.hf_scripts.common import (BASE_LR, GAS, MICRO_BATCH, StepRecord, WarningRecorder, error_of, parse_args,
                                     tiny_model, token_data, write_and_finish)

BUDGET = 12        # base-scale steps
WARMUP = 2
SAVE_AT = 2


def prepare(accelerator: Accelerator) -> tuple[Any, Any, Any, Any]:
    """Engine, optimizer, loader and scheduler; DummyScheduler's total_num_steps is divided by num_processes
    when Accelerate fills "auto" with it, so it gets the budget × num_processes."""
    model = tiny_model()
    optimizer = DummyOptim(model.parameters(), lr=BASE_LR)
    scheduler = DummyScheduler(optimizer, total_num_steps=BUDGET * accelerator.num_processes,
                               warmup_num_steps=WARMUP)
    loader = torch.utils.data.DataLoader(token_data(), batch_size=MICRO_BATCH)
    return accelerator.prepare(model, optimizer, loader, scheduler)


def train(accelerator: Accelerator, checkpoint: Path, resume: bool) -> dict[str, Any]:
    engine, optimizer, loader, scheduler = prepare(accelerator)
    driver = scaling_driver(scheduler)
    record = StepRecord(accelerator.process_index)
    if resume:
        accelerator.load_state(str(checkpoint))
        loader = accelerator.skip_first_batches(loader, SAVE_AT * GAS)
    for index, batch in enumerate(loader):
        if index % GAS == 0:
            record.before_step(engine.module)
        with accelerator.accumulate(engine):
            record.micro_batch(batch["input_ids"])
            accelerator.backward(engine(**batch).loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        if accelerator.sync_gradients:
            record.after_step(driver)
            if not resume and len(record.steps) == SAVE_AT:
                accelerator.save_state(str(checkpoint))
            if driver.done:
                break
    result = {**record.result(engine.module), "global_steps": engine.global_steps,
              "via_engine": type(scaling_driver(engine)).__name__}
    accelerator.free_memory(engine, optimizer, loader, scheduler)
    return result


def without_accumulate(accelerator: Accelerator, gains: list[float]) -> None:
    """Every micro-batch a boundary, as Accelerate makes it without ``accumulate``: DeepSpeed steps on each."""
    engine, optimizer, loader, scheduler = prepare(accelerator)
    driver = scaling_driver(scheduler)
    try:
        for batch in loader:
            accelerator.backward(engine(**batch).loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            gains.append(driver.gain)
    finally:
        accelerator.free_memory(engine, optimizer, loader, scheduler)


def main() -> None:
    args = parse_args()
    accelerator = Accelerator(gradient_accumulation_steps=GAS, kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
    checkpoint = Path(args.out) / "state"
    warnings = WarningRecorder()
    results: dict[str, Any] = {"num_processes": accelerator.num_processes,
                               "straight": train(accelerator, checkpoint, resume=False),
                               "resumed": train(accelerator, checkpoint, resume=True)}
    warnings.messages.clear()
    gains: list[float] = []
    results["no_accumulate"] = {"error": error_of(lambda: without_accumulate(accelerator, gains)), "gains": gains,
                                "warnings": list(warnings.messages)}
    write_and_finish(args.out, accelerator.process_index, results)


if __name__ == "__main__":
    main()
