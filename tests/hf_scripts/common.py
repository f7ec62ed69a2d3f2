"""Helpers for the scripts the Hugging Face tests launch (2 CPU ranks, gloo): a tiny Llama built from a config in
code (nothing is downloaded), token data with a learnable pattern, a per-step record from which the test
recomputes the gain and the applied learning rate offline, and the teardown."""
from __future__ import annotations

import argparse
import gc
import os
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from accelerate.state import AcceleratorState, PartialState
from transformers import LlamaConfig, LlamaForCausalLM

from scaling_plugins import ScalingWarning

VOCAB, SEQ, SAMPLES = 32, 8, 2048
MODEL_CONFIG = {"vocab_size": VOCAB, "max_position_embeddings": SEQ, "hidden_size": 32, "intermediate_size": 64,
                "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2, "bos_token_id": 0,
                "eos_token_id": 1, "attention_dropout": 0.0}
BASE_LR = 0.1
MICRO_BATCH = 32
GAS = 2


def parse_args() -> argparse.Namespace:
    """--out (results folder); the launchers may add --local_rank."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--local_rank", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    return args


def deepspeed_state_on_cpu() -> None:
    """Before each TrainingArguments: Accelerate picks no process-group backend for DeepSpeed on a machine without
    GPUs, and then counts one process (each rank would train on all the data). A state made first with gloo
    counts the launcher's ranks; ``TrainingArguments(accelerator_config={"use_configured_state": True})`` reuses
    it. The previous Trainer's accelerator state (its DeepSpeed plugin) is dropped, as a new process would."""
    AcceleratorState._reset_state()
    if not PartialState._shared_state:
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        PartialState(backend="gloo")
        del os.environ["ACCELERATE_USE_DEEPSPEED"]


def tiny_model() -> LlamaForCausalLM:
    """The same 2-layer Llama (hidden size 32, no dropout) on every call and every rank. (A GPT-2 would do as well,
    but the Trainer counts its loss's tokens without the causal shift: its loss_type is not set.)"""
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**MODEL_CONFIG))


def token_data() -> list[dict[str, torch.Tensor]]:
    """Sequences counting up by a per-sequence stride (mod VOCAB) with every third token random: the next token is
    mostly predictable, so the mean gradient is far from zero and the gain lies inside (1, S)."""
    generator = torch.Generator().manual_seed(1)
    starts = torch.randint(0, VOCAB, (SAMPLES, 1), generator=generator)
    strides = torch.randint(1, 4, (SAMPLES, 1), generator=generator)
    tokens = (starts + strides * torch.arange(SEQ)) % VOCAB
    noise = torch.randint(0, VOCAB, tokens.shape, generator=generator)
    tokens = torch.where(torch.arange(SEQ) % 3 == 2, noise, tokens)
    return [{"input_ids": row, "labels": row} for row in tokens]


def parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


class StepRecord:
    """What the test needs to recompute each step: the micro-batches this rank trained on, the parameters before
    every optimizer step and at the end (rank 0), and the scheduler's gain, lr and progress after every step."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.inputs: list[torch.Tensor] = []
        self.params: list[dict[str, torch.Tensor]] = []
        self.steps: list[dict[str, float]] = []

    def micro_batch(self, input_ids: torch.Tensor) -> None:
        self.inputs.append(input_ids.detach().clone())

    def before_step(self, model: torch.nn.Module) -> None:
        if self.rank == 0:
            self.params.append(parameters(model))

    def after_step(self, driver: Any) -> None:
        self.steps.append({"gain": driver.gain, "lr": driver.lr, "progress": driver.progress, "done": driver.done})

    def result(self, model: torch.nn.Module) -> dict[str, Any]:
        final = parameters(model) if self.rank == 0 else None
        return {"inputs": self.inputs, "params": self.params, "final": final, "steps": self.steps}


class WarningRecorder:
    """The messages of the ``ScalingWarning``s scaling_plugins shows from now on (each one: the category's filter
    becomes "always"); they are still printed."""

    def __init__(self) -> None:
        self.messages: list[str] = []
        warnings.simplefilter("always", ScalingWarning)
        self._show = warnings.showwarning
        warnings.showwarning = self._record

    def _record(self, message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
        if issubclass(category, ScalingWarning):
            self.messages.append(str(message))
        self._show(message, category, *args, **kwargs)


def error_of(fn: Any) -> str:
    """``"<ExceptionType>: message"`` of what ``fn()`` raised, or "no error"."""
    try:
        fn()
    except Exception as err:  # noqa: BLE001 - the test asserts on the type and message
        return f"{type(err).__name__}: {err}"
    return "no error"


def write_and_finish(out: str, rank: int, results: dict[str, Any]) -> None:
    """Write this rank's results, then tear down in order: engines (in reference cycles with their schedulers)
    are collected before the process group goes, else the interpreter's exit may abort in gloo."""
    torch.save(results, Path(out, f"rank{rank}.pt"))
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
