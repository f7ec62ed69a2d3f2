"""What each rank runs in tests/test_fsdp.py (spawned gloo ranks on CPU): FSDP2 models, the same model under DDP,
and the numbers the tests compare. Every function is ``fn(rank, world, ...)`` for ``tests.distributed.run_ranks``."""
from __future__ import annotations

import contextlib
import copy

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import (CPUOffloadPolicy, FSDPModule, FullyShardedDataParallel, MixedPrecisionPolicy,
                                    fully_shard)
from torch.nn.parallel import DistributedDataParallel as DDP

from scaling_plugins.backends import ddp, fsdp
from scaling_plugins.backends.fsdp import compat
from scaling_plugins.stats import GradientSample, estimate_moments
from tests import adaptive_cases
from tests.policy_cases import Quadratic

GOLDEN = {  # one input per rank into Linear(2, 2) with bias, loss = output.sum(): first-step gain
    "orthogonal": ([[1.0, 0.0], [0.0, 1.0]], 4 / 3),
    "identical": ([[1.0, 1.0], [1.0, 1.0]], 1.0),
    "opposite": ([[-1.0, 1.0], [1.0, -1.0]], 2.0),
}


def mesh_1d(world: int):
    return init_device_mesh("cpu", (world,))


def replicate_only_mesh(world: int):
    """HSDP's 2-D mesh with every rank a replica: shard groups of one rank."""
    return init_device_mesh("cpu", (world, 1), mesh_dim_names=("replicate", "shard"))


def golden_gains(rank: int, world: int) -> dict:
    """Each GOLDEN case's first step, and the learning rate the optimizer really applied."""
    out = {}
    for case, (inputs, _) in GOLDEN.items():
        torch.manual_seed(0)
        model = fully_shard(torch.nn.Linear(2, 2), mesh=mesh_1d(world))
        driver = fsdp.attach(model, torch.optim.SGD(model.parameters(), lr=0.1), "AdaScale")
        before = model.bias.detach().full_tensor()
        model(torch.tensor([inputs[rank]])).sum().backward()
        grad = model.bias.grad.full_tensor()
        driver.step()
        applied = ((before - model.bias.detach().full_tensor()) / grad).mean().item()
        out[case] = {"gain": driver.gain, "lr": driver.lr, "applied_lr": applied, "scale": driver.scale}
    return out


class Blocks(torch.nn.Module):
    """Three small blocks and a head: 8 parameter tensors, sharded per block or at the root only."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Tanh()) for _ in range(3))
        self.head = torch.nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def shard(model: Blocks, mesh, nested: bool, reshard_after_forward: bool = True, **kwargs) -> Blocks:
    if nested:
        for block in model.blocks:
            fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward, **kwargs)
    return fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward, **kwargs)


def batches(rank: int, steps: int, accumulation: int) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Per step, this rank's micro-batches (4 samples each; targets around 1, so the gradients share a mean), the
    same on every run of the same seed."""
    generator = torch.Generator().manual_seed(100 + rank)
    return [[(torch.randn(4, 6, generator=generator), torch.randn(4, 3, generator=generator) + 1.0)
             for _ in range(accumulation)] for _ in range(steps)]


def micro_steps(model, driver, data, accumulation: int, sync_each: bool, loss_reduction: str = "mean",
                clip: float | None = None) -> None:
    """One optimizer step: ``accumulation`` micro-batches (FSDP: gradient sync off on all but the last unless
    ``sync_each``; DDP: no_sync()), then the driver's step."""
    divisor = accumulation if loss_reduction == "mean" else 1
    for index, (x, y) in enumerate(data):
        last = index == accumulation - 1
        if isinstance(model, FSDPModule):
            model.set_requires_gradient_sync(sync_each or last)
            context = contextlib.nullcontext()
        else:
            context = contextlib.nullcontext() if last else model.no_sync()
        with context:
            (torch.nn.functional.mse_loss(model(x), y) / divisor).backward()
    if clip is not None:
        driver.clip_grad_norm_(clip)
    driver.step()
    driver.optimizer.zero_grad()


def trajectory(model, driver, rank: int, steps: int, accumulation: int, sync_each: bool,
               loss_reduction: str = "mean") -> dict:
    gains, lrs = [], []
    for data in batches(rank, steps, accumulation):
        micro_steps(model, driver, data, accumulation, sync_each, loss_reduction)
        gains.append(driver.gain)
        lrs.append(driver.lr)
    return {"gains": gains, "lrs": lrs, "metrics": driver.metrics()}


