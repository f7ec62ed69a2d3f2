"""One policy driving one optimizer's learning rates: the per-step logic every engine's driver shares.

Per optimizer step an engine's driver calls :meth:`PolicyDriver.advance`:

    L, T  = driver.reduced_norms()                  the step's reduced numbers, read with one host sync
    loss  = driver.reduced_loss(loss)               the mean training loss over ranks (policies that use it)
    policy.step(StepObservation(GradientSample(L, T, n), loss))
    for each param group: group["lr"] = policy.learning_rate(group["initial_lr"])

and then steps the optimizer. An engine's driver provides only where the numbers come from and how its ranks
communicate. Each group's base learning rate is its ``initial_lr`` (torch's LR schedulers' key), taken from its
``lr`` when the driver first sees the group. docs/design.md.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import weakref
from typing import Any, Callable, ClassVar, ContextManager, Iterator, Optional

import torch

from ...policies import build_policy
from ...policies.base import Policy, StepObservation
from ...policies.registry import PolicySpec
from ...state_check import check_fields, list_of, number, show
from ...stats import GradientSample
from ...user_warnings import warn_user
from .fused_norms import BackwardCounter

LOSS_REDUCTIONS = ("mean", "sum")
INITIAL_LR = "initial_lr"
AGREED_SETTINGS = ("policy", "params", "scale", "accumulation_steps", "loss_reduction")
MAX_GROUPS_SHOWN = 8        # rank groups named when the ranks disagree on a setting
PERSISTENT_MISMATCH = 3   # consecutive steps with an unexpected number of backward passes before it is an error
_DRIVEN: "weakref.WeakKeyDictionary[torch.optim.Optimizer, str]" = weakref.WeakKeyDictionary()
_DRIVING: "weakref.WeakKeyDictionary[Policy, weakref.ref]" = weakref.WeakKeyDictionary()   # policy → its driver
DRIVER_STATE_KEYS = ("policy", "base_lrs")
DRIVER_STATE_HINT = "pass the dict from driver.state_dict() (it has 'policy' and 'base_lrs')"


def check_loss_reduction(loss_reduction: str) -> None:
    """``ValueError`` unless ``loss_reduction`` is one of ``LOSS_REDUCTIONS``."""
    if loss_reduction not in LOSS_REDUCTIONS:
        raise ValueError(f"loss_reduction must be one of {LOSS_REDUCTIONS}, got {loss_reduction!r}")


def check_accumulation_steps(accumulation_steps: Any) -> None:
    """``ValueError`` unless ``accumulation_steps`` is an int ≥ 1."""
    if not (isinstance(accumulation_steps, int) and not isinstance(accumulation_steps, bool)
            and accumulation_steps >= 1):
        raise ValueError(f"accumulation_steps must be an int >= 1, got {accumulation_steps!r}")


def initial_lr(group: dict[str, Any]) -> float:
    """A param group's base learning rate: its ``initial_lr`` (torch's LR schedulers' key), else its ``lr``."""
    return group.get(INITIAL_LR, group["lr"])


def base_lrs_state(optimizer: torch.optim.Optimizer) -> list[float]:
    """Every param group's base learning rate, as a driver's ``state_dict()`` saves them (``"base_lrs"``)."""
    return [initial_lr(group) for group in optimizer.param_groups]


def check_saved_groups(state: dict[str, Any], optimizer: torch.optim.Optimizer) -> None:
    """``ValueError`` unless a driver state saved as many base learning rates as ``optimizer`` has param groups."""
    saved, groups = len(state["base_lrs"]), len(optimizer.param_groups)
    if saved != groups:
        raise ValueError(f"driver state: base_lrs has initial lrs for {saved} param groups, the optimizer has "
                         f"{groups}: load a state saved with the same param groups")


