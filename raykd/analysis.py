"""Sweep results as pandas DataFrames, the paper's tables, figures and a report.

A sweep folder holds `results.parquet` (one row per pretraining trial),
`study.json` (the study's name, its evaluation tasks and config) and `curves.parquet`
(per-step training curves). Everything here reads only those files, so a
finished sweep can be analysed wherever pandas runs.

A grid cell is (budget_unit, budget, repetition): strategies are compared
within a cell, and seeds are what the means and 95 % confidence intervals run
over (Student's t). Two control rows are no strategy of the grid: `random_init`
(the student never pretrained, a baseline that must lose) and `teacher` (one
that must win); they are fine-tuned with the same grid and seeds.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import scipy.stats
from matplotlib.figure import Figure

from raykd.io import atomic_path, atomic_write_text
from raykd.strategies import STRATEGIES

STRATEGY_ORDER = STRATEGIES  # the registry's order
# One colour per registered strategy, in registry order (scratch grey, the KD strategies after it).
PALETTE = ("tab:gray", "tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink",
           "tab:olive", "tab:cyan")
STRATEGY_COLOURS = dict(zip(STRATEGY_ORDER, PALETTE))
# Reference rows of every study (SPEC §6), shown apart from the grid's strategies.
CONTROLS = ("random_init", "teacher")
CONTROL_COLOURS = {"random_init": "black", "teacher": "tab:purple"}
CONFIDENCE = 0.95
# Used when a sweep folder has no study.json: the embedded synthetic tasks and GLUE.
KNOWN_TASKS = (
    "syn_cola", "syn_topic", "syn_para", "syn_nli", "syn_sts",
    "cola", "sst2", "mrpc", "qqp", "mnli", "qnli", "rte", "stsb",
)
RESULT_COLUMNS = (
    "trial_id", "strategy", "budget", "budget_unit", "repetition", "seed",
    "flops", "tokens", "device_seconds", "unique_tokens", "epochs", "steps",
    "lr", "mlm_val_loss", "glue_score", "checkpoint",
)
CURVE_COLUMNS = ("trial_id", "step", "budget_fraction", "mlm_val_loss")
CELL = ["budget_unit", "budget", "repetition"]

FIGURE_DPI = 120


# ---------------------------------------------------------------- loading


def load_results(*dirs: str | os.PathLike) -> pd.DataFrame:
    """One row per pretraining trial from one or several sweep folders.

    Adds a `sweep` column (the folder's name, or its path where two names
    clash) and records the evaluation tasks in `df.attrs["tasks"]`.
    Raises FileNotFoundError naming a missing results.parquet, and
    ValueError naming a missing column and its file.
    """
    folders = _folders(dirs)
    frames, tasks = [], []
    for folder, sweep in zip(folders, _sweep_names(folders)):
        path = folder / "results.parquet"
        frame = _read_parquet(path, RESULT_COLUMNS)
        sweep_tasks = _study_tasks(folder)
        if sweep_tasks is None:
            sweep_tasks = [task for task in KNOWN_TASKS if task in frame.columns]
        for task in sweep_tasks:
            if task not in frame.columns:
                raise ValueError(f"{path}: missing column {task!r} (a task listed in study.json)")
        frame.insert(0, "sweep", sweep)
        frames.append(frame)
        tasks += [task for task in sweep_tasks if task not in tasks]
    df = pd.concat(frames, ignore_index=True)
    df.attrs["tasks"] = tasks
    return df


def load_curves(*dirs: str | os.PathLike) -> pd.DataFrame:
    """Per-step training curves from one or several sweep folders, with a `sweep` column."""
    folders = _folders(dirs)
    frames = []
    for folder, sweep in zip(folders, _sweep_names(folders)):
        frame = _read_parquet(folder / "curves.parquet", CURVE_COLUMNS)
        frame.insert(0, "sweep", sweep)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def task_columns(source: pd.DataFrame | str | os.PathLike) -> list[str]:
    """The evaluation-task columns of a results DataFrame or a sweep folder.

    Taken from study.json (or the DataFrame's `attrs["tasks"]` set by
    `load_results`); without it, the known task names present as columns.
    """
    if isinstance(source, pd.DataFrame):
        columns = list(source.columns)
        tasks = source.attrs.get("tasks")
    else:
        folder = Path(source)
        tasks = _study_tasks(folder)
        path = folder / "results.parquet"
        if not path.is_file():
            raise FileNotFoundError(f"no results file: {path}")
        columns = pq.read_schema(path).names
    if tasks is None:
        return [task for task in KNOWN_TASKS if task in columns]
    return [task for task in tasks if task in columns]


def _folders(dirs) -> list[Path]:
    if not dirs:
        raise ValueError("no sweep folder given")
    return [Path(d) for d in dirs]


def _sweep_names(folders: list[Path]) -> list[str]:
    names = [folder.resolve().name for folder in folders]
    if len(set(names)) < len(names):
        return [str(folder) for folder in folders]
    return names


def _read_parquet(path: Path, required: tuple[str, ...]) -> pd.DataFrame:
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        frame = pd.read_parquet(path)
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: not a readable Parquet file ({error})") from error
    for column in required:
        if column not in frame.columns:
            raise ValueError(f"{path}: missing column {column!r}")
    if frame.empty:
        raise ValueError(f"{path}: no rows")
    return frame


def _study(folder: Path) -> dict | None:
    """study.json of a sweep folder (None when absent), its task list checked."""
    path = folder / "study.json"
    if not path.is_file():
        return None
    try:
        study = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from error
    tasks = study.get("tasks") if isinstance(study, dict) else None
    if not isinstance(tasks, list) or not all(isinstance(task, str) for task in tasks):
        raise ValueError(f"{path}: 'tasks' must be a list of task column names")
    return study


def _study_tasks(folder: Path) -> list[str] | None:
    study = _study(folder)
    return None if study is None else study["tasks"]


def _require(df: pd.DataFrame, columns: list[str]) -> None:
    for column in columns:
        if column not in df.columns:
            raise ValueError(f"results have no column {column!r}")


def _strategies(values) -> list[str]:
    """Strategies present, in the study's order, then unknown ones alphabetically, then the controls."""
    present = set(values)
    known = [name for name in STRATEGY_ORDER if name in present]
    controls = [name for name in CONTROLS if name in present]
    return known + sorted(present - set(STRATEGY_ORDER) - set(CONTROLS)) + controls


