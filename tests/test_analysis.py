"""raykd.analysis: tables against direct pandas computations, real figures, the report CLI.

`assert_report_matches(DIR)` checks any sweep folder (a smoke sweep's output
included): the paper table and KD gain against pandas/numpy computed here on
results.parquet, and report.md with its figures.
"""
import json
import subprocess
import sys
from pathlib import Path

import matplotlib.colors
import matplotlib.image
import numpy as np
import pandas as pd
import pytest
import scipy.stats

from analysis.report import main as report_main
from raykd.analysis import (
    above_chance,
    format_above_chance,
    STRATEGY_COLOURS,
    control_table,
    format_table,
    kd_gain,
    linked_figures,
    load_curves,
    load_results,
    paper_table,
    plot_glue_vs_budget,
    pretraining_gain,
    plot_tokens_and_passes,
    task_columns,
    write_report,
)

REPO = Path(__file__).resolve().parent.parent
TASKS = ["syn_cola", "syn_topic", "syn_para", "syn_nli", "syn_sts"]
CELL_AND_STRATEGY = ["budget_unit", "budget", "repetition", "strategy"]
# FLOPs per token relative to scratch: KD strategies pay for the teacher's forward.
COST = {"scratch": 1.0, "vanilla_kd": 1.6, "tinybert": 1.7, "minilm": 1.5}
EFFECT = {"scratch": 0.0, "vanilla_kd": 0.3, "tinybert": 2.0, "minilm": 2.5}


# ------------------------------------------------------------ a synthetic sweep


CONTROL_LEVEL = {"random_init": 40.0, "teacher": 75.0}


def make_sweep(folder: Path, strategies=tuple(COST), budgets=(2e12, 8e12), repetitions=(1.0, 4.0),
               seeds=(0, 1), rng_seed=0, controls=("random_init", "teacher")) -> Path:
    """Write results.parquet, study.json and curves.parquet shaped like a sweep's output."""
    rng = np.random.default_rng(rng_seed)
    flops_per_token = 6 * 5.5e6
    results, curves = [], []
    for budget in budgets:
        scratch_tokens = int(budget / flops_per_token)
        for repetition in repetitions:
            unique_tokens = int(scratch_tokens / repetition)
            for strategy in strategies:
                for seed in seeds:
                    trial_id = f"{strategy}_b{budget:g}_r{repetition:g}_s{seed}"
                    tokens = int(scratch_tokens / COST[strategy] * rng.uniform(0.99, 1.0))
                    steps = tokens // (32 * 128)
                    scores = {task: float(np.clip(rng.normal(60 + EFFECT[strategy] + 2 * np.log10(budget / 1e12)
                                                             - repetition * (strategy == "scratch"), 3), 0, 100))
                              for task in TASKS}
                    results.append({
                        "trial_id": trial_id, "strategy": strategy, "budget": budget, "budget_unit": "flops",
                        "repetition": repetition, "seed": seed, "flops": tokens * flops_per_token * COST[strategy],
                        "tokens": tokens, "device_seconds": tokens / 5700 * COST[strategy],
                        "unique_tokens": unique_tokens, "epochs": tokens / unique_tokens, "steps": steps,
                        "lr": float(rng.choice([3e-4, 5e-4, 1e-3])), "lr_source": "tuned",
                        "mlm_val_loss": float(rng.uniform(3, 5)),
                        "kd_loss": float("nan") if strategy == "scratch" else float(rng.uniform(0.5, 2)),
                        **scores, "glue_score": float(np.mean(list(scores.values()))),
                        "checkpoint": str(folder / "checkpoints" / trial_id), "wall_seconds": float(rng.uniform(30, 90)),
                    })
                    for step in range(1, 13):
                        fraction = step / 12
                        curves.append({
                            "trial_id": trial_id, "step": step, "flops": budget * fraction,
                            "tokens": int(tokens * fraction), "device_seconds": fraction * 60.0,
                            "budget_fraction": fraction, "lr": 1e-3 * min(fraction / 0.06, (1 - fraction) / 0.94),
                            "loss": 6.0 - 2.0 * fraction + rng.normal(0, 0.05),
                            "mlm_val_loss": 6.2 - 2.0 * fraction + rng.normal(0, 0.05) if step % 4 == 0 else np.nan,
                        })
    for control in controls:
        for seed in seeds:
            scores = {task: float(rng.normal(CONTROL_LEVEL[control], 3)) for task in TASKS}
            results.append({
                "trial_id": f"{control}-s{seed}", "strategy": control, "budget": 0.0 if control == "random_init" else 5e13,
                "budget_unit": "flops", "repetition": float("nan"), "seed": seed, "flops": 0.0, "tokens": 0,
                "device_seconds": 0.0, "unique_tokens": 0, "epochs": 0.0, "steps": 0, "lr": float("nan"),
                "lr_source": "control", "mlm_val_loss": 7.0 if control == "random_init" else 2.5, "kd_loss": float("nan"),
                **scores, "glue_score": float(np.mean(list(scores.values()))), "checkpoint": "", "wall_seconds": 10.0})
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(results).to_parquet(folder / "results.parquet")
    pd.DataFrame(curves).to_parquet(folder / "curves.parquet")
    (folder / "study.json").write_text(json.dumps({
        "tasks": TASKS, "name": "test", "chance": {"syn_cola": 0.0, "syn_topic": 12.5, "syn_para": 58.3, "syn_nli": 50.0, "syn_sts": 0.0},
        "references": {"unigram_entropy": 4.321, "teacher_mlm_val_loss": 2.468}}))
    return folder


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    return make_sweep(tmp_path_factory.mktemp("sweeps") / "grid")