def ddp_and_fsdp(rank: int, world: int, nested: bool, reshard_after_forward: bool, accumulation: int,
                 loss_reduction: str, steps: int = 4) -> dict:
    """The same model, data and seed through the DDP backend and the FSDP2 backend (a reduction per micro-batch),
    each with momentum SGD under AdaScale."""
    torch.manual_seed(0)
    net = Blocks()
    ddp_model = DDP(copy.deepcopy(net))
    ddp_driver = ddp.attach(ddp_model, torch.optim.SGD(ddp_model.parameters(), lr=0.05, momentum=0.9), "AdaScale",
                            accumulation_steps=accumulation, loss_reduction=loss_reduction)
    fsdp_model = shard(net, mesh_1d(world), nested, reshard_after_forward)
    fsdp_driver = fsdp.attach(fsdp_model, torch.optim.SGD(fsdp_model.parameters(), lr=0.05, momentum=0.9),
                              "AdaScale", accumulation_steps=accumulation, loss_reduction=loss_reduction)
    out = {"ddp": trajectory(ddp_model, ddp_driver, rank, steps, accumulation, False, loss_reduction),
           "fsdp": trajectory(fsdp_model, fsdp_driver, rank, steps, accumulation, True, loss_reduction)}
    del ddp_model, ddp_driver
    return out


def accumulated_statistics(rank: int, world: int, loss_reduction: str) -> dict:
    """Accumulation under set_requires_gradient_sync(False): the first step's σ², μ² against those of the
    hand-computed pieces (each rank's accumulated gradient, from a plain copy of the model), n = W."""
    accumulation = 3
    torch.manual_seed(0)
    net = Blocks()
    plain = copy.deepcopy(net)
    model = shard(net, mesh_1d(world), nested=True)
    driver = fsdp.attach(model, torch.optim.SGD(model.parameters(), lr=0.05), "AdaScale",
                         accumulation_steps=accumulation, loss_reduction=loss_reduction)
    data = batches(rank, 1, accumulation)[0]
    divisor = accumulation if loss_reduction == "mean" else 1
    for x, y in data:
        (torch.nn.functional.mse_loss(plain(x), y) / divisor).backward()
    local = torch.cat([p.grad.reshape(-1) for p in plain.parameters()]).double()
    pieces = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(pieces, local)
    unit = accumulation if loss_reduction == "sum" else 1     # the sum convention's accumulated gradient is A·ḡ_i
    pieces = [piece / unit for piece in pieces]
    sample = GradientSample(local_sq_sum=sum(float(p.dot(p)) for p in pieces),
                            mean_sq_norm=float(torch.stack(pieces).mean(0).pow(2).sum()), count=world)
    expected = estimate_moments(sample, float(world * accumulation))
    micro_steps(model, driver, data, accumulation, sync_each=False, loss_reduction=loss_reduction)
    return {"sigma_sq": driver.metrics()["sigma_sq"], "mu_sq": driver.metrics()["mu_sq"], "expected": expected,
            "gain": driver.gain}


def one_hot_accumulation(rank: int, world: int) -> dict:
    """Four orthogonal micro-batch gradients (2 ranks × 2 micro-batches), for each loss reduction, reduced every
    micro-batch or once: the gain equals the scale, 4."""
    out = {}
    for loss_reduction in ("mean", "sum"):
        for sync_each in (True, False):
            model = fully_shard(torch.nn.Linear(4, 2, bias=False), mesh=mesh_1d(world))
            driver = fsdp.attach(model, torch.optim.SGD(model.parameters(), lr=1.0), "AdaScale",
                                 accumulation_steps=2, loss_reduction=loss_reduction)
            divisor = 2 if loss_reduction == "mean" else 1
            for micro in range(2):
                model.set_requires_gradient_sync(sync_each or micro == 1)
                x = torch.nn.functional.one_hot(torch.tensor([2 * rank + micro]), 4).float()
                (model(x).sum() / divisor).backward()
            driver.step()
            out[loss_reduction, sync_each] = {"gain": driver.gain, "scale": driver.scale}
    return out


