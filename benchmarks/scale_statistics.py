"""The gradient statistics of S simulated workers in one process, against their exact values.

Each simulated worker contributes one gradient g_r of one sample (B0 = 1, so scale-1 units are one sample and
n = S). A step's reduced numbers are those an engine's all-reduce produces, and the step's ``GradientSample``
comes from them through the drivers' own ``accumulation_sample``:

    local_sq_mean = (1/S)·Σ_r ‖g_r‖²      (each rank's local sum, averaged by the all-reduce)
    T             = ‖(1/S)·Σ_r g_r‖²     (the squared norm of the averaged gradient)

Two sources of per-sample gradients (``torch.func``: vmap over samples of grad of the one-sample loss):

- the noisy quadratic: g = w − x with fresh x ~ N(0, ν·I_d) every step, so σ² = d·ν and μ² = ‖w‖² exactly;
- a finite population (the digits workload's training images at fixed weights), sampled with replacement: with
  G the N × P matrix of per-sample gradients and K = G·Gᵀ (float64), the population's moments are exact,

      μ² = ‖Ḡ‖² = 1ᵀK1/N²,     σ² = tr(K)/N − μ²,

  and a step with sample counts c (Σc = S) has local_sq_mean = cᵀdiag(K)/S and T = cᵀKc/S², the same
  numbers as summing the S drawn gradients, at O(N²) per step instead of O(S·P).

``GradientStatistics`` is then fed the same steps for every smoothing θ, and each estimate's bias and spread are
reported relative to its exact value.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Protocol

import torch
from torch.func import functional_call, grad, vmap

from scaling_plugins.app.workloads import get_workload
from scaling_plugins.app.workloads.quadratic import NoisyQuadratic, QuadraticModel
from scaling_plugins.backends.shared.driver import accumulation_sample
from scaling_plugins.stats import GradientSample, GradientStatistics, adascale_gain

GRADIENT_CHUNK = 256      # samples per vmap call
GRAM_COLUMNS = 4096       # parameter columns per float64 block of the Gram matrix


@dataclass(frozen=True)
class Moments:
    """σ² and μ² in scale-1 units (one sample)."""

    sigma_sq: float
    mu_sq: float

    def gain(self, scale: float) -> float:
        """r = (σ² + μ²)/(σ²/S + μ²)."""
        return adascale_gain(self.sigma_sq, self.mu_sq, scale)

    @property
    def noise_scale(self) -> float:
        """B_simple = σ²/μ² in samples."""
        return self.sigma_sq / self.mu_sq


class GradientSource(Protocol):
    """Where a simulated step's reduced numbers come from."""

    name: str

    def truth(self) -> Moments:
        """The exact σ², μ² of one sample's gradient."""

    def reduced(self, scale: int, generator: torch.Generator) -> tuple[float, float]:
        """(local_sq_mean, T) of one step of ``scale`` workers."""


def per_sample_gradients(model: torch.nn.Module, loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                         inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The N × P float32 matrix of each sample's gradient of ``loss`` (vmap of grad over the samples)."""
    params = {name: p.detach() for name, p in model.named_parameters()}

    def sample_loss(weights: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return loss(functional_call(model, weights, (x.unsqueeze(0),)), y.unsqueeze(0))

    per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0))
    rows = []
    for begin in range(0, len(inputs), GRADIENT_CHUNK):
        grads = per_sample(params, inputs[begin:begin + GRADIENT_CHUNK], targets[begin:begin + GRADIENT_CHUNK])
        rows.append(torch.cat([g.flatten(1) for g in grads.values()], dim=1))
    return torch.cat(rows)


def reduced_numbers(worker_grads: torch.Tensor) -> tuple[float, float]:
    """(local_sq_mean, T) of S workers' gradients (S × P): (1/S)·Σ‖g_r‖² and ‖(1/S)·Σg_r‖², in float64."""
    grads = worker_grads.to(torch.float64)
    return float(grads.pow(2).sum(dim=1).mean()), float(grads.mean(dim=0).pow(2).sum())


class QuadraticSource:
    """The noisy quadratic ½‖w − x‖² (``NoisyQuadratic``) at a fixed w with ‖w‖² = σ²/B_simple, fresh noise per
    step: σ² = d·ν and μ² = ‖w‖² exactly."""

    def __init__(self, noise_scale: float) -> None:
        self.workload = NoisyQuadratic()
        sigma_sq = self.workload.dimension * self.workload.noise_variance
        self.model = QuadraticModel(self.workload.dimension, start=math.sqrt(sigma_sq / noise_scale
                                                                              / self.workload.dimension))
        self.name = f"quadratic, B_simple = {noise_scale:g}"

    def truth(self) -> Moments:
        return Moments(*self.workload.exact_moments(self.model.w))

    def reduced(self, scale: int, generator: torch.Generator) -> tuple[float, float]:
        noise = torch.randn(scale, self.workload.dimension, generator=generator)
        inputs = noise * math.sqrt(self.workload.noise_variance)
        grads = per_sample_gradients(self.model, self.workload.loss, inputs, torch.zeros(scale))
        return reduced_numbers(grads)