# ------------------------------------------------------------ reusable checks


def _mean_ci(values) -> tuple[float, float]:
    """Mean and the half-width of its 95 % t interval, computed directly."""
    values = np.asarray(values, dtype=float)
    values = values[~np.isnan(values)]
    if len(values) < 2:
        return float(np.mean(values)), float("nan")
    low, high = scipy.stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=scipy.stats.sem(values))
    return float(np.mean(values)), float((high - low) / 2)


GRID = "strategy not in ('random_init', 'teacher')"


def _same(a: float, b: float) -> bool:
    return (np.isnan(a) and np.isnan(b)) or a == pytest.approx(b, rel=1e-9, abs=1e-9)


def check_paper_table(sweep_dir: Path) -> None:
    """paper_table equals per-cell mean and 95 % CI computed directly from results.parquet."""
    raw = pd.read_parquet(sweep_dir / "results.parquet").query(GRID)
    tasks = json.loads((sweep_dir / "study.json").read_text())["tasks"]
    table = paper_table(load_results(sweep_dir))
    cells = raw.groupby(CELL_AND_STRATEGY)
    assert len(table) == cells.ngroups
    for key, frame in cells:
        row = table.loc[key]
        for metric in tasks + ["glue_score"]:
            mean, half = _mean_ci(frame[metric])
            assert _same(row[(metric, "mean")], mean), (key, metric)
            assert _same(row[(metric, "ci95")], half), (key, metric)
        assert row[("n_seeds", "")] == len(frame)
    # Within each cell the strategies read in the study's order.
    order = ["scratch", "vanilla_kd", "tinybert", "minilm"]
    for _, cell in table.reset_index().groupby(["budget_unit", "budget", "repetition"]):
        listed = [str(s) for s in cell["strategy"]]
        assert listed == [s for s in order if s in listed] + sorted(set(listed) - set(order))


def check_kd_gain(sweep_dir: Path) -> None:
    """kd_gain equals the mean paired difference to scratch per cell, with its 95 % CI and verdict."""
    raw = pd.read_parquet(sweep_dir / "results.parquet").query(GRID)
    gain = kd_gain(load_results(sweep_dir)).set_index(CELL_AND_STRATEGY)
    expected_rows = 0
    for key, frame in raw.groupby(["budget_unit", "budget", "repetition"]):
        scratch = frame[frame.strategy == "scratch"]
        for strategy in set(frame.strategy) - {"scratch"}:
            student = frame[frame.strategy == strategy]
            row = gain.loc[(*key, strategy)]
            paired = student.merge(scratch, on="seed", suffixes=("", "_scratch"))
            if len(paired) == len(student) == len(scratch) >= 2:
                mean, half = _mean_ci(paired.glue_score - paired.glue_score_scratch)
                assert _same(row["gain"], mean) and _same(row["gain_ci95"], half)
                assert bool(row["significant"]) == (abs(mean) > half)
            else:
                assert _same(row["gain"], student.glue_score.mean() - scratch.glue_score.mean())
                assert np.isnan(row["gain_ci95"]) and not row["significant"]
            assert row["n_seeds"] == len(student) and row["n_scratch_seeds"] == len(scratch)
            expected_rows += 1
    assert len(gain) == expected_rows