def check_driver_state(state: Any, optimizer: torch.optim.Optimizer, policy: Policy) -> None:
    """``ValueError`` unless ``state`` is a whole driver state (``PolicyDriver.state_dict()``) that ``policy`` and
    ``optimizer`` can take: a dict of the wrong level (the policy's own state, ``optimizer.state_dict()``) is named
    as such; ``base_lrs`` must be finite numbers >= 0, one per param group; the policy's entry is checked whole
    (``Policy.check_state``). Changes nothing: a driver's ``load_state_dict`` calls it before anything else."""
    if not isinstance(state, dict):
        raise ValueError(f"driver state = {show(state)} ({type(state).__name__}): must be a dict: "
                         f"{DRIVER_STATE_HINT}")
    if not all(key in state for key in DRIVER_STATE_KEYS):
        keys = sorted(map(str, state))
        if "format" in state or isinstance(state.get("policy"), str):
            raise ValueError(f"driver state: got a policy's own state (policy.state_dict(), keys {keys}): "
                             f"{DRIVER_STATE_HINT}, not the policy's own state")
        if "param_groups" in state and "scaling_plugins" in state:
            raise ValueError(f"driver state: got a Horovod optimizer's state (opt.state_dict(), keys {keys}): pass "
                             "it to opt.load_state_dict(), or its 'scaling_plugins' entry here")
        if "param_groups" in state:
            raise ValueError(f"driver state: got an optimizer's state (optimizer.state_dict(), keys {keys}): "
                             f"{DRIVER_STATE_HINT}, not optimizer.state_dict()")
        missing = [key for key in DRIVER_STATE_KEYS if key not in state]
        raise ValueError(f"driver state has no {missing[0]!r} entry (it has {keys}): {DRIVER_STATE_HINT}")
    check_fields(state, {"base_lrs": list_of(number(minimum=0))}, "driver state")
    check_saved_groups(state, optimizer)
    policy.check_state(state["policy"])


def unshared_policy(spec: PolicySpec) -> Policy:
    """The policy ``spec`` gives (``build_policy``); ``ValueError`` when ``spec`` is a Policy instance that a live
    driver already drives (``_DRIVING``): one policy holds one run's progress and statistics, so two optimizers
    would spend its budget twice as fast and mix their statistics. Names and spec dicts build a fresh one."""
    if isinstance(spec, Policy):
        owner = _DRIVING.get(spec)
        if owner is not None and owner() is not None:
            raise ValueError(f"this {spec.name} policy instance already drives another optimizer: build one policy "
                             f"per optimizer (pass the name {spec.name!r} or a spec dict {{'type': {spec.name!r}, "
                             "'params': {...}}, which builds a fresh policy for each optimizer, or a new "
                             f"{spec.name}(...) instance)")
    return build_policy(spec)


def innermost_optimizer(optimizer: Any) -> Any:
    """The optimizer that does the update: ``optimizer`` with every wrapper that holds another in ``.optimizer``
    (DeepSpeed's ZeRO and loss-scaling optimizers) taken off."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def creates_optimizer_state(optimizer: torch.optim.Optimizer) -> bool:
    """Whether a step now only creates the state of an optimizer that has none, at lr 0 in every group: how
    ``torch.distributed.checkpoint.state_dict.get_state_dict`` prepares a fresh optimizer for a load (zero
    gradients, lr 0; no parameter moves)."""
    return not optimizer.state and all(group["lr"] == 0 for group in optimizer.param_groups)


def refuse_foreign_step(driver_ref: "weakref.ref[PolicyDriver]") -> Callable[..., None]:
    """An optimizer step pre-hook: ``RuntimeError`` for a step the driver (while it lives) is not taking itself,
    unless the step only creates the optimizer's state (``creates_optimizer_state``)."""
    def hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        driver = driver_ref()
        if driver is not None and not driver.in_own_step and not creates_optimizer_state(optimizer):
            raise RuntimeError("optimizer.step() was called outside driver.step(), which already steps this "
                               "optimizer (through the grad scaler when attach was given one): a second step would "
                               "apply the update twice, at twice the policy's learning rate. Remove the "
                               "optimizer.step() (or scaler.step(optimizer)) call: driver.step() replaces it")
    return hook