class PopulationSource:
    """Workers that draw samples with replacement from N samples whose per-sample gradients are G (N × P)."""

    def __init__(self, name: str, grads: torch.Tensor) -> None:
        self.name = name
        self.gram = gram_matrix(grads)
        self.sq_norms = self.gram.diagonal().clone()

    def truth(self) -> Moments:
        size = len(self.sq_norms)
        mu_sq = float(self.gram.sum()) / size ** 2
        return Moments(float(self.sq_norms.sum()) / size - mu_sq, mu_sq)

    def reduced(self, scale: int, generator: torch.Generator) -> tuple[float, float]:
        counts = self.counts(scale, generator)
        return float(counts @ self.sq_norms) / scale, float(counts @ self.gram @ counts) / scale ** 2

    def counts(self, scale: int, generator: torch.Generator) -> torch.Tensor:
        """How often each sample is drawn by ``scale`` workers (float64, sums to ``scale``)."""
        draws = torch.randint(len(self.sq_norms), (scale,), generator=generator)
        return torch.bincount(draws, minlength=len(self.sq_norms)).to(torch.float64)


def gram_matrix(grads: torch.Tensor) -> torch.Tensor:
    """K = G·Gᵀ in float64, accumulated over blocks of ``GRAM_COLUMNS`` parameters."""
    gram = torch.zeros(len(grads), len(grads), dtype=torch.float64)
    for begin in range(0, grads.shape[1], GRAM_COLUMNS):
        block = grads[:, begin:begin + GRAM_COLUMNS].to(torch.float64)
        gram += block @ block.T
    return gram


def digits_source(trained_steps: int, population: int, seed: int = 0) -> PopulationSource:
    """The digits CNN after ``trained_steps`` SGD steps at its base batch and learning rate (one rank), as a
    population of its first ``population`` training images."""
    workload = get_workload("digits", seed)
    model = workload.make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=workload.base_lr, momentum=workload.momentum)
    for step in range(trained_steps):
        inputs, targets = workload.micro_batch_at(step * workload.micro_batch_size, 0, 1, 0)
        optimizer.zero_grad()
        workload.loss(model(inputs), targets).backward()
        optimizer.step()
    grads = per_sample_gradients(model, workload.loss, workload.train_x[:population],
                                 workload.train_y[:population])
    return PopulationSource(f"digits, {trained_steps} steps trained, N = {population}", grads)


def simulated_samples(source: GradientSource, scale: int, steps: int, seed: int) -> list[GradientSample]:
    """``steps`` steps of ``scale`` one-sample workers, as the drivers turn their reduced numbers into samples."""
    generator = torch.Generator().manual_seed(seed)
    return [accumulation_sample(*source.reduced(scale, generator), world_size=scale, accumulation_steps=1,
                                loss_reduction="mean") for _ in range(steps)]


@dataclass(frozen=True)
class Accuracy:
    """An estimate over the measured steps, relative to its exact value x: bias = mean/x − 1, spread = std/x, and
    the standard error of the bias were the steps independent, spread/√steps (true for θ = 0; a smoothed θ's
    steps are correlated, its bias is as uncertain as θ = 0's)."""

    bias: float
    spread: float
    standard_error: float


def accuracy(values: torch.Tensor, exact: float) -> Accuracy:
    spread = float(values.std()) / exact
    return Accuracy(float(values.mean()) / exact - 1.0, spread, spread / math.sqrt(len(values)))


@dataclass(frozen=True)
class StatisticsRow:
    """One source, scale and θ: the accuracy of the smoothed σ², μ² and gain over the second half of the steps,
    and the fraction of those steps whose gain sat at S (μ̂² clamped to 0)."""

    source: str
    scale: int
    theta: float
    default_theta: bool
    exact_gain: float
    sigma_sq: Accuracy
    mu_sq: Accuracy
    gain: Accuracy
    at_scale: float


def smoothed_trace(samples: list[GradientSample], scale: int, theta: Optional[float]) -> tuple[float, torch.Tensor]:
    """(θ used, steps × 3 tensor of the smoothed σ², μ², gain after each step) of ``GradientStatistics``."""
    statistics = GradientStatistics(scale, theta)
    trace = []
    for sample in samples:
        statistics.update(sample)
        trace.append((statistics.sigma_sq, statistics.mu_sq, statistics.gain))
    return statistics.smoothing, torch.tensor(trace, dtype=torch.float64)


def statistics_rows(source: GradientSource, scale: int, thetas: tuple[Optional[float], ...], steps: int,
                    seed: int = 0) -> list[StatisticsRow]:
    """One row per θ (None: the default), every θ fed the same simulated steps."""
    samples = simulated_samples(source, scale, steps, seed)
    truth = source.truth()
    rows = []
    for theta in thetas:
        used, trace = smoothed_trace(samples, scale, theta)
        kept = trace[steps // 2:]
        rows.append(StatisticsRow(source.name, scale, used, theta is None, truth.gain(scale),
                                  accuracy(kept[:, 0], truth.sigma_sq), accuracy(kept[:, 1], truth.mu_sq),
                                  accuracy(kept[:, 2], truth.gain(scale)), float((kept[:, 2] == scale).double().mean())))
    return rows