def check_image(path: Path, colours=()) -> None:
    """A real PNG: a sizeable RGB(A) image, not one flat colour, showing each given colour."""
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[2] in (3, 4), image.shape
    assert image.shape[0] > 100 and image.shape[1] > 100, image.shape
    pixels = image[..., :3].reshape(-1, 3)
    assert len(np.unique(pixels, axis=0)) > 10, f"{path} is (nearly) one flat colour"
    for colour in colours:
        rgb = np.array(matplotlib.colors.to_rgb(colour))
        assert (np.abs(pixels - rgb).max(axis=1) < 0.02).any(), f"{path} never shows {colour}"


def check_report(sweep_dir: Path, out: Path | None = None) -> Path:
    """write_report writes report.md linking every figure, each a real image, with the table's numbers."""
    report = write_report(sweep_dir, out)
    assert report == (out or sweep_dir) / "report.md" and report.is_file()
    text = report.read_text()
    study = json.loads((sweep_dir / "study.json").read_text()) if (sweep_dir / "study.json").is_file() else {}
    assert ("study `" in text) == ("name" in study)
    figures = linked_figures(report)
    names = {figure.name for figure in figures}
    expected = {"glue_vs_budget.png", "kd_gain.png", "tokens_and_passes.png"}
    if (sweep_dir / "curves.parquet").is_file():
        expected.add("mlm_curves.png")
    assert names == expected
    assert set(report.parent.joinpath("figures").glob("*.png")) == set(figures)
    for figure in figures:
        check_image(figure)
    # The GLUE column of the table, formatted from a direct computation.
    raw = pd.read_parquet(sweep_dir / "results.parquet")
    for _, frame in raw.query(GRID).groupby(CELL_AND_STRATEGY):
        mean, half = _mean_ci(frame.glue_score)
        assert (f"{mean:.1f}" if np.isnan(half) else f"{mean:.1f} ± {half:.1f}") in text
    for control, frame in raw.query(f"not ({GRID})").groupby("strategy"):
        mean, half = _mean_ci(frame.glue_score)
        assert f"| {control} |" in text and (f"{mean:.1f}" if np.isnan(half) else f"{mean:.1f} ± {half:.1f}") in text
    study = json.loads((sweep_dir / "study.json").read_text())
    for task, level in study.get("chance", {}).items():
        assert task in text.split("## Chance level per task")[1] and f"{level:.1f}" in text
    for value in study.get("references", {}).values():
        assert f"{value:.3f}" in text
    return report


def assert_report_matches(sweep_dir: Path, out: Path | None = None) -> Path:
    """All checks for one sweep folder; returns the report's path."""
    check_paper_table(sweep_dir)
    check_kd_gain(sweep_dir)
    return check_report(sweep_dir, out)


# ------------------------------------------------------------ tests


def test_synthetic_sweep_report_matches_pandas(sweep):
    assert_report_matches(sweep)


def test_figures_show_every_strategy(sweep, tmp_path):
    df = load_results(sweep)
    colours = [STRATEGY_COLOURS[s] for s in COST]
    check_image(plot_glue_vs_budget(df, tmp_path), colours)
    check_image(plot_tokens_and_passes(df, tmp_path), colours)


def test_load_results_adds_sweep_and_tasks(sweep, tmp_path):
    other = make_sweep(tmp_path / "other", strategies=("scratch", "minilm"), seeds=(7,), rng_seed=1)
    df = load_results(sweep, other)
    # 32 trials + 2 controls x 2 seeds; 8 trials + 2 controls x 1 seed
    assert len(df) == 36 + 10
    assert df.groupby("sweep").size().to_dict() == {"grid": 36, "other": 10}
    assert task_columns(df) == TASKS == task_columns(sweep)
    assert load_curves(sweep, other)["sweep"].unique().tolist() == ["grid", "other"]
    # Same trial_id in two sweeps stays two trials.
    assert df.groupby(["sweep", "trial_id"]).ngroups == len(df)


def test_task_columns_without_study_json(tmp_path):
    folder = make_sweep(tmp_path / "no_study", strategies=("scratch",), budgets=(1e12,), repetitions=(1.0,))
    (folder / "study.json").unlink()
    assert task_columns(folder) == TASKS
    assert task_columns(load_results(folder)) == TASKS


