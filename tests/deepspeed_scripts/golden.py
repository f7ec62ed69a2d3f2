"""Launched by tests/test_deepspeed.py: `deepspeed --num_gpus 2 golden.py --out DIR --stage {0,2}`.

Each rank writes DIR/rank<r>.json with: the golden first-step gains (and the lr read off the bias update),
the 4-micro-batch gain, collectives per step against bare DeepSpeed (and for ZeRO-1/2 with
compute_grad_norm=false, the documented fallback), a checkpoint resume, every registered policy's lrs, the code
path (initialize(policy=...)), and the errors raised at deepspeed.initialize.
"""
from __future__ import annotations

import copy
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

import scaling_plugins.backends.deepspeed as ds_backend
from scaling_plugins import POLICIES
from tests.deepspeed_scripts.common import LrRecorder, collectives, config, error_of, setup, write_and_finish

ADASCALE = {"type": "AdaScale", "params": {}}
GOLDEN = {"orthogonal": ([1.0, 0.0], [0.0, 1.0]), "identical": ([1.0, 2.0], [1.0, 2.0]),
          "opposite": ([-1.0, 1.0], [1.0, -1.0])}
NEEDED_PARAMS = {"AutoWU": {"total_num_steps": 20, "steps_per_epoch": 2}}


def engine_for(model: torch.nn.Module, cfg: dict) -> tuple:
    engine, _, _, scheduler = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    return engine, scheduler


def reduce_in_buffers_of(engine: object, bucket_size: int) -> list[int]:
    """Make ``engine``'s flat all-reduce use buffers of ``bucket_size`` elements; the returned list receives the
    number of tensors in each buffer it reduces."""
    buckets: list[int] = []
    reduce_gradients, reduce_bucket = engine.allreduce_gradients, engine.allreduce_bucket

    def allreduce_bucket(bucket: list, *args: object) -> torch.Tensor:
        buckets.append(len(bucket))
        return reduce_bucket(bucket, *args)

    engine.allreduce_gradients = lambda: reduce_gradients(bucket_size=bucket_size)
    engine.allreduce_bucket = allreduce_bucket
    return buckets


def golden(rank: int, stage: int, bucket_size: int | None = None) -> dict:
    """Linear(2, 2) with bias, loss = output.sum(), one sample per rank: first-step gain and applied lr.
    ``bucket_size``: the flat all-reduce's elements per buffer (DeepSpeed's default 5e8 is not a config key; 2
    splits this model's gradients into several buffers, as a model of more than 5e8 elements is split); the sizes
    of the buffers reduced are recorded."""
    results = {}
    for name, inputs in GOLDEN.items():
        torch.manual_seed(0)
        engine, scheduler = engine_for(torch.nn.Linear(2, 2), config(stage, scheduler=ADASCALE))
        buckets = reduce_in_buffers_of(engine, bucket_size) if bucket_size is not None else []
        recorder = LrRecorder(engine)
        bias_before = engine.module.bias.detach().clone()
        engine.backward(engine(torch.tensor([inputs[rank]])).sum())
        engine.step()
        # d(sum)/d(bias) = [1, 1] for every sample, so the averaged bias gradient is 1 and Δbias = −lr.
        applied = (bias_before - engine.module.bias.detach()).tolist()
        metrics = scheduler.metrics()
        results[name] = {"gain": scheduler.gain, "lr_used": recorder.lrs[0], "applied_lr": applied,
                         "scale": scheduler.scale, "moments": [metrics["sigma_sq"], metrics["mu_sq"]],
                         "buckets": buckets}
    return results


def loss_scaled(rank: int, stage: int) -> dict:
    """The golden orthogonal case under a loss scale: ZeRO-0 with ``torch_autocast`` fp16, whose torch GradScaler
    scales the loss by 65536, then 131072 after 2 growth steps (so the smoothed moments would be reweighted if they
    were in scaled units; the loss, summed in fp32, is weighted by 1/4 so that no fp16 gradient overflows); ZeRO-1/2/3 with a scale of
    1024 (``override_loss_scale``: the fp16 mechanism, which cannot run on CPU, without fp16). The statistics must
    come out in true units every step."""
    torch.manual_seed(0)
    if stage == 0:
        weight = 0.25
        autocast = {"torch_autocast": {"enabled": True, "dtype": "torch.float16"}}
        engine, scheduler = engine_for(torch.nn.Linear(2, 2), config(stage, scheduler=ADASCALE, **autocast))
        scaler = engine.torch_autocast_z0_gradscaler
        scaler.set_growth_interval(2)
        read_scale = scaler.get_scale
    else:
        weight = 1.0
        engine, scheduler = engine_for(torch.nn.Linear(2, 2), config(stage, scheduler=ADASCALE))
        engine.optimizer.override_loss_scale(1024.0)
        read_scale = lambda: engine.optimizer.loss_scale   # noqa: E731
    steps = []
    for _ in range(4):
        scale = read_scale()
        bias_before = engine.module.bias.detach().clone()
        engine.backward(engine(torch.tensor([GOLDEN["orthogonal"][rank]])).float().sum() * weight)
        engine.step()
        metrics = scheduler.metrics()
        steps.append({"gain": scheduler.gain, "applied_lr": (bias_before - engine.module.bias.detach()).tolist(),
                      "loss_scale": scale, "weight": weight, "moments": [metrics["sigma_sq"], metrics["mu_sq"]]})
    return steps


