"""Engine adapters for the built-in trainer: one small class per backend, one surface for the training loop.

Each adapter wraps a model with its engine and a policy and offers

    accumulation_steps                         micro-batches per rank in the next step (read before each step)
    forward_backward(x, y, last) -> loss      one micro-batch (``last`` closes the optimizer step)
    step(mean_loss)                            the optimizer step, learning rate set by the policy
    mean_over_ranks(value)                     an all-reduced mean (for the training-loss telemetry)
    metrics(), policy, module                  what the telemetry reads; the bare model for evaluation
    save_checkpoint(dir, client_state)         model, optimizer, policy and the trainer's counters, all ranks
    load_checkpoint(dir) -> client_state       back from the last save (None when there is none)

Checkpoints go the engine's own way: DeepSpeed's ``engine.save_checkpoint``/``load_checkpoint`` (the policy is
its lr scheduler, saved with it); for DDP and Horovod rank 0 writes one ``torch.save`` file (written to a
temporary name, then renamed, so a rank killed mid-write leaves the previous checkpoint whole) and every rank
reads it. The directory must be one that every node sees (a shared file system), as DeepSpeed's own.

Backends that are not installed, or whose module has not landed, raise ``BackendUnavailable`` with a hint.
:func:`start` joins the job a launcher (or ``scaling_plugins.app.spawn``) started, as the backend needs.
"""
from __future__ import annotations

import contextlib
import importlib
import math
import os
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from torch import nn

from .launch_env import Placement, init_process_group, placement, shutdown_process_group
from .workloads import Workload

BACKENDS = ("ddp", "deepspeed", "horovod")
ENGINE_MODULES = {"ddp": "torch.distributed", "deepspeed": "deepspeed", "horovod": "horovod.torch"}
INSTALL_HINTS = {
    "deepspeed": "pip install 'scaling_plugins[deepspeed]'",
    "horovod": "make horovod (builds Horovod 0.28.1 against this torch; see docs/horovod.md)",
}


class BackendUnavailable(RuntimeError):
    """The chosen backend cannot run here (engine not installed, or its scaling_plugins module missing)."""