def every_policy(rank: int, world: int, specs: dict) -> dict:
    """A few steps of each policy spec on the nested model (the loss passed where a policy reads it)."""
    out = {}
    for name, spec in specs.items():
        torch.manual_seed(0)
        model = shard(Blocks(), mesh_1d(world), nested=True)
        driver = fsdp.attach(model, torch.optim.SGD(model.parameters(), lr=0.05), spec, accumulation_steps=2)
        lrs, accumulations = [], []
        for step in range(4):
            accumulation = driver.accumulation_steps
            accumulations.append(accumulation)
            loss = 0.0
            for x, y in batches(rank + 10 * step, 1, accumulation)[0]:
                value = torch.nn.functional.mse_loss(model(x), y) / accumulation
                value.backward()
                loss += value.item()
            driver.step(loss)
            driver.optimizer.zero_grad()
            lrs.append(driver.lr)
        out[name] = {"lrs": lrs, "accumulations": accumulations, "metrics": driver.metrics(),
                     "state": driver.state_dict()["policy"]}
    return out


def hsdp_and_ddp(rank: int, world: int, steps: int = 3) -> dict:
    """HSDP (2 replicas × 2 shards) against DDP on the same 4 ranks, model, data and seed."""
    torch.manual_seed(0)
    net = Blocks()
    ddp_model = DDP(copy.deepcopy(net))
    ddp_driver = ddp.attach(ddp_model, torch.optim.SGD(ddp_model.parameters(), lr=0.05), "AdaScale")
    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
    model = shard(net, mesh, nested=True)
    driver = fsdp.attach(model, torch.optim.SGD(model.parameters(), lr=0.05), "AdaScale")
    out = {"ddp": trajectory(ddp_model, ddp_driver, rank, steps, 1, True),
           "fsdp": trajectory(model, driver, rank, steps, 1, True)}
    del ddp_model, ddp_driver
    return out


def mixed_precision(rank: int, world: int, param_dtype: str, reduce_dtype: str) -> dict:
    """Parameters in ``param_dtype``, gradients reduced in ``reduce_dtype`` (fp16: FSDP divides them by its
    pre-divide factor before the reduce-scatter): the first step's σ², μ² against the ones computed from each
    rank's local gradient in ``param_dtype`` (read in fp64, from a copy of the model in that dtype) and from the
    gradient FSDP reduced (in ``reduce_dtype``, so with its rounding)."""
    torch.manual_seed(0)
    net = Blocks()
    dtype = getattr(torch, param_dtype)
    plain = copy.deepcopy(net).to(dtype)
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=getattr(torch, reduce_dtype))
    model = shard(net, mesh_1d(world), nested=True, mp_policy=policy)
    driver = fsdp.attach(model, torch.optim.SGD(model.parameters(), lr=0.05), "AdaScale")
    x, y = batches(rank, 1, 1)[0][0]
    torch.nn.functional.mse_loss(plain(x.to(dtype)).float(), y).backward()
    local = torch.cat([p.grad.reshape(-1) for p in plain.parameters()]).double()
    pieces = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(pieces, local)
    torch.nn.functional.mse_loss(model(x), y).backward()
    reduced = torch.cat([p.grad.full_tensor().reshape(-1) for p in model.parameters()]).double()
    sample = GradientSample(local_sq_sum=sum(float(p.dot(p)) for p in pieces),
                            mean_sq_norm=float(reduced.dot(reduced)), count=world)
    expected = estimate_moments(sample, float(world))
    driver.step()
    return {"sigma_sq": driver.metrics()["sigma_sq"], "mu_sq": driver.metrics()["mu_sq"], "expected": expected,
            "predivide": compat.predivide_factor(compat.param_groups(model)[0])}


def clipping(rank: int, world: int) -> dict:
    """driver.clip_grad_norm_ against torch's clip_grad_norm_ on an identical FSDP model: the total norms and the
    clipped gradients; the all-reduces of a step after the driver's clipping (none: the clipping made the one the
    statistics need) and of a step without it (one)."""
    torch.manual_seed(0)
    net = Blocks()
    reference = shard(copy.deepcopy(net), mesh_1d(world), nested=True)
    model = shard(net, mesh_1d(world), nested=True)
    driver = fsdp.attach(model, torch.optim.SGD(model.parameters(), lr=0.05), "AdaScale")
    x, y = batches(rank, 1, 1)[0][0]
    for m in (reference, model):
        torch.nn.functional.mse_loss(m(x), y).backward()
    expected_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.01).full_tensor().item()
    norm = driver.clip_grad_norm_(0.01).item()
    grads = [(p.grad.full_tensor(), q.grad.full_tensor()) for p, q in zip(model.parameters(), reference.parameters())]
    with counting_all_reduces() as clipped_step:
        driver.step()
    driver.optimizer.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    with counting_all_reduces() as plain_step:
        driver.step()
    return {"norm": norm, "expected_norm": expected_norm,
            "max_grad_diff": max(float((a - b).abs().max()) for a, b in grads),
            "max_grad": max(float(b.abs().max()) for _, b in grads),
            "all_reduces": (len(clipped_step), len(plain_step)), "gain": driver.gain}


