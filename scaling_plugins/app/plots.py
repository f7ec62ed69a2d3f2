"""Figures and the comparison table from saved run folders (each with ``run.json``, ``metrics.jsonl`` and
``eval.jsonl``, as ``scaling_plugins.app.training`` writes them).

    runs = load_runs(["runs/20240101-120000"])       # a run folder, or a folder of run folders
    print(comparison_table(runs))
    render(runs, "runs/20240101-120000")             # validation.png, lr_gain.png, progress.png, batch.png, table.md

matplotlib (Agg, no display needed) is imported lazily: ``pip install 'scaling_plugins[plot]'``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

from ..telemetry import EVAL_FILE, METRICS_FILE
from .inputs import InputError, parse_json, parse_jsonl
from .training import RUN_FILE

FIGURES = ("validation.png", "lr_gain.png", "progress.png", "batch.png")
TABLE_FILE = "table.md"


@dataclass
class Run:
    """One saved run: its folder, spec and summary (``run.json``), step records and evaluations."""

    path: Path
    spec: dict[str, Any]
    summary: dict[str, Any]
    steps: list[dict[str, Any]]
    evals: list[dict[str, Any]]

    @property
    def name(self) -> str:
        return self.spec.get("name", self.path.name)

    @property
    def label(self) -> str:
        return f"{self.name} (S={scale_label(self.summary) if 'scale' in self.summary else '?'})"


# What the table, the figures and the advice read from a saved run, and so what a run's files must hold.
SUMMARY_NUMBERS = ("scale", "final_val_loss", "steps", "samples", "wall_s", "mean_gain")   # required numbers
SUMMARY_OPTIONAL_NUMBERS = ("final_val_accuracy", "final_progress")                         # numbers or null
SPEC_OPTIONAL_NUMBERS = ("budget",)
STEP_NUMBERS = ("step", "samples", "loss", "lr", "gain", "sigma_sq", "mu_sq", "noise_scale", "progress", "batch_size",
                "accumulation_steps", "batch_noise_scale")
EVAL_NUMBERS = ("step", "samples", "val_loss", "val_accuracy")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_numbers(record: Mapping[str, Any], keys: Sequence[str], where: str, required: bool = False) -> None:
    """``ValueError`` naming ``where + key`` unless each key holds a number (or, when not ``required``, is absent
    or null)."""
    for key in keys:
        if key not in record:
            if required:
                raise ValueError(f"{where}{key} is missing (a number is required)")
            continue
        value = record[key]
        if not (_is_number(value) or (value is None and not required)):
            raise ValueError(f"{where}{key} must be a number{'' if required else ' or null'}, got {value!r}")


def _section(info: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    """``info[key]``, which must be a JSON object."""
    section = info.get(key)
    if not isinstance(section, Mapping):
        raise ValueError(f'"{key}" must be an object, ' + ("missing" if key not in info else f"got {section!r}"))
    return section


def _read_run_file(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(spec, summary) from a ``run.json``; ``InputError`` naming the file and the bad key."""
    info = parse_json(path)
    try:
        if not isinstance(info, Mapping):
            raise ValueError(f'expected an object {{"spec": ..., "summary": ...}}, got {type(info).__name__}')
        spec, summary = _section(info, "spec"), _section(info, "summary")
        _check_numbers(summary, SUMMARY_NUMBERS, "summary.", required=True)
        _check_numbers(summary, SUMMARY_OPTIONAL_NUMBERS, "summary.")
        _check_numbers(spec, SPEC_OPTIONAL_NUMBERS, "spec.")
        scale_range = summary.get("scale_range", [0, 0])
        if not (isinstance(scale_range, list) and len(scale_range) == 2 and all(map(_is_number, scale_range))):
            raise ValueError(f"summary.scale_range must be [lowest S, highest S], got {scale_range!r}")
        if not isinstance(spec.get("name", ""), str):
            raise ValueError(f"spec.name must be a string, got {spec['name']!r}")
    except ValueError as err:
        raise InputError(path, str(err)) from None
    return dict(spec), dict(summary)