def test_kd_gain_hand_checked():
    base = {"budget_unit": "flops", "budget": 1e12, "repetition": 2.0}
    df = pd.DataFrame([
        {**base, "strategy": "scratch", "seed": 0, "glue_score": 50.0},
        {**base, "strategy": "scratch", "seed": 1, "glue_score": 54.0},
        {**base, "strategy": "minilm", "seed": 0, "glue_score": 53.0},
        {**base, "strategy": "minilm", "seed": 1, "glue_score": 55.0},
        {**base, "strategy": "tinybert", "seed": 0, "glue_score": 51.0},
        {**base, "strategy": "tinybert", "seed": 2, "glue_score": 57.0},
    ])
    gain = kd_gain(df).set_index("strategy")
    assert list(gain.index) == ["tinybert", "minilm"]
    # minilm: paired differences 3 and 1 -> mean 2, std sqrt(2), 95 % CI 2 ± t(0.975, 1) * sqrt(2) / sqrt(2)
    # = 2 ± 12.706: contains 0, not significant.
    assert gain.loc["minilm", "gain"] == pytest.approx(2.0)
    assert gain.loc["minilm", "gain_ci95"] == pytest.approx(12.7062047, rel=1e-6)
    assert not gain.loc["minilm", "significant"]
    # tinybert's seeds (0, 2) do not pair with scratch's (0, 1): difference of means, no interval.
    assert gain.loc["tinybert", "gain"] == pytest.approx(2.0)
    assert np.isnan(gain.loc["tinybert", "gain_ci95"]) and not gain.loc["tinybert", "significant"]
    assert gain.loc["minilm", "n_seeds"] == 2 and gain.loc["minilm", "n_scratch_seeds"] == 2


def test_a_gain_whose_interval_excludes_zero_is_significant():
    base = {"budget_unit": "flops", "budget": 1e12, "repetition": 1.0}
    df = pd.DataFrame([{**base, "strategy": strategy, "seed": seed, "glue_score": score}
                       for strategy, scores in (("scratch", (50.0, 52.0, 51.0)), ("minilm", (55.0, 57.5, 56.0)))
                       for seed, score in enumerate(scores)])
    row = kd_gain(df).iloc[0]
    # differences 5, 5.5, 5: mean 5.1667, sd 0.288675, t(0.975, 2) = 4.302653 -> half-width 0.717109
    assert row["gain"] == pytest.approx(5.1666667) and row["gain_ci95"] == pytest.approx(0.717109, rel=1e-5)
    assert row["significant"] and row["ci_low"] > 0


def test_controls_are_tabled_apart_and_paired_against_random_init(sweep):
    df = load_results(sweep)
    assert set(paper_table(df).index.get_level_values("strategy")) == set(COST)
    controls = control_table(df)
    assert list(controls.index) == ["random_init", "teacher"]
    raw = pd.read_parquet(sweep / "results.parquet")
    mean, half = _mean_ci(raw[raw.strategy == "teacher"].glue_score)
    assert _same(controls.loc["teacher", ("glue_score", "mean")], mean)
    assert _same(controls.loc["teacher", ("glue_score", "ci95")], half)
    gain = pretraining_gain(df)
    teacher = gain[gain.strategy == "teacher"].iloc[0]
    random_init = raw[raw.strategy == "random_init"].set_index("seed").glue_score
    difference = raw[raw.strategy == "teacher"].set_index("seed").glue_score - random_init
    assert _same(teacher["gain"], difference.mean()) and _same(teacher["gain_ci95"], _mean_ci(difference)[1])
    assert len(gain) == 1 + len(paper_table(df))


def test_above_chance_needs_the_whole_interval_above_the_chance_level(sweep):
    df = load_results(sweep)
    chance = json.loads((sweep / "study.json").read_text())["chance"]
    table = above_chance(df, chance)
    raw = pd.read_parquet(sweep / "results.parquet")
    checked = 0
    for row in table.itertuples():
        if row.strategy in ("random_init", "teacher"):
            frame = raw[raw.strategy == row.strategy]
        else:
            frame = raw[(raw.strategy == row.strategy) & (raw.budget == row.budget) & (raw.repetition == row.repetition)]
        mean, half = _mean_ci(frame[row.task])
        assert _same(row.mean, mean) and _same(row.ci95, half)
        assert row.above == (not np.isnan(half) and mean - half > chance[row.task])
        checked += 1
    assert checked == len(chance) * (len(paper_table(df)) + 2)
    # Both verdicts occur in the fixture, and a single seed is never above chance.
    assert table.above.any() and not table.above.all()
    one_seed = above_chance(raw[raw.seed == raw.seed.min()], chance)
    assert not one_seed.above.any()
    text = format_above_chance(table)
    for task in chance:
        assert f"| {task} |" in text