def require_backend(name: str) -> Any:
    """The ``scaling_plugins.backends.<name>`` module once it and its engine import, or
    ``BackendUnavailable`` saying how to get them."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; valid backends: {list(BACKENDS)}")
    try:
        importlib.import_module(ENGINE_MODULES[name])
        return importlib.import_module(f"scaling_plugins.backends.{name}")
    except ImportError as err:
        hint = INSTALL_HINTS.get(name, "")
        raise BackendUnavailable(f"backend {name!r} is not available here ({err}). {hint}".strip()) from err


CHECKPOINT_FILE = "state.pt"


class EngineAdapter:
    """What every adapter shares: its backend's policy driver (``self.driver``) answers for the policy, the
    telemetry numbers and the mean over ranks; DDP and Horovod share the one-file checkpoint."""

    driver: Any
    module: nn.Module
    optimizer: torch.optim.Optimizer
    policy_in_optimizer_state = False   # the optimizer's state_dict() carries the policy's (Horovod's does)

    def rank(self) -> int:
        raise NotImplementedError

    def barrier(self) -> None:
        raise NotImplementedError

    def training_state(self) -> dict[str, Any]:
        """What a checkpoint holds besides the trainer's counters."""
        state = {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict()}
        if not self.policy_in_optimizer_state:
            state["scaling"] = self.driver.state_dict()
        return state

    def load_training_state(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if not self.policy_in_optimizer_state:
            self.driver.load_state_dict(state["scaling"])

    def save_checkpoint(self, directory: Path, client_state: dict[str, Any]) -> None:
        """Rank 0 writes ``directory/state.pt`` (atomically); every rank returns once it is there."""
        if self.rank() == 0:
            directory.mkdir(parents=True, exist_ok=True)
            partial = directory / f"{CHECKPOINT_FILE}.partial"
            torch.save({**self.training_state(), "client": client_state}, partial)
            os.replace(partial, directory / CHECKPOINT_FILE)
        self.barrier()

    def load_checkpoint(self, directory: Path) -> Optional[dict[str, Any]]:
        """The trainer's counters of the last checkpoint in ``directory``, with the model, optimizer and policy
        restored on every rank; None when there is no checkpoint."""
        path = directory / CHECKPOINT_FILE
        if not path.exists():
            return None
        state = torch.load(path, map_location="cpu", weights_only=False)
        self.load_training_state(state)
        return state["client"]

    @property
    def policy(self) -> Any:
        return self.driver.policy

    @property
    def accumulation_steps(self) -> int:
        """Micro-batches per rank in the next optimizer step (the policy's driver follows a batch-size controller)."""
        return self.driver.accumulation_steps

    def mean_over_ranks(self, value: torch.Tensor) -> float:
        return self.driver.all_reduce_mean(value)

    def metrics(self) -> dict[str, Any]:
        return self.driver.metrics()


class DDPAdapter(EngineAdapter):
    """``DistributedDataParallel`` + SGD + ``scaling_plugins.backends.ddp.attach``; needs an initialised
    torch.distributed process group."""

    def __init__(self, model: nn.Module, workload: Workload, lr: float, policy: Mapping[str, Any],
                 accumulation: int) -> None:
        ddp_backend = require_backend("ddp")
        self.module = model
        self.workload = workload
        self.ddp = torch.nn.parallel.DistributedDataParallel(model)
        self.optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=workload.momentum)
        self.driver = ddp_backend.attach(self.ddp, self.optimizer, dict(policy), accumulation_steps=accumulation)

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor, last: bool) -> torch.Tensor:
        context = contextlib.nullcontext() if last else self.ddp.no_sync()
        with context:
            loss = self.workload.loss(self.ddp(x), y)
            (loss / self.accumulation_steps).backward()
        return loss.detach()

    def step(self, mean_loss: float) -> None:
        self.driver.step(mean_loss)
        self.optimizer.zero_grad(set_to_none=True)

    def rank(self) -> int:
        return torch.distributed.get_rank()

    def barrier(self) -> None:
        torch.distributed.barrier()


class DeepSpeedAdapter(EngineAdapter):
    """``deepspeed.initialize`` with the policy as the config's ``"scheduler"`` entry (the JSON path a DeepSpeed
    user takes), SGD, ZeRO stage 0, no gradient clipping; DeepSpeed does the accumulation (it divides each
    micro-batch's loss by gradient_accumulation_steps itself). With ``monitor_dir``, DeepSpeed's csv monitor
    writes its own events and the policy's (``scaling_plugins/<field>``) to ``monitor_dir/deepspeed_monitor``."""

    def __init__(self, model: nn.Module, workload: Workload, lr: float, policy: Mapping[str, Any],
                 accumulation: int, monitor_dir: Optional[Path] = None) -> None:
        require_backend("deepspeed")   # registers the policy names with DeepSpeed
        import deepspeed

        self.workload = workload
        self.config = {
            "train_micro_batch_size_per_gpu": workload.micro_batch_size,
            "gradient_accumulation_steps": accumulation,
            "optimizer": {"type": "SGD", "params": {"lr": lr, "momentum": workload.momentum}},
            "scheduler": dict(policy),
            "gradient_clipping": 0.0,
            "zero_optimization": {"stage": 0},
        }
        if monitor_dir is not None:
            self.config["csv_monitor"] = {"enabled": True, "output_path": str(monitor_dir),
                                          "job_name": "deepspeed_monitor"}
        self.engine, _, _, self.driver = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                                              config=self.config)
        self.module = self.engine.module

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor, last: bool) -> torch.Tensor:
        loss = self.workload.loss(self.engine(x), y)
        self.engine.backward(loss)
        self.engine.step()   # DeepSpeed applies the update at the accumulation boundary only
        return loss.detach()

    def step(self, mean_loss: float) -> None:
        """Nothing left to do: the last ``forward_backward`` stepped (a loss-driven policy reads its loss from
        ``engine.backward``)."""

    def save_checkpoint(self, directory: Path, client_state: dict[str, Any]) -> None:
        """DeepSpeed's own checkpoint (model, optimizer, the policy as its lr scheduler) with the counters."""
        self.engine.save_checkpoint(str(directory), client_state=client_state)

    def load_checkpoint(self, directory: Path) -> Optional[dict[str, Any]]:
        if not (directory / "latest").exists():
            return None
        _, client_state = self.engine.load_checkpoint(str(directory))
        return client_state