def one_hot_accumulation(rank: int, stage: int) -> dict:
    """Bias-free Linear(4, 2), 2 ranks × 2 micro-batches of one-hot inputs e_{2r+k}: gain = scale = 4."""
    torch.manual_seed(0)
    engine, scheduler = engine_for(torch.nn.Linear(4, 2, bias=False),
                                   config(stage, gas=2, scheduler=ADASCALE))
    for k in range(2):
        engine.backward(engine(torch.eye(4)[2 * rank + k].reshape(1, 4)).sum())
        engine.step()
    return {"gain": scheduler.gain, "scale": scheduler.scale}


def step_fn(engine: object, rank: int, width: int = 6) -> callable:
    """``step(key=global step)``: one optimizer step (all micro-batches) on data fixed by (key, micro-batch, rank);
    ``poison=True`` puts a NaN into rank 0's first micro-batch."""
    def step(key: int | None = None, poison: bool = False) -> None:
        key = engine.global_steps if key is None else key
        for micro in range(engine.gradient_accumulation_steps()):
            gen = torch.Generator().manual_seed(1000 * key + 10 * micro + rank)
            x, y = torch.randn(3, width, generator=gen), torch.randn(3, 2, generator=gen)
            if poison and rank == 0 and micro == 0:
                x[0, 0] = float("nan")
            dtype = next(engine.module.parameters()).dtype
            engine.backward(torch.nn.functional.mse_loss(engine(x.to(dtype)), y.to(dtype)))
            engine.step()
    return step


def mlp(width: int = 6) -> torch.nn.Module:
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(width, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))


def count_collectives(rank: int, stage: int) -> dict:
    """gloo collectives per step (4 steps, gas 2) for bare DeepSpeed and DeepSpeed + AdaScale, same config."""
    counts = {}
    variants = {"bare": config(stage, gas=2), "adascale": config(stage, gas=2, scheduler=ADASCALE)}
    if stage in (1, 2):
        no_norm = {"stage": stage, "compute_grad_norm": False}
        variants["bare_no_norm"] = config(stage, gas=2, zero_optimization=no_norm)
        variants["adascale_no_norm"] = config(stage, gas=2, zero_optimization=no_norm, scheduler=ADASCALE)
    extra = {}
    for name, cfg in variants.items():
        engine, scheduler = engine_for(mlp(), cfg)
        step = step_fn(engine, rank)
        counts[name] = [collectives(step) for _ in range(4)]
        if scheduler is not None:
            extra[name] = {"extra_collectives": scheduler.extra_collectives_per_step, "gain": scheduler.gain}
    return {"counts": counts, "schedulers": extra}


def checkpoint_resume(rank: int, stage: int, out: str) -> dict:
    """6 steps straight vs 3 steps, save, a fresh engine loads and runs 3 more: the same lrs bit for bit."""
    cfg = config(stage, gas=2, optimizer={"type": "SGD", "params": {"lr": 0.05, "momentum": 0.9}},
                 scheduler={"type": "AdaScale", "params": {
                     "schedule": {"type": "WarmupCosineLR", "params": {"total_num_steps": 60, "warmup_num_steps": 4}},
                     "total_num_steps": 100}})
    ckpt = Path(out) / f"ckpt_stage{stage}"
    engine, scheduler = engine_for(mlp(), cfg)
    recorder, step = LrRecorder(engine), step_fn(engine, rank)
    states = []
    for k in range(6):
        if k == 3:
            engine.save_checkpoint(str(ckpt), tag="step3")
        step()
        states.append(scheduler.policy.state_dict())
    straight = {"lrs": recorder.lrs, "final_state": states[-1]}
    engine, scheduler = engine_for(mlp(), cfg)
    engine.load_checkpoint(str(ckpt), tag="step3")
    recorder, step = LrRecorder(engine), step_fn(engine, rank)
    resumed_from = scheduler.policy.state_dict()
    for _ in range(3):
        step()
    return {"straight": straight, "resumed": {"lrs": recorder.lrs, "final_state": scheduler.policy.state_dict()},
            "state_at_3": states[2], "loaded_state": resumed_from, "global_steps": engine.global_steps}


def overflow_skip(rank: int, stage: int) -> dict:
    """bf16 with DeepSpeed's overflow check: a NaN on one rank makes every rank skip the step. The policy must
    not advance and the skipped step's local norms must not leak into the next: a run with the skipped step
    ends in the same policy state as a run without it."""
    cfg = config(stage, gas=2, bf16={"enabled": True, "check_grad_overflow": True}, scheduler=ADASCALE)
    states, skipped = [], []
    for keys in ([0, "nan", 1, 2], [0, 1, 2]):
        engine, scheduler = engine_for(mlp(), cfg)
        step = step_fn(engine, rank)
        for key in keys:
            step(key=3, poison=True) if key == "nan" else step(key=key)
        states.append(scheduler.policy.state_dict())
        skipped.append(engine.skipped_steps)
    return {"with_skip": states[0], "without": states[1], "skipped_steps": skipped}