def test_format_table_writes_mean_plus_minus_ci():
    df = pd.DataFrame({
        "budget_unit": "tokens", "budget": 1e6, "repetition": 1.0, "strategy": ["minilm", "scratch", "minilm"],
        "seed": [0, 0, 1], "syn_cola": [10.0, 20.0, 14.0], "glue_score": [40.0, 41.25, 44.0],
    })
    text = format_table(paper_table(df, tasks=["syn_cola"]))
    lines = text.splitlines()
    assert lines[0] == "| budget | repetition | strategy | syn_cola | GLUE | seeds |"
    assert lines[2] == "| 1e+06 tokens | 1 | scratch | 20.0 | 41.2 | 1 |"
    # two seeds: half-width = t(0.975, 1) * sd / sqrt(2) = 12.706 * 2.828 / 1.414 = 25.4
    assert lines[3] == "| 1e+06 tokens | 1 | minilm | 12.0 ± 25.4 | 42.0 ± 25.4 | 2 |"


def test_single_budget_repetition_and_seed(tmp_path):
    folder = make_sweep(tmp_path / "tiny", strategies=("scratch", "minilm"), budgets=(1e12,),
                        repetitions=(1.0,), seeds=(3,))
    report = assert_report_matches(folder, out=tmp_path / "report_out")
    scores = report.read_text().split("## Scores")[1].split("## Controls")[0]
    rows = [line for line in scores.splitlines() if line.startswith("| 1e+12")]
    assert len(rows) == 2 and not any("±" in row for row in rows)


def test_report_without_curves_or_scratch(tmp_path):
    folder = make_sweep(tmp_path / "no_scratch", strategies=("vanilla_kd", "tinybert"),
                        budgets=(1e12,), repetitions=(1.0, 2.0))
    (folder / "curves.parquet").unlink()
    report = assert_report_matches(folder)
    assert "No curves.parquet" in report.read_text()
    assert kd_gain(load_results(folder))["gain"].isna().all()


def test_cli_module_and_script(sweep, tmp_path):
    for command, out in ([sys.executable, "-m", "analysis.report", str(sweep)], sweep), \
                        ([sys.executable, "analysis/report.py", str(sweep), "--out", str(tmp_path)], tmp_path):
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        lines = done.stdout.splitlines()
        assert lines[0] == f"report: {(out / 'report.md').resolve()}"
        printed = [Path(line.removeprefix("figure: ")) for line in lines[1:]]
        assert printed == [p.resolve() for p in linked_figures(out / "report.md")] and len(printed) == 4
        assert all(p.is_file() for p in printed)


def test_cli_errors_name_the_folder_or_file(tmp_path, capsys):
    assert report_main([str(tmp_path / "absent")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "absent" in err[0]
    (tmp_path / "empty").mkdir()
    assert report_main([str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(tmp_path / "empty" / "results.parquet") in err[0]


def test_bad_input_names_the_file_or_column(sweep, tmp_path):
    with pytest.raises(FileNotFoundError, match="results.parquet"):
        load_results(tmp_path)
    raw = pd.read_parquet(sweep / "results.parquet")
    broken = tmp_path / "broken"
    broken.mkdir()
    raw.drop(columns="glue_score").to_parquet(broken / "results.parquet")
    with pytest.raises(ValueError, match=r"broken/results\.parquet: missing column 'glue_score'"):
        load_results(broken)
    raw.drop(columns="syn_sts").to_parquet(broken / "results.parquet")
    (broken / "study.json").write_text(json.dumps({"tasks": TASKS}))
    with pytest.raises(ValueError, match="missing column 'syn_sts'"):
        load_results(broken)
    (broken / "study.json").write_text("{not json")
    with pytest.raises(ValueError, match="study.json"):
        load_results(broken)
    (broken / "results.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match="results.parquet"):
        load_results(broken)
    pd.DataFrame({"trial_id": ["a"], "step": [1], "budget_fraction": [0.5]}).to_parquet(broken / "curves.parquet")
    with pytest.raises(ValueError, match=r"curves\.parquet: missing column 'mlm_val_loss'"):
        load_curves(broken)