class HorovodAdapter(EngineAdapter):
    """``scaling_plugins.backends.horovod.DistributedOptimizer`` over SGD; needs ``hvd.init()`` done."""

    policy_in_optimizer_state = True   # under "scaling_plugins"

    def __init__(self, model: nn.Module, workload: Workload, lr: float, policy: Mapping[str, Any],
                 accumulation: int) -> None:
        horovod_backend = require_backend("horovod")
        self.hvd = importlib.import_module("horovod.torch")
        self.module = model
        self.workload = workload
        self.hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        sgd = torch.optim.SGD(model.parameters(), lr=lr, momentum=workload.momentum)
        self.optimizer = horovod_backend.DistributedOptimizer(
            sgd, named_parameters=model.named_parameters(), policy=dict(policy),
            backward_passes_per_step=accumulation)
        self.driver = self.optimizer.scaling

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor, last: bool) -> torch.Tensor:
        loss = self.workload.loss(self.module(x), y)
        (loss / self.accumulation_steps).backward()
        return loss.detach()

    def step(self, mean_loss: float) -> None:
        self.optimizer.step(loss=mean_loss)
        self.optimizer.zero_grad()   # Horovod's zero_grad takes no set_to_none

    def rank(self) -> int:
        return self.hvd.rank()

    def barrier(self) -> None:
        self.hvd.barrier()


ADAPTERS = {"ddp": DDPAdapter, "horovod": HorovodAdapter}


def start(backend: str, timeout: Optional[float] = None) -> Placement:
    """Join the job this process belongs to, the way ``backend`` needs: Horovod's own ``hvd.init()``, or a
    torch.distributed gloo group from the launcher's variables (``scaling_plugins.app.launch_env``).
    ``timeout``: seconds a collective may wait for a lost peer before it raises (torch.distributed's process
    group timeout; Horovod reads HOROVOD_GLOO_TIMEOUT_SECONDS, which this sets unless it is set already)."""
    require_backend(backend)
    if backend == "horovod":
        if timeout is not None:
            os.environ.setdefault("HOROVOD_GLOO_TIMEOUT_SECONDS", str(int(math.ceil(timeout))))
        hvd = importlib.import_module("horovod.torch")
        hvd.init()
        launched = placement()
        if hvd.size() != launched.world_size:
            raise BackendUnavailable(
                f"the launcher started {launched.world_size} ranks ({launched.source}) but Horovod sees {hvd.size()}: "
                "start the horovod backend with horovodrun or mpirun (launch/horovodrun.sh, launch/mpirun.sh)")
        return Placement(hvd.rank(), hvd.size(), hvd.local_rank(), "horovod")
    return init_process_group("gloo", timeout)


def stop(backend: str) -> None:
    """Leave the job started by :func:`start` (Horovod shuts down itself at exit)."""
    if backend != "horovod":
        shutdown_process_group()


def make_adapter(backend: str, model: nn.Module, workload: Workload, lr: float, policy: Mapping[str, Any],
                 accumulation: int, run_dir: Optional[Path] = None) -> Any:
    """The adapter for ``backend``; ``BackendUnavailable`` when that backend cannot run here. ``run_dir``
    receives the engine's own monitor output where it has one (DeepSpeed)."""
    require_backend(backend)
    if backend == "deepspeed":
        return DeepSpeedAdapter(model, workload, lr, policy, accumulation, monitor_dir=run_dir)
    return ADAPTERS[backend](model, workload, lr, policy, accumulation)