def load_run(path: Union[str, Path]) -> Run:
    """The run saved in ``path``; ``FileNotFoundError`` when it holds no ``run.json``, ``InputError`` (naming the
    file, and the line or key) when one of its files is damaged."""
    path = Path(path)
    info_file = path / RUN_FILE
    if not info_file.exists():
        raise FileNotFoundError(f"{path} is not a run folder (no {RUN_FILE})")
    spec, summary = _read_run_file(info_file)
    steps = parse_jsonl(path / METRICS_FILE, check=lambda record: _check_numbers(record, STEP_NUMBERS, ""))
    evals = parse_jsonl(path / EVAL_FILE, check=lambda record: _check_numbers(record, EVAL_NUMBERS, ""))
    return Run(path=path, spec=spec, summary=summary, steps=steps, evals=evals)


def _run_folders(path: Path) -> tuple[list[Path], list[str]]:
    """(run folders, problems) for a report argument: ``path`` itself when it holds ``run.json``, else its
    sub-folders that do; a sub-folder with step records but no ``run.json`` (an unfinished run) is a problem."""
    if (path / RUN_FILE).exists():
        return [path], []
    if not path.is_dir():
        return [], [f"{path}: " + ("not a folder" if path.exists() else "no such folder")]
    children = sorted(child for child in path.iterdir() if child.is_dir())
    runs = [child for child in children if (child / RUN_FILE).exists()]
    unfinished = [f"{child}: no {RUN_FILE} (an unfinished run?)" for child in children
                  if (child / METRICS_FILE).exists() and not (child / RUN_FILE).exists()]
    if not runs and not unfinished:
        unfinished = [f"{path}: holds no runs (no {RUN_FILE} in it or in its sub-folders)"]
    return runs, unfinished


def load_runs(paths: Iterable[Union[str, Path]], skip: Optional[Callable[[str], None]] = None) -> list[Run]:
    """Runs from run folders and from folders of run folders (inside each: by scale, then name, so the S = 1
    reference comes first as in the demo). A damaged or unfinished run, or an argument that holds none, is passed
    to ``skip`` as a message naming the file (and line or key) and left out; without ``skip`` it raises
    (``InputError``, or ``FileNotFoundError`` for a folder with no runs)."""
    runs: list[Run] = []
    for path in map(Path, paths):
        folders, problems = _run_folders(path)
        loaded: list[Run] = []
        for folder in folders:
            try:
                loaded.append(load_run(folder))
            except InputError as err:
                if skip is None:
                    raise
                problems.append(str(err))
        for problem in problems:
            if skip is None:
                raise FileNotFoundError(problem)
            skip(problem)
        runs.extend(sorted(loaded, key=lambda run: (run.summary["scale"], run.name)))
    return runs


# -- table ------------------------------------------------------------------------------------------------
COLUMNS = ("run", "policy", "S", "val loss", "val acc", "steps", "samples", "wall s", "mean gain")


def scale_label(summary: Mapping[str, Any]) -> str:
    """The run's S, or ``low-high`` where a batch-size controller moved it (``scale_range``)."""
    low, high = summary.get("scale_range") or (summary["scale"], summary["scale"])
    return str(summary["scale"]) if low == high else f"{low}-{high}"


def _row(run: Run) -> list[str]:
    summary = run.summary
    accuracy = summary.get("final_val_accuracy")
    return [run.name, str(run.spec.get("policy", "?")), scale_label(summary), f"{summary['final_val_loss']:.4f}",
            "-" if accuracy is None else f"{100 * accuracy:.1f}%", str(summary["steps"]), str(summary["samples"]),
            f"{summary['wall_s']:.1f}", f"{summary['mean_gain']:.2f}"]


def comparison_table(runs: Sequence[Run]) -> str:
    """A Markdown table (readable as plain text): final validation loss/accuracy, optimizer steps, samples,
    wall time and mean gain, one row per run."""
    rows = [list(COLUMNS)] + [_row(run) for run in runs]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = ["| " + " | ".join(cell.ljust(width) for cell, width in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (width + 2) for width in widths) + "|")
    return "\n".join(lines)


# -- figures ----------------------------------------------------------------------------------------------
def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError("plots need matplotlib: pip install 'scaling_plugins[plot]'") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _series(records: list[dict[str, Any]], x: str, y: str) -> tuple[list[float], list[float]]:
    points = [(r[x], r[y]) for r in records if r.get(x) is not None and r.get(y) is not None]
    return [p[0] for p in points], [p[1] for p in points]