def _ordered(df: pd.DataFrame) -> pd.DataFrame:
    """A copy whose `strategy` sorts in the study's order."""
    df = df.copy()
    df["strategy"] = pd.Categorical(df["strategy"], categories=_strategies(df["strategy"]))
    return df


def _colour(strategy: str) -> str | None:
    return STRATEGY_COLOURS.get(strategy) or CONTROL_COLOURS.get(strategy)


# ---------------------------------------------------------------- tables


def confidence_halfwidth(values) -> float:
    """Half-width of the 95 % confidence interval of the mean of `values` (Student's t); NaN below 2 values."""
    values = np.asarray(values, dtype=float)
    values = values[~np.isnan(values)]
    if len(values) < 2:
        return float("nan")
    quantile = scipy.stats.t.ppf(0.5 + CONFIDENCE / 2, len(values) - 1)
    return float(quantile * values.std(ddof=1) / np.sqrt(len(values)))


def grid_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The pretraining trials of the grid (no control rows)."""
    return df[~df["strategy"].isin(CONTROLS)]


def control_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The `random_init` and `teacher` rows."""
    return df[df["strategy"].isin(CONTROLS)]


def _mean_ci(grouped, metrics: list[str]) -> pd.DataFrame:
    table = grouped[metrics].agg(["mean", confidence_halfwidth])
    table = table.rename(columns={"confidence_halfwidth": "ci95"}, level=1)
    table[("n_seeds", "")] = grouped.size()
    return table


def paper_table(df: pd.DataFrame, tasks: list[str] | None = None) -> pd.DataFrame:
    """The paper's table: mean and 95 % CI over seeds per cell and strategy.

    Index: (budget_unit, budget, repetition, strategy), strategies in the
    study's order; control rows are left out (see `control_table`). Columns:
    (metric, "mean") and (metric, "ci95") — the half-width of the 95 %
    interval, NaN for a single seed — for each task and glue_score, then
    ("n_seeds", "").
    """
    tasks = task_columns(df) if tasks is None else list(tasks)
    metrics = tasks + ["glue_score"]
    _require(df, CELL + ["strategy"] + metrics)
    grouped = _ordered(grid_rows(df)).groupby(CELL + ["strategy"], observed=True, sort=True)
    return _mean_ci(grouped, metrics)


