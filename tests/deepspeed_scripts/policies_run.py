"""Launched by tests/test_policies_deepspeed.py: `deepspeed --num_gpus 2 policies_run.py --out DIR`.

The fixed scaling rules, AdaScaleAdam and AutoWU as DeepSpeed "scheduler" config entries (ZeRO-0, 2 CPU ranks):
each fixed rule's and AdaScaleAdam's learning rates over a few steps with 2 micro-batches per step, and a full
AutoWU run whose loss reaches the policy through engine.backward(loss), run again also passing it as
engine.step(lr_kwargs={"loss": loss}). Each rank writes DIR/rank<r>.json.
"""
from __future__ import annotations

import deepspeed
import torch

import scaling_plugins.backends.deepspeed  # noqa: F401  (registers the policy names with DeepSpeed)
from tests.deepspeed_scripts.common import LrRecorder, config, setup, write_and_finish
from tests.policy_cases import ACCUMULATION, AUTOWU, BASE_LR, RULES, STEPS, Quadratic


def engine_for(model: torch.nn.Module, cfg: dict) -> tuple:
    engine, _, _, scheduler = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    return engine, scheduler


def rules(rank: int) -> dict:
    results = {}
    for name, spec in RULES.items():
        torch.manual_seed(0)
        optimizer = {"type": "Adam" if name == "AdaScaleAdam" else "SGD", "params": {"lr": BASE_LR}}
        engine, scheduler = engine_for(torch.nn.Linear(4, 1), config(0, gas=ACCUMULATION, optimizer=optimizer,
                                                                     scheduler=spec))
        recorder = LrRecorder(engine)
        data = torch.Generator().manual_seed(100 + rank)
        gains = []
        for _ in range(STEPS * ACCUMULATION):
            x = torch.randn(8, 4, generator=data)
            engine.backward((engine(x) - x.sum(1, keepdim=True)).pow(2).mean())
            engine.step()
            if len(gains) < len(recorder.lrs):
                gains.append(scheduler.gain)
        results[name] = {"lrs": [lr for (lr,) in recorder.lrs], "gains": gains, "scale": scheduler.scale,
                         "params": [p.detach().reshape(-1).tolist() for p in engine.module.parameters()]}
    return results


def autowu(rank: int, via_lr_kwargs: bool) -> dict:
    engine, scheduler = engine_for(Quadratic(), config(0, scheduler=AUTOWU))
    recorder = LrRecorder(engine)
    data = torch.Generator().manual_seed(rank)
    while not scheduler.done:
        loss = engine(torch.randn(4, 20, generator=data))
        engine.backward(loss)
        engine.step(lr_kwargs={"loss": loss} if via_lr_kwargs else None)
    policy = scheduler.policy
    return {"lrs": [lr for (lr,) in recorder.lrs], "switch_step": policy.switch_step, "peak_lr": policy.peak_lr,
            "losses": policy.losses, "w": engine.module.w.detach().tolist()}


def main() -> None:
    rank, args = setup()
    write_and_finish(args.out, rank, {"rules": rules(rank), "autowu": autowu(rank, via_lr_kwargs=False),
                           "autowu_lr_kwargs": autowu(rank, via_lr_kwargs=True)})


if __name__ == "__main__":
    main()
