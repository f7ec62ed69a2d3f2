"""Has the training loss stopped decreasing? The Gaussian-process test behind AutoWU.

Kim, Kim, Kim, Lee & Kim, "Automated Learning Rate Scheduler for Large-batch Training" (ICML 2021 AutoML
workshop): during an exponential learning-rate warmup, fit a Gaussian process to the loss history and ask
whether the minimum of the smoothed curve already lies in the past.

One test, on the finite losses ℓ_0..ℓ_{N−1} recorded so far:

- time is normalised to [0, 1] (x_i = i/(N−1)), the losses are standardised (zero mean, unit variance:
  the GP's constant mean is the sample mean);
- ``num_subsamples`` times, a random subsample of at most ``max_points`` points (always keeping the newest)
  is fitted with scikit-learn's ``GaussianProcessRegressor``, kernel c·RBF(ℓ = 0.2, fixed) + white noise
  (c and the noise level learned by maximum marginal likelihood);
- from ``num_draws`` draws of the latent (noise-free) posterior f on a grid of ``GRID_POINTS`` times
  evenly spread over [0, 1] (spacing ≈ lengthscale/20: fine enough for a curve that smooth),
  p = P(min_{x < 1} f(x) < f(1)) — the probability that some earlier point lies below the current one;
- the test is positive when p > ``threshold`` in a strict majority of the subsamples.

It also reports where the smoothed loss is lowest (the argmin of the posterior mean over the subsample's
steps, median over the subsamples), which AutoWU uses to pick the learning rate it restarts from.

Randomness comes only from the ``seed`` passed in, so every rank that feeds the same (all-reduced) losses
and the same seed reaches the same decision.
"""
from __future__ import annotations

import statistics
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np

INSTALL_HINT = "AutoWU's loss test needs scikit-learn: pip install 'scaling_plugins[autowu]' (or scikit-learn)"
LENGTHSCALE = 0.2
MIN_POINTS = 5
GRID_POINTS = 100
AMPLITUDE_BOUNDS, NOISE_BOUNDS = (1e-3, 1e3), (1e-8, 1e1)
INITIAL_HYPERPARAMETERS = (1.0, 0.1)   # (c, noise level) on standardised losses


def require_sklearn() -> None:
    """Raise ``ImportError`` with the install command when scikit-learn is missing."""
    try:
        import sklearn.gaussian_process  # noqa: F401
    except ImportError as err:
        raise ImportError(INSTALL_HINT) from err


@dataclass(frozen=True)
class MinimumTest:
    """Settings of the test (see the module docstring)."""

    threshold: float = 0.95
    max_points: int = 200
    num_subsamples: int = 3
    num_draws: int = 200

    def __post_init__(self) -> None:
        if not 0.5 <= self.threshold < 1:
            raise ValueError(f"threshold must lie in [0.5, 1), got {self.threshold!r}")
        if not (isinstance(self.max_points, int) and self.max_points >= 10):
            raise ValueError(f"max_points must be an int >= 10, got {self.max_points!r}")
        if not (isinstance(self.num_subsamples, int) and self.num_subsamples >= 1):
            raise ValueError(f"num_subsamples must be an int >= 1, got {self.num_subsamples!r}")
        if not (isinstance(self.num_draws, int) and self.num_draws >= 10):
            raise ValueError(f"num_draws must be an int >= 10, got {self.num_draws!r}")


@dataclass(frozen=True)
class TestResult:
    """positive: the minimum has passed; probability: median p over subsamples; minimum_index: where the
    smoothed loss is lowest, as an index into the losses given to :func:`minimum_has_passed`;
    hyperparameters: the fitted (c, noise level) of the first subsample, to start the next test's fit from."""

    positive: bool
    probability: float
    minimum_index: int
    hyperparameters: tuple[float, float] = INITIAL_HYPERPARAMETERS