def control_table(df: pd.DataFrame, tasks: list[str] | None = None) -> pd.DataFrame:
    """The controls (`random_init`, `teacher`): mean and 95 % CI over seeds, indexed by strategy."""
    tasks = task_columns(df) if tasks is None else list(tasks)
    metrics = tasks + ["glue_score"]
    _require(df, ["strategy"] + metrics)
    controls = control_rows(df).copy()
    controls["strategy"] = pd.Categorical(controls["strategy"], categories=list(CONTROLS))
    return _mean_ci(controls.groupby("strategy", observed=True, sort=True), metrics)


def paired_difference(student: pd.DataFrame, baseline: pd.DataFrame, metric: str) -> dict:
    """`student` minus `baseline` on `metric`, paired by seed (and sweep).

    Over the seeds both sides have (at least two, each once) the gain is the mean of the per-seed
    differences and `gain_ci95` the half-width of its 95 % interval; otherwise the gain is the
    difference of the means and the interval is unknown (NaN). `significant` is True only when
    the interval excludes 0.
    """
    key = ["sweep", "seed"] if "sweep" in student.columns and "sweep" in baseline.columns else ["seed"]
    student_scores = student.set_index(key)[metric]
    baseline_scores = baseline.set_index(key)[metric]
    common = student_scores.index.intersection(baseline_scores.index)
    paired = len(common) >= 2 and student_scores.index.is_unique and baseline_scores.index.is_unique
    if paired:
        differences = student_scores.loc[common] - baseline_scores.loc[common]
        gain, half = float(differences.mean()), confidence_halfwidth(differences)
    else:
        gain, half = float(student_scores.mean() - baseline_scores.mean()), float("nan")
    significant = bool(not np.isnan(half) and (gain - half > 0 or gain + half < 0))
    return {"gain": gain, "gain_ci95": half, "ci_low": gain - half, "ci_high": gain + half,
            "significant": significant, "n_pairs": len(common) if paired else 0}


GAIN_COLUMNS = ["gain", "gain_ci95", "ci_low", "ci_high", "significant", "n_pairs"]


def kd_gain(df: pd.DataFrame, metric: str = "glue_score") -> pd.DataFrame:
    """Each KD strategy's `metric` minus scratch's in the same cell, paired per seed.

    One row per (budget_unit, budget, repetition, strategy != scratch) with
    the columns of `paired_difference` (gain NaN where the cell has no scratch
    trial), the two means, `n_seeds` and `n_scratch_seeds`. A gain whose 95 %
    interval contains 0 has `significant` False: report it as not significant.
    """
    _require(df, CELL + ["strategy", "seed", metric])
    rows = []
    for cell, frame in grid_rows(df).groupby(CELL, sort=True):
        scratch = frame[frame["strategy"] == "scratch"]
        for strategy in _strategies(frame["strategy"]):
            if strategy == "scratch":
                continue
            student = frame[frame["strategy"] == strategy]
            if scratch.empty:
                difference = {**dict.fromkeys(GAIN_COLUMNS, float("nan")), "significant": False, "n_pairs": 0}
            else:
                difference = paired_difference(student, scratch, metric)
            rows.append({**dict(zip(CELL, cell)), "strategy": strategy, **difference,
                         metric: student[metric].mean(), f"scratch_{metric}": scratch[metric].mean(),
                         "n_seeds": len(student), "n_scratch_seeds": len(scratch)})
    columns = CELL + ["strategy"] + GAIN_COLUMNS + [metric, f"scratch_{metric}", "n_seeds", "n_scratch_seeds"]
    return pd.DataFrame(rows, columns=columns)


