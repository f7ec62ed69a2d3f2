"""The Hugging Face Trainer with the shipped configs/huggingface/adascale_zero2.json, 2 CPU ranks:
``deepspeed --num_gpus 2 tests/hf_scripts/trainer_run.py --out DIR``.

Runs, in one process per rank: the run to the budget (TensorBoard on, a checkpoint every 2 steps), the same run
resumed from checkpoint-2, a run counted in epochs (refused), and the config's scheduler entry under plain
``deepspeed.initialize``. Each rank writes ``DIR/rank<r>.pt``; tests/test_huggingface.py asserts.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import deepspeed
import torch
import torch.distributed as dist
from transformers import Trainer, TrainerCallback, TrainingArguments

from scaling_plugins.integrations.huggingface import ScalingCallback, scaling_driver
from tests.hf_scripts.common import (BASE_LR, GAS, MICRO_BATCH, StepRecord, WarningRecorder, deepspeed_state_on_cpu,
                                     error_of, parse_args, tiny_model, token_data, write_and_finish)

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "huggingface" / "adascale_zero2.json"
BUDGET = 12          # max_steps: the base-scale budget T_SI
WARMUP = 2


class RecordingTrainer(Trainer):
    """The Trainer, noting each micro-batch it trains on."""

    record: StepRecord

    def compute_loss(self, model: Any, inputs: dict, *args: Any, **kwargs: Any) -> Any:
        self.record.micro_batch(inputs["input_ids"])
        return super().compute_loss(model, inputs, *args, **kwargs)


class Recorder(TrainerCallback):
    def __init__(self, record: StepRecord) -> None:
        self.record = record

    def on_step_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self.record.before_step(model)

    def on_step_end(self, args: Any, state: Any, control: Any, lr_scheduler: Any = None, **kwargs: Any) -> None:
        self.record.after_step(scaling_driver(lr_scheduler))


def arguments(out: Path, tensorboard: bool = False, **overrides: Any) -> TrainingArguments:
    settings = {"output_dir": str(out), "deepspeed": json.loads(CONFIG.read_text()), "max_steps": BUDGET,
                "per_device_train_batch_size": MICRO_BATCH, "gradient_accumulation_steps": GAS,
                "learning_rate": BASE_LR, "warmup_steps": WARMUP, "max_grad_norm": 0.0, "logging_steps": 1,
                "save_strategy": "steps", "save_steps": 2, "ddp_backend": "gloo", "seed": 0, "disable_tqdm": True,
                "report_to": ["tensorboard"] if tensorboard else "none",
                "accelerator_config": {"use_configured_state": True}, **overrides}
    if tensorboard:
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(out / "tensorboard")
    deepspeed_state_on_cpu()
    return TrainingArguments(**settings)


def train(rank: int, args: TrainingArguments, resume: Optional[Path] = None) -> dict[str, Any]:
    record = StepRecord(rank)
    trainer = RecordingTrainer(model=tiny_model(), args=args, train_dataset=token_data(),
                               callbacks=[ScalingCallback(), Recorder(record)])
    trainer.record = record
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    callbacks = [type(cb).__name__ for cb in trainer.callback_handler.callbacks]
    return {**record.result(trainer.model), "global_step": trainer.state.global_step,
            "log_history": trainer.state.log_history, "callbacks": callbacks,
            "via_trainer": type(scaling_driver(trainer)).__name__}


def plain_deepspeed() -> dict[str, Any]:
    """The same file under deepspeed.initialize, with numbers where only HF fills "auto" outside the scheduler."""
    config = json.loads(CONFIG.read_text())
    config.update(train_micro_batch_size_per_gpu=MICRO_BATCH, gradient_accumulation_steps=GAS, gradient_clipping=0.0)
    del config["train_batch_size"]
    config["optimizer"]["params"]["lr"] = BASE_LR
    model = tiny_model()
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    policy = engine.lr_scheduler.policy
    return {"params": policy.params, "lr_before_first_step": engine.lr_scheduler.lr}


def main() -> None:
    args = parse_args()
    out = Path(args.out)
    warnings = WarningRecorder()
    deepspeed_state_on_cpu()
    rank = dist.get_rank()
    results: dict[str, Any] = {"straight": train(rank, arguments(out / "run", tensorboard=True))}
    results["resumed"] = train(rank, arguments(out / "run"), resume=out / "run" / "checkpoint-2")
    results["epochs"] = error_of(lambda: train(rank, arguments(out / "epochs", max_steps=-1, num_train_epochs=1)))
    results["plain"] = plain_deepspeed()
    results["warnings"] = warnings.messages
    write_and_finish(args.out, rank, results)


if __name__ == "__main__":
    main()