def two_param_groups(rank: int, stage: int) -> dict:
    """Weights at lr 0.1, biases at lr 0.02: ZeRO-1/2 step the basic optimizer once per group. Every call
    records (global step, the visible groups' initial lr and lr); the policy must step once per global step."""
    model = mlp()
    groups = [{"params": [p for n, p in model.named_parameters() if n.endswith("weight")], "lr": 0.1},
              {"params": [p for n, p in model.named_parameters() if n.endswith("bias")], "lr": 0.02}]
    engine, _, _, scheduler = deepspeed.initialize(model=model, model_parameters=groups,
                                                   config=config(stage, gas=2, scheduler=ADASCALE))
    calls = []
    engine.basic_optimizer.register_step_pre_hook(lambda opt, args, kwargs: calls.append(
        [engine.global_steps, [[g["initial_lr"], g["lr"]] for g in opt.param_groups]]))
    step = step_fn(engine, rank)
    gains = []
    for _ in range(3):
        step()
        gains.append(scheduler.gain)
    return {"calls": calls, "gains": gains, "policy_steps": scheduler.policy.steps}


def every_policy(rank: int, stage: int) -> dict:
    """Every registered policy by its config name: lrs of 4 steps and, for loss-driven ones, the loss seen."""
    results = {}
    for name in sorted(POLICIES):
        engine, scheduler = engine_for(mlp(), config(stage, gas=2, scheduler={
            "type": name, "params": NEEDED_PARAMS.get(name, {})}))
        recorder, step = LrRecorder(engine), step_fn(engine, rank)
        losses = []
        original_backward = engine.backward

        def backward(loss: torch.Tensor, **kwargs: object) -> object:
            losses.append(loss.item())
            return original_backward(loss, **kwargs)

        engine.backward = backward
        for _ in range(4):
            step()
        mean = torch.tensor(losses, dtype=torch.float64).reshape(4, 2).sum(1)
        dist.all_reduce(mean)
        results[name] = {"lrs": recorder.lrs, "true_mean_loss": (mean / 4).tolist(),
                         "policy_losses": getattr(scheduler.policy, "losses", None)}
    return results


def code_path(rank: int, stage: int) -> dict:
    """scaling_plugins.backends.deepspeed.initialize(policy=...) instead of a "scheduler" entry."""
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 2)
    engine, _, _, scheduler = ds_backend.initialize(model=model, model_parameters=model.parameters(),
                                                    config=config(stage), policy="AdaScale")
    engine.backward(engine(torch.tensor([GOLDEN["orthogonal"][rank]])).sum())
    engine.step()
    return {"gain": scheduler.gain, "type": type(scheduler).__name__}


def errors(stage: int) -> dict:
    model = torch.nn.Linear(2, 2)

    def init(scheduler: dict) -> None:
        engine_for(copy.deepcopy(model), config(stage, scheduler=scheduler))

    engine, scheduler = engine_for(copy.deepcopy(model), config(stage, scheduler=ADASCALE))
    return {
        "typo": error_of(lambda: init({"type": "AdaScael", "params": {}})),
        "unknown": error_of(lambda: init({"type": "Foo", "params": {}})),
        "bad_value": error_of(lambda: init({"type": "AdaScale", "params": {"smoothing": 2.0}})),
        "unknown_key": error_of(lambda: init({"type": "AdaScale", "params": {"warmup_steps": 10}})),
        "bad_schedule": error_of(lambda: init({"type": "AdaScale", "params": {"schedule": {"type": "Cosine"}}})),
        "last_batch_iteration": error_of(lambda: init({"type": "AdaScale", "params": {"last_batch_iteration": 5}})),
        "step_with_batch_size": error_of(lambda: scheduler.step(128)),
        "step_with_kwargs": error_of(lambda: scheduler.step(increment=1)),
        "policy_and_scheduler": error_of(lambda: ds_backend.initialize(
            model=copy.deepcopy(model), config=config(stage, scheduler=ADASCALE), policy="AdaScale")),
        "torch_scheduler_still_works": error_of(lambda: engine_for(  # torch schedulers need a torch optimizer
            copy.deepcopy(model), config(0, scheduler={"type": "StepLR", "params": {"step_size": 2}}))),
    }


def main() -> None:
    rank, args = setup()
    results = {"golden": golden(rank, args.stage), "golden_small_buckets": golden(rank, args.stage, bucket_size=2),
               "one_hot": one_hot_accumulation(rank, args.stage),
               "loss_scaled": loss_scaled(rank, args.stage),
               "collectives": count_collectives(rank, args.stage),
               "checkpoint": checkpoint_resume(rank, args.stage, args.out),
               "overflow": overflow_skip(rank, args.stage), "param_groups": two_param_groups(rank, args.stage),
               "policies": every_policy(rank, args.stage), "code_path": code_path(rank, args.stage),
               "errors": errors(args.stage)}
    write_and_finish(args.out, rank, results)


if __name__ == "__main__":
    main()