def pretraining_gain(df: pd.DataFrame, metric: str = "glue_score") -> pd.DataFrame:
    """Every strategy (per cell) and the teacher against `random_init`, paired per seed.

    What the instrument must show before any KD comparison means something: a
    pretrained student beats the never-pretrained one, and the teacher beats
    both. The teacher's row has no cell (NaN budget and repetition).
    """
    _require(df, ["strategy", "seed", metric])
    columns = CELL + ["strategy"] + GAIN_COLUMNS + [metric, f"random_init_{metric}"]
    baseline = df[df["strategy"] == "random_init"]
    if baseline.empty:
        return pd.DataFrame(columns=columns)
    groups = list(grid_rows(df).groupby(CELL, sort=True))
    groups.append(((None, float("nan"), float("nan")), df[df["strategy"] == "teacher"]))
    rows = []
    for cell, frame in groups:
        for strategy in _strategies(frame["strategy"]):
            student = frame[frame["strategy"] == strategy]
            rows.append({**dict(zip(CELL, cell)), "strategy": strategy,
                         **paired_difference(student, baseline, metric),
                         metric: student[metric].mean(), f"random_init_{metric}": baseline[metric].mean()})
    return pd.DataFrame(rows, columns=columns)


def above_chance(df: pd.DataFrame, chance: dict) -> pd.DataFrame:
    """Per task, each row of the study (a strategy in its cell, or a control) against the task's chance level.

    `chance` is study.json's `chance` ({task: level}). One row per (task, cell, strategy) with the mean,
    the 95 % CI half-width over seeds and `above`: True only when the whole interval lies above the
    chance level. A row with one seed has no interval and is never `above`: as far as the study can
    tell, it sits at chance.
    """
    tasks = [task for task in chance if task in df.columns]
    _require(df, ["strategy"] + tasks)
    frame = df.copy()
    for column in CELL:
        if column not in frame.columns:
            frame[column] = np.nan
    controls = frame["strategy"].isin(CONTROLS)
    frame.loc[controls, CELL] = None  # a control's row is its own, whatever its budget columns say
    rows = []
    for (unit, budget, repetition, strategy), group in _ordered(frame).groupby(
            CELL + ["strategy"], observed=True, sort=True, dropna=False):
        for task in tasks:
            mean, half = float(group[task].mean()), confidence_halfwidth(group[task])
            rows.append({"task": task, "chance": float(chance[task]), "budget_unit": unit, "budget": budget,
                         "repetition": repetition, "strategy": strategy, "mean": mean, "ci95": half,
                         "above": bool(not np.isnan(half) and mean - half > chance[task]), "n_seeds": len(group)})
    return pd.DataFrame(rows, columns=["task", "chance", *CELL, "strategy", "mean", "ci95", "above", "n_seeds"])


def format_above_chance(table: pd.DataFrame) -> str:
    """An `above_chance` table as markdown: per task, which pretrained students and which controls are
    above chance (95 % CI clear of it)."""
    header = ["task", "chance", "pretrained students above chance", "random_init", "teacher"]
    rows = []
    for task, frame in table.groupby("task", sort=False):
        students = frame[~frame["strategy"].isin(CONTROLS)]
        names = [f"{row.strategy}" + (f" ({_budget_label(row.budget, row.budget_unit)}, r{row.repetition:g})"
                                      if students[["budget", "repetition"]].drop_duplicates().shape[0] > 1 else "")
                 for row in students.itertuples() if row.above]
        verdict = {control: ("above" if frame[frame["strategy"] == control]["above"].any() else "at chance")
                   if (frame["strategy"] == control).any() else "–" for control in CONTROLS}
        rows.append([task, _number(frame["chance"].iloc[0], 1),
                     f"all {len(names)}" if names and len(names) == len(students)
                     else f"{len(names)} of {len(students)}" + (f": {', '.join(names)}" if names else ""),
                     verdict["random_init"], verdict["teacher"]])
    return _markdown(header, rows)


def format_table(table: pd.DataFrame, digits: int = 1) -> str:
    """A `paper_table` (or `control_table`) as markdown, each score written "mean ± 95 % CI half-width"."""
    metrics = [name for name in table.columns.get_level_values(0).unique() if name != "n_seeds"]
    cells = table.index.nlevels > 1
    header = (["budget", "repetition"] if cells else []) + ["strategy"] + [_metric_label(m) for m in metrics] + ["seeds"]
    rows = []
    for index, row in table.iterrows():
        scores = [_mean_ci_text(row[(m, "mean")], row[(m, "ci95")], digits) for m in metrics]
        if cells:
            unit, budget, repetition, strategy = index
            label = [_budget_label(budget, unit), f"{repetition:g}", strategy]
        else:
            label = [index]
        rows.append(label + scores + [str(int(row[("n_seeds", "")]))])
    return _markdown(header, rows)