def _finish(fig: Any, axes: Iterable[Any], path: Path, title: str) -> None:
    for ax in axes:
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_validation(runs: Sequence[Run], path: Path, title: str) -> None:
    """Validation loss (log scale) and, where the task has one, accuracy against training samples seen."""
    plt = _pyplot()
    with_accuracy = any(e.get("val_accuracy") is not None for run in runs for e in run.evals)
    fig, axes = plt.subplots(1, 2 if with_accuracy else 1, figsize=(11 if with_accuracy else 6, 4.2), squeeze=False)
    axes = axes[0]
    for run in runs:
        axes[0].plot(*_series(run.evals, "samples", "val_loss"), marker="o", markersize=3, label=run.label)
        if with_accuracy:
            axes[1].plot(*_series(run.evals, "samples", "val_accuracy"), marker="o", markersize=3, label=run.label)
    axes[0].set(xlabel="training samples seen", ylabel="validation loss", yscale="log")
    if with_accuracy:
        axes[1].set(xlabel="training samples seen", ylabel="validation accuracy")
        finals = [e["val_accuracy"] for run in runs for e in run.evals[-1:] if e.get("val_accuracy") is not None]
        if finals:   # zoom on the end of training, where the runs differ
            axes[1].set_ylim(max(0.0, min(finals) - 0.15), min(1.0, max(finals) + 0.02))
    _finish(fig, axes, path, title)
    plt.close(fig)


def plot_lr_gain(runs: Sequence[Run], path: Path, title: str) -> None:
    """Learning rate and gain against optimizer step (log step axis: runs at different S take very
    different numbers of steps)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for run in runs:
        axes[0].plot(*_series(run.steps, "step", "lr"), label=run.label)
        axes[1].plot(*_series(run.steps, "step", "gain"), label=run.label)
    axes[0].set(xlabel="optimizer step", ylabel="learning rate", xscale="log")
    axes[1].set(xlabel="optimizer step", ylabel="gain r  (1 ≤ r ≤ S)", xscale="log")
    _finish(fig, axes, path, title)
    plt.close(fig)


def plot_progress(runs: Sequence[Run], path: Path, title: str) -> None:
    """The policy's progress τ against optimizer step, with the budget as a dashed line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for run in runs:
        ax.plot(*_series(run.steps, "step", "progress"), label=run.label)
    budgets = {run.spec.get("budget") for run in runs} - {None}
    for budget in budgets:
        ax.axhline(budget, color="gray", linestyle="--", linewidth=1)
    ax.set(xlabel="optimizer step", ylabel="progress τ (base-scale steps)", xscale="log", yscale="log")
    _finish(fig, [ax], path, title + ("  (dashed: budget)" if budgets else ""))
    plt.close(fig)


def plot_batch(runs: Sequence[Run], path: Path, title: str) -> None:
    """Against progress τ: the gain, the batch size (samples per step) and the accumulation steps of each step,
    side by side, so a batch-size controller's choices (AdaptiveBatch) show where the gain moved them."""
    plt = _pyplot()
    from matplotlib.ticker import ScalarFormatter

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for run in runs:
        for ax, field in zip(axes, ("gain", "batch_size", "accumulation_steps")):
            ax.plot(*_series(run.steps, "progress", field), label=run.label, drawstyle="steps-post")
    for ax, label in zip(axes, ("gain r", "batch size (samples per step)", "accumulation steps per worker")):
        ax.set(xlabel="progress τ (base-scale steps)", ylabel=label)
    for ax in axes[1:]:
        ax.set_yscale("log", base=2)
        ax.yaxis.set_major_formatter(ScalarFormatter())
    _finish(fig, axes, path, title)
    plt.close(fig)


def render(runs: Sequence[Run], out_dir: Union[str, Path], title: Optional[str] = None) -> list[Path]:
    """Write the figures (``FIGURES``) and ``table.md`` into ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    title = title or _default_title(runs)
    paths = [out_dir / name for name in FIGURES]
    plot_validation(runs, paths[0], title)
    plot_lr_gain(runs, paths[1], title)
    plot_progress(runs, paths[2], title)
    plot_batch(runs, paths[3], title)
    table = out_dir / TABLE_FILE
    table.write_text(f"# {title}\n\n{comparison_table(runs)}\n")
    return paths + [table]


def _default_title(runs: Sequence[Run]) -> str:
    workloads = sorted({str(run.spec.get("workload")) for run in runs})
    backends = sorted({str(run.spec.get("backend")) for run in runs})
    return f"{', '.join(workloads)} on {', '.join(backends)}"
