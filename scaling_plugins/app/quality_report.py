"""The quality-at-scale report: from the run folders ``scaling_plugins.app.quality`` wrote, one table per workload
(final validation loss and accuracy as mean ± sample standard deviation over seeds, optimizer steps, steps
and samples relative to S = 1, mean gain), the goal checks, the measured gradient noise scale against where
AdaScale's steps-vs-S curve flattens, the smoothing ablation, AdaScale's training loss against the
reference's in scale-invariant time, and two figures: ``quality.png`` (final validation loss and accuracy
against S, one line per method) and ``quality_steps.png`` (AdaScale's steps against S, with the noise-scale
prediction); where the study ran AdaptiveBatch, its table against AdaScale at fixed S (with wall time), the
adaptive goal checks and ``adaptive_<workload>.png`` (batch size and gain against τ).
"""
from __future__ import annotations

import math
import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from .noise_scale import NoiseScale, batch_size_advice, flattening_scale, run_noise_scale, steps_ratio
from .plots import Run, _finish, _pyplot, load_run, plot_batch
from ..stats import default_smoothing
from .quality import METHODS, REFERENCE
from .training import RUN_FILE
from .workloads import WORKLOADS

CELL = re.compile(r"(?P<method>[A-Za-z]+)-S(?P<scale>\d+)-seed(?P<seed>\d+)$")
ABLATION = re.compile(r"AdaScale-theta(?P<theta>[\d.]+)-S(?P<scale>\d+)-seed(?P<seed>\d+)$")
REPORT_FILE, QUALITY_FIGURE, STEPS_FIGURE = "report.md", "quality.png", "quality_steps.png"
ADASCALE_TOLERANCE, RULE_TOLERANCE = 0.01, 0.02   # the goals: within 1% (AdaScale), 2% (LEGW, AutoWU)


@dataclass(frozen=True)
class Result:
    """One finished cell."""

    workload: str
    method: str
    scale: int
    seed: int
    run: Run


@dataclass(frozen=True)
class Row:
    """One (workload, method, scale) over its seeds."""

    workload: str
    method: str
    scale: int
    seeds: int
    loss: tuple[float, float]                 # mean, sample sd (0 with one seed)
    accuracy: Optional[tuple[float, float]]
    steps: float
    samples: float
    mean_gain: float
    noise: Optional[NoiseScale]               # measured in the seed-0 run (AdaScale at S > 1)
    wall: float                               # mean wall time of the training loop, seconds
    scale_range: tuple[int, int]              # lowest and highest S any seed's steps ran at


def load_results(out: Union[str, Path]) -> list[Result]:
    """Every finished ``<workload>/<method>-S<S>-seed<k>`` run under ``out`` (sweep runs excluded)."""
    results = []
    for info in sorted(Path(out).glob(f"*/*/{RUN_FILE}")):
        match = CELL.match(info.parent.name)
        if match and match["method"] in METHODS:
            results.append(Result(info.parent.parent.name, match["method"], int(match["scale"]), int(match["seed"]),
                                  load_run(info.parent)))
    return results