def format_gain(gain: pd.DataFrame, digits: int = 1) -> str:
    """A `kd_gain` or `pretraining_gain` table as markdown: paired gain ± 95 % CI, n.s. where it contains 0."""
    baseline = next(column for column in gain.columns if column.startswith(("scratch_", "random_init_")))
    metric = baseline.split("_", 1)[1] if baseline.startswith("scratch_") else baseline[len("random_init_"):]
    against = "scratch" if baseline.startswith("scratch_") else "random_init"
    header = ["budget", "repetition", "strategy", f"gain over {against}", "95 % CI", "significant",
              _metric_label(metric), f"{against} {_metric_label(metric)}", "paired seeds"]
    rows = []
    for _, row in gain.iterrows():
        cell = ([_budget_label(row.budget, row.budget_unit), f"{row.repetition:g}"]
                if isinstance(row.budget_unit, str) else ["–", "–"])
        interval = "–" if pd.isna(row.gain_ci95) else f"[{row.ci_low:+.{digits}f}, {row.ci_high:+.{digits}f}]"
        verdict = "yes" if row.significant else ("n.s." if not pd.isna(row.gain_ci95) else "n.s. (unpaired)")
        rows.append(cell + [row.strategy, _number(row.gain, digits, signed=True), interval, verdict,
                            _number(row[metric], digits), _number(row[baseline], digits), str(row.n_pairs)])
    return _markdown(header, rows)


def chance_levels(tasks: dict) -> str:
    """Each task's chance level (study.json's `chance`) as one markdown table row."""
    return _markdown(list(tasks), [[_number(value, 1) for value in tasks.values()]])


def _compute_markdown(df: pd.DataFrame) -> str:
    """Budget accounting per cell and strategy (means over seeds)."""
    columns = {
        "tokens": ("tokens seen", "{:.3g}"),
        "unique_tokens": ("unique tokens", "{:.3g}"),
        "epochs": ("passes", "{:.2f}"),
        "steps": ("steps", "{:.0f}"),
        "flops": ("FLOPs", "{:.3g}"),
        "device_seconds": ("device s", "{:.1f}"),
        "lr": ("lr", "{:.2g}"),
        "mlm_val_loss": ("MLM val loss", "{:.3f}"),
    }
    means = _ordered(df).groupby(CELL + ["strategy"], observed=True, sort=True)[list(columns)].mean()
    header = ["budget", "repetition", "strategy"] + [label for label, _ in columns.values()]
    rows = [
        [_budget_label(budget, unit), f"{repetition:g}", strategy]
        + [("–" if pd.isna(row[c]) else fmt.format(row[c])) for c, (_, fmt) in columns.items()]
        for (unit, budget, repetition, strategy), row in means.iterrows()
    ]
    return _markdown(header, rows)


def _metric_label(metric: str) -> str:
    return "GLUE" if metric == "glue_score" else metric


def _budget_label(budget: float, unit: str) -> str:
    return f"{budget:g} {unit}"


def _number(value: float, digits: int, signed: bool = False) -> str:
    if pd.isna(value):
        return "–"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _mean_ci_text(mean: float, half: float, digits: int) -> str:
    text = _number(mean, digits)
    return text if pd.isna(half) or pd.isna(mean) else f"{text} ± {half:.{digits}f}"


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------- figures
# Figures are built on matplotlib's Figure class directly (Agg canvas, no
# pyplot), so importing this module never changes a notebook's backend.