def minimum_has_passed(losses: Sequence[float], test: MinimumTest, seed: Sequence[int],
                       start: tuple[float, float] = INITIAL_HYPERPARAMETERS) -> TestResult:
    """Run the test on ``losses`` (one per step, oldest first; non-finite entries are left out of the fit).

    The marginal-likelihood fit of (c, noise level) starts from ``start`` — the previous test's result, which
    the loss curve has barely changed since, so the optimiser needs few iterations. Fewer than
    ``MIN_POINTS`` finite losses give a negative result (too little history to smooth).
    """
    values = np.asarray(losses, dtype=np.float64)
    finite = np.flatnonzero(np.isfinite(values))
    if finite.size < MIN_POINTS:
        last = int(finite[-1]) if finite.size else 0
        return TestResult(positive=False, probability=0.0, minimum_index=last, hyperparameters=start)
    rng = np.random.default_rng(list(seed))
    votes, probabilities, minima, fitted = 0, [], [], []
    for _ in range(test.num_subsamples):
        chosen = _subsample(finite, test.max_points, rng)
        probability, minimum, hyperparameters = _fit_and_test(chosen, values[chosen], len(values), test.num_draws,
                                                              int(rng.integers(2**31)), start)
        votes += probability > test.threshold
        probabilities.append(probability)
        minima.append(minimum)
        fitted.append(hyperparameters)
    return TestResult(positive=votes * 2 > test.num_subsamples,
                      probability=float(statistics.median(probabilities)),
                      minimum_index=int(statistics.median_low(minima)), hyperparameters=fitted[0])


def _subsample(indices: np.ndarray, max_points: int, rng: np.random.Generator) -> np.ndarray:
    """At most ``max_points`` of ``indices`` (sorted), always keeping the newest."""
    if indices.size <= max_points:
        return indices
    earlier = rng.choice(indices[:-1], size=max_points - 1, replace=False)
    return np.append(np.sort(earlier), indices[-1])


def _fit_and_test(steps: np.ndarray, losses: np.ndarray, length: int, num_draws: int, draw_seed: int,
                  start: tuple[float, float]) -> tuple[float, int, tuple[float, float]]:
    """(p, step of the posterior mean's minimum, fitted (c, noise level)) for one subsample."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.gaussian_process import GaussianProcessRegressor
    from sklearn.gaussian_process.kernels import RBF, ConstantKernel, WhiteKernel
    from threadpoolctl import threadpool_limits

    x = (steps / max(length - 1, 1)).reshape(-1, 1)
    spread = losses.std()
    y = (losses - losses.mean()) / (spread if spread > 0 else 1.0)
    amplitude, noise = (float(np.clip(v, *bounds)) for v, bounds in zip(start, (AMPLITUDE_BOUNDS, NOISE_BOUNDS)))
    kernel = (ConstantKernel(amplitude, AMPLITUDE_BOUNDS) * RBF(LENGTHSCALE, length_scale_bounds="fixed")
              + WhiteKernel(noise, NOISE_BOUNDS))
    gp = GaussianProcessRegressor(kernel=kernel, normalize_y=False)
    # One BLAS thread: the matrices are at most max_points², threads only contend with training for cores,
    # and a single-threaded factorisation gives every rank the same bits.
    with warnings.catch_warnings(), threadpool_limits(limits=1):
        warnings.simplefilter("ignore", ConvergenceWarning)
        gp.fit(x, y)
        fitted = (float(gp.kernel_.k1.k1.constant_value), float(gp.kernel_.k2.noise_level))
        # The fitted factorisation already accounts for the noise; dropping the white term from kernel_
        # turns predictions at x into the latent curve's posterior (no observation noise on the diagonal).
        gp.kernel_ = gp.kernel_.k1
        mean = gp.predict(x)
        warnings.simplefilter("ignore", RuntimeWarning)  # near-singular latent covariance: harmless here
        grid = np.linspace(0.0, 1.0, GRID_POINTS).reshape(-1, 1)
        draws = gp.sample_y(grid, n_samples=num_draws, random_state=draw_seed)  # shape (GRID_POINTS, draws)
    probability = float(np.mean(draws[:-1].min(axis=0) < draws[-1]))
    return probability, int(steps[int(np.argmin(mean))]), fitted
