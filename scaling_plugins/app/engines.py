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
its lr scheduler, saved with it); FSDP2's through ``torch.distributed.checkpoint`` (every rank writes its
shards); for DDP and Horovod rank 0 writes one ``torch.save`` file (written to a
temporary name, then renamed, so a rank killed mid-write leaves the previous checkpoint whole) and every rank
reads it. The directory must be one that every node sees (a shared file system), as DeepSpeed's own.

Backends that are not installed, or whose module has not landed, raise ``BackendUnavailable`` with a hint.
:func:`start` joins the job a launcher (or ``scaling_plugins.app.spawn``) started, as the backend needs.
"""
from __future__ import annotations

import contextlib
import copy
import importlib
import json
import math
import os
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from torch import nn

from .launch_env import Placement, init_process_group, placement, shutdown_process_group
from .workloads import Workload

BACKENDS = ("ddp", "fsdp", "deepspeed", "horovod")
ENGINE_MODULES = {"ddp": "torch.distributed", "fsdp": "torch.distributed.fsdp", "deepspeed": "deepspeed",
                  "horovod": "horovod.torch"}
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
DCP_METADATA = ".metadata"   # the file torch.distributed.checkpoint writes last, once every shard is saved


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

    def evaluation_module(self) -> nn.Module:
        """The whole model with the current weights, to evaluate; every rank calls it (an engine that shards the
        parameters gathers them here)."""
        return self.module

    def metrics(self) -> dict[str, Any]:
        return self.driver.metrics()


class TorchDistributedAdapter(EngineAdapter):
    """What the adapters of torch's own engines (DDP, FSDP2) share: the ranks of the torch.distributed process
    group, and ``driver.step()``, which steps the optimizer itself."""

    def step(self, mean_loss: float) -> None:
        self.driver.step(mean_loss)
        self.optimizer.zero_grad(set_to_none=True)

    def rank(self) -> int:
        return torch.distributed.get_rank()

    def barrier(self) -> None:
        torch.distributed.barrier()


class DDPAdapter(TorchDistributedAdapter):
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


class FSDPAdapter(TorchDistributedAdapter):
    """FSDP2: ``fully_shard`` on each child module that has parameters, then on the root (the per-block sharding
    FSDP2 users apply), SGD and ``scaling_plugins.backends.fsdp.attach``; needs an initialised torch.distributed
    process group. Gradients are reduce-scattered once per step (``set_requires_gradient_sync`` off on all but the
    last micro-batch). ``module`` is an unsharded replica that :meth:`evaluation_module` fills from the shards;
    checkpoints go through ``torch.distributed.checkpoint``, every rank writing and reading its own shards.

    ``replicas`` R > 1 is HSDP: the mesh is (R, W/R) with dimensions ("replicate", "shard"), each parameter
    sharded over W/R consecutive ranks and replicated R times. Launchers number the ranks host by host, so with
    W/R ranks per host each shard group stays inside a host and the replicas (gradients all-reduced) span the
    hosts."""

    def __init__(self, model: nn.Module, workload: Workload, lr: float, policy: Mapping[str, Any],
                 accumulation: int, replicas: int = 1) -> None:
        fsdp_backend = require_backend("fsdp")
        from torch.distributed.fsdp import fully_shard

        self.workload = workload
        self.module = copy.deepcopy(model)
        mesh = data_parallel_mesh(replicas)
        for child in model.children():
            if any(param.requires_grad for param in child.parameters()):
                fully_shard(child, mesh=mesh)
        self.sharded = fully_shard(model, mesh=mesh)
        self.optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=workload.momentum)
        self.driver = fsdp_backend.attach(self.sharded, self.optimizer, dict(policy), accumulation_steps=accumulation)

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor, last: bool) -> torch.Tensor:
        self.sharded.set_requires_gradient_sync(last)
        loss = self.workload.loss(self.sharded(x), y)
        (loss / self.accumulation_steps).backward()
        return loss.detach()

    def evaluation_module(self) -> nn.Module:
        """The replica with the parameters gathered whole from every rank's shards (one all-gather each)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        whole = get_model_state_dict(self.sharded, options=StateDictOptions(full_state_dict=True))
        self.module.load_state_dict(whole)
        return self.module

    def save_checkpoint(self, directory: Path, client_state: dict[str, Any]) -> None:
        """Model, optimizer and policy with ``torch.distributed.checkpoint`` (each rank its shards), the counters
        beside them as JSON text."""
        import torch.distributed.checkpoint as dcp

        dcp.save(self._state(json.dumps(client_state)), checkpoint_id=str(directory))

    def load_checkpoint(self, directory: Path) -> Optional[dict[str, Any]]:
        """The counters of the last complete save in ``directory`` (its ``.metadata`` is written last), with the
        model, optimizer and policy restored from it on every rank (resharded when the number of ranks changed);
        None when there is none."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        if not (directory / DCP_METADATA).exists():
            return None
        state = self._state("")
        dcp.load(state, checkpoint_id=str(directory))
        set_state_dict(self.sharded, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])
        self.driver.load_state_dict(state["scaling"])
        return json.loads(state["client"])

    def _state(self, client: str) -> dict[str, Any]:
        """What a checkpoint holds, in the layout ``torch.distributed.checkpoint`` saves and loads in place."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optimizer_state = get_state_dict(self.sharded, self.optimizer)
        return {"model": model_state, "optimizer": optimizer_state, "scaling": self.driver.state_dict(),
                "client": client}


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
    ``timeout``: seconds a collective may wait for a lost peer before it raises: torch.distributed's process
    group timeout, which the DeepSpeed backend passes on to every group DeepSpeed makes; for Horovod
    (:func:`horovod_timeout_env`) its Gloo timeout, Open MPI's failure detector and its stall shutdown, each
    unless set already."""
    require_backend(backend)
    if backend == "horovod":
        if timeout is not None:
            for key, value in horovod_timeout_env(timeout).items():
                os.environ.setdefault(key, value)
        hvd = importlib.import_module("horovod.torch")
        hvd.init()
        launched = placement()
        if hvd.size() != launched.world_size:
            raise BackendUnavailable(
                f"the launcher started {launched.world_size} ranks ({launched.source}) but Horovod sees {hvd.size()}: "
                "start the horovod backend with horovodrun or mpirun (launch/horovodrun.sh, launch/mpirun.sh)")
        return Placement(hvd.rank(), hvd.size(), hvd.local_rank(), "horovod")
    return init_process_group("gloo", timeout)


def horovod_timeout_env(timeout: float) -> dict[str, str]:
    """Horovod's variables for a collective timeout of ``timeout`` seconds (whole seconds, rounded up: T):

    - ``HOROVOD_GLOO_TIMEOUT_SECONDS`` = T: under Gloo, a collective whose peer is lost (a host down, a link cut)
      raises after T;
    - over MPI (Open MPI 5), its failure detector: ``OMPI_MCA_mpi_ft_enable`` and ``OMPI_MCA_mpi_ft_detector`` on,
      ``OMPI_MCA_mpi_ft_detector_timeout`` = T, ``OMPI_MCA_mpi_ft_detector_period`` = T / 4 (each rank sends a
      heartbeat that often; the timeout must exceed three periods). A peer silent for T (a host down, a link cut)
      is declared failed and MPI aborts the job (``MPI_ERR_PROC_FAILED``), from inside Horovod's MPI calls, before
      Python sees an error. Open MPI reads these in ``MPI_Init`` (``hvd.init``), so setting them here suffices;
    - ``HOROVOD_STALL_SHUTDOWN_TIME_SECONDS`` = T with ``HOROVOD_STALL_CHECK_TIME_SECONDS`` = c = ceil(T / 4), under
      Gloo and MPI: Horovod shuts down (every rank's pending collective raises) once a tensor some ranks submitted
      has waited T for the others: a rank that is alive but stops submitting, which neither timeout above sees.
      The coordinator looks every c seconds, and a tensor of its response cache (every tensor after the first
      steps) first waits c to 2c to be taken out of the cache, where the T starts: such a rank ends the job
      between T + c and T + 3c. Horovod ignores a shutdown time below the check time (default 60 s), hence both."""
    seconds = int(math.ceil(timeout))
    return {"HOROVOD_GLOO_TIMEOUT_SECONDS": str(seconds),
            "OMPI_MCA_mpi_ft_enable": "1", "OMPI_MCA_mpi_ft_detector": "1",
            "OMPI_MCA_mpi_ft_detector_timeout": str(seconds), "OMPI_MCA_mpi_ft_detector_period": str(seconds / 4),
            "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS": str(seconds),
            "HOROVOD_STALL_CHECK_TIME_SECONDS": str(max(1, math.ceil(seconds / 4)))}


def stop(backend: str) -> None:
    """Leave the job started by :func:`start` (Horovod shuts down itself at exit)."""
    if backend != "horovod":
        shutdown_process_group()


def check_replicas(backend: str, replicas: int, world_size: Optional[int] = None) -> None:
    """``ValueError`` unless ``replicas`` (HSDP's replica count, :class:`FSDPAdapter`) is an int >= 1, is 1 for
    every backend but fsdp, and divides ``world_size`` (when given)."""
    if not (isinstance(replicas, int) and replicas >= 1):
        raise ValueError(f"replicas must be an int >= 1, got {replicas!r}")
    if replicas != 1 and backend != "fsdp":
        raise ValueError(f"replicas={replicas} (HSDP) needs the fsdp backend, not {backend!r}: use --backend fsdp, "
                         "or leave replicas at 1")
    if world_size is not None and world_size % replicas:
        raise ValueError(f"replicas={replicas} does not divide the world size {world_size}: the HSDP mesh is "
                         f"(replicas, world size / replicas); pick a divisor of {world_size}")


def data_parallel_mesh(replicas: int) -> Any:
    """FSDP2's CPU device mesh over every rank of the default group: 1-D (W,) for ``replicas`` = 1, else HSDP's
    (replicas, W / replicas) named ("replicate", "shard"), rank r at (r // (W / replicas), r % (W / replicas))."""
    from torch.distributed.device_mesh import init_device_mesh

    world_size = torch.distributed.get_world_size()
    check_replicas("fsdp", replicas, world_size)
    if replicas == 1:
        return init_device_mesh("cpu", (world_size,))
    return init_device_mesh("cpu", (replicas, world_size // replicas), mesh_dim_names=("replicate", "shard"))


def make_adapter(backend: str, model: nn.Module, workload: Workload, lr: float, policy: Mapping[str, Any],
                 accumulation: int, run_dir: Optional[Path] = None, replicas: int = 1) -> Any:
    """The adapter for ``backend``; ``BackendUnavailable`` when that backend cannot run here. ``run_dir``
    receives the engine's own monitor output where it has one (DeepSpeed); ``replicas`` > 1 is FSDP2's HSDP
    (:class:`FSDPAdapter`), a ``ValueError`` for the other backends."""
    require_backend(backend)
    if backend == "fsdp":
        return FSDPAdapter(model, workload, lr, policy, accumulation, replicas)
    check_replicas(backend, replicas)
    if backend == "deepspeed":
        return DeepSpeedAdapter(model, workload, lr, policy, accumulation, monitor_dir=run_dir)
    return ADAPTERS[backend](model, workload, lr, policy, accumulation)