def plot_glue_vs_budget(df: pd.DataFrame, out_dir: str | os.PathLike, metric: str = "glue_score") -> Path:
    """GLUE score (mean ± 95 % CI over seeds) against budget, a line per strategy,
    a panel per repetition (a row per budget unit); log x. Returns the PNG path."""
    _require(df, CELL + ["strategy", metric])
    summary = _cell_summary(df, metric)
    units = sorted(summary["budget_unit"].unique())
    repetitions = sorted(summary["repetition"].unique())
    fig = Figure(figsize=(1.0 + 3.6 * len(repetitions), 0.6 + 3.0 * len(units)), layout="constrained")
    axes = fig.subplots(len(units), len(repetitions), squeeze=False, sharey=True)
    for i, unit in enumerate(units):
        for j, repetition in enumerate(repetitions):
            ax = axes[i][j]
            panel = summary[(summary["budget_unit"] == unit) & (summary["repetition"] == repetition)]
            ax.set_title(f"repetition {repetition:g}")
            if panel.empty:
                _no_data(ax, "no trials")
                continue
            for strategy, line in panel.groupby("strategy", observed=True, sort=True):
                ax.errorbar(line["budget"], line["mean"], yerr=line["ci95"].fillna(0.0), marker="o",
                            capsize=3, label=strategy, color=_colour(strategy))
            for control, score in control_rows(df).groupby("strategy")[metric].mean().items():
                ax.axhline(score, color=_colour(control), linestyle="--", linewidth=1, label=control)
            budgets = sorted(panel["budget"].unique())
            ax.set_xscale("log")
            ax.set_xticks(budgets, labels=[f"{b:g}" for b in budgets])
            ax.minorticks_off()
            ax.set_xlabel(f"budget ({unit})")
        axes[i][0].set_ylabel(f"{_metric_label(metric)} score")
    _legend(fig, axes)
    return _save(fig, Path(out_dir) / "glue_vs_budget.png")


def plot_kd_gain(df: pd.DataFrame, out_dir: str | os.PathLike) -> Path:
    """KD gain over scratch (GLUE points) against repetition, a line per KD
    strategy, a panel per budget; error bars are 95 % CIs of paired per-seed differences. Returns the PNG path."""
    gain = kd_gain(df).dropna(subset=["gain"])
    grid = grid_rows(df)
    cells = sorted(set(zip(grid["budget_unit"], grid["budget"])))
    fig = Figure(figsize=(1.0 + 3.6 * len(cells), 3.4), layout="constrained")
    axes = fig.subplots(1, len(cells), squeeze=False, sharey=True)
    for j, (unit, budget) in enumerate(cells):
        ax = axes[0][j]
        ax.set_title(f"budget {_budget_label(budget, unit)}")
        panel = gain[(gain["budget_unit"] == unit) & (gain["budget"] == budget)]
        if panel.empty:
            _no_data(ax, "no scratch and KD trials\nin the same cell")
            continue
        for strategy in _strategies(panel["strategy"]):
            line = panel[panel["strategy"] == strategy].sort_values("repetition")
            ax.errorbar(line["repetition"], line["gain"], yerr=line["gain_ci95"].fillna(0.0), marker="o",
                        capsize=3, label=strategy, color=_colour(strategy))
        repetitions = sorted(panel["repetition"].unique())
        ax.set_xscale("log", base=2)
        ax.set_xticks(repetitions, labels=[f"{r:g}" for r in repetitions])
        ax.minorticks_off()
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_xlabel("repetition (passes over the pool by scratch)")
    axes[0][0].set_ylabel("GLUE gain over scratch")
    _legend(fig, axes)
    return _save(fig, Path(out_dir) / "kd_gain.png")


def plot_tokens_and_passes(df: pd.DataFrame, out_dir: str | os.PathLike) -> Path:
    """Tokens seen and passes over the unique pool (means over seeds) as
    grouped bars: a group per (budget, repetition), a bar per strategy. Returns the PNG path."""
    _require(df, CELL + ["strategy", "tokens", "epochs"])
    means = (_ordered(grid_rows(df)).groupby(CELL + ["strategy"], observed=True, sort=True)[["tokens", "epochs"]]
             .mean().reset_index())
    groups = sorted(set(zip(means["budget_unit"], means["budget"], means["repetition"])))
    strategies = _strategies(means["strategy"].astype(str))
    width = 0.8 / len(strategies)
    fig = Figure(figsize=(2.0 + 1.1 * len(groups) * max(1, len(strategies) / 3), 5.6), layout="constrained")
    axes = fig.subplots(2, 1, sharex=True, squeeze=False)
    for k, strategy in enumerate(strategies):
        rows = means[means["strategy"] == strategy]
        offsets = {key: i for i, key in enumerate(groups)}
        x = np.array([offsets[key] for key in zip(rows["budget_unit"], rows["budget"], rows["repetition"])])
        x = x + (k - (len(strategies) - 1) / 2) * width
        axes[0][0].bar(x, rows["tokens"], width, label=strategy, color=_colour(strategy))
        axes[1][0].bar(x, rows["epochs"], width, label=strategy, color=_colour(strategy))
    axes[0][0].set_ylabel("tokens seen")
    axes[1][0].set_ylabel("passes (epochs)")
    axes[1][0].set_xticks(range(len(groups)),
                          labels=[f"{_budget_label(b, u)}\nrepetition {r:g}" for u, b, r in groups])
    _legend(fig, axes)
    return _save(fig, Path(out_dir) / "tokens_and_passes.png")


