"""AutoWU: automated warmup then decay (Kim, Kim, Kim, Lee & Kim, "Automated Learning Rate Scheduler for
Large-batch Training", ICML 2021 AutoML workshop).

Steps t = 0 .. T−1 (T = ``total_num_steps`` optimizer steps), warmup cap W = ``warmup_num_steps``
(default ⌊T/2⌋):

- Warmup: lr_t = lr_min · (lr_max/lr_min)^(t/W), exponential growth that reaches lr_max at the cap.
- At the end of every epoch (every ``steps_per_epoch`` steps) of the warmup, the loss history is tested
  (``scaling_plugins.policies.loss_trend``: a Gaussian process on the loss curve; positive when, with probability
  > ``threshold``, some earlier point of the smoothed curve lies below the current one). An epoch with a
  non-finite loss counts as positive (the loss diverged). After ``patience`` positive epochs in a row the
  run switches to decay at that step s, restarting from the warmup learning rate at the step where the
  smoothed loss is lowest: lr_peak = lr_min · (lr_max/lr_min)^(t*/W).
- No switch by the cap: decay starts at s = W from lr_peak = lr_max.
- Decay to exactly 0 at the last step T−1. ``"cos"``: lr_t = lr_peak · ½(1 + cos(π·(t − s)/(T − 1 − s))).
  ``"const-cos"``: lr_peak until the last 20% of the budget, then a cosine over that 20%
  (from c = max(s, 0.8·(T − 1)) to T − 1).

The learning rates are absolute (``warmup_min_lr``/``warmup_max_lr``, as in the paper and DeepSpeed's WarmupLR)
for the first param group, whose own lr is the reference lr_ref; every other group keeps its ratio to it:
lr_g = lr_t · lr_g,0 / lr_ref, where lr_g,0 is the group's own (initial) lr. With one group, or groups that share
one lr, this is DeepSpeed's WarmupLR rule (the optimizer's own lr is not used); groups configured with different
lrs (a smaller lr for the embeddings, say) keep the relation the user gave them.

Loss: ``step()`` needs the training loss of every step. With several workers it must be the mean over all
ranks (and micro-batches), so every rank tests the same numbers; the test's randomness is seeded by
(``seed``, epoch), so every rank switches at the same step. The backends do the averaging:
DDP ``driver.step(loss)``; Horovod ``opt.step(loss=loss)``; DeepSpeed, with ``"scheduler": {"type": "AutoWU",
"params": {...}}`` in the config, reads the loss given to ``engine.backward(loss)`` (it must be known before
the optimizer step, so ``engine.step(lr_kwargs=...)``, which reaches the scheduler after it, is not used).
Needs scikit-learn (``pip install 'scaling_plugins[autowu]'``).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

from ..state_check import DAMAGED, Entry, any_number, fields, flag, integer, list_of, nullable, number, one_of
from .loss_trend import INITIAL_HYPERPARAMETERS, MinimumTest, TestResult, minimum_has_passed, require_sklearn
from .base import Policy, StepObservation
from .registry import register

DECAY_TYPES = ("cos", "const-cos")
COSINE_FRACTION = 0.2  # const-cos: the cosine covers the last 20% of the budget
WARMUP, DECAY = "warmup", "decay"


@register
class AutoWU(Policy):
    """Exponential warmup until a Gaussian-process test says the loss stopped decreasing, then decay to 0.

    The learning rates are absolute for the first param group; the others keep their ratios to it (module
    docstring).

    Args (DeepSpeed-style names; only ``total_num_steps`` has no default):
        total_num_steps: the budget T in optimizer steps; the learning rate is 0 at step T − 1.
        steps_per_epoch: how often the loss is tested; default max(1, T // 100).
        warmup_min_lr, warmup_max_lr: the warmup's start and end learning rates (1e-5, 1.0).
        warmup_num_steps: the warmup cap W, where lr reaches warmup_max_lr; default T // 2.
        decay_type: "cos" or "const-cos".
        threshold: probability above which an epoch is positive (0.95).
        patience: positive epochs in a row that trigger the switch (3).
        max_points, num_subsamples, num_draws: the test's subsample size, number of subsamples voting
            (strict majority) and posterior draws per subsample (200, 3, 200).
        seed: seeds the test's subsampling and posterior draws.

    Kim et al., "Automated Learning Rate Scheduler for Large-batch Training", 2021.

    Example::

        policy = AutoWU(total_num_steps=3000, warmup_max_lr=0.8)
        driver = attach(ddp_model, optimizer, policy)
        loss = loss_fn(ddp_model(x), y); loss.backward()
        driver.step(loss)                 # AutoWU reads the training loss every step
    """

    name = "AutoWU"
    needs_loss = True

    def __init__(self, total_num_steps: Optional[int] = None, steps_per_epoch: Optional[int] = None,
                 warmup_min_lr: float = 1e-5, warmup_max_lr: float = 1.0, warmup_num_steps: Optional[int] = None,
                 decay_type: str = "cos", threshold: float = 0.95, patience: int = 3, max_points: int = 200,
                 num_subsamples: int = 3, num_draws: int = 200, seed: int = 0) -> None:
        super().__init__()
        if total_num_steps is None:
            raise ValueError("total_num_steps is required: AutoWU decays to 0 at the end of the budget")
        _require_int("total_num_steps", total_num_steps, minimum=2)
        if warmup_num_steps is None:
            warmup_num_steps = total_num_steps // 2
        _require_int("warmup_num_steps", warmup_num_steps, minimum=1)
        if warmup_num_steps >= total_num_steps:
            raise ValueError(f"warmup_num_steps={warmup_num_steps!r} must be < total_num_steps={total_num_steps!r} "
                             "(the warmup cap must leave room to decay)")
        if steps_per_epoch is None:
            steps_per_epoch = max(1, total_num_steps // 100)
        _require_int("steps_per_epoch", steps_per_epoch, minimum=1)
        if not (all(isinstance(v, (int, float)) for v in (warmup_min_lr, warmup_max_lr))
                and 0 < warmup_min_lr < warmup_max_lr):
            raise ValueError(f"need 0 < warmup_min_lr < warmup_max_lr, got warmup_min_lr={warmup_min_lr!r}, "
                             f"warmup_max_lr={warmup_max_lr!r}")
        if decay_type not in DECAY_TYPES:
            raise ValueError(f"decay_type={decay_type!r} is not a known decay; valid: {list(DECAY_TYPES)}")
        _require_int("patience", patience, minimum=1)
        _require_int("seed", seed, minimum=0)
        self.test = MinimumTest(threshold=threshold, max_points=max_points, num_subsamples=num_subsamples,
                                num_draws=num_draws)
        require_sklearn()
        self.total_num_steps = total_num_steps
        self.steps_per_epoch = steps_per_epoch
        self.warmup_min_lr, self.warmup_max_lr = float(warmup_min_lr), float(warmup_max_lr)
        self.warmup_num_steps = warmup_num_steps
        self.decay_type = decay_type
        self.patience = patience
        self.seed = seed
        self.losses: list[float] = []
        self.phase = WARMUP
        self.positive_streak = 0
        self.last_test: Optional[TestResult] = None
        self.switch_step: Optional[int] = None
        self.peak_lr: Optional[float] = None
        self._lr = self.warmup_lr(0)
        self.reference_lr: Optional[float] = None   # the first base_lr asked about: param group 0's own lr

    # -- the schedule -----------------------------------------------------------------------------------------
    def warmup_lr(self, step: int) -> float:
        """lr_min · (lr_max/lr_min)^(step/W)."""
        return self.warmup_min_lr * (self.warmup_max_lr / self.warmup_min_lr) ** (step / self.warmup_num_steps)

    def decay_lr(self, step: int) -> float:
        """The decay phase's rate at ``step`` ≥ the switch step: peak → exactly 0 at step T − 1."""
        last = self.total_num_steps - 1
        start = self.switch_step
        if self.decay_type == "const-cos":
            start = max(start, (1 - COSINE_FRACTION) * last)
        if step >= last:
            return 0.0
        if step <= start:
            return self.peak_lr
        return self.peak_lr * 0.5 * (1 + math.cos(math.pi * (step - start) / (last - start)))

    # -- the protocol -----------------------------------------------------------------------------------------
    def step(self, observation: StepObservation) -> None:
        if observation.loss is None:
            raise ValueError("AutoWU needs the training loss every step: DDP driver.step(loss), Horovod "
                             "opt.step(loss=loss), DeepSpeed engine.backward(loss), or StepObservation(loss=...)")
        t = self.steps
        if self.phase == WARMUP:
            self.losses.append(float(observation.loss))
            if (t + 1) % self.steps_per_epoch == 0:
                self._test_epoch(t)
            if self.phase == WARMUP and t >= self.warmup_num_steps:
                self._switch(t, self.warmup_max_lr)
        self._lr = self.warmup_lr(t) if self.phase == WARMUP else self.decay_lr(t)
        self.steps += 1

    def _test_epoch(self, t: int) -> None:
        epoch = (t + 1) // self.steps_per_epoch
        recent = self.losses[-self.steps_per_epoch:]
        start = INITIAL_HYPERPARAMETERS if self.last_test is None else self.last_test.hyperparameters
        if all(math.isfinite(x) for x in recent):
            self.last_test = minimum_has_passed(self.losses, self.test, seed=(self.seed, epoch), start=start)
        else:
            finite = [(x, i) for i, x in enumerate(self.losses) if math.isfinite(x)]
            self.last_test = TestResult(positive=True, probability=1.0,
                                        minimum_index=min(finite)[1] if finite else 0, hyperparameters=start)
        self.positive_streak = self.positive_streak + 1 if self.last_test.positive else 0
        if self.positive_streak >= self.patience:
            self._switch(t, self.warmup_lr(self.last_test.minimum_index))

    def _switch(self, t: int, peak_lr: float) -> None:
        self.phase, self.switch_step, self.peak_lr = DECAY, t, peak_lr

    def learning_rate(self, base_lr: float) -> float:
        """The current step's rate lr_t for the reference group, lr_t · base_lr / lr_ref for the others.

        The reference lr_ref is the first ``base_lr`` asked about since construction or ``load_state_dict``: every
        driver sets param group 0's lr first. ``ValueError`` when lr_ref is 0 and another group's is not (no
        ratio to keep)."""
        if self.reference_lr is None:
            self.reference_lr = base_lr
        if base_lr == self.reference_lr:
            return self._lr
        if self.reference_lr == 0:
            raise ValueError(f"AutoWU keeps each param group's lr in proportion to the first group's, which is 0, "
                             f"while another group's is {base_lr:g}: give the first param group a non-zero lr")
        return self._lr * base_lr / self.reference_lr

    @property
    def done(self) -> bool:
        return self.steps >= self.total_num_steps

    def metrics(self) -> dict[str, Any]:
        test = self.last_test
        return {**super().metrics(), "phase": self.phase, "switch_step": self.switch_step,
                "positive_streak": self.positive_streak,
                "minimum_probability": None if test is None else test.probability}

    def state_dict(self) -> dict[str, Any]:
        test = self.last_test
        return {**super().state_dict(), "losses": list(self.losses), "phase": self.phase,
                "positive_streak": self.positive_streak, "switch_step": self.switch_step, "peak_lr": self.peak_lr,
                "lr": self._lr, "last_test": None if test is None else dataclasses.asdict(test)}

    def state_layout(self) -> dict[str, Entry]:
        test = fields({"positive": flag(), "probability": number(minimum=0, maximum=1),
                       "minimum_index": integer(0), "hyperparameters": list_of(number(), length=2)})
        return {**super().state_layout(), "losses": list_of(any_number()), "phase": one_of((WARMUP, DECAY)),
                "positive_streak": integer(0), "switch_step": nullable(integer(0)),
                "peak_lr": nullable(number(minimum=0)), "lr": number(minimum=0), "last_test": nullable(test)}

    def check_state(self, state: Any) -> None:
        super().check_state(state)
        if state["phase"] == DECAY and (state["switch_step"] is None or state["peak_lr"] is None):
            raise ValueError(f"policy state: phase = {DECAY!r} needs switch_step and peak_lr, got "
                             f"{state['switch_step']!r} and {state['peak_lr']!r} ({DAMAGED})")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.reference_lr = None   # the driver sets the loaded groups' lrs next, param group 0's first
        self.losses = [float(x) for x in state["losses"]]
        self.phase = state["phase"]
        self.positive_streak = int(state["positive_streak"])
        self.switch_step = state["switch_step"]
        self.peak_lr = state["peak_lr"]
        self._lr = float(state["lr"])
        test = state["last_test"]
        self.last_test = None if test is None else TestResult(
            positive=bool(test["positive"]), probability=float(test["probability"]),
            minimum_index=int(test["minimum_index"]), hyperparameters=tuple(map(float, test["hyperparameters"])))


def _require_int(key: str, value: Any, minimum: int) -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= minimum):
        raise ValueError(f"{key} must be an int >= {minimum}, got {value!r}")