@contextlib.contextmanager
def counting_all_reduces():
    """The calls to torch.distributed.all_reduce made inside (one entry each)."""
    calls = []
    original = dist.all_reduce

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    dist.all_reduce = counting
    try:
        yield calls
    finally:
        dist.all_reduce = original


def refused(make) -> str:
    """The message of the ``ValueError``/``RuntimeError`` ``make()`` raises ("" when it raises none)."""
    try:
        make()
    except (ValueError, RuntimeError) as error:
        return str(error)
    return ""


class OwnReduceScatter(compat.ReduceScatter):
    """A user's reduce-scatter (torch's default behaviour)."""

    def allocate(self, size, *, dtype, device):
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
        return dist.reduce_scatter_single(output_tensor, input_tensor, group=group, op=op, async_op=async_op)


def bad_input(rank: int, world: int) -> dict:
    """The message of each refused set-up, at attach or at the step."""
    mesh, cpu = mesh_1d(world), torch.device("cpu")

    def attach(model, **kwargs):
        return fsdp.attach(model, torch.optim.SGD(model.parameters(), lr=0.1), "AdaScale", **kwargs)

    def with_own_reduce_scatter():
        model = shard(Blocks(), mesh, nested=True)
        model.blocks[1].set_custom_reduce_scatter(OwnReduceScatter())
        attach(model)

    def with_ignored_parameter():
        net = Blocks()
        attach(fully_shard(net, mesh=mesh, ignored_params={net.head.weight}))

    def with_divide_factor():
        model = shard(Blocks(), mesh, nested=True)
        model.set_gradient_divide_factor(1.0)
        attach(model)

    def shard_of_one_rank():
        attach(shard(Blocks(), replicate_only_mesh(world), nested=False))

    def uneven_reductions():    # 3 micro-batches, gradients synced after the 2nd and the 3rd
        model = shard(Blocks(), mesh, nested=True)
        driver = attach(model, accumulation_steps=3)
        for micro, (x, y) in enumerate(batches(rank, 1, 3)[0]):
            model.set_requires_gradient_sync(micro > 0)
            torch.nn.functional.mse_loss(model(x), y).backward()
        driver.step()

    def step_without_backward():
        attach(shard(Blocks(), mesh, nested=True)).step()

    def optimizer_step_after_the_drivers():
        model = shard(Blocks(), mesh, nested=True)
        driver = attach(model)
        x, y = batches(rank, 1, 1)[0][0]
        torch.nn.functional.mse_loss(model(x), y).backward()
        driver.step()
        driver.optimizer.step()

    return {
        "fsdp1": refused(lambda: attach(FullyShardedDataParallel(torch.nn.Linear(2, 2), device_id=cpu))),
        "plain": refused(lambda: attach(torch.nn.Linear(2, 2))),
        "own_reduce_scatter": refused(with_own_reduce_scatter),
        "ignored_parameter": refused(with_ignored_parameter),
        "divide_factor": refused(with_divide_factor),
        "shard_of_one_rank": refused(shard_of_one_rank),
        "uneven_reductions": refused(uneven_reductions),
        "step_without_backward": refused(step_without_backward),
        "optimizer_step_after_the_drivers": refused(optimizer_step_after_the_drivers),
        "rule_policy_on_shard_of_one_rank": refused(lambda: fsdp.attach(
            shard(Blocks(), replicate_only_mesh(world), nested=False),
            torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1), "LinearScaling")),
    }