def plot_mlm_curves(curves: pd.DataFrame, df: pd.DataFrame, out_dir: str | os.PathLike) -> Path:
    """MLM validation loss against the fraction of budget spent, a line per
    trial coloured by strategy, a panel per (budget, repetition). Returns the PNG path."""
    key = ["sweep", "trial_id"] if "sweep" in curves.columns and "sweep" in df.columns else ["trial_id"]
    df = grid_rows(df)
    trials = df[key + CELL + ["strategy"]]
    points = curves[key + ["step", "budget_fraction", "mlm_val_loss"]].dropna(subset=["mlm_val_loss"])
    points = points.merge(trials, on=key, how="inner")
    budgets = sorted(set(zip(df["budget_unit"], df["budget"])))
    repetitions = sorted(df["repetition"].unique())
    fig = Figure(figsize=(1.0 + 3.6 * len(repetitions), 0.6 + 3.0 * len(budgets)), layout="constrained")
    axes = fig.subplots(len(budgets), len(repetitions), squeeze=False, sharex=True)
    for i, (unit, budget) in enumerate(budgets):
        for j, repetition in enumerate(repetitions):
            ax = axes[i][j]
            ax.set_title(f"{_budget_label(budget, unit)}, repetition {repetition:g}")
            panel = points[(points["budget_unit"] == unit) & (points["budget"] == budget)
                           & (points["repetition"] == repetition)]
            if panel.empty:
                _no_data(ax, "no MLM evaluations")
                continue
            for _, line in panel.groupby(key, sort=True):
                strategy = line["strategy"].iloc[0]
                line = line.sort_values("step")
                ax.plot(line["budget_fraction"], line["mlm_val_loss"], marker=".",
                        color=_colour(strategy), label=strategy, alpha=0.8)
            ax.set_xlabel("fraction of budget spent")
        axes[i][0].set_ylabel("MLM validation loss")
    _legend(fig, axes)
    return _save(fig, Path(out_dir) / "mlm_curves.png")


def _cell_summary(df: pd.DataFrame, metric: str) -> pd.DataFrame:
    grouped = _ordered(grid_rows(df)).groupby(CELL + ["strategy"], observed=True, sort=True)[metric]
    return grouped.agg(["mean", confidence_halfwidth]).rename(columns={"confidence_halfwidth": "ci95"}).reset_index()


