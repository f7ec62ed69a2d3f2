"""Launched by tests/test_deepspeed_harvest.py: `deepspeed --num_gpus 2 bf16_range.py --out DIR`.

bf16 through DeepSpeed's flat all-reduce in bf16 (its default communication_data_type for bf16), as the shipped
configs run it: ZeRO-0 (FP16_UnfusedOptimizer) and ZeRO-1 with fp32 accumulation (BF16_Optimizer). The
golden orthogonal case (Linear(2, 2) + bias, one one-hot sample per rank, loss = factor · output.sum()), whose
gain is 4/3 for any factor, with gradients whose norm is far above 65,504 and far below 1e-4. Each rank writes
DIR/rank<r>.json.
"""
from __future__ import annotations

import deepspeed
import torch

import scaling_plugins.backends.deepspeed  # noqa: F401  (registers the policies with DeepSpeed)
from tests.deepspeed_scripts.common import config, setup, write_and_finish

FACTORS = (1.0, 3.0e5, 3.0e-6)


FP32_ACCUMULATION = {"data_types": {"grad_accum_dtype": "fp32"}}
VARIANTS = {   # the shipped configs' two bf16 flat-reduction paths, and BF16_Optimizer freeing each bf16 gradient
    "zero0": {"stage": 0},                                                 # FP16_UnfusedOptimizer, bf16 grads
    "zero1_fp32_accumulation": {"stage": 1, **FP32_ACCUMULATION},          # BF16_Optimizer
    # BF16_Optimizer that adds each bf16 gradient into its fp32 buffer as soon as autograd has accumulated it,
    # then sets the parameter's .grad to None, during the backward
    "zero1_fp32_accumulation_immediate": {"stage": 1, **FP32_ACCUMULATION,
                                          "bf16": {"enabled": True, "immediate_grad_update": True}},
}


def orthogonal(rank: int, factor: float, variant: dict) -> dict:
    torch.manual_seed(0)
    extra = {"bf16": {"enabled": True}, **{key: value for key, value in variant.items() if key != "stage"}}
    cfg = config(variant["stage"], scheduler={"type": "AdaScale", "params": {}}, **extra)
    model = torch.nn.Linear(2, 2)
    engine, _, _, scheduler = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    x = torch.eye(2)[rank].reshape(1, 2).to(torch.bfloat16)
    loss = engine(x).sum() * factor
    engine.backward(loss)
    grads = [p.grad for p in engine.module.parameters()]
    grad_norm = None if None in grads else float(torch.cat([g.float().reshape(-1) for g in grads]).norm())
    engine.step()
    metrics = scheduler.metrics()
    carried = scheduler._values        # what reached the policy: [Σ_ranks local ‖g‖², T] (private; test only)
    return {"gain": scheduler.gain, "entry": float(torch.tensor(factor, dtype=torch.bfloat16)),
            "local_sq_sum": carried[0], "mean_sq_norm": carried[-1], "sigma_sq": metrics["sigma_sq"], "mu_sq": metrics["mu_sq"],
            "local_grad_norm": grad_norm, "optimizer": type(engine.optimizer).__name__,
            "communication": str(engine.communication_data_type)}


def main() -> None:
    rank, args = setup()
    write_and_finish(args.out, rank, {name: {str(factor): orthogonal(rank, factor, variant) for factor in FACTORS}
                                      for name, variant in VARIANTS.items()})


if __name__ == "__main__":
    main()