def _mean_sd(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def aggregate(results: Sequence[Result]) -> list[Row]:
    """Rows sorted by workload, method (in ``METHODS`` order) and scale."""
    groups: dict[tuple[str, str, int], list[Result]] = {}
    for result in results:
        groups.setdefault((result.workload, result.method, result.scale), []).append(result)
    rows = []
    for (workload, method, scale), members in groups.items():
        summaries = [m.run.summary for m in members]
        accuracies = [s["final_val_accuracy"] for s in summaries if s.get("final_val_accuracy") is not None]
        first = min(members, key=lambda m: m.seed)
        ranges = [s.get("scale_range") or (scale, scale) for s in summaries]
        rows.append(Row(workload, method, scale, len(members), _mean_sd([s["final_val_loss"] for s in summaries]),
                        _mean_sd(accuracies) if accuracies else None,
                        statistics.fmean(s["steps"] for s in summaries),
                        statistics.fmean(s["samples"] for s in summaries),
                        statistics.fmean(s["mean_gain"] for s in summaries),
                        run_noise_scale(first.run.steps, WORKLOADS[workload].micro_batch_size),
                        statistics.fmean(s["wall_s"] for s in summaries),
                        (min(low for low, _ in ranges), max(high for _, high in ranges))))
    return sorted(rows, key=lambda r: (r.workload, METHODS.index(r.method), r.scale))


def reference_row(rows: Sequence[Row], workload: str) -> Row:
    (row,) = [r for r in rows if r.workload == workload and r.method == REFERENCE]
    return row


def relative_loss(row: Row, reference: Row) -> float:
    """(loss − reference loss)/reference loss, from the means over seeds."""
    return row.loss[0] / reference.loss[0] - 1


def workload_table(rows: Sequence[Row], workload: str) -> str:
    """The Markdown table of one workload."""
    reference = reference_row(rows, workload)
    lines = ["| method | S | seeds | final val loss | vs S = 1 | val accuracy | steps | steps / S=1 | samples / S=1 "
             "| mean gain |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in (r for r in rows if r.workload == workload):
        accuracy = "–" if row.accuracy is None else f"{100 * row.accuracy[0]:.1f} ± {100 * row.accuracy[1]:.1f}%"
        lines.append(f"| {row.method} | {row.scale} | {row.seeds} | {row.loss[0]:.4f} ± {row.loss[1]:.4f} | "
                     f"{100 * relative_loss(row, reference):+.1f}% | {accuracy} | {row.steps:.0f} | "
                     f"{row.steps / reference.steps:.3f} | {row.samples / reference.samples:.2f} | "
                     f"{row.mean_gain:.2f} |")
    return "\n".join(lines)


def goal_lines(rows: Sequence[Row], workload: str) -> list[str]:
    """The issue's three goals, checked on the means (the reference's own seed spread is quoted beside)."""
    reference = reference_row(rows, workload)
    scaled = [r for r in rows if r.workload == workload and r.scale > 1]
    largest = max((r.scale for r in scaled), default=None)
    lines = [f"- reference (S = 1): val loss {reference.loss[0]:.4f} ± {reference.loss[1]:.4f} "
             f"(seed spread {100 * reference.loss[1] / reference.loss[0]:.1f}% of the mean), "
             f"{reference.steps:.0f} steps"]
    for row in (r for r in scaled if r.method == "AdaScale" and r.scale >= 16):
        delta = relative_loss(row, reference)
        lines.append(f"- AdaScale S = {row.scale}: {100 * delta:+.1f}% val loss vs S = 1 "
                     f"({'within' if delta <= ADASCALE_TOLERANCE else 'NOT within'} 1%), "
                     f"{row.steps:.0f} steps = {row.steps / reference.steps:.3f} × S = 1's, "
                     f"mean gain {row.mean_gain:.2f}")
    for row in (r for r in scaled if r.method == "LinearScaling" and r.scale == largest):
        lines.append(f"- LinearScaling S = {row.scale}: {100 * relative_loss(row, reference):+.1f}% val loss vs S = 1")
    for method in ("LEGW", "AutoWU"):
        deltas = {r.scale: relative_loss(r, reference) for r in scaled if r.method == method}
        if deltas:
            within = [s for s, d in deltas.items() if d <= RULE_TOLERANCE]
            lines.append(f"- {method}: " + ", ".join(f"S = {s} {100 * d:+.1f}%" for s, d in deltas.items())
                         + f" → within 2% at S ∈ {within or 'none'}")
    return lines


TRAJECTORY_FRACTIONS = (0.125, 0.25, 0.5, 1.0)   # of the budget, in scale-invariant progress τ
TRAJECTORY_WINDOW = 0.05


def training_loss_at(run: Run, fraction: float) -> Optional[float]:
    """Mean training loss of the steps whose progress τ lies within ±5% of the budget of ``fraction``·budget."""
    budget = run.spec["budget"]
    window = [r["loss"] for r in run.steps if r.get("loss") is not None and r.get("progress") is not None
              and abs(r["progress"] - fraction * budget) <= TRAJECTORY_WINDOW * budget]
    return statistics.fmean(window) if window else None


def load_ablation(out: Union[str, Path]) -> dict[tuple[str, float, int], list[Run]]:
    """The finished smoothing-ablation runs under ``out``, by (workload, θ, scale)."""
    groups: dict[tuple[str, float, int], list[Run]] = {}
    for info in sorted(Path(out).glob(f"*/*/{RUN_FILE}")):
        match = ABLATION.match(info.parent.name)
        if match:
            key = (info.parent.parent.name, float(match["theta"]), int(match["scale"]))
            groups.setdefault(key, []).append(load_run(info.parent))
    return groups


def smoothing_lines(ablation: dict[tuple[str, float, int], list[Run]], rows: Sequence[Row], workload: str) -> list[str]:
    """AdaScale with other smoothing θ against the default θ (``default_smoothing``) at the same scale."""
    lines = []
    for (name, theta, scale), runs in sorted(ablation.items()):
        default = [r for r in rows if r.workload == name == workload and r.method == "AdaScale" and r.scale == scale]
        if not default:
            continue
        reference = reference_row(rows, workload)
        loss = _mean_sd([run.summary["final_val_loss"] for run in runs])
        lines.append(f"- AdaScale S = {scale}, smoothing θ = {theta:g} (default {default_smoothing(scale):g}), "
                     f"{len(runs)} seed(s): val loss {loss[0]:.4f} ± {loss[1]:.4f} "
                     f"({100 * (loss[0] / reference.loss[0] - 1):+.1f}% "
                     f"vs S = 1; default θ {100 * relative_loss(default[0], reference):+.1f}%), "
                     f"{statistics.fmean(run.summary['steps'] for run in runs):.0f} steps, mean gain "
                     f"{statistics.fmean(run.summary['mean_gain'] for run in runs):.2f}")
    return lines


def trajectory_table(results: Sequence[Result], workload: str) -> str:
    """Does AdaScale follow the reference in scale-invariant time? Training loss at fractions of the budget in
    τ, and the final validation loss, each a mean over seeds: a match in training loss with a gap in validation
    loss points at generalization, a gap in both at the optimization (gain estimate, smoothing, schedule)."""
    groups: dict[int, list[Run]] = {}
    for result in results:
        if result.workload == workload and result.method in (REFERENCE, "AdaScale"):
            groups.setdefault(result.scale, []).append(result.run)
    header = " | ".join(f"train loss at τ = {100 * f:g}%" for f in TRAJECTORY_FRACTIONS)
    lines = [f"| run | {header} | final val loss |", "|---|" + "---:|" * (len(TRAJECTORY_FRACTIONS) + 1)]
    for scale in sorted(groups):
        runs = groups[scale]
        cells = []
        for fraction in TRAJECTORY_FRACTIONS:
            values = [v for v in (training_loss_at(run, fraction) for run in runs) if v is not None]
            cells.append(f"{statistics.fmean(values):.4f}" if values else "–")
        final = statistics.fmean(run.summary["final_val_loss"] for run in runs)
        name = "reference S = 1" if scale == 1 else f"AdaScale S = {scale}"
        lines.append(f"| {name} | {' | '.join(cells)} | {final:.4f} |")
    return "\n".join(lines)


def noise_lines(rows: Sequence[Row], workload: str) -> list[str]:
    """Measured B_simple (AdaScale runs, seed 0) against where AdaScale's steps-vs-S curve flattens."""
    reference = reference_row(rows, workload)
    adascale = [r for r in rows if r.workload == workload and r.method == "AdaScale" and r.scale > 1]
    measured = [r for r in adascale if r.noise is not None]
    if not measured:
        return []
    largest = max(measured, key=lambda r: r.scale)
    lines = [f"- B_simple measured by AdaScale at S = {r.scale}: median {r.noise.median:.0f} samples "
             f"(first 10% of steps {r.noise.early:.0f}, last 10% {r.noise.late:.0f})" for r in measured]
    scales = [1] + [r.scale for r in adascale]
    knee = flattening_scale(scales, [reference.steps] + [r.steps for r in adascale])
    predicted = ", ".join(f"S = {r.scale}: {r.steps / reference.steps:.3f} measured vs "
                          f"{steps_ratio(r.scale, largest.noise.median, largest.noise.base_batch):.3f} predicted"
                          for r in adascale)
    base = largest.noise.base_batch
    lines.append(f"- steps relative to S = 1 ({predicted}, from B_simple at S = {largest.scale})")
    lines.append("- AdaScale's steps-vs-S curve flattens (log-log slope −½) at "
                 + (f"S ≈ {knee:.1f}, i.e. batch ≈ {knee * base:.0f} samples" if knee is not None
                    else f"no measured S (slope steeper than −½ up to S = {scales[-1]})")
                 + f"; B_simple predicts S ≈ {largest.noise.scale:.1f} ({largest.noise.median:.0f} samples)")
    lines.append(f"- advice: {batch_size_advice(largest.noise)}")
    return lines


ADAPTIVE = "AdaptiveBatch"


def adaptive_table(rows: Sequence[Row], workload: str) -> str:
    """AdaptiveBatch against the reference and AdaScale at each fixed S: final validation loss, optimizer steps,
    samples and wall time (means over seeds)."""
    compared = [r for r in rows if r.workload == workload and r.method in (REFERENCE, "AdaScale", ADAPTIVE)]
    reference = reference_row(rows, workload)
    lines = ["| run | S | seeds | final val loss | vs S = 1 | steps | samples | samples / S=1 | wall s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in compared:
        low, high = row.scale_range
        scale = f"{low}–{high}" if row.method == ADAPTIVE else str(row.scale)
        lines.append(f"| {row.method} | {scale} | {row.seeds} | {row.loss[0]:.4f} ± {row.loss[1]:.4f} | "
                     f"{100 * relative_loss(row, reference):+.1f}% | {row.steps:.0f} | {row.samples:.0f} | "
                     f"{row.samples / reference.samples:.2f} | {row.wall:.0f} |")
    return "\n".join(lines)


def adaptive_lines(rows: Sequence[Row], workload: str) -> list[str]:
    """The adaptive study's goal, checked on the means: the quality of AdaScale at its best fixed S (within
    ``ADASCALE_TOLERANCE``), fewer samples than AdaScale at the largest fixed S, fewer optimizer steps than at the
    smallest fixed S > 1."""
    fixed = {r.scale: r for r in rows if r.workload == workload and r.method == "AdaScale" and r.scale > 1}
    lines = []
    for row in (r for r in rows if r.workload == workload and r.method == ADAPTIVE and fixed):
        best = min(fixed.values(), key=lambda r: r.loss[0])
        largest, smallest = fixed[max(fixed)], fixed[min(fixed)]
        delta = row.loss[0] / best.loss[0] - 1
        lines += [f"- AdaptiveBatch (S {row.scale_range[0]}–{row.scale_range[1]}) vs the best fixed S "
                  f"(AdaScale S = {best.scale}): {100 * delta:+.1f}% val loss "
                  f"({'within' if delta <= ADASCALE_TOLERANCE else 'NOT within'} 1%; seed sd "
                  f"{100 * row.loss[1] / row.loss[0]:.1f}% and {100 * best.loss[1] / best.loss[0]:.1f}% of the means)",
                  _fewer_line("samples", row.samples, largest.samples, largest.scale),
                  _fewer_line("optimizer steps", row.steps, smallest.steps, smallest.scale)]
    return lines


def _fewer_line(what: str, mine: float, theirs: float, scale: int) -> str:
    """``- samples: 12923 vs 22784 at S = 32 (fewer, 0.57×)``."""
    return (f"- {what}: {mine:.0f} vs {theirs:.0f} at S = {scale} "
            f"({'fewer' if mine < theirs else 'NOT fewer'}, {mine / theirs:.2f}×)")


def adaptive_figures(results: Sequence[Result], out: Path) -> list[Path]:
    """``adaptive_<workload>.png``: gain, batch size and accumulation steps against τ (``plots.plot_batch``) of the
    seed-0 runs of the reference, AdaScale at each S and AdaptiveBatch, per workload that has an AdaptiveBatch run."""
    paths = []
    for workload in sorted({r.workload for r in results if r.method == ADAPTIVE}):
        runs = [r.run for r in sorted(results, key=lambda r: (METHODS.index(r.method), r.scale))
                if r.workload == workload and r.seed == 0 and r.method in (REFERENCE, "AdaScale", ADAPTIVE)]
        path = out / f"adaptive_{workload}.png"
        plot_batch(runs, path, f"{workload}: batch size and gain against τ (seed 0)")
        paths.append(path)
    return paths


def _scale_axis(ax: Any, scales: Sequence[int], title: str) -> None:
    """A log S axis labelled at the measured scales."""
    ax.set(xscale="log", xlabel="scale S (batch / base batch)", title=title)
    ax.set_xticks(scales, [str(s) for s in scales])
    ax.set_xticks([], minor=True)


LOSS_RATIO_LIMITS = (0.5, 10.0)   # the loss panel's range; worse runs leave the top of the plot


def plot_quality(rows: Sequence[Row], path: Path) -> None:
    """One column per workload, one line per method against S (error bars: sd over seeds): on top the final
    validation loss relative to the S = 1 reference (log axis; the reference's seed band in gray, the 1% and
    2% goals dotted), below the final validation accuracy (the reference dashed, its seed band in gray)."""
    plt = _pyplot()
    workloads = sorted({r.workload for r in rows})
    fig, axes = plt.subplots(2, len(workloads), figsize=(5.5 * len(workloads), 8), squeeze=False)
    for column, workload in enumerate(workloads):
        reference = reference_row(rows, workload)
        scales = sorted({r.scale for r in rows if r.workload == workload})
        for line, metric in enumerate(("loss", "accuracy")):
            ax = axes[line][column]
            unit = reference.loss[0] if metric == "loss" else 1.0   # the loss panel is relative
            ref_mean, ref_sd = (x / unit for x in getattr(reference, metric) or (math.nan, 0.0))
            ax.axhline(ref_mean, color="black", linestyle="--", linewidth=1, label="reference (S = 1)")
            ax.axhspan(ref_mean - ref_sd, ref_mean + ref_sd, color="gray", alpha=0.25)
            if metric == "loss":
                for goal in (1 + ADASCALE_TOLERANCE, 1 + RULE_TOLERANCE):
                    ax.axhline(goal, color="gray", linestyle=":", linewidth=1)
            for method in METHODS[1:]:
                points = [r for r in rows if r.workload == workload and r.method == method and getattr(r, metric)]
                if points:
                    ax.errorbar([r.scale for r in points], [getattr(r, metric)[0] / unit for r in points],
                                yerr=[getattr(r, metric)[1] / unit for r in points], marker="o", markersize=4,
                                capsize=3, label=method)
            if metric == "loss":
                ax.set(yscale="log", ylim=LOSS_RATIO_LIMITS,
                       ylabel="final val loss / reference's  (dotted: +1%, +2%)")
            else:
                low, high = ax.get_ylim()
                ax.set(ylabel="final validation accuracy", ylim=(max(low, 0.0), min(high, 1.02)))
            _scale_axis(ax, scales, workload)
    _finish(fig, axes.flat, path, "Quality at scale: final validation metric against S (base hyperparameters "
                                  "tuned at S = 1)")
    plt.close(fig)


def plot_steps(rows: Sequence[Row], path: Path) -> None:
    """AdaScale's optimizer steps relative to S = 1 against S, with perfect scaling (1/S) and the
    prediction (1 + b/S)/(1 + b) from the B_simple measured at the largest S."""
    plt = _pyplot()
    workloads = sorted({r.workload for r in rows})
    fig, axes = plt.subplots(1, len(workloads), figsize=(5.5 * len(workloads), 4.2), squeeze=False)
    for ax, workload in zip(axes[0], workloads):
        reference = reference_row(rows, workload)
        adascale = [r for r in rows if r.workload == workload and r.method == "AdaScale" and r.scale > 1]
        scales = [1] + [r.scale for r in adascale]
        ax.plot(scales, [1] + [r.steps / reference.steps for r in adascale], marker="o", label="AdaScale (measured)")
        ax.plot(scales, [1 / s for s in scales], linestyle=":", color="gray", label="perfect scaling 1/S")
        measured = [r for r in adascale if r.noise is not None]
        if measured:
            noise = max(measured, key=lambda r: r.scale).noise
            ax.plot(scales, [steps_ratio(s, noise.median, noise.base_batch) for s in scales], linestyle="--",
                    label=f"(1 + b/S)/(1 + b), B_simple = {noise.median:.0f}")
            ax.axvline(noise.scale, color="red", linewidth=1, alpha=0.5, label=f"B_simple: S = {noise.scale:.1f}")
        knee = flattening_scale(scales, [reference.steps] + [r.steps for r in adascale])
        if knee is not None:
            ax.axvline(knee, color="green", linestyle="--", linewidth=1, label=f"measured slope −½: S = {knee:.1f}")
        ax.set(yscale="log", ylabel="optimizer steps / steps at S = 1")
        _scale_axis(ax, scales, workload)
    _finish(fig, axes.flat, path, "AdaScale's steps against S, and the gradient-noise-scale prediction")
    plt.close(fig)


def write_report(out: Union[str, Path], command: str = "") -> Path:
    """Write ``report.md``, ``quality.png`` and ``quality_steps.png`` into ``out``; returns the report's path."""
    out = Path(out)
    results = load_results(out)
    rows = aggregate(results)
    ablation = load_ablation(out)
    if not rows:
        raise FileNotFoundError(f"{out} holds no finished study runs (<workload>/<method>-S<S>-seed<k>/{RUN_FILE})")
    plot_quality(rows, out / QUALITY_FIGURE)
    plot_steps(rows, out / STEPS_FIGURE)
    parts = ["# Quality at scale", ""] + ([f"Command: `{command}`", ""] if command else [])
    adaptive_figures(results, out)
    for workload in sorted({r.workload for r in rows}):
        parts += [f"## {workload}", "", workload_table(rows, workload), "", *goal_lines(rows, workload),
                  *noise_lines(rows, workload), *smoothing_lines(ablation, rows, workload), "",
                  "AdaScale against the reference in scale-invariant time (means over seeds):", "",
                  trajectory_table(results, workload), ""]
        if any(r.workload == workload and r.method == ADAPTIVE for r in rows):
            parts += ["Adaptive batch size (AdaptiveBatch) against AdaScale at fixed S (means over seeds; wall time "
                      "of the training loop, on the ranks of each run):", "", adaptive_table(rows, workload), "",
                      *adaptive_lines(rows, workload), "", f"![batch size against τ](adaptive_{workload}.png)", ""]
    parts += [f"![final validation metric against S]({QUALITY_FIGURE})",
              f"![AdaScale steps against S]({STEPS_FIGURE})", ""]
    path = out / REPORT_FILE
    path.write_text("\n".join(parts))
    return path