def _no_data(ax, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def _legend(fig: Figure, axes) -> None:
    """One legend for the figure, strategies in the study's order."""
    handles = {}
    for ax in np.ravel(axes):
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    if handles:
        labels = _strategies(handles)
        fig.legend([handles[label] for label in labels], labels, loc="outside right upper")


def _save(fig: Figure, path: Path) -> Path:
    with atomic_path(path) as staging:
        fig.savefig(staging, format="png", dpi=FIGURE_DPI)
    return path


# ---------------------------------------------------------------- report


def write_report(sweep_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Write report.md (tables and figures) for one sweep folder; return its path.

    The report and a `figures/` folder go to `out` (default: the sweep
    folder). Each file is written to a temporary name and renamed, so a
    reader never sees half a report.
    """
    sweep_dir = Path(sweep_dir)
    df = load_results(sweep_dir)
    out = sweep_dir if out is None else Path(out)
    figures_dir = out / "figures"
    figures = {
        "GLUE score against budget": plot_glue_vs_budget(df, figures_dir),
        "KD gain over scratch against repetition": plot_kd_gain(df, figures_dir),
        "Tokens seen and passes over the data": plot_tokens_and_passes(df, figures_dir),
    }
    has_curves = (sweep_dir / "curves.parquet").is_file()
    if has_curves:
        figures["MLM validation loss against budget spent"] = plot_mlm_curves(
            load_curves(sweep_dir), df, figures_dir)
    report = out / "report.md"
    atomic_write_text(report, _report_text(sweep_dir, df, figures, report.parent, has_curves))
    return report


def linked_figures(report: str | os.PathLike) -> list[Path]:
    """The figure files a report.md links to, as paths."""
    report = Path(report)
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report.read_text())
    return [report.parent / link for link in links]


def _report_text(sweep_dir: Path, df: pd.DataFrame, figures: dict[str, Path], report_dir: Path,
                 has_curves: bool) -> str:
    tasks = task_columns(df)
    study = _study(sweep_dir) or {}
    grid = grid_rows(df)
    seeds = sorted(df["seed"].unique())
    lines = [
        f"# raykd report: {df['sweep'].iloc[0]}",
        "",
        f"Source: `{(sweep_dir / 'results.parquet').resolve()}`"
        + (f", study `{study['name']}`" if study.get("name") else "") + ".",
        f"{len(grid)} pretraining trials; strategies {', '.join(_strategies(grid['strategy']))}; "
        f"budgets {', '.join(_budget_label(b, u) for u, b in sorted(set(zip(grid['budget_unit'], grid['budget']))))}; "
        f"repetitions {', '.join(f'{r:g}' for r in sorted(grid['repetition'].unique()))}; "
        f"seeds {', '.join(str(s) for s in seeds)}; controls: "
        f"{', '.join(c for c in CONTROLS if c in set(df['strategy'])) or 'none'}.",
        f"Tasks: {', '.join(tasks) if tasks else 'none'}; GLUE = mean of the task scores (0–100). "
        "± is the half-width of the 95 % confidence interval over seeds (Student's t).",
        "",
    ]
    references = study.get("references") or {}
    if references:
        lines += ["## References", "",
                  "MLM validation loss in nats per masked token: a model that ignores context scores the unigram "
                  "entropy of the masked tokens.", "",
                  _markdown(["unigram entropy", "teacher MLM validation loss"],
                            [[_number(references.get("unigram_entropy"), 3),
                              _number(references.get("teacher_mlm_val_loss"), 3)]]), ""]
    if study.get("chance"):
        lines += ["## Chance level per task", "",
                  "What a constant prediction scores on each dev set (majority-class accuracy, MCC 0, F1 and "
                  "accuracy of the majority answer, correlation 0).", "", chance_levels(study["chance"]), "",
                  "Above chance: the 95 % CI over seeds lies wholly above the task's chance level. A task on which "
                  "no pretrained student is above chance cannot show what pretraining taught.", "",
                  format_above_chance(above_chance(df, study["chance"])), ""]
    lines += [
        "## Scores (mean ± 95 % CI over seeds)",
        "",
        format_table(paper_table(df, tasks)),
        "",
    ]
    if not control_rows(df).empty:
        lines += ["## Controls", "",
                  "`random_init`: the student's architecture with its seed's initial weights, never pretrained "
                  "(must lose). `teacher`: the teacher itself (must win). Same fine-tuning grid and seeds.", "",
                  format_table(control_table(df, tasks)), "",
                  "### Gain over random_init (paired per seed)", "",
                  "If a pretrained student does not beat `random_init`, the study cannot tell pretraining from "
                  "none, and its KD comparisons mean nothing.", "",
                  format_gain(pretraining_gain(df)), ""]
    lines += [
        "## KD gain over scratch",
        "",
        "Gain = the mean of per-seed differences (strategy minus scratch at the same budget, repetition and "
        "seed) with its 95 % confidence interval; a gain whose interval contains 0 is not significant (n.s.).",
        "",
        format_gain(kd_gain(df)),
        "",
        "## Budget accounting (means over seeds)",
        "",
        _compute_markdown(grid),
        "",
        "## Figures",
        "",
    ]
    for title, path in figures.items():
        link = Path(os.path.relpath(path, report_dir)).as_posix()
        lines += [f"### {title}", "", f"![{title}]({link})", ""]
    if not has_curves:
        lines += ["No curves.parquet in the sweep folder: no MLM loss curves.", ""]
    return "\n".join(lines)