def optimizer_device(optimizer: torch.optim.Optimizer) -> torch.device:
    """The device of the optimizer's parameters: every tensor a driver hands to a collective is made there (an
    NCCL process group takes only its GPU's tensors)."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            return param.device
    raise ValueError("the optimizer has no parameters")


def check_dense_gradients(module: torch.nn.Module, why: str, also: str = "") -> None:
    """``ValueError`` naming the submodules that produce sparse gradients (``nn.Embedding``/``EmbeddingBag`` with
    sparse=True), ``why`` the engine's reduction cannot carry the statistics with them, and what to do (``also``
    adds another way)."""
    sparse = [name for name, sub in module.named_modules()
              if isinstance(sub, (torch.nn.Embedding, torch.nn.EmbeddingBag)) and sub.sparse]
    if sparse:
        raise ValueError(f"module(s) {sparse} make sparse gradients (sparse=True), {why}: build them with "
                         f"sparse=False{also}")


def accumulation_sample(local_sq_mean: float, mean_sq_norm: float, world_size: int, accumulation_steps: int,
                        loss_reduction: str) -> GradientSample:
    """The step's ``GradientSample`` from the all-reduced numbers of ``world_size`` workers.

    local_sq_mean: (1/W)·Σ_workers Σ_micro-batches ‖g‖² of each micro-batch's gradient as measured;
    mean_sq_norm: ‖accumulated, worker-averaged gradient‖². With A = accumulation_steps and
    n = W·A micro-batch gradients g_i (AdaScale, Johnson et al., ICML 2020):

    - ``"mean"`` (each micro-batch loss divided by A): each measured gradient is g_i/A and the
      accumulated average is ḡ, so L = W·A²·local_sq_mean and T = mean_sq_norm;
    - ``"sum"`` (micro-batch losses summed): each measured gradient is g_i and the accumulated average
      is A·ḡ, so L = W·local_sq_mean and T = mean_sq_norm/A².
    """
    acc = accumulation_steps
    if loss_reduction == "mean":
        local_sq_mean *= acc * acc
    else:
        mean_sq_norm /= acc * acc
    return GradientSample(local_sq_sum=local_sq_mean * world_size, mean_sq_norm=mean_sq_norm,
                          count=world_size * acc)


def setting_fingerprint(value: Any) -> int:
    """A 63-bit hash of a setting's JSON text (callables by their qualified name), equal on every rank."""
    def describe(obj: Any) -> str:
        return f"{type(obj).__module__}.{getattr(obj, '__qualname__', type(obj).__qualname__)}"

    text = json.dumps(value, sort_keys=True, default=describe)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1


def disagreements(rows: torch.Tensor) -> dict[str, list[list[int]]]:
    """For each of ``AGREED_SETTINGS`` on which the ranks' fingerprints (one row per rank) differ: the ranks
    grouped by equal value."""
    found = {}
    for column, key in enumerate(AGREED_SETTINGS):
        groups: dict[int, list[int]] = {}
        for rank, value in enumerate(rows[:, column].tolist()):
            groups.setdefault(value, []).append(rank)
        if len(groups) > 1:
            found[key] = list(groups.values())
    return found


def describe_rank_groups(groups: list[list[int]], shown: int = MAX_GROUPS_SHOWN) -> str:
    """``[[0-2046, 2048-4095], [2047]]``: each group's ranks with consecutive runs as ranges, at most ``shown``
    groups (then how many more), so that the message stays short at thousands of ranks."""
    def ranges(ranks: list[int]) -> str:
        runs: list[list[int]] = []
        for rank in ranks:
            if runs and rank == runs[-1][1] + 1:
                runs[-1][1] = rank
            else:
                runs.append([rank, rank])
        return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)

    text = ", ".join(f"[{ranges(group)}]" for group in groups[:shown])
    more = f", and {len(groups) - shown} more groups" if len(groups) > shown else ""
    return f"[{text}{more}]"