def checkpoint_resume(rank: int, world: int, directory: str) -> dict:
    """Train 2 steps, save model, optimizer and driver state with torch.distributed.checkpoint, train 2 more; then
    a fresh model and driver load the checkpoint and train the same 2 steps: the gains, learning rates and
    parameters must repeat bit for bit."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    def build():
        torch.manual_seed(0)
        model = shard(Blocks(), mesh_1d(world), nested=True)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        return model, optimizer, fsdp.attach(model, optimizer, "AdaScale", accumulation_steps=2)

    def train(model, driver, steps):
        record = []
        for data in steps:
            micro_steps(model, driver, data, 2, sync_each=False)
            record.append((driver.gain, driver.lr))
        return record, [p.detach().to_local().clone() for p in model.parameters()]

    data = batches(rank, 4, 2)
    model, optimizer, driver = build()
    train(model, driver, data[:2])
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state, "scaling": driver.state_dict()}, checkpoint_id=directory)
    first, first_params = train(model, driver, data[2:])

    model, optimizer, driver = build()
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state, "scaling": driver.state_dict()}
    dcp.load(state, checkpoint_id=directory)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    driver.load_state_dict(state["scaling"])
    second, second_params = train(model, driver, data[2:])
    return {"first": first, "second": second, "progress_after_load": state["scaling"]["policy"],
            "same_params": all(torch.equal(a, b) for a, b in zip(first_params, second_params))}


def offloaded_and_not(rank: int, world: int, steps: int = 3) -> dict:
    """The same model, data and seed sharded with and without ``CPUOffloadPolicy`` (its gradients reduce-scattered
    and kept on the host), 2 micro-batches each reduced, momentum SGD under AdaScale."""
    torch.manual_seed(0)
    net = Blocks()
    out = {}
    for name, offload in {"plain": {}, "offloaded": {"offload_policy": CPUOffloadPolicy(pin_memory=False)}}.items():
        model = shard(copy.deepcopy(net), mesh_1d(world), nested=True, **offload)
        driver = fsdp.attach(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), "AdaScale",
                             accumulation_steps=2)
        out[name] = trajectory(model, driver, rank, steps, 2, True)
    return out


RESHARDED_POLICIES = ("AdaScale", "LinearScaling")


def checkpoint_across_world_sizes(rank: int, world: int, directory: str, resume: bool) -> dict:
    """For each of RESHARDED_POLICIES: 2 steps from a fresh start, saved with torch.distributed.checkpoint to
    ``directory/<policy>``, or (``resume``) the same model, optimizer and driver loaded there first — on however
    many ranks this run has, DCP resharding the model and optimizer state. Per policy: the driver's scale,
    progress and metrics right after the load and after the 2 steps, and the full parameters when saved or
    loaded."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    out = {}
    for policy in RESHARDED_POLICIES:
        torch.manual_seed(0)
        model = shard(Blocks(), mesh_1d(world), nested=True)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        driver = fsdp.attach(model, optimizer, policy)
        path = f"{directory}/{policy}"
        resumed = {}
        if resume:
            model_state, optim_state = get_state_dict(model, optimizer)
            state = {"model": model_state, "optim": optim_state, "scaling": driver.state_dict()}
            dcp.load(state, checkpoint_id=path)
            set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
            driver.load_state_dict(state["scaling"])
            resumed = {"scale": driver.scale, "progress": driver.progress, "metrics": driver.metrics(),
                       "params": full_parameters(model)}
        for data in batches(rank, 2, 1):
            micro_steps(model, driver, data, 1, sync_each=True)
        saved = {}
        if not resume:
            model_state, optim_state = get_state_dict(model, optimizer)
            dcp.save({"model": model_state, "optim": optim_state, "scaling": driver.state_dict()}, checkpoint_id=path)
            saved = {"params": full_parameters(model)}
        out[policy] = {"scale": driver.scale, "progress": driver.progress, "gain": driver.gain,
                       "metrics": driver.metrics(), "resumed": resumed, **saved}
    return out


def full_parameters(model: torch.nn.Module) -> list[list[float]]:
    """Every parameter, gathered whole from its shards (a collective: every rank calls it)."""
    return [param.detach().full_tensor().reshape(-1).tolist() for param in model.parameters()]


class AdaptiveLoop(adaptive_cases.DriverLoop):
    """tests/adaptive_cases.py's loop through FSDP2: ``driver.accumulation_steps`` micro-batches, each reduced."""

    def __init__(self) -> None:
        self.model = self.net = fully_shard(Quadratic(), mesh=mesh_1d(dist.get_world_size()))
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=adaptive_cases.BASE_LR)
        self.driver = fsdp.attach(self.model, self.optimizer, adaptive_cases.SPEC)

    def backward(self, x: torch.Tensor, accumulation: int) -> None:
        (self.model(x) / accumulation).backward()


def adaptive_batch(rank: int, world: int) -> dict:
    """AdaptiveBatch's run with a resume (tests/adaptive_cases.py)."""
    return adaptive_cases.run_with_resume(AdaptiveLoop, rank)