def torch_all_gather_rows(row: torch.Tensor, group: Any = None) -> torch.Tensor:
    """Every rank's ``row`` (torch.distributed), stacked in rank order."""
    import torch.distributed as dist

    rows = [torch.empty_like(row) for _ in range(dist.get_world_size(group))]
    dist.all_gather(rows, row, group=group)
    return torch.stack(rows)


def torch_all_reduce_mean(value: torch.Tensor, group: Any = None) -> float:
    """The mean over the ranks of ``group`` (torch.distributed) of a one-element tensor, in float64."""
    import torch.distributed as dist

    total = value.detach().to(torch.float64).reshape(1).clone()
    dist.all_reduce(total, group=group)
    return total.item() / dist.get_world_size(group)


class PolicyReadings:
    """What users read off any driver: the learning rate (the first param group's), the policy's progress and
    whether it is done."""

    optimizer: torch.optim.Optimizer
    policy: Policy

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    @property
    def progress(self) -> float:
        return self.policy.progress

    @property
    def done(self) -> bool:
        return self.policy.done


class PolicyDriver(PolicyReadings):
    """Steps one policy once per optimizer step and sets every param group's learning rate from it.

    Every tensor the driver hands to a collective lives on ``self.device``: the optimizer parameters' device
    unless the engine names its own.

    Subclasses (one per engine) provide :meth:`reduced_norms`, :meth:`all_reduce_mean`, :meth:`all_gather_rows`
    and, where they count them, :meth:`backward_passes`; they call :meth:`agree_across_ranks` once their
    collectives work, and say in ``backward_hint`` and ``loss_hint`` how their users hand over gradients and
    the loss.

    Checks on the way (each a clear error, never a silent wrong learning rate):
    - one driver per optimizer: a second attach on the same optimizer is refused;
    - at attach, one all-gather of a few fingerprints: every rank must run the same policy with the same
      params, scale, accumulation and loss reduction;
    - every step, where the backend counts backward passes: a step with none is an error; a count other
      than ``accumulation_steps`` logs a warning (once), and ``PERSISTENT_MISMATCH`` such steps in a row
      are an error (one short step, such as an epoch's last partial accumulation, is allowed);
    - a param group with lr 0 is logged once (the policy multiplies it, so that group does not train);
    - a step taken after the policy is done (its budget reached) is logged once.

    A batch-size controller (``policy.controls_batch``) names the accumulation it wants for the next steps; the
    backend calls :meth:`follow_batch_request` right after each optimizer step (and after a checkpoint is loaded),
    which applies it through :meth:`set_accumulation_steps`, the engine's own way. ``accumulation_steps`` is then
    the next step's, for the training loop to read, and the backward-pass check expects it.
    """

    backward_hint: ClassVar[str] = "call loss.backward() before the optimizer step"
    loss_hint: ClassVar[str] = "pass the loss to the step"
    accumulation_name: ClassVar[str] = "accumulation_steps"   # what the engine's users call it

    def __init__(self, optimizer: torch.optim.Optimizer, policy: PolicySpec, world_size: int,
                 accumulation_steps: int = 1, loss_reduction: str = "mean",
                 device: Optional[torch.device] = None, micro_batch_size: Optional[int] = None) -> None:
        check_accumulation_steps(accumulation_steps)
        check_loss_reduction(loss_reduction)
        if optimizer in _DRIVEN:
            raise ValueError(f"this optimizer already follows policy {_DRIVEN[optimizer]!r}: attach a policy once "
                             "per optimizer (a second attach would drive the same learning rates twice)")
        self.optimizer = optimizer
        self.device = optimizer_device(optimizer) if device is None else device
        self.accumulation_steps = accumulation_steps
        self.loss_reduction = loss_reduction
        self.world_size = world_size
        self.policy = unshared_policy(policy)   # a Policy instance drives one optimizer
        if micro_batch_size is not None:   # the engine knows it (DeepSpeed)
            self.policy.set_micro_batch_size(micro_batch_size)
        self.policy.configure(world_size, accumulation_steps)
        self._mismatched_steps = 0
        self._warned_passes = False
        self._warned_zero_lr = False
        self._warned_done = False
        self._warned_foreign_lr = False
        self._applied_lrs: dict[int, float] = {}   # id(param group) → the lr this driver set there last
        self.in_own_step = False
        advice = self.policy.optimizer_advice(innermost_optimizer(optimizer).__class__)
        if advice is not None:
            warn_user(advice)
        PolicyDriver.apply_learning_rate(self)   # this class's own: a subclass's override would run half-built
        _DRIVING[self.policy] = weakref.ref(self)   # from here on this driver drives it (``unshared_policy``)

    # -- what each engine provides --------------------------------------------------------------------------
    def reduced_norms(self) -> Optional[tuple[float, float]]:
        """(mean over ranks of Σ_micro-batches ‖g‖² as measured, ‖reduced gradient‖²) of this step, or None
        when no gradients were reduced since the last step; resets for the next step."""
        raise NotImplementedError

    def all_reduce_mean(self, value: torch.Tensor) -> float:
        """The mean over this driver's ranks of a one-element tensor."""
        raise NotImplementedError

    def all_gather_rows(self, row: torch.Tensor) -> torch.Tensor:
        """Every rank's one-dimensional ``row``, stacked in rank order (one collective)."""
        raise NotImplementedError

    def backward_passes(self) -> Optional[int]:
        """Backward passes seen since the last step (then reset), or None where the backend does not count."""
        return None

    def backward_counter(self) -> Optional[BackwardCounter]:
        """What counts (and measures) this driver's backward passes, or None where the backend does not count."""
        return None

    def extra_backward(self) -> ContextManager[None]:
        """``with driver.extra_backward(): loss.backward()`` — a backward pass that is not one of the step's own
        micro-batches (SAM's first pass, which only finds the perturbation; any pass whose gradients the step
        does not apply): it is neither counted against the accumulation nor measured into the statistics.
        ``torch.autograd.grad`` needs no such marking (it accumulates nothing into ``.grad``)."""
        counter = self.backward_counter()
        return counter.paused() if counter is not None else contextlib.nullcontext()

    def reduced_loss(self, loss: Optional[torch.Tensor | float]) -> float:
        """This step's training loss, averaged over ranks (one 1-element all-reduce)."""
        if loss is None:
            raise ValueError(f"policy {self.policy.name!r} uses the training loss: {self.loss_hint}")
        value = torch.as_tensor(loss, dtype=torch.float64, device=self.device).detach()
        if value.numel() != 1:
            raise ValueError(f"the loss given to the step must be one number (the batch's mean loss), got a tensor "
                             f"of shape {tuple(value.shape)}: reduce it first, e.g. loss.mean()")
        return self.all_reduce_mean(value.reshape(1))

    def agree_across_ranks(self) -> None:
        """``ValueError`` on every rank unless all ranks run the same policy with the same params, scale,
        accumulation and loss reduction (one all-gather of ``len(AGREED_SETTINGS)`` int64 per rank); once they
        agree, the optimizer counts as driven (a second attach on it is refused)."""
        mine = {"policy": self.policy.name, "params": self.policy.params, "scale": float(self.scale),
                "accumulation_steps": self.accumulation_steps, "loss_reduction": self.loss_reduction}
        row = torch.tensor([setting_fingerprint(mine[key]) for key in AGREED_SETTINGS], dtype=torch.int64,
                           device=self.device)
        differing = disagreements(self.all_gather_rows(row))
        if differing:
            parts = [f"{key} (ranks grouped by equal value: {describe_rank_groups(groups)}; this rank has "
                     f"{mine[key]!r})"
                     for key, groups in differing.items()]
            raise ValueError("the ranks disagree on their policy settings: " + "; ".join(parts) + ". Every rank "
                             "must attach the same policy with the same params, accumulation and loss reduction")
        _DRIVEN[self.optimizer] = self.policy.name

    def refuse_other_optimizer_steps(self) -> None:
        """For an engine whose driver steps the optimizer itself (``driver.step()`` does): from now on an
        ``optimizer.step()`` that does not come from :meth:`stepping_optimizer` raises before it changes anything
        (``refuse_foreign_step``), since it would apply the update a second time."""
        self.optimizer.register_step_pre_hook(refuse_foreign_step(weakref.ref(self)))

    @contextlib.contextmanager
    def stepping_optimizer(self) -> Iterator[None]:
        """The driver's own optimizer step (directly or through a grad scaler) runs inside this block."""
        self.in_own_step = True
        try:
            yield
        finally:
            self.in_own_step = False

    # -- per step -------------------------------------------------------------------------------------------
    def advance(self, loss: Optional[torch.Tensor | float] = None) -> None:
        """Fold this optimizer step's statistics (and loss) into the policy and set this step's learning rates."""
        self._check_backward_passes(self.backward_passes())
        self._warn_past_budget()
        self._warn_foreign_lr()
        gradients = self._gradient_sample() if self.policy.needs_gradient_norms else None
        mean_loss = self.reduced_loss(loss) if self.policy.needs_loss else None
        self.policy.step(StepObservation(gradients=gradients, loss=mean_loss))
        self.apply_learning_rate()

    def discard(self) -> None:
        """Drop this step's harvested numbers without moving the policy (a step the optimizer skips, such as a
        loss-scaler overflow): τ, the estimates and the learning rates stay as they are."""
        self.backward_passes()
        if self.policy.needs_gradient_norms:
            self.reduced_norms()

    def _check_backward_passes(self, seen: Optional[int]) -> None:
        if seen is None:
            return
        expected = self.accumulation_steps
        if seen == 0:
            raise RuntimeError(f"no backward pass since the last step: {self.backward_hint}")
        if seen == expected:
            self._mismatched_steps = 0
            return
        self._mismatched_steps += 1
        message = (f"{seen} backward pass(es) in this step, but {self.accumulation_name} is {expected}: the policy's "
                   f"scale and statistics assume {expected} (run that many micro-batches per step, or pass the "
                   "accumulation you run)")
        if self._mismatched_steps >= PERSISTENT_MISMATCH:
            raise RuntimeError(f"{message}; {self._mismatched_steps} steps in a row")
        if not self._warned_passes:
            warn_user(f"{message}; an error if it happens {PERSISTENT_MISMATCH} steps in a row")
            self._warned_passes = True

    def _warn_past_budget(self) -> None:
        """One warning when a step is taken after the policy is done (its schedule has ended, so the learning rate
        is whatever the schedule gives past its end, often 0)."""
        if self.policy.done and not self._warned_done:
            budget = getattr(self.policy, "total_num_steps", None)
            warn_user(f"policy {self.policy.name!r} is done (budget total_num_steps={budget} reached, progress "
                      f"{self.policy.progress:.6g}) but training goes on: stop the loop when .done is true (the "
                      "Hugging Face Trainer: scaling_plugins.integrations.huggingface.ScalingCallback)")
            self._warned_done = True

    def _warn_foreign_lr(self) -> None:
        """One warning when a param group's lr is not the one this driver set there last: something else set it
        (a torch LR scheduler kept beside the policy, or a hand-set ``group["lr"]``), and this step undoes it."""
        if self._warned_foreign_lr:
            return
        for index, group in enumerate(self.optimizer.param_groups):
            applied = self._applied_lrs.get(id(group))
            if applied is not None and group["lr"] != applied:
                warn_user(f"param group {index}'s lr was set to {group['lr']:g} outside policy "
                          f"{self.policy.name!r}, which had set {applied:g}: the policy sets every group's lr at "
                          "each step, so that change is undone. Shape the learning rate with the policy's own "
                          "schedule (params 'schedule', docs/policies.md) instead of a torch LR scheduler or a "
                          "hand-set lr")
                self._warned_foreign_lr = True
                return

    def _gradient_sample(self) -> GradientSample:
        reduced = self.reduced_norms()
        if reduced is None:
            raise RuntimeError(f"no gradients were reduced since the last step: {self.backward_hint}")
        local_sq_mean, mean_sq_norm = reduced
        return accumulation_sample(local_sq_mean, mean_sq_norm, self.world_size, self.accumulation_steps,
                                   self.loss_reduction)

    def resize(self, world_size: int, accumulation_steps: Optional[int] = None) -> None:
        """Follow a new world size (Horovod Elastic) or accumulation: the policy's scale follows; estimates carry
        over."""
        if accumulation_steps is None:
            accumulation_steps = self.accumulation_steps
        if (world_size, accumulation_steps) != (self.policy.world_size, self.policy.accumulation_steps):
            self.policy.configure(world_size, accumulation_steps)
        self.world_size, self.accumulation_steps = world_size, accumulation_steps

    def follow_batch_request(self) -> None:
        """At a step boundary: run the next steps with the accumulation a batch-size controller asks for (nothing
        for other policies, or when it asks for the current one)."""
        requested = self.policy.requested_accumulation_steps
        if requested is not None and requested != self.accumulation_steps:
            self.set_accumulation_steps(requested)

    def set_accumulation_steps(self, accumulation_steps: int) -> None:
        """Take ``accumulation_steps`` micro-batches per worker from the next step on (the policy's scale follows).
        Engines with a setting of their own (Horovod's ``backward_passes_per_step``, DeepSpeed's batch size)
        change it here too."""
        self.resize(self.world_size, accumulation_steps)

    def apply_learning_rate(self) -> None:
        """lr = policy.learning_rate(initial lr) for every param group visible now (a new group's initial lr is
        its lr when first seen; ZeRO-1/2 show DeepSpeed's basic optimizer only the group it is stepping)."""
        for group in self.optimizer.param_groups:
            base_lr = group.setdefault(INITIAL_LR, group["lr"])
            group["lr"] = self.policy.learning_rate(base_lr)
            if base_lr == 0 and group["lr"] == 0 and not self._warned_zero_lr:
                warn_user(f"a param group has lr 0: policy {self.policy.name!r} multiplies it, so that group does "
                          "not train")
                self._warned_zero_lr = True
            self._applied_lrs[id(group)] = group["lr"]

    # -- what users read ------------------------------------------------------------------------------------
    @property
    def gain(self) -> float:
        return self.policy.gain

    @property
    def scale(self) -> float:
        return getattr(self.policy, "scale", float(self.world_size * self.accumulation_steps))

    def metrics(self) -> dict[str, Any]:
        """The step's telemetry numbers: step, learning rate, accumulation steps and the policy's own (gain,
        progress, σ², ...; a batch-size controller reports the accumulation of the step just taken)."""
        return {"step": self.policy.steps, "lr": self.lr, "accumulation_steps": self.accumulation_steps,
                **self.policy.metrics()}

    def state_dict(self) -> dict[str, Any]:
        return {"policy": self.policy.state_dict(), "base_lrs": base_lrs_state(self.optimizer)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()``'s. The whole state is checked first (``check_driver_state``): a refused one
        leaves the policy, the learning rates and the accumulation as they were."""
        check_driver_state(state, self.optimizer, self.policy)
        self.policy.load_state_dict(state["policy"])
        self.resize(self.world_size, self.accumulation_steps)   # saved on another shape: the scale follows
        self.follow_batch_request()                              # a batch-size controller's batch comes back
        for group, base_lr in zip(self.optimizer.param_groups, state["base_lrs"]):
            group[INITIAL_LR] = base_lr
        self.apply_learning_rate()
